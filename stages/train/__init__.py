"""Training: the two stages as LightningModules on one shared base, their optimiser, checkpoints and resume."""
