"""`osp-compile`: the command line. Each verb lives in `osp_compile/commands/<verb>.py` with
`add_arguments(parser)` and `run(args) -> int`, and is listed in COMMANDS."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("osp_compile.commands.demo", "convert the embedded tiny DiT, check it against the masked dense oracle"),
    "inspect": ("osp_compile.commands.inspect", "show the attention sites, their layouts and the rewritten graph"),
    "train-grpo": ("osp_compile.commands.train_grpo", "Mix-GRPO LoRA training on the tiny DiT with an offline reward"),
    "bench": ("osp_compile.commands.bench", "time one denoising step: dense (eager, Inductor) vs OSP, side by side"),
    "export": ("osp_compile.commands.export", "write the converted model as a standalone module for cpu, cuda or npu"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osp-compile",
        description="Compile a dense video DiT into its OSP-Next form (Skiparse-2D attention, SSP, HiF8).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
