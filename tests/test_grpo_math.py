"""The pure pieces of Mix-GRPO, checked against independent float64 formulas: the SDE step and its
log-probability, the KL, group advantages, the PPO-clip loss and the SDE window schedule."""
from __future__ import annotations

import math

import pytest
import torch

from osp_compile.errors import OSPConfigError
from osp_compile.grpo import LatentColour, MixGRPOConfig
from osp_compile.grpo.advantages import group_advantages, ppo_clip_loss
from osp_compile.grpo.sde import gaussian_log_prob, sde_mean_std, sde_sigma, transition_kl
from reference_model import euler_step, shifted_sigmas

SIGMAS = shifted_sigmas(10, 3.0).tolist()


def _flow_grpo_mean_std_f64(x, v, t, t_next, a):
    """Flow-GRPO's arrangement of the same step (prev_sample_mean), in float64."""
    sigma_max = SIGMAS[1]
    std_t = math.sqrt(t / (1 - (sigma_max if t == 1 else t))) * a
    dt = t_next - t
    x, v = x.double(), v.double()
    mean = x * (1 + std_t**2 / (2 * t) * dt) + v * (1 + std_t**2 * (1 - t) / (2 * t)) * dt
    return mean, std_t * math.sqrt(-dt)


@pytest.mark.parametrize("step", [0, 1, 5, 9])
def test_step_log_prob_equals_float64_gaussian_density(step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(3, 4, 2, 6, 6, generator=gen)
    v = torch.randn(3, 4, 2, 6, 6, generator=gen)
    t, t_next = SIGMAS[step], SIGMAS[step + 1]
    mean, std = sde_mean_std(x, v, t, t_next, 0.7)
    x_next = mean + std * torch.randn(mean.shape, generator=gen)

    mean64, std64 = _flow_grpo_mean_std_f64(x, v, t, t_next, 0.7)
    expected = torch.distributions.Normal(mean64, std64).log_prob(x_next.double()).mean(dim=(1, 2, 3, 4))
    got = gaussian_log_prob(x_next, mean, std)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    assert std == pytest.approx(std64, rel=1e-12)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_log_prob_is_float32_for_bf16_inputs_and_differentiable_in_mean_only():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    v = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    mean, std = sde_mean_std(x, v, SIGMAS[2], SIGMAS[3], 0.7)
    x_next = (mean + std).detach().requires_grad_()
    lp = gaussian_log_prob(x_next, mean, std)
    assert mean.dtype == lp.dtype == torch.float32
    lp.sum().backward()
    assert v.grad is not None and x_next.grad is None


def test_sigma_at_t1_uses_next_grid_point_and_small_noise_is_the_euler_step():
    assert sde_sigma(1.0, SIGMAS[1], 0.7) == pytest.approx(0.7 * math.sqrt(1 / (1 - SIGMAS[1])))
    assert sde_sigma(0.5, 0.4, 0.7) == pytest.approx(0.7)
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    mean, _ = sde_mean_std(x, v, SIGMAS[3], SIGMAS[4], 1e-6)
    torch.testing.assert_close(mean, euler_step(x, v, SIGMAS[3], SIGMAS[4]))


def test_kl_is_the_gaussian_kl_of_equal_std_steps_and_zero_for_equal_means():
    m1, m2 = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    std = 0.3
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1.double(), std), torch.distributions.Normal(m2.double(), std)
    ).mean(dim=(1, 2))
    torch.testing.assert_close(transition_kl(m1, m2, std).double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(transition_kl(m1, m1.clone(), std), torch.zeros(3))


def test_group_advantages_normalise_within_groups_with_eps_and_clip():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    a = group_advantages({"r": r})
    std = math.sqrt(1.25)  # population std of 1..4
    torch.testing.assert_close(a[0], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))  # a tied group carries no signal

    outlier = torch.zeros(1, 40)
    outlier[0, 0] = 100.0  # z = sqrt(39) > 5
    a = group_advantages({"r": outlier}, clip=5.0)
    assert a[0, 0] == 5.0 and a[0, 1] == pytest.approx(-1 / math.sqrt(39), rel=1e-3)


def test_several_rewards_weighted_sum_of_per_reward_advantages():
    gen = torch.Generator().manual_seed(0)
    r1, r2 = torch.randn(3, 6, generator=gen), 1000 * torch.randn(3, 6, generator=gen)
    combined = group_advantages({"a": r1, "b": r2}, {"b": 0.5})
    expected = group_advantages({"a": r1}, clip=1e9) + 0.5 * group_advantages({"b": r2}, clip=1e9)
    torch.testing.assert_close(combined, expected.clamp(-5, 5))


def test_ppo_clip_loss():
    adv = torch.tensor([1.0, -2.0])
    old = torch.tensor([0.3, -0.1])
    loss, ratio = ppo_clip_loss(old.clone(), old, adv, 0.1)
    assert torch.equal(ratio, torch.ones(2)) and loss.item() == pytest.approx(0.5)  # mean(-A)

    new = (old + torch.log(torch.tensor([1.5, 1.5]))).requires_grad_()
    loss, ratio = ppo_clip_loss(new, old, adv, 0.1)
    # sample 0 (A > 0) is clipped at 1.1: no gradient; sample 1 (A < 0) keeps the unclipped 1.5
    assert loss.item() == pytest.approx((-1.0 * 1.1 + 2.0 * 1.5) / 2)
    loss.backward()
    assert new.grad[0] == 0 and new.grad[1] == pytest.approx(2.0 * 1.5 / 2)


def test_window_schedules():
    cfg = MixGRPOConfig(latent_shape=(4, 1, 8, 8))  # MixGRPO: T = 25, w = 4, tau = 25, s = 1
    assert cfg.window(0) == range(0, 4) and cfg.window(24) == range(0, 4) and cfg.window(25) == range(1, 5)
    assert cfg.window(25 * 30) == range(23, 25)  # l capped at T - 2
    rolled = cfg.replace(roll_back=True)
    assert rolled.window(25 * 23) == range(23, 25) and rolled.window(25 * 24) == range(0, 4)
    # a stride that does not land on T - 2, and a start other than 0: back to the start, not a modulo
    strided = cfg.replace(roll_back=True, window_stride=5, window_schedule="progressive")
    assert [strided.window(25 * k).start for k in range(7)] == [0, 5, 10, 15, 20, 0, 5]
    late = cfg.replace(roll_back=True, window_start=3, window_schedule="progressive")
    assert [late.window(25 * k).start for k in (0, 20, 21, 22)] == [3, 23, 3, 4]
    assert cfg.replace(window_stride=5).window(25 * 6) == range(23, 25)  # no roll back: capped
    osp = MixGRPOConfig.osp_next((4, 1, 8, 8))
    assert all(osp.window(i) == range(0, 10) for i in (0, 7, 1000))
    assert (osp.clip_range, osp.kl_beta, osp.group_size) == (5e-3, 0.004, 4)


@pytest.mark.parametrize("bad", [dict(group_size=1), dict(window_size=0), dict(window_schedule="rolling"),
                                 dict(window_start=24), dict(clip_range=0.0), dict(latent_shape=(4, 8, 8)),
                                 dict(window_size=1, window_start=24, window_schedule="progressive")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(OSPConfigError):
        MixGRPOConfig(**{"latent_shape": (4, 1, 8, 8), **bad})


def test_latent_colour_reward():
    x = torch.zeros(2, 4, 1, 2, 2)
    x[1, 0::2] = 1.0
    x[1, 1::2] = -1.0
    colour = LatentColour((1.0, -1.0))
    assert torch.equal(colour(x, [None, None]), torch.tensor([-1.0, 0.0]))
    assert torch.equal(LatentColour(1.0)(torch.ones(3, 4, 1, 2, 2), [None] * 3), torch.zeros(3))
