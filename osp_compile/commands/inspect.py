"""`osp-compile inspect`: the attention sites, their layouts, the FLOPs saved, and the rewritten graph;
with --html, the same as one self-contained page with pictures (osp_compile.visualize)."""
from __future__ import annotations

import argparse

import torch.nn as nn

from .common import add_config_arguments, add_model_arguments, config_from_args, load_from_args, make_output_dirs


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--no-code", action="store_true", help="do not print the rewritten graph's code")
    p.add_argument("--json", default=None, help="also write the report as JSON to this path")
    p.add_argument("--html", default=None, help="write one self-contained HTML page with the pictures to this path")
    p.add_argument("--out-dir", default=None, help="write the pictures as SVG files into this folder")
    p.add_argument("--world-size", type=int, default=1,
                   help="S: also colour the tokens by SSP rank (rank r holds subsequences [r*P*P/S, (r+1)*P*P/S))")
    p.add_argument("--sp", choices=["ssp", "ulysses"], default=None,
                   help="with --world-size S: plan SSP and Ulysses for S ranks (nothing runs) and compare their "
                        "collectives and bytes per rank side by side; the page shows the chosen one")
    add_config_arguments(p)


def communication_table(model, inputs, kwargs, config, world: int) -> tuple[str, dict]:
    """SSP and Ulysses for `world` ranks, planned on one process: per site, bytes each rank sends."""
    import torch

    from ..convert import plan
    from ..distributed import PlanningGroup
    from ..report import format_table

    plans = {}
    for mode in ("ssp", "ulysses"):
        torch._dynamo.reset()
        plans[mode] = plan(model, inputs, kwargs, config.replace(sequence_parallel=mode, sp_group=PlanningGroup(world)))
    ssp, uly = plans["ssp"].communication, plans["ulysses"].communication
    layouts = {str(s.index): s.layout for s in plans["ssp"].video_sites}
    rows = []
    for site in sorted(set(ssp["bytes_by_site"]) | set(uly["bytes_by_site"]), key=lambda k: (k == "-", int(k) if k != "-" else 0)):
        a, b = ssp["bytes_by_site"].get(site, 0.0), uly["bytes_by_site"].get(site, 0.0)
        rows.append({"site": site, "layout": layouts.get(site, "(gather)"), "SSP MB/rank": f"{a / 1e6:.2f}",
                     "Ulysses MB/rank": f"{b / 1e6:.2f}", "SSP / Ulysses": f"{a / b:.3f}" if b else "-"})
    rows.append({"site": "total", "layout": "", "SSP MB/rank": f"{ssp['bytes_per_rank_mean'] / 1e6:.2f}",
                 "Ulysses MB/rank": f"{uly['bytes_per_rank_mean'] / 1e6:.2f}",
                 "SSP / Ulysses": f"{ssp['bytes_per_rank_mean'] / uly['bytes_per_rank_mean']:.3f}"})
    text = (f"communication per forward on {world} ranks: SSP {ssp['collectives']}, Ulysses {uly['collectives']}\n"
            + format_table(rows))
    return text, {"ssp": ssp, "ulysses": uly}


def block_count(model: nn.Module) -> int | None:
    """Blocks in the model's top-level ModuleLists (blocks, transformer_blocks, single_transformer_blocks...):
    a bound for the default number of full-attention sites."""
    return sum(len(m) for m in model.children() if isinstance(m, nn.ModuleList)) or None


def run(args: argparse.Namespace) -> int:
    from .. import convert
    from ..visualize.page import write_report
    from ..visualize.tokens import check_world_size

    make_output_dirs((args.json, args.html), (args.out_dir,))
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
    if args.sp and args.world_size > 1:
        text, comm = communication_table(model, inputs, kwargs, config, args.world_size)
        print()
        print(text)
        report.communication = comm[args.sp]
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    if args.html or args.out_dir:
        pictures = write_report(report, config, args.html, args.out_dir, args.world_size,
                                title=f"osp-compile inspect --model {args.model}")
        for where in filter(None, (args.html, args.out_dir and f"{args.out_dir}/ ({len(pictures)} SVG files)")):
            print(f"wrote {where}")
    return 0
