"""What every per-target attention kernel shares: the opaque-op wrapper, mask shapes, node facts.

A device library call (torch_npu.npu_fusion_attention, flash-attn) is wrapped as a `torch.library`
custom op so that Dynamo, AOTAutograd and Inductor see ONE opaque node with a fake implementation
(shapes only): no graph break and no attempt to trace into the library. Every such op takes the
SDPA layout and arguments (q, k, v [B, heads, S, D], a boolean attn_mask with True = attend, an
explicit scale, enable_gqa), so one backward serves them all: PyTorch's SDPA backward of the same
call, recomputing the forward (traceable, so AOTAutograd puts it in the backward graph). The library
kernel speeds up the forward; the backward is SDPA's. A recomputed forward cannot replay a dropout
mask, which is why the kernels refuse dropout.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

OPAQUE_IMPLS: dict[Any, Callable] = {}
"""Opaque op -> its eager implementation: what an exported module calls instead of the op."""


def attention_op(qualname: str, impl: Callable[..., Tensor]):
    """`impl(query, key, value, attn_mask, scale, enable_gqa) -> out` as an opaque op with fake and autograd."""
    op = torch.library.custom_op(qualname, impl, mutates_args=())

    @op.register_fake
    def _(query, key, value, attn_mask, scale, enable_gqa):
        return query.new_empty((*query.shape[:-1], value.shape[-1]))

    def setup_context(ctx, inputs, output) -> None:
        query, key, value, attn_mask, ctx.scale, ctx.enable_gqa = inputs
        ctx.save_for_backward(query, key, value, attn_mask)

    def backward(ctx, grad):
        query, key, value, attn_mask = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_() for x in (query, key, value)]
            out = F.scaled_dot_product_attention(*inputs, attn_mask=attn_mask, scale=ctx.scale,
                                                 enable_gqa=ctx.enable_gqa)
        return (*torch.autograd.grad(out, inputs, grad), None, None, None)

    op.register_autograd(backward, setup_context=setup_context)
    OPAQUE_IMPLS[op] = impl
    return op


def as_4d(mask: Tensor) -> Tensor:
    """An SDPA attn_mask broadcastable to [B, heads, Sq, Skv], with its leading 1s made explicit."""
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def shape_refusal(query, key, value) -> str | None:
    """Why a library kernel taking [B, S, N, D] q/k/v of one batch and one head dim cannot run these
    SDPA operands (None: it can). SDPA also takes other ranks, batch-broadcast keys and a value head
    dim of its own; flash-attn and npu_fusion_attention do not."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return f"q/k/v of {query.dim()}/{key.dim()}/{value.dim()} dims (the kernel takes [B, N, S, D])"
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        return f"batch sizes {query.shape[0]}/{key.shape[0]}/{value.shape[0]} differ (SDPA broadcasts, the kernel does not)"
    if key.shape != value.shape or value.shape[-1] != query.shape[-1]:
        return f"key {tuple(key.shape)} / value {tuple(value.shape)} / query head dim {query.shape[-1]} differ"
    return None


def attention_facts(node: fx.Node) -> dict[str, Any]:
    """What a kernel's check needs from an attention node (example values, not tensors).

    The node is an SDPA call, or an ``osp::`` composite whose first three arguments are q, k, v
    (its inner masks are its own business: the kernel falls back at run time where it must).
    """
    from passes.fx_utils import is_sdpa, meta_value, op_args, sdpa_args

    if is_sdpa(node):
        a = sdpa_args(node)
        return {"query": meta_value(a["query"]), "key": meta_value(a["key"]), "value": meta_value(a["value"]),
                "attn_mask": meta_value(a["attn_mask"]), "dropout_p": a["dropout_p"], "is_causal": a["is_causal"]}
    bound = op_args(node)
    return {"query": meta_value(node.args[0]), "key": meta_value(node.args[1]), "value": meta_value(node.args[2]),
            "attn_mask": None, "dropout_p": bound.get("dropout_p", 0.0), "is_causal": False}
