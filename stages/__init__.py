"""Training stages (Lightning modules, data, CLI) built on the `qformer` model library."""
