"""`MixGRPOTrainer`: Mix-GRPO on the transformed (OSP) video DiT.

One `step(prompts)` is one GRPO iteration:

1. Rollout, without gradients. Each prompt gets a group of G samples sharing one initial noise.
   The flow-matching sampler takes the Flow-GRPO SDE step at the steps of the window W (recording
   x_t, x_next and log pi(x_next | x_t)) and the Euler ODE step everywhere else.
2. Rewards of the final latents (decoded first when a `decode` is given); group advantages.
3. Training on the window only: for each window step in order, the stored x_t -> x_next
   transitions are re-scored with gradients, the PPO-clip loss (+ kl_beta * KL to the reference)
   is back-propagated for each of this rank's groups (gradients accumulate), gradients are
   averaged over data-parallel ranks and clipped, and the optimizer steps. So a window of w steps
   makes w optimizer steps per iteration, as DanceGRPO/MixGRPO do per timestep: the first sees
   ratio exactly 1 (same weights, same inputs as the rollout), the later ones see the policy
   moved by the earlier ones, which is what the clip bounds. Steps outside the window are never
   differentiated: the backward pass costs w model calls per group, not T.

The model is called as ``model(x, t=sigma * 1000 [B], context=[B, L, D])`` and returns the
velocity, like `reference_model.sampler.sample`. Every model call has batch G, so one captured
graph per grad mode serves the whole run.

With LoRA (the model was converted with lora_rank > 0) the base weights are frozen and only the
adapters train; the reference is the same module with the adapters switched off. Without LoRA
every parameter trains and the reference is a snapshot of the weights the trainer started from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from reference_model.sampler import euler_step, shifted_sigmas
from .advantages import group_advantages, ppo_clip_loss
from .config import MixGRPOConfig
from .distributed import (average_gradients, barrier, broadcast_parameters, group_offset, mean_over_ranks, sp_size_of,
                          rank_and_world)
from .lora import adapters_disabled, find_adapters
from .rewards import RewardFn, evaluate_rewards, named_rewards
from .sde import gaussian_log_prob, sde_mean_std, transition_kl


@dataclass
class GroupRollout:
    """One prompt group's trajectory: what training needs to re-score the window transitions."""

    context: Tensor      # [G, L, D] the text conditioning of every sample
    window: range        # the sampling steps that used the SDE
    states: Tensor       # [w, G, C, F, H, W] x_t fed to the model at each window step (float32)
    next_states: Tensor  # [w, G, C, F, H, W] the sampled x_next
    log_probs: Tensor    # [w, G] log pi_old(x_next | x_t)
    latents: Tensor      # [G, C, F, H, W] the final samples


class MixGRPOTrainer:
    """Mix-GRPO on `model`, what `convert()` or ``torch.compile(backend="osp")`` returned.

    reward_fns: one callable ``(videos_or_latents, prompts) -> [N]``, a list, or a name -> callable
        mapping (names key `config.reward_weights` and the metrics).
    encode_prompts: maps a list of prompts to text contexts [n, L, D]; without it `step` takes the
        contexts themselves.
    decode: maps latents [N, C, F, H, W] to what the rewards score (e.g. a VAE decoder).
    osp_options: the ``options`` dict of a ``torch.compile(backend="osp")`` model (already run
        once), so the trainer finds its LoRA adapters.
    """

    def __init__(self, model: nn.Module, reward_fns: RewardFn | Sequence[RewardFn] | Mapping[str, RewardFn],
                 config: MixGRPOConfig, *, encode_prompts: Callable[[list], Tensor] | None = None,
                 decode: Callable[[Tensor], Tensor] | None = None, osp_options: dict | None = None) -> None:
        self.model = model
        self.config = config
        self.reward_fns = named_rewards(reward_fns)
        unknown = sorted(set(config.reward_weights) - set(self.reward_fns))
        if unknown:
            raise ValueError(f"config.reward_weights names {unknown}, which are not rewards here: the rewards are "
                             f"{sorted(self.reward_fns)} (pass a name -> callable mapping to choose the names)")
        self.encode_prompts = encode_prompts
        self.decode = decode
        self.adapters = find_adapters(model, osp_options)
        first = next(p for p in model.parameters() if p.is_floating_point())
        self.device, self.dtype = first.device, first.dtype
        if self.adapters is not None:
            for p in model.parameters():
                p.requires_grad_(False)
            self.trainable = dict(self.adapters.named_parameters())
        else:
            self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("the model has nothing to train: no LoRA adapters and no parameter requires grad")
        broadcast_parameters(self.trainable.values())
        # the KL reference without LoRA: the weights training starts from (before any checkpoint is loaded)
        self._reference_weights = None
        if self.adapters is None and config.kl_beta > 0:
            self._reference_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=config.lr, weight_decay=config.weight_decay)
        self.sigmas = shifted_sigmas(config.num_steps, config.shift).tolist()
        self.iteration = 0

    # -- sampling ----------------------------------------------------------------------------------
    def noise_generator(self, group: int) -> torch.Generator:
        """The noise source of global group `group` at this iteration.

        Counter-based: a hash of (seed, iteration, group), so the noise does not depend on how
        groups are spread over ranks, and a resumed run needs no generator state.
        """
        key = f"{self.config.seed}:{self.iteration}:{group}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))

    def _velocity(self, x: Tensor, t: float, context: Tensor, weights: dict[str, Tensor] | None = None) -> Tensor:
        """The model's velocity at x (float32); `weights` evaluates it with other parameter values."""
        timestep = torch.full((x.shape[0],), t * 1000.0, dtype=torch.float32, device=self.device)
        args, kwargs = (x.to(self.dtype),), {"t": timestep, "context": context}
        if weights is None:
            return self.model(*args, **kwargs).float()
        return torch.func.functional_call(self.model, weights, args, kwargs).float()

    def _reference_velocity(self, x: Tensor, t: float, context: Tensor) -> Tensor:
        with torch.no_grad():
            if self.adapters is not None:
                with adapters_disabled(self.adapters):
                    return self._velocity(x, t, context)
            return self._velocity(x, t, context, self._reference_weights)

    @torch.no_grad()
    def rollout(self, context: Tensor, window: range, generator: torch.Generator) -> GroupRollout:
        """Sample one group for the text context [L, D]: SDE steps in `window`, Euler ODE elsewhere."""
        cfg = self.config
        g = cfg.group_size
        noise = torch.randn((1, *cfg.latent_shape), generator=generator)
        # contiguous copies: every model call sees the same strides (one captured graph)
        x = noise.repeat(g, *[1] * len(cfg.latent_shape)).to(self.device)
        context = context.to(self.device, self.dtype).unsqueeze(0).repeat(g, *[1] * context.ndim)
        states, next_states, log_probs = [], [], []
        for i in range(cfg.num_steps):
            t, t_next = self.sigmas[i], self.sigmas[i + 1]
            v = self._velocity(x, t, context)
            if i in window:
                mean, std = sde_mean_std(x, v, t, t_next, cfg.noise_level)
                x_next = mean + std * torch.randn(mean.shape, generator=generator).to(self.device)
                states.append(x)
                next_states.append(x_next)
                log_probs.append(gaussian_log_prob(x_next, mean, std))
            else:
                x_next = euler_step(x, v, t, t_next)
            x = x_next
        return GroupRollout(context, window, torch.stack(states), torch.stack(next_states), torch.stack(log_probs), x)

    # -- training ----------------------------------------------------------------------------------
    def transition_loss(self, rollout: GroupRollout, k: int, advantages: Tensor) -> dict[str, Tensor]:
        """Loss of the k-th window transition of a group, re-scored with gradients."""
        cfg = self.config
        step = rollout.window[k]
        t, t_next = self.sigmas[step], self.sigmas[step + 1]
        x = rollout.states[k]
        mean, std = sde_mean_std(x, self._velocity(x, t, rollout.context), t, t_next, cfg.noise_level)
        log_prob = gaussian_log_prob(rollout.next_states[k], mean, std)
        policy_loss, ratio = ppo_clip_loss(log_prob, rollout.log_probs[k], advantages.to(self.device), cfg.clip_range)
        kl = torch.zeros((), device=self.device)
        if cfg.kl_beta > 0:
            mean_ref, _ = sde_mean_std(x, self._reference_velocity(x, t, rollout.context), t, t_next, cfg.noise_level)
            kl = transition_kl(mean, mean_ref, std).mean()
        return {"loss": policy_loss + cfg.kl_beta * kl, "policy_loss": policy_loss, "kl": kl, "ratio": ratio}

    def _train_window(self, rollouts: list[GroupRollout], advantages: Tensor) -> dict[str, float]:
        """One optimizer step per window step; gradients summed over this rank's groups, averaged over ranks."""
        cfg = self.config
        params = list(self.trainable.values())
        n = len(rollouts)
        sums = dict.fromkeys(("loss", "policy_loss", "kl", "ratio_mean", "clip_frac", "grad_norm"), 0.0)
        first_ratio_dev = 0.0
        window_len = len(rollouts[0].window)
        for k in range(window_len):
            self.optimizer.zero_grad(set_to_none=False)
            for j, rollout in enumerate(rollouts):
                out = self.transition_loss(rollout, k, advantages[j])
                with self._backward_errors():
                    (out["loss"] / n).backward()
                ratio = out["ratio"].detach()
                for name in ("loss", "policy_loss", "kl"):
                    sums[name] += float(out[name].detach()) / n
                sums["ratio_mean"] += float(ratio.mean()) / n
                sums["clip_frac"] += float(((ratio - 1).abs() > cfg.clip_range).float().mean()) / n
                if k == 0:
                    first_ratio_dev = max(first_ratio_dev, float((ratio - 1).abs().max()))
            average_gradients(params)
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            self.optimizer.step()
        metrics = {name: value / window_len for name, value in sums.items()}
        metrics["first_step_ratio_max_dev"] = first_ratio_dev
        return metrics

    def _backward_errors(self) -> contextlib.AbstractContextManager:
        """A converted model's rank-aware errors for the collectives of a backward (SP only)."""
        from ..convert import OSPModule

        return self.model.collective_errors() if isinstance(self.model, OSPModule) else contextlib.nullcontext()

    def _contexts(self, prompts: Sequence[Any] | Tensor) -> tuple[Tensor, list]:
        if self.encode_prompts is not None:
            prompts = list(prompts)
            return self.encode_prompts(prompts), prompts
        if not (isinstance(prompts, Tensor) and prompts.ndim == 3):
            raise TypeError("without encode_prompts, step() takes text contexts as a tensor [groups, L, D]")
        return prompts, list(prompts)

    def step(self, prompts: Sequence[Any] | Tensor) -> dict[str, float]:
        """One Mix-GRPO iteration on this rank's prompt groups (one group of G samples per prompt).

        Returns metrics averaged over ranks: rewards before the update (``reward_mean``,
        ``reward/<name>``), losses, KL, PPO ratio statistics, gradient norm, timings.
        """
        cfg = self.config
        contexts, prompts = self._contexts(prompts)
        first_group = group_offset(len(prompts), sp_size_of(self.model))
        window = cfg.window(self.iteration)
        start = time.perf_counter()
        rollouts = [self.rollout(contexts[j], window, self.noise_generator(first_group + j))
                    for j in range(len(prompts))]
        latents = torch.cat([r.latents for r in rollouts])
        samples = self.decode(latents) if self.decode is not None else latents
        rewards = evaluate_rewards(self.reward_fns, samples, [p for p in prompts for _ in range(cfg.group_size)])
        grouped = {name: r.view(len(prompts), cfg.group_size) for name, r in rewards.items()}
        advantages = group_advantages(grouped, cfg.reward_weights, cfg.adv_clip, cfg.adv_eps)
        sampled = time.perf_counter()
        metrics = self._train_window(rollouts, advantages)
        weights = cfg.reward_weights
        metrics.update({
            "reward_mean": float(sum(weights.get(n, 1.0) * r.mean() for n, r in rewards.items())),
            **{f"reward/{n}": float(r.mean()) for n, r in rewards.items()},
            "advantage_abs_mean": float(advantages.abs().mean()),
            "time_rollout_s": sampled - start,
            "time_train_s": time.perf_counter() - sampled,
        })
        metrics = mean_over_ranks(metrics)
        metrics.update({"iteration": self.iteration, "window_start": window.start, "window_size": len(window)})
        self.iteration += 1
        return metrics

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        """Trainable parameters, optimizer, iteration and RNG state; rank 0 writes, all ranks wait.

        The sampling noise is a function of (seed, iteration, group), so with the iteration saved a
        resumed run makes exactly the update the uninterrupted run would have made next.
        """
        if rank_and_world()[0] == 0:
            torch.save({
                "iteration": self.iteration,
                "params": {n: p.detach().cpu() for n, p in self.trainable.items()},
                "optimizer": self.optimizer.state_dict(),
                "torch_rng_state": torch.get_rng_state(),
                "config": dataclasses.asdict(self.config),
                "lora": self._lora_shape(),
            }, path)
        barrier()

    def _lora_shape(self) -> dict | None:
        return None if self.adapters is None else {"rank": self.adapters.rank, "alpha": self.adapters.alpha}

    def load_checkpoint(self, path: str) -> None:
        """Restore what `save_checkpoint` wrote, into a trainer built like the saving one: the same
        configuration, the same adapters (rank, alpha) and parameter shapes, or a clear error - a
        resumed run is only the continued run when nothing else changed."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved, current = _comparable(state["config"]), _comparable(dataclasses.asdict(self.config))
        changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} here"
                   for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if "lora" in state and state["lora"] != self._lora_shape():
            changed.append(f"LoRA adapters: {state.get('lora')} in the checkpoint, {self._lora_shape()} here")
        if changed:
            raise ValueError(f"checkpoint {path} was written by another setup; resume with the same one (or start a "
                             f"new run, e.g. from its adapters): " + "; ".join(changed))
        if set(state["params"]) != set(self.trainable):
            raise ValueError(
                f"checkpoint {path} trains other parameters than this trainer: missing "
                f"{sorted(set(self.trainable) - set(state['params']))[:5]}, unexpected "
                f"{sorted(set(state['params']) - set(self.trainable))[:5]}"
            )
        shapes = [f"{n}: {tuple(state['params'][n].shape)} vs {tuple(p.shape)}" for n, p in self.trainable.items()
                  if state["params"][n].shape != p.shape]
        if shapes:
            raise ValueError(f"checkpoint {path} holds parameters of other shapes (checkpoint vs here): {shapes[:5]}")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng_state"])
        self.iteration = int(state["iteration"])


def _comparable(config: dict) -> dict:
    """A config dict with tuples as lists, as a checkpoint stores and loads it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
