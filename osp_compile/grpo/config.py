"""`MixGRPOConfig`: the knobs of Mix-GRPO, and the SDE window each iteration trains.

Defaults are MixGRPO's (arXiv 2507.21802); `MixGRPOConfig.osp_next()` gives OSP-Next's variant
(a fixed SDE prefix, larger clip range, KL to the LoRA-disabled model). See
/work/shared/reference/grpo.md for the facts these follow.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from osp_compile.errors import OSPConfigError

WINDOW_SCHEDULES = ("progressive", "fixed_prefix")


@dataclass
class MixGRPOConfig:
    """Options of one Mix-GRPO run.

    latent_shape: (C, F, H, W) of one sample's latent video (the initial noise).
    group_size: G samples per prompt; they share the initial noise, so differences come from the
        SDE noise and advantages compare like with like.
    num_steps, shift: the flow-matching sampler (T steps on Wan's shifted sigma schedule).
    window_size, window_start, window_stride, iters_per_shift, window_schedule, roll_back: the SDE
        window W = [l, l + w). ``progressive`` (MixGRPO): l = start + stride * (iteration //
        iters_per_shift), capped at T - 2, or with `roll_back` back to start once it would pass T - 2.
        ``fixed_prefix`` (OSP-Next): l = start every iteration (steps start..start+w-1 SDE).
    noise_level: a in sigma_t = a * sqrt(t / (1 - t)).
    clip_range: PPO clip eps; adv_clip: advantages are clipped to +-adv_clip; adv_eps: the
        epsilon added to the group std.
    kl_beta: weight of the KL to the reference (adapters off, or the initial weights); 0 skips
        the reference forward entirely.
    lr, weight_decay, max_grad_norm: AdamW and gradient clipping.
    seed: all sampling noise derives from (seed, iteration, global group index).
    reward_weights: weight per reward name in the advantage sum; missing names weigh 1.
    """

    latent_shape: tuple[int, int, int, int]
    group_size: int = 12
    num_steps: int = 25
    shift: float = 3.0
    window_size: int = 4
    window_start: int = 0
    window_stride: int = 1
    iters_per_shift: int = 25
    window_schedule: str = "progressive"
    roll_back: bool = False
    noise_level: float = 0.7
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    adv_eps: float = 1e-4
    kl_beta: float = 0.0
    lr: float = 1e-5
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 0
    reward_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.latent_shape = tuple(int(n) for n in self.latent_shape)  # type: ignore[assignment]
        if len(self.latent_shape) != 4 or min(self.latent_shape) < 1:
            raise OSPConfigError(f"latent_shape must be four positive sizes (C, F, H, W), got {self.latent_shape}.")
        if self.group_size < 2:
            raise OSPConfigError(f"group_size must be >= 2 (advantages compare samples of a group), got {self.group_size}.")
        if self.num_steps < 2:
            raise OSPConfigError(f"num_steps must be >= 2, got {self.num_steps}.")
        if self.window_schedule not in WINDOW_SCHEDULES:
            raise OSPConfigError(f"window_schedule must be one of {WINDOW_SCHEDULES}, got {self.window_schedule!r}.")
        if not 1 <= self.window_size <= self.num_steps:
            raise OSPConfigError(f"window_size must be in [1, num_steps={self.num_steps}], got {self.window_size}.")
        if not 0 <= self.window_start <= self.num_steps - self.window_size:
            raise OSPConfigError(
                f"window_start must be in [0, num_steps - window_size = {self.num_steps - self.window_size}], "
                f"got {self.window_start}."
            )
        if self.window_schedule == "progressive" and self.window_start > self.num_steps - 2:
            raise OSPConfigError(f"window_start must be <= num_steps - 2 = {self.num_steps - 2} for the progressive "
                                 f"schedule (its left edge moves up to T - 2), got {self.window_start}.")
        if self.window_stride < 0 or self.iters_per_shift < 1:
            raise OSPConfigError("window_stride must be >= 0 and iters_per_shift >= 1.")
        for name in ("noise_level", "clip_range", "adv_clip", "adv_eps", "lr"):
            if getattr(self, name) <= 0:
                raise OSPConfigError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.kl_beta < 0 or self.max_grad_norm <= 0:
            raise OSPConfigError("kl_beta must be >= 0 and max_grad_norm > 0.")

    @classmethod
    def osp_next(cls, latent_shape: tuple[int, int, int, int], **changes) -> "MixGRPOConfig":
        """OSP-Next's Mix-GRPO: steps 0-9 of 25 SDE and trained, eps 5e-3, KL 0.004, G = 4, lr 2e-5."""
        base = dict(group_size=4, num_steps=25, window_size=10, window_schedule="fixed_prefix",
                    clip_range=5e-3, kl_beta=0.004, lr=2e-5)
        return cls(latent_shape=latent_shape, **{**base, **changes})

    def window(self, iteration: int) -> range:
        """The sampling steps that use the SDE and are trained at `iteration`.

        "progressive": the left edge starts at `window_start` and moves `window_stride` steps every
        `iters_per_shift` iterations up to T - 2; there it stays, or with `roll_back` it goes back to
        `window_start` and moves on from there (MixGRPO rolls back to its start, 0)."""
        left = self.window_start
        if self.window_schedule == "progressive" and self.window_stride:
            shifts, max_left = iteration // self.iters_per_shift, self.num_steps - 2
            positions = (max_left - left) // self.window_stride + 1  # left edges before the end is passed
            if self.roll_back:
                left += self.window_stride * (shifts % positions)
            else:
                left = min(left + self.window_stride * shifts, max_left)
        return range(left, min(left + self.window_size, self.num_steps))

    def replace(self, **changes) -> "MixGRPOConfig":
        return dataclasses.replace(self, **changes)
