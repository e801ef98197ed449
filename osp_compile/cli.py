"""`osp-compile`: the command line. Each verb lives in `osp_compile/commands/<verb>.py` with
`add_arguments(parser)` and `run(args) -> int`, and is listed in COMMANDS."""
from __future__ import annotations

import argparse
import importlib
import os
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


TRACEBACK_ENV = "OSP_COMPILE_TRACEBACK"


def main(argv: list[str] | None = None) -> int:
    """Run a verb. What the user asked for that cannot be done (an `OSPError`, a `ValueError` such as
    an unknown resolution, an `OSError` such as a path that cannot be written) is one line on stderr
    and exit status 2, as argparse does for bad arguments; the traceback only with
    ``OSP_COMPILE_TRACEBACK=1``."""
    from .errors import OSPError

    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except (OSPError, ValueError, OSError) as exc:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"osp-compile {args.command}: error: {exc}\n(set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
