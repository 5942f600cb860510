"""Evaluation as the paper reports it: `qformer eval retrieval | caption | vqa`, one process or several."""
