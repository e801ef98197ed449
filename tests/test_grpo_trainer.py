"""MixGRPOTrainer on the Skiparse + LoRA converted tiny DiT: the first PPO ratio is exactly 1 and the KL
exactly 0, only window steps are differentiated, only adapters move, checkpoints resume the exact next
update, full fine-tuning without LoRA, and the offline train-grpo demo raises its reward."""
from __future__ import annotations

import argparse
import json
import os

import torch

from osp_compile import OSPConfig, convert
from osp_compile.grpo import LatentColour, MixGRPOConfig, MixGRPOTrainer, lora_adapters
from osp_compile.grpo.cli import add_train_grpo_arguments, run_train_grpo
from reference_model import build_model, make_inputs

LATENT = (2, 8, 8)
GROUP = 4
CONFIG = MixGRPOConfig(latent_shape=(4, *LATENT), group_size=GROUP, num_steps=4, window_size=2,
                       kl_beta=0.01, lr=1e-3, clip_range=5e-3, seed=0)


def _converted(lora_rank: int = 4):
    args, kwargs = make_inputs("tiny", batch=GROUP, latent_shape=LATENT)
    return convert(build_model("tiny", num_layers=2), args, kwargs, OSPConfig(num_full_blocks=1, lora_rank=lora_rank))


def _contexts(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 8, 32, generator=torch.Generator().manual_seed(seed))


def test_rollout_and_step_ratio_one_kl_zero_window_only_gradients_adapters_only():
    osp = _converted()
    config = CONFIG.replace(window_start=1)  # steps 1, 2 are SDE; 0 and 3 Euler
    trainer = MixGRPOTrainer(osp, {"bright": LatentColour(1.0)}, config)
    calls = []
    osp.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    base = {n: p.detach().clone() for n, p in osp.named_parameters()}

    rollout = trainer.rollout(_contexts(1)[0], config.window(0), trainer.noise_generator(0))
    assert not any(calls) and len(calls) == config.num_steps  # sampling never builds a graph
    assert rollout.states.shape == (2, GROUP, 4, *LATENT) and rollout.log_probs.shape == (2, GROUP)
    # the group shares its noise and step 0 is the deterministic ODE: the group is identical at the
    # window start; the SDE step tells the samples apart
    assert all(torch.equal(rollout.states[0, 0], s) for s in rollout.states[0])
    assert not torch.equal(rollout.next_states[0, 0], rollout.next_states[0, 1])

    out = trainer.transition_loss(rollout, 0, torch.randn(GROUP))
    assert torch.equal(out["ratio"], torch.ones(GROUP))  # same weights, same inputs as the rollout
    assert out["kl"].item() == 0.0  # B = 0: the policy is its reference

    calls.clear()
    metrics = trainer.step(_contexts(2))
    groups, window = 2, len(config.window(0))
    assert sum(calls) == groups * window  # differentiated calls: window steps only
    assert len(calls) == groups * config.num_steps + 2 * groups * window  # + rollout and reference (no grad)
    assert metrics["window_start"] == 1 and metrics["window_size"] == 2 and metrics["iteration"] == 0
    assert metrics["first_step_ratio_max_dev"] == 0.0 and metrics["grad_norm"] > 0
    assert all(torch.equal(p, base[n]) and p.grad is None for n, p in osp.named_parameters())  # base frozen
    assert all(b.abs().sum() > 0 for _, _, b in lora_adapters(osp).items())
    assert trainer.iteration == 1


def test_checkpoint_resume_reproduces_the_next_update(tmp_path):
    osp = _converted()
    trainer = MixGRPOTrainer(osp, LatentColour(1.0), CONFIG)
    trainer.step(_contexts(2, seed=1))
    path = str(tmp_path / "ckpt.pt")
    trainer.save_checkpoint(path)
    expected_metrics = trainer.step(_contexts(2, seed=2))
    expected = {n: p.detach().clone() for n, p in trainer.trainable.items()}

    resumed = MixGRPOTrainer(osp, LatentColour(1.0), CONFIG)  # a fresh trainer (and optimizer)
    resumed.load_checkpoint(path)
    assert resumed.iteration == 1
    metrics = resumed.step(_contexts(2, seed=2))
    assert metrics["reward_mean"] == expected_metrics["reward_mean"]
    for name, p in resumed.trainable.items():
        assert torch.equal(p, expected[name]), name


def test_resume_refuses_another_setup(tmp_path):
    """A checkpoint resumes only the run that wrote it: another config (lr, seed, ...), other adapters
    (rank, alpha) are named in the error before anything is loaded."""
    import pytest

    trainer = MixGRPOTrainer(_converted(), LatentColour(1.0), CONFIG)
    path = str(tmp_path / "ckpt.pt")
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"lr: 0.001 in the checkpoint, 1e-07 here.*seed: 0 in the checkpoint, 5 here"):
        MixGRPOTrainer(_converted(), LatentColour(1.0), CONFIG.replace(lr=1e-7, seed=5)).load_checkpoint(path)
    other_rank = MixGRPOTrainer(_converted(lora_rank=2), LatentColour(1.0), CONFIG)
    before = {n: p.detach().clone() for n, p in other_rank.trainable.items()}
    with pytest.raises(ValueError, match=r"LoRA adapters: \{'rank': 4, 'alpha': 4.0\} in the checkpoint, "
                                         r"\{'rank': 2, 'alpha': 2.0\} here"):
        other_rank.load_checkpoint(path)
    assert all(torch.equal(p, before[n]) for n, p in other_rank.trainable.items())  # nothing loaded
    MixGRPOTrainer(_converted(), LatentColour(1.0), CONFIG).load_checkpoint(path)  # the same setup resumes


def test_reward_weights_must_name_rewards():
    import pytest

    with pytest.raises(ValueError, match=r"names \['brightness'\], which are not rewards here: the rewards are "
                                         r"\['LatentColour'\]"):
        MixGRPOTrainer(_converted(), LatentColour(1.0), CONFIG.replace(reward_weights={"brightness": 0.0}))


def test_full_fine_tuning_without_lora_uses_a_snapshot_reference():
    model = build_model("tiny", num_layers=1)  # any nn.Module with the DiT call convention
    trainer = MixGRPOTrainer(model, LatentColour(1.0), CONFIG.replace(lr=1e-4))
    assert trainer.adapters is None and len(trainer.trainable) == len(list(model.parameters()))
    rollout = trainer.rollout(_contexts(1)[0], CONFIG.window(0), trainer.noise_generator(0))
    out = trainer.transition_loss(rollout, 0, torch.randn(GROUP))
    assert out["kl"].item() == 0.0 and torch.equal(out["ratio"], torch.ones(GROUP))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = trainer.step(_contexts(2))
    assert metrics["kl"] > 0  # the second window step sees the moved policy
    assert not torch.equal(model.blocks[0].self_attn.q.weight, before["blocks.0.self_attn.q.weight"])
    assert all(torch.equal(trainer._reference_weights[n], before[n]) for n in before)


def test_train_grpo_cli_raises_the_reward_and_resumes(tmp_path):
    parser = add_train_grpo_arguments(argparse.ArgumentParser())
    out = str(tmp_path / "run")
    summary = run_train_grpo(parser.parse_args(["--out", out, "--steps", "12", "--no-progress"]))
    assert summary["reward_end"] > summary["reward_start"] + 0.3, summary
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["iteration"] for m in lines] == list(range(12))
    with open(summary["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for name in ("checkpoint.pt", "adapters.safetensors", "summary.json"):
        assert os.path.exists(os.path.join(out, name))

    run_train_grpo(parser.parse_args(["--out", out, "--steps", "1", "--no-progress",
                                      "--resume", os.path.join(out, "checkpoint.pt")]))
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["iteration"] for m in lines] == list(range(13))


def test_train_grpo_cli_refuses_bad_counts_before_writing(tmp_path):
    import pytest

    parser = add_train_grpo_arguments(argparse.ArgumentParser())
    out = tmp_path / "run"
    for bad, says in ((["--steps", "0"], "--steps 0"), (["--lora-rank", "0"], "--lora-rank 0"),
                      (["--groups", "10", "--num-prompts", "3"], r"must be in \[1, 3\]"),
                      (["--groups", "0"], "--groups 0")):
        with pytest.raises(SystemExit, match=says):
            run_train_grpo(parser.parse_args(["--out", str(out), "--no-progress", *bad]))
    assert not out.exists()
