"""Data-parallel Mix-GRPO: two gloo ranks with one prompt group each make the same update as one process
with both groups (gradients averaged over ranks before each optimizer step)."""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from osp_compile.grpo import LatentColour, MixGRPOTrainer
from test_grpo_trainer import CONFIG, _contexts, _converted

TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_gloo(rank: int, world: int, port: int) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S // 2))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _join_gloo(rank, world, port)
    try:
        trainer = MixGRPOTrainer(_converted(), LatentColour(1.0), CONFIG)
        metrics = trainer.step(_contexts(world)[rank:rank + 1])  # this rank's group of the global batch
        params = {n: p.detach().clone() for n, p in trainer.trainable.items()}
        torch.save({"params": params, "metrics": metrics}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(worker, tmp_path, single_step):
    """Start two gloo ranks running `worker`, run `single_step()` here meanwhile, and return its
    result with the ranks' saved results; ranks that outlive the deadline are killed."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(rank, 2, port, str(tmp_path)), daemon=True) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        expected = single_step()
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(p.is_alive() for p in procs), "distributed workers timed out"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return expected, [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_gloo_ranks_make_the_single_process_update(tmp_path):
    single = MixGRPOTrainer(_converted(), LatentColour(1.0), CONFIG)
    expected_metrics, results = _run_two_ranks(_worker, tmp_path, lambda: single.step(_contexts(2)))
    assert any(name.startswith("lora_B") and p.abs().sum() > 0 for name, p in single.trainable.items())
    for name, p in single.trainable.items():
        assert torch.equal(results[0]["params"][name], results[1]["params"][name]), name  # replicas agree
        torch.testing.assert_close(results[0]["params"][name], p.detach(), rtol=1e-5, atol=1e-7)
    assert abs(results[0]["metrics"]["reward_mean"] - expected_metrics["reward_mean"]) < 1e-6
    assert results[0]["metrics"]["grad_norm"] == pytest.approx(expected_metrics["grad_norm"], rel=1e-4)


def _ssp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _join_gloo(rank, world, port)
    try:
        from test_grpo_trainer import GROUP, LATENT
        from osp_compile import OSPConfig, convert
        from reference_model import build_model, make_inputs

        args, kwargs = make_inputs("tiny", batch=GROUP, latent_shape=LATENT)
        model = convert(build_model("tiny", num_layers=2), args, kwargs,
                        OSPConfig(num_full_blocks=1, lora_rank=4, sequence_parallel="ssp"))
        trainer = MixGRPOTrainer(model, LatentColour(1.0), CONFIG)
        metrics = trainer.step(_contexts(1))  # both ranks of the SP group run the same group
        params = {n: p.detach().clone() for n, p in trainer.trainable.items()}
        torch.save({"params": params, "metrics": metrics}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ssp_inside_a_group_makes_the_single_process_update(tmp_path):
    """Two ranks forming one SSP group run one prompt group together: the same update as one process."""
    single = MixGRPOTrainer(_converted(), LatentColour(1.0), CONFIG)
    expected, results = _run_two_ranks(_ssp_worker, tmp_path, lambda: single.step(_contexts(1)))
    for name, p in single.trainable.items():
        torch.testing.assert_close(results[0]["params"][name], p.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(results[1]["params"][name], p.detach(), rtol=1e-4, atol=1e-6)
    assert abs(results[0]["metrics"]["reward_mean"] - expected["reward_mean"]) < 1e-5
