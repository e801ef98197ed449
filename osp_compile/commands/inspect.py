"""`osp-compile inspect`: the attention sites, their layouts, the FLOPs saved, and the rewritten graph;
with --html, the same as one self-contained page with pictures (osp_compile.visualize)."""
from __future__ import annotations

import argparse

import torch.nn as nn

from .common import add_config_arguments, add_model_arguments, config_from_args, load_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--no-code", action="store_true", help="do not print the rewritten graph's code")
    p.add_argument("--json", default=None, help="also write the report as JSON to this path")
    p.add_argument("--html", default=None, help="write one self-contained HTML page with the pictures to this path")
    p.add_argument("--out-dir", default=None, help="write the pictures as SVG files into this folder")
    p.add_argument("--world-size", type=int, default=1,
                   help="S: also colour the tokens by SSP rank (rank r holds subsequences [r*P*P/S, (r+1)*P*P/S))")
    add_config_arguments(p)


def block_count(model: nn.Module) -> int | None:
    """Blocks in the model's top-level ModuleLists (blocks, transformer_blocks, single_transformer_blocks...):
    a bound for the default number of full-attention sites."""
    return sum(len(m) for m in model.children() if isinstance(m, nn.ModuleList)) or None


def run(args: argparse.Namespace) -> int:
    from .. import convert
    from ..visualize.page import write_report
    from ..visualize.tokens import check_world_size

    model, inputs, kwargs = load_from_args(args)
    config = config_from_args(args, block_count(model))
    check_world_size(config.sparse_ratio, args.world_size)
    converted = convert(model, inputs, kwargs, config)
    report = converted.osp_report
    print(report.sites_table())
    print()
    print(report.passes_text())
    if not args.no_code:
        for i, g in enumerate(report.graphs):
            print(f"\n# ---- rewritten graph {i} ----")
            print(g.code.strip())
    print()
    print(report.summary())
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    if args.html or args.out_dir:
        pictures = write_report(report, config, args.html, args.out_dir, args.world_size,
                                title=f"osp-compile inspect --model {args.model}")
        for where in filter(None, (args.html, args.out_dir and f"{args.out_dir}/ ({len(pictures)} SVG files)")):
            print(f"wrote {where}")
    return 0
