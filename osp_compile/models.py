"""Models the CLI and the tests can name: the reference presets, tiny diffusers DiTs, and
`module:callable` for a user's own DiT.

`load(name, ...)` returns (model, args, kwargs) ready for `convert(model, args, kwargs, config)`.
`load_example(name, ...)` also returns what the masked dense oracle needs to know about the model -
its token grid and, for joint text+video attention, where the video tokens sit in the joined
sequence. Those facts come from how the model is built here, never from the compiler's analysis,
so a test that checks the compiler against the oracle does not grade the analysis by itself.

The diffusers models are built from tiny configs (no download, a second to build): a few blocks,
dims of a few dozen, 5 text tokens, and a default token grid (2, 5, 6) that needs padding for P=2.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import OSPConfigError

LoadedModel = tuple[torch.nn.Module, tuple, dict]

#: latent video (F, H, W) of the tiny diffusers models: token grid (2, 5, 6) with patch (1, 2, 2)
DIFFUSERS_LATENT = (2, 10, 12)
TEXT_LEN = 5


@dataclass
class Example:
    """A model, example inputs, and the geometry the oracle needs."""

    model: torch.nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    grid: tuple[int, int, int] | None = None
    text_len: int = 0  # joint attention: text tokens joined with the video tokens
    video_offset: int = 0  # joint attention: where the video tokens start in the joined sequence

    @property
    def inputs(self) -> LoadedModel:
        return self.model, self.args, self.kwargs


def _reference(name: str, *, resolution: str | None = None, latent: tuple | None = None, layers: int | None = None,
               device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Example:
    from reference_model import PRESETS, build_model, make_inputs, token_grid

    cfg = PRESETS[name]
    model = build_model(name, num_layers=layers, device=device, dtype=dtype, seed=seed).eval()
    args, kwargs = make_inputs(cfg, resolution=resolution, latent_shape=latent, device=device, dtype=dtype, seed=seed + 1)
    return Example(model, args, kwargs, grid=token_grid(cfg, tuple(args[0].shape[2:])))


def patch_grid(latent: tuple[int, int, int]) -> tuple[int, int, int]:
    """The token grid of a latent video under diffusers' CogVideoX/HunyuanVideo/Wan 1x2x2 patches."""
    f, h, w = latent
    if h % 2 or w % 2:
        raise OSPConfigError(f"latent {latent}: these diffusers models patchify by 2, give an even height and width.")
    return f, h // 2, w // 2


def _diffusers_wan(latent: tuple[int, int, int], layers: int, generator: torch.Generator) -> Example:
    """WanTransformer3DModel: video self-attention, cross-attention to the text."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers, rope_max_seq_len=64,
    )
    kwargs = {"timestep": torch.tensor([437.0]), "encoder_hidden_states": torch.randn(1, TEXT_LEN, 16, generator=generator),
              "return_dict": False}
    return Example(model, (torch.randn(1, 4, *latent, generator=generator),), kwargs, grid=patch_grid(latent))


def _diffusers_cogvideox(latent: tuple[int, int, int], layers: int, generator: torch.Generator) -> Example:
    """CogVideoXTransformer3DModel: joint attention, text first; Conv2d patch embedding on frames folded
    into the batch; RoPE on the video tokens (precomputed as the pipeline does)."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    head_dim = 16  # the smallest that CogVideoX's 3-D RoPE splits into even t/h/w parts
    grid = patch_grid(latent)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=layers, patch_size=2, max_text_seq_length=TEXT_LEN,
        sample_frames=4 * (latent[0] - 1) + 1, sample_height=latent[1], sample_width=latent[2],
        use_rotary_positional_embeddings=True,
    )
    rope = get_3d_rotary_pos_embed(head_dim, crops_coords=((0, 0), grid[1:]), grid_size=grid[1:], temporal_size=grid[0])
    f, h, w = latent
    kwargs = {"encoder_hidden_states": torch.randn(1, TEXT_LEN, 16, generator=generator),
              "timestep": torch.tensor([437]), "image_rotary_emb": rope, "return_dict": False}
    return Example(model, (torch.randn(1, f, 4, h, w, generator=generator),), kwargs, grid=grid,
                   text_len=TEXT_LEN, video_offset=TEXT_LEN)


def _diffusers_hunyuan(latent: tuple[int, int, int], layers: int, generator: torch.Generator) -> Example:
    """HunyuanVideoTransformer3DModel: double-stream blocks (video and text projected apart, joined at the
    attention) then single-stream blocks on the joined sequence, video first; the last 2 text tokens
    are padding, masked by the model's key mask."""
    from diffusers import HunyuanVideoTransformer3DModel

    double = max(1, layers // 2)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=double,
        num_single_layers=max(0, layers - double), num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
        patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 4, 4), guidance_embeds=False,
    )
    text_mask = torch.ones(1, TEXT_LEN)
    text_mask[:, -2:] = 0
    kwargs = {"timestep": torch.tensor([437]), "encoder_hidden_states": torch.randn(1, TEXT_LEN, 16, generator=generator),
              "encoder_attention_mask": text_mask, "pooled_projections": torch.randn(1, 8, generator=generator),
              "return_dict": False}
    return Example(model, (torch.randn(1, 4, *latent, generator=generator),), kwargs, grid=patch_grid(latent),
                   text_len=TEXT_LEN, video_offset=0)


_DIFFUSERS: dict[str, Callable[[tuple, int, torch.Generator], Example]] = {
    "diffusers:Wan": _diffusers_wan,
    "diffusers:CogVideoX": _diffusers_cogvideox,
    "diffusers:HunyuanVideo": _diffusers_hunyuan,
}


def _diffusers(name: str, *, latent: tuple | None = None, layers: int | None = None, device: str = "cpu",
               seed: int = 0, resolution: str | None = None) -> Example:
    if resolution is not None:
        raise OSPConfigError(f"{name} is a tiny test model: give its latent video with --latent F,H,W, not --resolution.")
    if device == "meta":
        raise OSPConfigError(f"{name} is tiny: inspect it on cpu (--device meta is for the large reference presets).")
    torch.manual_seed(seed)
    example = _DIFFUSERS[name](tuple(latent or DIFFUSERS_LATENT), layers or 2, torch.Generator().manual_seed(seed + 1))
    example.model.eval().to(device)
    example.args = tuple(a.to(device) for a in example.args)
    example.kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.kwargs.items()}
    return example


def _user_callable(spec: str, **_: Any) -> Example:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # as `python -m`: a user's module resolves from the current directory
        sys.path.insert(0, os.getcwd())
    try:
        fn: Callable = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise OSPConfigError(f"cannot load {spec!r}: {exc}. Give 'package.module:function' returning (model, args, kwargs).")
    out = fn()
    if not (isinstance(out, tuple) and len(out) == 3):
        raise OSPConfigError(f"{spec} must return (model, args, kwargs), got {type(out).__name__}")
    return Example(*out)


def model_names() -> list[str]:
    from reference_model import PRESETS

    return [*PRESETS, *_DIFFUSERS]


def load_example(name: str, **options: Any) -> Example:
    """Build the named model, example inputs and the oracle's geometry (see the module docstring).

    Names: reference presets (tiny, wan-1.3b, wan-14b), diffusers:Wan, diffusers:CogVideoX,
    diffusers:HunyuanVideo, or 'module:callable' returning (model, args, kwargs)."""
    from reference_model import PRESETS

    if name in PRESETS:
        return _reference(name, **options)
    if name in _DIFFUSERS:
        return _diffusers(name, **options)
    if ":" in name and not name.startswith("diffusers:"):
        return _user_callable(name, **options)
    raise OSPConfigError(f"unknown model {name!r}: use one of {', '.join(model_names())}, or 'module:callable'.")


def load(name: str, **options: Any) -> LoadedModel:
    """(model, args, kwargs) of `load_example`."""
    return load_example(name, **options).inputs
