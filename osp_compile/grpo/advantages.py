"""Group-relative advantages and the PPO-clip policy loss of GRPO.

A group is the G samples of one prompt; the advantage says how much better a sample is than its
group, so no value network is needed.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor


def group_advantages(rewards: Mapping[str, Tensor], weights: Mapping[str, float] | None = None,
                     clip: float = 5.0, eps: float = 1e-4) -> Tensor:
    """Advantages [groups, G] from one or more rewards, each [groups, G].

    Each reward is normalised within its group, A_k = (r_k - mean) / (std + eps) (population
    std, as Flow-GRPO), so rewards of different scales count alike; the advantages are summed
    with `weights` (missing names weigh 1) and clipped to [-clip, clip].
    """
    if not rewards:
        raise ValueError("group_advantages needs at least one reward")
    weights = weights or {}
    total = None
    for name, r in rewards.items():
        r = r.double()
        a = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
        a = weights.get(name, 1.0) * a
        total = a if total is None else total + a
    return total.clamp(-clip, clip).float()


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, Tensor]:
    """PPO-clip loss mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))) and the ratios.

    ratio = exp(logp_new - logp_old) per sample; at the first update after sampling both
    log-probs come from the same weights and inputs, so the ratio is exactly 1.
    """
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio
