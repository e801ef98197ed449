"""Arguments several verbs share: which model, which conversion."""
from __future__ import annotations

import argparse
import os

from ..config import NAMED_LAYOUTS, OSPConfig


def parse_latent(text: str) -> tuple[int, int, int]:
    try:
        f, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--latent takes F,H,W (three integers), got {text!r}")
    return f, h, w


def parse_layout(text: str) -> str | list[str]:
    return text if text in NAMED_LAYOUTS else text.split(",")


def add_model_arguments(p: argparse.ArgumentParser, default: str = "tiny") -> None:
    p.add_argument("--model", default=default, help="reference preset (tiny, wan-1.3b, wan-14b), a tiny diffusers "
                   "DiT (diffusers:Wan, diffusers:CogVideoX, diffusers:HunyuanVideo), or module:callable")
    p.add_argument("--resolution", default=None, help="480p, 720p or 768p (81 frames); default: the preset's small video")
    p.add_argument("--latent", type=parse_latent, default=None, help="latent video shape F,H,W instead of --resolution")
    p.add_argument("--layers", type=int, default=None, help="build the preset with this many blocks")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or meta (shapes only: inspect large presets for free)")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparse-ratio", type=int, default=2, help="P: P*P subsequences")
    p.add_argument("--layout", type=parse_layout, default="dual_end",
                   help=f"one of {', '.join(NAMED_LAYOUTS)}, or full/token/group per site, comma-separated")
    p.add_argument("--num-full-blocks", type=int, default=None,
                   help="full-attention sites for dual_end/uniform (None: 8, at most half the sites)")


def config_from_args(args: argparse.Namespace, num_sites_hint: int | None = None) -> OSPConfig:
    full = args.num_full_blocks
    if full is None:
        full = 8 if num_sites_hint is None else min(8, num_sites_hint // 2)
    return OSPConfig(sparse_ratio=args.sparse_ratio, layout=args.layout, num_full_blocks=full)


def load_from_args(args: argparse.Namespace, **overrides):
    """(model, args, kwargs) of `--model`; `overrides` are further options of `models.load` (e.g. dtype)."""
    from ..models import load

    options = {"resolution": args.resolution, "latent": args.latent, "layers": args.layers, "device": args.device}
    return load(args.model, **{k: v for k, v in options.items() if v is not None}, **overrides)


def make_output_dirs(files: tuple[str | None, ...] = (), dirs: tuple[str | None, ...] = ()) -> None:
    """Create the folders the outputs will be written to, before any work: a path that cannot be
    written fails at once, not after the conversion."""
    for folder in [os.path.dirname(f) for f in files if f] + [d for d in dirs if d]:
        if folder:
            os.makedirs(folder, exist_ok=True)
