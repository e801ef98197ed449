"""The Flow-GRPO SDE step, its Gaussian log-probability and the KL between two policies' steps.

Pure functions on tensors. t (sigma) runs from 1 (noise) to 0, dt = t_next - t < 0, v is the
predicted velocity. The SDE shares the Euler ODE's marginals, so a sampler may switch between the
two step by step (MixGRPO). Everything is computed in float32 whatever the model's dtype: a
per-element mean of log-densities in bf16 is too coarse for PPO ratios near 1.
"""
from __future__ import annotations

import math

from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sde_sigma(t: float, t_next: float, noise_level: float) -> float:
    """sigma_t = a * sqrt(t / (1 - t)); at t = 1 (where it is infinite) the next grid point
    stands in for t in the denominator, as in Flow-GRPO."""
    denom = 1.0 - (t_next if t >= 1.0 else t)
    return noise_level * math.sqrt(t / denom)


def sde_mean_std(x: Tensor, v: Tensor, t: float, t_next: float, noise_level: float) -> tuple[Tensor, float]:
    """Mean (float32 tensor) and standard deviation (a number) of the transition x_t -> x_next.

    mu = x + [v + sigma_t^2 / (2t) * (x + (1 - t) v)] * dt,  std = sigma_t * sqrt(-dt).
    """
    dt = t_next - t
    sigma = sde_sigma(t, t_next, noise_level)
    x, v = x.float(), v.float()
    mean = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mean, sigma * math.sqrt(-dt)


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: float) -> Tensor:
    """log N(x_next; mean, std^2), averaged over the elements of each sample: [B] float32.

    `x_next` is a sample (no gradient flows into it); the gradient flows through `mean`.
    """
    z = x_next.detach().float() - mean
    return _per_sample_mean(-(z * z) / (2 * std**2) - math.log(std) - _LOG_SQRT_2PI)


def transition_kl(mean: Tensor, mean_ref: Tensor, std: float) -> Tensor:
    """KL between two Gaussian steps of equal std, per element averaged per sample: [B].

    KL = mean (mu_theta - mu_ref)^2 / (2 sigma_t^2 |dt|), with std^2 = sigma_t^2 |dt|.
    """
    d = mean.float() - mean_ref.float()
    return _per_sample_mean(d * d) / (2 * std**2)
