"""One per-tensor scale for a tensor whose tokens are split over a sequence-parallel group.

Under sequence parallelism (``OSPConfig(sequence_parallel="ssp" | "ulysses")``) each rank holds a
shard of the tokens.  A HiF8 op that took ``max|x|`` over its own shard would quantize every rank
with a scale of its own (activations in the forward, the output gradient in the QAT backward):
not the single-process model.  So the HiF8 ops take the SP group's name (``group``, as the
``osp_compile.distributed`` ops do) and all-reduce (MAX) the absmax over it before the scale is
computed; ``group=""`` (one process) runs no collective and keeps the single-process bits.

The all-reduce is an eager c10d call made at run time inside the opaque custom ops (Dynamo,
AOTAutograd and Inductor only see their fake implementations, and the traced QAT backward calls
the opaque ``osp::hif8_fake_quant``), on a 0-dim tensor: one tiny collective per quantized shard.
The pass (``passes/hif8_linear.py``) gives the group only to ops whose input is a shard: on a
replicated tensor every rank holds the same values, so the reduce would change nothing and is
skipped (a replicated QAT input has its own treatment of the backward, see ``qat.py``).

Grids that P does not divide need nothing special: the sequence-parallel layouts are packed (real
tokens only, ``token_layouts``), so a rank's max is over real tokens, and the max over the group
is the whole tensor's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import codec


def _resolve(group: str) -> dist.ProcessGroup:
    try:
        return dist.distributed_c10d._resolve_process_group(group)
    except (RuntimeError, ValueError) as exc:
        raise RuntimeError(
            f"a HiF8 op shares its per-tensor scale over process group {group!r}, which this process does not "
            f"have (a graph planned with a PlanningGroup cannot run, and every rank must have created the "
            f"sequence-parallel group before calling the converted module)"
        ) from exc


def group_amax(x: torch.Tensor, group: str, amax: torch.Tensor | None = None) -> torch.Tensor | None:
    """float32 0-dim ``max|x|`` over the shards of ``x`` on every rank of the process group named
    ``group``; for ``group=""``, ``amax`` (the caller then takes ``x``'s own where it is None,
    without a collective). ``amax``: this shard's ``max|x|``, computed in the graph
    (``passes/hif8_absmax.py``), else here.

    Every rank of the group must call it, in the same order (they run the same graph).  A NaN
    becomes +Inf before the reduce, since a MAX over NaN is not specified alike by every backend:
    all ranks then see a non-finite max and use scale 1, as one process would."""
    if amax is not None:
        amax = amax.to(torch.float32).reshape(())
    if not group:
        return amax
    return reduce_amax(codec.absmax(x) if amax is None else amax, group)


def reduce_amax(amax: torch.Tensor, group: str) -> torch.Tensor:
    """The MAX over the ranks of ``group`` of a float32 0-dim ``max|x|`` of this rank's shard (see
    `group_amax`, which computes it from ``x``); a NaN becomes +Inf first."""
    amax = torch.where(torch.isnan(amax), torch.full_like(amax, float("inf")), amax)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=_resolve(group))
    return amax


def group_size(group: str) -> int:
    """The number of ranks of the process group named ``group``."""
    return dist.get_world_size(_resolve(group))
