"""Commands that prepare data or move models: `cache-features`, `make-shards`, `export`, `import`, `export-hf`, `info`."""
