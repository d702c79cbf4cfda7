"""Pieces of the training loop around the model: how checkpoints are written and when."""
