"""``osp-compile train-grpo``: Mix-GRPO with LoRA on a converted reference DiT, offline.

    osp-compile train-grpo --preset tiny --steps 60 --out runs/grpo

builds the reference model, converts it (Skiparse + LoRA adapters), and trains the adapters on
built-in latent-space rewards (no download) for random text contexts. It writes to --out:
``metrics.jsonl`` (one line per iteration), ``reward.png`` (the curve), ``checkpoint.pt``
(resumable with --resume), ``adapters.safetensors`` and ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm.auto import tqdm

from osp_compile.commands.common import add_config_arguments, config_from_args, parse_latent
from osp_compile.convert import convert
from reference_model import PRESETS, build_model, make_inputs
from .config import WINDOW_SCHEDULES, MixGRPOConfig
from .lora import save_adapters
from .plot import save_curve_png
from .rewards import BUILTIN_REWARDS, RewardFn
from .trainer import MixGRPOTrainer


def add_train_grpo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``train-grpo``; defaults train the tiny preset on 2 CPU cores in about a minute."""
    p = parser
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="reference model size")
    p.add_argument("--layers", type=int, default=2, help="build the preset with this many blocks")
    p.add_argument("--latent", type=parse_latent, default=(2, 8, 8), help="latent video shape F,H,W")
    p.add_argument("--steps", type=int, default=60, help="GRPO iterations")
    p.add_argument("--out", required=True, help="output directory")
    add_config_arguments(p)
    p.set_defaults(num_full_blocks=1)
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt (G)")
    p.add_argument("--groups", type=int, default=2, help="prompt groups per iteration (per rank)")
    p.add_argument("--num-prompts", type=int, default=8, help="size of the random text-context bank")
    p.add_argument("--sampling-steps", type=int, default=8, help="sampler steps T")
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--window-size", type=int, default=4)
    p.add_argument("--window-start", type=int, default=0)
    p.add_argument("--window-schedule", default="fixed_prefix", choices=WINDOW_SCHEDULES)
    p.add_argument("--iters-per-shift", type=int, default=25)
    p.add_argument("--noise-level", type=float, default=0.7)
    p.add_argument("--clip-range", type=float, default=5e-3)
    p.add_argument("--kl-beta", type=float, default=0.004)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--reward", action="append", metavar="NAME[:WEIGHT]",
                   help=f"built-in reward, repeatable: {', '.join(BUILTIN_REWARDS)}; none given: brightness")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def _parse_rewards(specs: list[str] | None) -> tuple[dict[str, RewardFn], dict[str, float]]:
    fns, weights = {}, {}
    for spec in specs or ["brightness"]:
        name, _, weight = spec.partition(":")
        if name not in BUILTIN_REWARDS:
            raise SystemExit(f"unknown reward {name!r}: use one of {', '.join(BUILTIN_REWARDS)}")
        fns[name] = BUILTIN_REWARDS[name]()
        weights[name] = float(weight) if weight else 1.0
    return fns, weights


def _check_counts(args: argparse.Namespace) -> None:
    """The run's sizes, checked before anything is built (so nothing is written for a bad call)."""
    if args.steps < 1:
        raise SystemExit(f"--steps {args.steps}: need at least 1 GRPO iteration")
    if args.lora_rank < 1:
        raise SystemExit(f"--lora-rank {args.lora_rank}: train-grpo trains LoRA adapters, their rank must be >= 1 "
                         "(full fine-tuning: use osp_compile.grpo.MixGRPOTrainer on a model without adapters)")
    if not 1 <= args.groups <= args.num_prompts:
        raise SystemExit(f"--groups {args.groups}: each iteration draws that many distinct prompts from the "
                         f"--num-prompts {args.num_prompts} bank, so it must be in [1, {args.num_prompts}]")


def run_train_grpo(args: argparse.Namespace) -> dict:
    """Run ``train-grpo`` with parsed arguments; returns the summary it also writes to summary.json."""
    _check_counts(args)
    os.makedirs(args.out, exist_ok=True)
    reward_fns, weights = _parse_rewards(args.reward)
    model = build_model(args.preset, num_layers=args.layers, seed=args.seed)
    mcfg = model.config
    example_args, example_kwargs = make_inputs(mcfg, batch=args.group_size, latent_shape=args.latent)
    osp_config = config_from_args(args, num_sites_hint=args.layers).replace(
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    osp = convert(model, example_args, example_kwargs, osp_config)
    config = MixGRPOConfig(
        latent_shape=(mcfg.in_channels, *args.latent), group_size=args.group_size, num_steps=args.sampling_steps, shift=args.shift,
        window_size=args.window_size, window_start=args.window_start, window_schedule=args.window_schedule,
        iters_per_shift=args.iters_per_shift, noise_level=args.noise_level, clip_range=args.clip_range,
        kl_beta=args.kl_beta, lr=args.lr, max_grad_norm=args.max_grad_norm, seed=args.seed,
        reward_weights=weights,
    )
    trainer = MixGRPOTrainer(osp, reward_fns, config)
    if args.resume:
        trainer.load_checkpoint(args.resume)
    bank = torch.randn(args.num_prompts, mcfg.text_len, mcfg.text_dim, generator=torch.Generator().manual_seed(args.seed))

    log_path = os.path.join(args.out, "metrics.jsonl")
    rewards: list[float] = []
    start = time.perf_counter()
    with open(log_path, "a" if args.resume else "w") as log:
        bar = tqdm(range(trainer.iteration, trainer.iteration + args.steps), desc="train-grpo",
                   disable=args.no_progress)
        for it in bar:
            pick = torch.randperm(args.num_prompts, generator=torch.Generator().manual_seed(args.seed * 100_003 + it))
            metrics = trainer.step(bank[pick[:args.groups]])
            rewards.append(metrics["reward_mean"])
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            bar.set_postfix(reward=f"{metrics['reward_mean']:.4f}", kl=f"{metrics['kl']:.2e}")
    wall = time.perf_counter() - start

    trainer.save_checkpoint(os.path.join(args.out, "checkpoint.pt"))
    save_adapters(osp, os.path.join(args.out, "adapters.safetensors"))
    plot_path = os.path.join(args.out, "reward.png")
    renderer = save_curve_png(plot_path, rewards)
    k = max(1, min(5, len(rewards) // 4))
    summary = {
        "iterations": len(rewards),
        "reward_start": sum(rewards[:k]) / k,  # mean over the first k iterations
        "reward_end": sum(rewards[-k:]) / k,
        "averaged_over": k,
        "wall_s": wall,
        "plot": plot_path,
        "plot_renderer": renderer,
        "metrics": log_path,
        "report": osp.osp_report.passes_text(),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"mean reward {summary['reward_start']:.4f} -> {summary['reward_end']:.4f} (first/last {k} iterations) "
          f"in {wall:.1f}s; curve: {plot_path} ({renderer}), log: {log_path}")
    return summary
