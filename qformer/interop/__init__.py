"""Bridges to LAVIS and transformers: `names` maps weight names, `lavis` and `hf` convert whole models."""
