"""Reference dense Wan2.1-style video DiT and its flow-matching sampler.

This is the plain PyTorch model that osp-compile takes as input and transforms; it is
also the ground truth that the compiled (sparse / parallel / low-precision) model is
compared against.
"""
from .model import WanConfig, WanDiT
from .presets import PRESETS, RESOLUTIONS, build_model, latent_shape, make_inputs, token_grid
from .sampler import euler_step, sample, shifted_sigmas

__all__ = [
    "WanConfig",
    "WanDiT",
    "PRESETS",
    "RESOLUTIONS",
    "build_model",
    "make_inputs",
    "latent_shape",
    "token_grid",
    "shifted_sigmas",
    "euler_step",
    "sample",
]
