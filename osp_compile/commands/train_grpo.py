"""`osp-compile train-grpo`: Mix-GRPO LoRA training of the converted tiny DiT with an offline reward."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..grpo.cli import add_train_grpo_arguments

    add_train_grpo_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..grpo.cli import run_train_grpo

    run_train_grpo(args)
    return 0
