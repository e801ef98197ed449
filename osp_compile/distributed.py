"""Sequence-parallel operators (namespace ``osp``), built on torch.distributed functional collectives
so the rewritten graph stays traceable (Dynamo, AOTAutograd, Inductor) and differentiable.

Contract of an SP-converted module: every rank passes the same full inputs and gets the same full
output; after the same ``loss.backward()`` on every rank, every rank's parameter gradients equal
the single-process gradients. How the gradients get there:
- inside the sharded region each rank back-propagates only its own tokens, so the gradients that
  reach replicated tensors and parameters are *partial*; each parameter passes through
  `sp_grad_sync` (identity forward, all-reduce SUM of the gradient backward) once;
- `sp_all_gather` (sharded -> replicated) takes its rank's slice of the incoming gradient in backward
  (every rank holds the same full gradient there), instead of a reduce-scatter;
- whatever runs replicated after the gather computes the same full gradient on every rank, so its
  replicated inputs (parameters included) pass through `sp_grad_scale(1/S)` and the SUM is exact.
With data parallelism on top, the SP group is a sub-group: these syncs finish inside it, and DDP or
FSDP2 then average over the data-parallel group as usual (see README).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from .errors import OSPError, caused_by
from .ops import _lib

# torch 2.13 renamed all_gather_tensor to all_gather_single; torch 2.11 (the GPU machines) has the old name
_all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
from .token_layouts import as_index, from_rows, gather_order, gather_rows, local_gather, routing, shard_rows, token_rows


@dataclass(frozen=True)
class PlanningGroup:
    """A stand-in process group for planning only (`osp-compile inspect --sp`): the passes rewrite
    and account for `world` ranks without any process running; the result is never executed."""

    world: int
    rank: int = 0
    group_name: str = "planning"


@contextlib.contextmanager
def collective_errors(config, phase: str = "forward"):
    """Turn a failed or timed-out collective into an error that says which rank and what to check.
    ``phase``: ``"forward"`` (the converted module's call, which wraps itself) or ``"backward"``
    (``OSPModule.collective_errors()`` around ``loss.backward()``: backward's collectives run in
    autograd's engine, outside any call of the module)."""
    if config.sequence_parallel is None or isinstance(config.sp_group, PlanningGroup):
        yield
        return
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        from torch._dynamo.exc import BackendCompilerFailed

        if not dist.is_initialized() or caused_by(exc, OSPError) or isinstance(exc, BackendCompilerFailed):
            raise  # not a collective: a compile-time error says what it is itself
        group = config.sp_group or dist.group.WORLD
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        contract = ("Every rank must call the converted module with the same inputs" if phase == "forward" else
                    "Every rank must run the same backward (each rank's loss.backward() after the same forward)")
        raise OSPError(
            f"sequence-parallel collective failed in {phase} on rank {rank} of {world} ({config.sequence_parallel}): "
            f"a peer rank died or did not arrive within the process group's timeout "
            f"(init_process_group(timeout=...)). {contract}. Cause: {type(exc).__name__}: {str(exc)[:500]}"
        ) from exc


# ---------------------------------------------------------------------------------------------------
# layout changes between shards: one all-to-all (or a local slice / one all-gather)
# ---------------------------------------------------------------------------------------------------
_lib.define(
    "sp_relayout(Tensor x, int dim, int T, int H, int W, int P, str src, str dst, int rank, int world, "
    "str group) -> Tensor"
)


@torch.library.impl(_lib, "sp_relayout", "CompositeImplicitAutograd")
def _sp_relayout(x, dim, T, H, W, P, src, dst, rank, world, group):
    grid = (T, H, W)
    key = (src, dst, grid, P, world, rank)
    if src == "full":  # replicated -> shards: a local gather, no communication
        return gather_rows(x, dim, lambda lead: local_gather(src, dst, grid, P, world, rank, lead), ("local",) + key)
    rows, lead, rest = token_rows(x, dim)
    key += (lead,)
    if dst == "full":  # shards -> replicated: one all-gather (shards padded to equal rows), then natural order
        pad = shard_rows(src, grid, P, world, lead) - rows.shape[0]
        padded = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])]) if pad else rows
        gathered = sp_all_gather(padded, world, group)
        out = gathered.index_select(0, as_index(gather_order(src, grid, P, world, lead), x.device, ("gather",) + key))
    else:  # shards -> shards: exactly one all-to-all
        send, send_counts, recv_counts, place = routing(src, dst, grid, P, world, rank, lead)
        payload = rows.index_select(0, as_index(send, x.device, ("send",) + key))
        received = fc.all_to_all_single_autograd(payload, recv_counts, send_counts, group)
        out = received.index_select(0, as_index(place, x.device, ("recv",) + key))
    return from_rows(out, dim, lead, rest, x.dim())


# ---------------------------------------------------------------------------------------------------
# all-gather whose backward is a slice (every rank holds the same full gradient there)
# ---------------------------------------------------------------------------------------------------
_lib.define("sp_all_gather(Tensor x, int world, str group) -> Tensor")


@torch.library.impl(_lib, "sp_all_gather", "CompositeExplicitAutograd")
def _sp_all_gather(x, world, group):
    return fc.wait_tensor(_all_gather(x.contiguous(), 0, group))


@torch.library.register_fake("osp::sp_all_gather")
def _sp_all_gather_fake(x, world, group):
    return x.new_empty((x.shape[0] * world, *x.shape[1:]))


def _sp_all_gather_backward(ctx, grad):
    rank = dist.get_rank(dist.distributed_c10d._resolve_process_group(ctx.group))
    n = grad.shape[0] // ctx.world
    return grad[rank * n:(rank + 1) * n], None, None


def _sp_all_gather_setup(ctx, inputs, output):
    ctx.world, ctx.group = inputs[1], inputs[2]


torch.library.register_autograd("osp::sp_all_gather", _sp_all_gather_backward, setup_context=_sp_all_gather_setup)
sp_all_gather = torch.ops.osp.sp_all_gather.default

# ---------------------------------------------------------------------------------------------------
# gradient bookkeeping
# ---------------------------------------------------------------------------------------------------
_lib.define("sp_grad_sync(Tensor x, str group) -> Tensor")
_lib.define("sp_grad_scale(Tensor x, float scale) -> Tensor")


@torch.library.impl(_lib, "sp_grad_sync", "CompositeExplicitAutograd")
def _sp_grad_sync(x, group):
    return x.clone()


@torch.library.register_fake("osp::sp_grad_sync")
def _sp_grad_sync_fake(x, group):
    return torch.empty_like(x)


def _grad_sync_backward(ctx, grad):
    return fc.wait_tensor(fc.all_reduce(grad.contiguous(), "sum", ctx.group)), None


def _grad_sync_setup(ctx, inputs, output):
    ctx.group = inputs[1]


torch.library.register_autograd("osp::sp_grad_sync", _grad_sync_backward, setup_context=_grad_sync_setup)


@torch.library.impl(_lib, "sp_grad_scale", "CompositeExplicitAutograd")
def _sp_grad_scale(x, scale):
    return x.clone()


@torch.library.register_fake("osp::sp_grad_scale")
def _sp_grad_scale_fake(x, scale):
    return torch.empty_like(x)


def _grad_scale_setup(ctx, inputs, output):
    ctx.scale = inputs[1]


torch.library.register_autograd("osp::sp_grad_scale", lambda ctx, g: (g * ctx.scale, None), setup_context=_grad_scale_setup)
sp_grad_sync = torch.ops.osp.sp_grad_sync.default
sp_grad_scale = torch.ops.osp.sp_grad_scale.default

# ---------------------------------------------------------------------------------------------------
# Ulysses attention: heads scattered, sequence gathered, 4 all-to-alls per call
# ---------------------------------------------------------------------------------------------------
_lib.define(
    "ulysses_attention(Tensor q, Tensor k, Tensor v, int world, str group, str pattern, int T, int H, int W, "
    "int P, float dropout_p=0.0, float? scale=None, bool enable_gqa=False) -> Tensor"
)


def _seq_to_heads(x: torch.Tensor, world: int, group: str) -> torch.Tensor:
    """[B, h, N/S, D] (sequence shard) -> [B, h/S, N, D] (head shard), one all-to-all."""
    b, h, n, d = x.shape
    send = x.reshape(b, world, h // world, n, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = fc.all_to_all_single_autograd(send.reshape(world * b, -1), None, None, group)
    return recv.reshape(world, b, h // world, n, d).permute(1, 2, 0, 3, 4).reshape(b, h // world, world * n, d)


def _heads_to_seq(x: torch.Tensor, world: int, group: str) -> torch.Tensor:
    """[B, h/S, N, D] -> [B, h, N/S, D], one all-to-all."""
    b, hl, n, d = x.shape
    send = x.reshape(b, hl, world, n // world, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = fc.all_to_all_single_autograd(send.reshape(world * b, -1), None, None, group)
    return recv.reshape(world, b, hl, n // world, d).permute(1, 0, 2, 3, 4).reshape(b, world * hl, n // world, d)


@torch.library.impl(_lib, "ulysses_attention", "CompositeImplicitAutograd")
def _ulysses_attention(q, k, v, world, group, pattern, T, H, W, P, dropout_p=0.0, scale=None, enable_gqa=False):
    from .ops import skiparse_attention

    qh, kh, vh = (_seq_to_heads(t, world, group) for t in (q, k, v))
    if pattern == "full":
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout_p, scale=scale,
                                                              enable_gqa=enable_gqa)
    else:
        out = skiparse_attention(qh, kh, vh, T, H, W, P, pattern, dropout_p=dropout_p, scale=scale,
                                 enable_gqa=enable_gqa)
    return _heads_to_seq(out, world, group)


sp_relayout = torch.ops.osp.sp_relayout.default
ulysses_attention = torch.ops.osp.ulysses_attention.default

__all__ = ["PlanningGroup", "sp_relayout", "sp_all_gather", "sp_grad_sync", "sp_grad_scale", "ulysses_attention"]
