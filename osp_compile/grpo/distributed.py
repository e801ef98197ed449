"""Data parallelism over prompt groups with torch.distributed (any backend; gloo on CPU).

Each data-parallel replica (one rank, or the ranks of one SP group) samples and scores its own
groups; gradients are averaged over ranks before every
optimizer step, so all ranks take the same step. With equal group counts per rank this is the
update one process would make on all groups: each rank's loss is the mean over its groups, and
the mean of equal-sized means is the global mean. Without an initialised process group every
function is the single-process identity.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def sp_size_of(model) -> int:
    """Ranks per sequence-parallel group of a model converted with SSP/Ulysses (1 otherwise).

    The ranks of one SP group run ONE sample together (same prompts, same noise), so the
    data-parallel index of a rank is rank // sp_size (SP groups are consecutive ranks). Gradients
    are already complete inside an SP group (`osp::sp_grad_sync`), so averaging them over all
    ranks equals averaging over the data-parallel replicas.
    """
    config = getattr(model, "osp_config", None)
    if config is None or config.sequence_parallel is None or not is_distributed():
        return 1
    return dist.get_world_size(config.sp_group or dist.group.WORLD)


def group_offset(local_groups: int, sp_size: int = 1) -> int:
    """Global index of this rank's first group; checks that every rank has as many groups.
    Ranks of one SP group (`sp_size` consecutive ranks) share their groups."""
    rank, world = rank_and_world()
    if world == 1:
        return 0
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local_groups]))
    if len({int(c) for c in counts}) != 1:
        raise ValueError(
            f"every rank must process the same number of prompt groups per step (got {[int(c) for c in counts]}): "
            f"the averaged update equals the global one only then"
        )
    return rank // sp_size * local_groups


def broadcast_parameters(params: Iterable[torch.Tensor]) -> None:
    """Give every rank rank 0's values, so data-parallel replicas start identical."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """All-reduce (mean) the gradients of `params`, one flat buffer per dtype and device.

    A missing gradient counts as zero (it becomes a zero tensor), so every rank reduces the
    same buffers in the same order.
    """
    _, world = rank_and_world()
    if world == 1:
        return
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks (every rank must pass the same keys)."""
    _, world = rank_and_world()
    if world == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def barrier() -> None:
    if is_distributed():
        dist.barrier()
