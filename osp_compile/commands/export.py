"""`osp-compile export`: the converted model as a standalone Python module for cpu, cuda or npu.

Writes DIR/model.py (imports torch and the target's libraries only) and DIR/parameters.safetensors;
copy DIR to the target machine and ``import model; net = model.load(DIR, device)``. Runs here on the
CPU (the target's libraries are not needed); the module is specialised to the example video's
shapes and dtype.
"""
from __future__ import annotations

import argparse

import torch

from .common import add_config_arguments, add_model_arguments, config_from_args, load_from_args

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_config_arguments(p)
    p.add_argument("--target", required=True, choices=("cpu", "cuda", "npu"), help="device the module is written for")
    p.add_argument("--out", required=True, help="directory for model.py and parameters.safetensors")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype of the reference presets' weights and video (the module is specialised to it)")


def run(args: argparse.Namespace) -> int:
    from ..export import export_model
    from ..report import format_table

    from reference_model import PRESETS

    if args.device != "cpu":
        raise SystemExit("export reads the weights on the CPU: use --device cpu")
    if args.dtype != "float32" and args.model not in PRESETS:
        raise SystemExit(f"--dtype applies to the reference presets ({', '.join(PRESETS)}); export other models "
                         f"in the dtype their loader gives")
    overrides = {"dtype": getattr(torch, args.dtype)} if args.dtype != "float32" else {}
    model, inputs, kwargs = load_from_args(args, **overrides)
    num_blocks = len(getattr(model, "blocks", [])) or None
    result = export_model(model, inputs, kwargs, config_from_args(args, num_blocks), args.target, args.out)
    print(format_table(result.kernels))
    print(f"\nwrote {result.module_path}\n      {result.parameters_path}")
    print(f'run it on the {args.target} machine: import sys; sys.path.insert(0, "{args.out}"); import model; '
          f'net = model.load("{args.out}", "{args.target}")')
    return 0
