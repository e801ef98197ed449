"""Flow-matching Euler sampler with Wan's shifted sigma schedule.

Wan is trained with rectified flow: x_sigma = (1 - sigma) * x0 + sigma * noise and the
model predicts the velocity v = noise - x0, so sampling integrates dx/dsigma = v from
sigma = 1 (pure noise) down to sigma = 0 with Euler steps. The "shift" spends more of
the steps at high noise, which matters for large videos. `shifted_sigmas` and
`euler_step` are kept separate so that trainers (e.g. GRPO) can reuse them step by step.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["shifted_sigmas", "euler_step", "sample"]


def shifted_sigmas(num_steps: int, shift: float = 5.0, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """`num_steps + 1` sigmas from 1 to 0: shift*s / (1 + (shift-1)*s) for s = linspace(1, 0)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    sigmas = shift * s / (1 + (shift - 1) * s)
    return sigmas.to(dtype)


def euler_step(x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """One Euler step of dx/dsigma = v from `sigma` to `sigma_next`."""
    return x + (sigma_next - sigma) * v


@torch.no_grad()
def sample(
    model: Callable[..., Tensor],
    noise: Tensor,
    context: Tensor,
    *,
    num_steps: int = 25,
    shift: float = 5.0,
    guidance_scale: float = 1.0,
    negative_context: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Denoise `noise` [B, C, F, Hl, Wl] into a latent video with `num_steps` Euler steps.

    The model is called as ``model(x, t=sigma * 1000, context=...)`` with t of shape [B]
    (float32) and must return the velocity. With ``guidance_scale != 1`` and a
    `negative_context`, classifier-free guidance is applied:
    v = v_neg + guidance_scale * (v_pos - v_neg). The latent is integrated in float32 and
    returned in `noise`'s dtype.
    """
    if guidance_scale != 1.0 and negative_context is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs a negative_context (the unconditional text) to guide "
                         f"against; without guidance use guidance_scale=1.0")
    use_cfg = guidance_scale != 1.0
    sigmas = shifted_sigmas(num_steps, shift).tolist()
    x = noise.float()
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t = torch.full((noise.shape[0],), sigma * 1000.0, dtype=torch.float32, device=noise.device)
        x_in = x.to(noise.dtype)
        v = model(x_in, t=t, context=context).float()
        if use_cfg:
            v_neg = model(x_in, t=t, context=negative_context).float()
            v = v_neg + guidance_scale * (v - v_neg)
        x = euler_step(x, v, sigma, sigma_next)
    return x.to(noise.dtype)
