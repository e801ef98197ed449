"""Models the CLI can name: the reference presets, and `module:callable` for a user's own DiT.

`load(name, ...)` returns (model, args, kwargs) ready for `convert(model, args, kwargs, config)`.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from .errors import OSPConfigError

LoadedModel = tuple[torch.nn.Module, tuple, dict]


def _reference(name: str, *, resolution: str | None = None, latent: tuple | None = None, layers: int | None = None,
               device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    from reference_model import PRESETS, build_model, make_inputs

    cfg = PRESETS[name]
    model = build_model(name, num_layers=layers, device=device, dtype=dtype, seed=seed).eval()
    if resolution is None and latent is None and name == "tiny":
        latent = None  # the preset's default small video
    args, kwargs = make_inputs(cfg, resolution=resolution, latent_shape=latent, device=device, dtype=dtype, seed=seed + 1)
    return model, args, kwargs


def _user_callable(spec: str, **_: Any) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        fn: Callable = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise OSPConfigError(f"cannot load {spec!r}: {exc}. Give 'package.module:function' returning (model, args, kwargs).")
    out = fn()
    if not (isinstance(out, tuple) and len(out) == 3):
        raise OSPConfigError(f"{spec} must return (model, args, kwargs), got {type(out).__name__}")
    return out


def model_names() -> list[str]:
    from reference_model import PRESETS

    return list(PRESETS)


def load(name: str, **options: Any) -> LoadedModel:
    """Build the named model and example inputs. Names: reference presets, or 'module:callable'."""
    if name in model_names():
        return _reference(name, **options)
    if ":" in name and not name.startswith("diffusers:"):
        return _user_callable(name, **options)
    raise OSPConfigError(f"unknown model {name!r}: use one of {', '.join(model_names())}, or 'module:callable'.")
