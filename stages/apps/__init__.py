"""What a user runs on a trained model: `caption`, `ask`, `index`, `search` and the `serve` page. No training code."""
