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

Memory: the op saves ``x`` and ``W`` (as a plain linear does) and quantizes them again in the
backward (same bits as the forward: the quantization is deterministic) instead of saving the
quantized copies as extra outputs.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import api

X_SCALE_MAX = 15.0
"""scale_max of the activations (forward)."""
W_SCALE_MAX = 15.0
"""scale_max of the weights (forward)."""
GRAD_SCALE_MAX = 224.0
"""scale_max of the output gradient (backward)."""


@torch.library.custom_op("osp::hif8_fake_quant", mutates_args=())
def hif8_fake_quant(x: torch.Tensor, scale_max: float) -> torch.Tensor:
    """Per-tensor scaled HiF8 quantize-dequantize of ``x`` (``api.quantize_scaled``), contiguous."""
    return api.quantize_scaled(x, scale_max).contiguous()


@hif8_fake_quant.register_fake
def _fake_quant_fake(x: torch.Tensor, scale_max: float) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("osp::hif8_qat_linear", mutates_args=())
def hif8_qat_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(fq(x, 15), fq(weight, 15), bias)``; ``weight`` is [out, in] as in ``F.linear``."""
    return F.linear(hif8_fake_quant(x, X_SCALE_MAX), hif8_fake_quant(weight, W_SCALE_MAX), bias).contiguous()


@hif8_qat_linear.register_fake
def _qat_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    g_q = hif8_fake_quant(grad, GRAD_SCALE_MAX)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = g_q @ hif8_fake_quant(weight, W_SCALE_MAX)
    if ctx.needs_input_grad[1]:
        x_q = hif8_fake_quant(x, X_SCALE_MAX)
        grad_w = g_q.reshape(-1, g_q.shape[-1]).T @ x_q.reshape(-1, x_q.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b


hif8_qat_linear.register_autograd(_backward, setup_context=_setup_context)
