"""`osp-compile demo`: the main job on the embedded tiny model, in well under a minute on a CPU.

Converts the tiny reference DiT (dual_end layout, a token grid that needs padding), checks the
converted module against the masked dense oracle (outputs and input gradients), prints the report.
"""
from __future__ import annotations

import argparse
import time

import torch

from .common import add_config_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.set_defaults(num_full_blocks=4)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from .. import OSPConfig, convert
    from ..oracle import masked_oracle, rel_err
    from reference_model import PRESETS, build_model, make_inputs, token_grid

    cfg = PRESETS["tiny"]
    model = build_model("tiny", seed=args.seed)
    inputs, kwargs = make_inputs(cfg, seed=args.seed + 1)
    grid = token_grid(cfg, tuple(inputs[0].shape[2:]))
    config = OSPConfig(sparse_ratio=args.sparse_ratio, layout=args.layout, num_full_blocks=args.num_full_blocks)
    print(f"tiny reference DiT: {cfg.num_layers} blocks, dim {cfg.dim}, token grid (T, H, W) = {grid}")
    start = time.perf_counter()
    converted = convert(model, inputs, kwargs, config)
    print(f"converted in {time.perf_counter() - start:.1f} s\n")
    report = converted.osp_report
    print(report.sites_table())
    print()

    x = inputs[0].clone().requires_grad_(True)
    out = converted(x, **kwargs)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    with masked_oracle(report.layout, grid, config.sparse_ratio):
        ref = model(x, **kwargs)
    (ref * weight).sum().backward()
    err_out, err_grad = rel_err(out.detach(), ref.detach()), rel_err(gx, x.grad)
    ok = err_out <= 1e-5 and err_grad <= 1e-5
    print(f"masked dense oracle: output rel. error {err_out:.2e}, input-gradient rel. error {err_grad:.2e} "
          f"-> {'OK' if ok else 'MISMATCH'}")
    print(report.summary())
    return 0 if ok else 1
