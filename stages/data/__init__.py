"""Data: annotation files, images read safely, the caption data module, webdataset shards and the feature cache.

Nothing here imports training: the data module hands Lightning what it asks for and no more."""
