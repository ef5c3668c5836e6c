"""Scenic/Flax checkpoints to PyTorch weights and back (installed as ``tokenlearner_torch.weights_convert``).

* :func:`flax_to_torch` / :func:`torch_to_flax`: a Flax ``params`` tree <-> a state dict, one rule per layer kind.
"""

from .mapping import flax_to_torch, torch_to_flax

__all__ = ["flax_to_torch", "torch_to_flax"]
