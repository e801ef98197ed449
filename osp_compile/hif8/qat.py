"""Quantization-aware HiF8 linear: OSP-Next's ``hif8_linear`` recipe as one ``torch.library`` op.

    out = x_q @ W_q^T + b,   x_q = fq(x, 15),  W_q = fq(W, 15)
    grad_x = g_q @ W_q,  grad_W = g_q^T @ x_q,  grad_b = sum(g),   g_q = fq(grad_out, 224)

where ``fq(t, m)`` is the per-tensor scaled fake-quant ``quantize(t * s) / s``, ``s = m / max|t|``
(``api.quantize_scaled``; facts in /work/shared/reference/hif8.md).

Why a custom op and not a ``torch.autograd.Function``: the QAT pass puts ONE node in the Dynamo
graph (``osp::hif8_qat_linear``), which LoRA and lowering can find by name, and which Dynamo /
AOTAutograd / Inductor trace through its fake implementation without a graph break.  The backward
is registered with ``register_autograd``; AOTAutograd traces it into the backward graph, so
everything it calls must be traceable: it uses ``osp::hif8_fake_quant``, itself an opaque op
(Triton on CUDA, the torch codec elsewhere, bit-identical) with a fake implementation.

Sequence parallelism (``OSPConfig(sequence_parallel=...)``; the pass sets ``group``, the SP group's
name, and ``replicated``) must give every rank the single-process quantization, and two cases differ:

* ``x`` is one rank's shard of the tokens (``replicated=False``): ``fq(x)`` and ``fq(grad_out)`` take
  the absmax over the whole group (``group.py``), so each rank quantizes its rows exactly as one
  process quantizes the whole tensor; the products are then the single-process ones, row by row.
* ``x`` is whole on every rank but feeds the sharded region (cross-attention's k / v on the text
  context; any quantized linear before the first sharded block; ``replicated=True``): the forward
  needs no collective, but the backward receives on each rank only the *partial* gradient of its
  own tokens' consumers, and ``fq(g_0) + fq(g_1) != fq(g_0 + g_1)``.  So the backward all-reduces
  (SUM) the output gradient first, quantizes the whole of it (same bits on every rank) and returns
  each gradient divided by the group size S: S equal shares, which the SP gradient sync
  (``osp_compile.distributed``) sums back (exactly for S = 2, to float32 rounding otherwise).
  Not "rank 0 returns them, the others zeros", exact for any S: the backward must be the same
  graph on every rank, so that a compiler orders its collectives alike (that variant gave a gloo
  collective mismatch under Inductor).  Cost: one all-reduce of the linear's output gradient per
  such linear (text-sized, not video-sized).

Replicated tensors after the final gather get neither (``group=""``): every rank computes the same
full gradient there, as one process does.  The weight is replicated everywhere and its scale needs
no collective.

Memory: the op saves ``x`` and ``W`` (as a plain linear does) and quantizes them again in the
backward (same bits as the forward: the quantization is deterministic) instead of saving the
quantized copies as extra outputs.
"""
from typing import Optional

import torch
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F

from . import api
from .group import group_amax, group_size

X_SCALE_MAX = 15.0
"""scale_max of the activations (forward)."""
W_SCALE_MAX = 15.0
"""scale_max of the weights (forward)."""
GRAD_SCALE_MAX = 224.0
"""scale_max of the output gradient (backward)."""


@torch.library.custom_op("osp::hif8_fake_quant", mutates_args=())
def hif8_fake_quant(x: torch.Tensor, scale_max: float, group: str = "") -> torch.Tensor:
    """Per-tensor scaled HiF8 quantize-dequantize of ``x`` (``api.quantize_scaled``), contiguous;
    with ``group``, ``x`` is one rank's shard and the scale is the whole tensor's (``group.py``)."""
    return api.quantize_scaled(x, scale_max, amax=group_amax(x, group)).contiguous()


@hif8_fake_quant.register_fake
def _fake_quant_fake(x: torch.Tensor, scale_max: float, group: str = "") -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("osp::hif8_qat_linear", mutates_args=())
def hif8_qat_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    group: str = "", replicated: bool = False) -> torch.Tensor:
    """``F.linear(fq(x, 15), fq(weight, 15), bias)``; ``weight`` is [out, in] as in ``F.linear``.
    ``group``: the sequence-parallel group ("" for one process); ``replicated``: ``x`` is whole on
    every rank of it rather than one shard of the tokens (see the module docstring)."""
    x_q = hif8_fake_quant(x, X_SCALE_MAX, "" if replicated else group)
    return F.linear(x_q, hif8_fake_quant(weight, W_SCALE_MAX), bias).contiguous()


@hif8_qat_linear.register_fake
def _qat_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     group: str = "", replicated: bool = False) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, group, replicated = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.group, ctx.replicated = group, replicated


def _grads(ctx, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, group: str) -> tuple:
    """(grad_x, grad_W, grad_b) of the recipe, ``grad`` and ``x`` being shards over ``group``."""
    g_q = hif8_fake_quant(grad, GRAD_SCALE_MAX, group)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = g_q @ hif8_fake_quant(weight, W_SCALE_MAX)
    if ctx.needs_input_grad[1]:
        x_q = hif8_fake_quant(x, X_SCALE_MAX, group)
        grad_w = g_q.reshape(-1, g_q.shape[-1]).T @ x_q.reshape(-1, x_q.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    if not (ctx.group and ctx.replicated):
        return (*_grads(ctx, grad, x, weight, ctx.group), None, None)
    # x whole on every rank, grad a partial sum: quantize the whole gradient, return 1/S of each
    whole = fc.wait_tensor(fc.all_reduce(grad.contiguous(), "sum", ctx.group))
    share = 1.0 / group_size(ctx.group)
    return (*(None if g is None else g * share for g in _grads(ctx, whole, x, weight, "")), None, None)


hif8_qat_linear.register_autograd(_backward, setup_context=_setup_context)
