"""Scenic/Flax checkpoints to PyTorch weights and back."""
