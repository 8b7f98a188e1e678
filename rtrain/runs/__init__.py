"""A run on disk: its directory layout, checkpoints, weights loading, locks, comparison and pictures."""
