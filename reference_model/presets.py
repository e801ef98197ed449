"""Named model sizes, video resolutions and random inputs for the reference Wan DiT.

The compiler, its tests and benchmarks all need the same few configurations and the
same shape arithmetic (pixels -> VAE latent -> token grid), so they live here once.
``tiny`` runs in milliseconds on CPU and its default input has a token grid (3, 6, 10)
whose frame count is not a multiple of 2, so it exercises padding in the sparse passes.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .model import WanConfig, WanDiT

__all__ = [
    "PRESETS",
    "RESOLUTIONS",
    "VAE_STRIDE",
    "DEFAULT_LATENT_SHAPE",
    "latent_shape",
    "token_grid",
    "build_model",
    "make_inputs",
]

PRESETS: dict[str, WanConfig] = {
    "tiny": WanConfig(
        dim=64,
        ffn_dim=128,
        num_heads=4,
        num_layers=12,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        text_len=8,
        freq_dim=32,
    ),
    "wan-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}

#: (width, height) in pixels. 768p is the paper's "1360x768 class" at the token grid it states,
#: 21 x 48 x 80 (80,640 tokens, no padding for P = 2): 1280 pixels wide (1360 would give 85 columns).
RESOLUTIONS: dict[str, tuple[int, int]] = {
    "480p": (832, 480),
    "720p": (1280, 720),
    "768p": (1280, 768),
}

#: Wan VAE compression (frames, height, width).
VAE_STRIDE: tuple[int, int, int] = (4, 8, 8)

#: Latent (F, Hl, Wl) used by `make_inputs` when neither a latent shape nor a resolution is given.
DEFAULT_LATENT_SHAPE: tuple[int, int, int] = (3, 12, 20)


def _get_config(preset: str | WanConfig) -> WanConfig:
    if isinstance(preset, WanConfig):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; available presets: {', '.join(PRESETS)}") from None


def latent_shape(resolution: str, frames: int = 81) -> tuple[int, int, int]:
    """VAE latent (F, Hl, Wl) of a `frames`-frame video at `resolution` (e.g. 480p, 81 -> (21, 60, 104))."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}; available: {', '.join(RESOLUTIONS)}")
    if frames < 1 or (frames - 1) % VAE_STRIDE[0]:
        raise ValueError(f"frames must be {VAE_STRIDE[0]}*n + 1 (e.g. 81), got {frames}")
    width, height = RESOLUTIONS[resolution]
    st, sh, sw = VAE_STRIDE
    return 1 + (frames - 1) // st, height // sh, width // sw


def token_grid(cfg: str | WanConfig, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid (T, H, W) after the patch embedding (e.g. 720p latent -> (21, 45, 80))."""
    cfg = _get_config(cfg)
    if any(n % p for n, p in zip(latent_shape, cfg.patch_size)):
        raise ValueError(f"latent shape {tuple(latent_shape)} is not divisible by patch size {cfg.patch_size}")
    return tuple(n // p for n, p in zip(latent_shape, cfg.patch_size))


def build_model(
    preset: str | WanConfig,
    *,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> WanDiT:
    """Build a randomly initialised WanDiT, deterministic in `seed`.

    Weights are always initialised in float32 on CPU (without touching the global RNG)
    and then moved, so the same seed gives the same weights for every dtype and device.
    ``device="meta"`` builds shapes only (no memory, no values): enough to capture and inspect
    the graph of a 14B model on a laptop.
    """
    cfg = _get_config(preset)
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    if str(device) == "meta":
        with torch.device("meta"):
            return WanDiT(cfg).to(dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanDiT(cfg)
    return model.to(device=device, dtype=dtype)


def make_inputs(
    cfg: str | WanConfig,
    *,
    batch: int = 1,
    latent_shape: tuple[int, int, int] | None = None,
    resolution: str | None = None,
    frames: int = 81,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """Random inputs for ``model(*args, **kwargs)``: args = (x,), kwargs = {"t", "context"}.

    x is [batch, in_channels, *latent_shape] standard normal noise, t is [batch] float32 in
    (0, 1000) (timesteps stay float32 whatever `dtype` is), context is [batch, text_len,
    text_dim] standard normal. The latent shape is `latent_shape`, else that of
    `resolution` / `frames`, else DEFAULT_LATENT_SHAPE.
    """
    cfg = _get_config(cfg)
    if latent_shape is not None and resolution is not None:
        raise ValueError("give latent_shape or resolution, not both")
    if latent_shape is None:
        latent_shape = _latent_shape(resolution, frames) if resolution is not None else DEFAULT_LATENT_SHAPE
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *latent_shape, generator=gen)
    t = 1.0 + 998.0 * torch.rand(batch, generator=gen)
    context = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=gen)
    args = (x.to(device=device, dtype=dtype),)
    kwargs = {"t": t.to(device=device), "context": context.to(device=device, dtype=dtype)}
    return args, kwargs


_latent_shape = latent_shape  # `make_inputs` has a parameter of the same name
