"""The application around the `qformer` model library: the `qformer` command and its rooms.

`train/` the two Lightning stages; `data/` annotation files, images, shards, the feature cache; `eval/` the paper's
evaluations; `apps/` caption, ask, search and the page; `tools/` the commands that convert, cache and export;
`demo/` the whole pipeline on built-in data. `docs/architecture.md` lists every module.
"""
