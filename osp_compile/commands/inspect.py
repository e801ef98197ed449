"""`osp-compile inspect`: the attention sites, their layouts, the FLOPs saved, and the rewritten graph."""
from __future__ import annotations

import argparse

from .common import add_config_arguments, add_model_arguments, config_from_args, load_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_config_arguments(p)
    p.add_argument("--no-code", action="store_true", help="do not print the rewritten graph's code")
    p.add_argument("--json", default=None, help="also write the report as JSON to this path")


def run(args: argparse.Namespace) -> int:
    from .. import convert

    model, inputs, kwargs = load_from_args(args)
    num_blocks = len(getattr(model, "blocks", [])) or None
    converted = convert(model, inputs, kwargs, config_from_args(args, num_blocks))
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
    return 0
