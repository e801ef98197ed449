"""CUDA: ``osp::linear_gelu`` as one cuBLASLt GEMM with the GELU in its epilogue.

``torch._addmm_activation(bias, x, W^T, use_gelu=True)`` runs cuBLASLt's GELU_BIAS epilogue (the
tanh approximation) on CUDA, and Inductor keeps it as one external call, so the FFN's hidden
activation is written once, already activated, instead of written, read and written again by a
separate GELU kernel. It computes the GELU from the float32 accumulator, before rounding to the
output dtype, so it is at least as accurate as the two calls.

Chosen only where that is what the op asks and PyTorch can run it: ``approximate='tanh'``, a bias,
float16/bfloat16, and no autograd (PyTorch defines no derivative for ``_addmm_activation``; a
training graph keeps the two calls, which Inductor fuses as before).
"""
from __future__ import annotations

import torch
from torch import Tensor

from passes.fx_utils import call_args, differentiated, meta_value

from .registry import register_kernel

EPILOGUE_DTYPES = (torch.float16, torch.bfloat16)


def linear_gelu_cublaslt(x: Tensor, weight: Tensor, bias: Tensor, approximate: str = "tanh") -> Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate="tanh")`` as one cuBLASLt call."""
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def epilogue_refusal(node) -> str | None:
    """Why the cuBLASLt GELU epilogue cannot run this ``osp::linear_gelu`` node (None: it can)."""
    a = call_args(node, ["x", "weight", "bias", "approximate"], {"bias": None, "approximate": "none"})
    if a["approximate"] != "tanh":
        return f"cuBLASLt's GELU epilogue is the tanh approximation, this GELU is approximate={a['approximate']!r}"
    if a["bias"] is None:
        return "no bias (the fused call takes one)"
    x, w, b = (meta_value(a[k]) for k in ("x", "weight", "bias"))
    if not all(isinstance(t, torch.Tensor) for t in (x, w, b)):
        return "no example values for the inputs"
    if x.dtype not in EPILOGUE_DTYPES or w.dtype != x.dtype or b.dtype != x.dtype:
        return f"dtypes {x.dtype}/{w.dtype}/{b.dtype}: the epilogue kernel takes one of float16, bfloat16"
    if differentiated(x, w, b):
        return "autograd: PyTorch has no derivative for _addmm_activation (training keeps linear + GELU)"
    return None


register_kernel("linear_gelu", "cuda", name="cuBLASLt GEMM + GELU epilogue (_addmm_activation)",
                check=epilogue_refusal)(linear_gelu_cublaslt)
