"""Rewards: any callable ``(videos_or_latents [N, ...], prompts: list of N) -> Tensor [N]``.

A real reward model (VideoAlign, an aesthetic scorer, ...) plugs in as such a callable, usually
behind the trainer's `decode` (latents -> pixels). The built-ins below score latents directly and
need no download, so a tiny model can show the trainer raising a reward in minutes on a CPU.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

RewardFn = Callable[[Tensor, Sequence[Any]], Tensor]


class LatentColour:
    """-mean over channels of (channel mean - target)^2, per sample: a "colour" in latent space.

    `target` is one value for every channel, or a sequence repeated over the channels
    ((1, -1) asks channels 0, 2, ... for +1 and 1, 3, ... for -1). The maximum is 0.
    """

    def __init__(self, target: float | Sequence[float] = 1.0) -> None:
        self.target = torch.atleast_1d(torch.as_tensor(target, dtype=torch.float32))

    def __call__(self, samples: Tensor, prompts: Sequence[Any]) -> Tensor:
        channels = samples.shape[1]
        target = self.target.repeat(-(-channels // self.target.numel()))[:channels].to(samples.device)
        means = samples.float().transpose(0, 1).flatten(2).mean(dim=2).T  # [N, C]
        return -((means - target) ** 2).mean(dim=1)


BUILTIN_REWARDS: dict[str, Callable[[], RewardFn]] = {
    "brightness": functools.partial(LatentColour, 1.0),
    "colour": functools.partial(LatentColour, (1.0, -1.0)),
}


def named_rewards(reward_fns: RewardFn | Sequence[RewardFn] | Mapping[str, RewardFn]) -> dict[str, RewardFn]:
    """Reward callables by name: a mapping as given, a sequence or single callable named by type."""
    if isinstance(reward_fns, Mapping):
        named = dict(reward_fns)
    else:
        fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
        named = {}
        for fn in fns:
            base = getattr(fn, "__name__", type(fn).__name__)
            name, i = base, 1
            while name in named:
                i += 1
                name = f"{base}_{i}"
            named[name] = fn
    if not named:
        raise ValueError("at least one reward function is needed")
    return named


def evaluate_rewards(reward_fns: Mapping[str, RewardFn], samples: Tensor, prompts: Sequence[Any]) -> dict[str, Tensor]:
    """Each reward on all samples: name -> float32 [N] (checked, so a bad reward fails here, clearly)."""
    out = {}
    with torch.no_grad():
        for name, fn in reward_fns.items():
            r = torch.as_tensor(fn(samples, prompts)).float().reshape(-1)
            if r.numel() != samples.shape[0]:
                raise ValueError(f"reward {name!r} returned {r.numel()} values for {samples.shape[0]} samples")
            if not torch.isfinite(r).all():
                raise ValueError(f"reward {name!r} returned non-finite values: {r.tolist()}")
            out[name] = r.cpu()
    return out
