"""CUDA: attention on flash-attn where it is installed and can take the call, else PyTorch's SDPA.

Without flash-attn nothing is lowered: `F.scaled_dot_product_attention` already picks the
flash / cuDNN / memory-efficient kernel on CUDA (the key-padding mask of a Skiparse site rules
flash out and the efficient or cuDNN kernel takes it).

flash-attn's documented interface (flash_attn/flash_attn_interface.py, Dao-AILab/flash-attention):
    flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, ...)
        q [B, Sq, H, D], k/v [B, Skv, Hkv, D], Hkv dividing H (GQA); fp16/bf16; head dim <= 256
    flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, ...)
        q [total_q, H, D], k/v [total_k, Hkv, D] packed sequences; cu_seqlens int32 [batch + 1]
A key-padding mask becomes varlen attention: only the real keys are packed (queries all stay).
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_ops import as_4d, attention_facts, attention_op, shape_refusal
from .registry import register_kernel

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


def _flash_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], scale: float,
                     enable_gqa: bool) -> Tensor:
    """SDPA semantics ([B, H, S, D]; attn_mask None or a bool key-padding mask) on flash-attn."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # BHSD -> BSHD
    if attn_mask is None:
        return flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale).transpose(1, 2)
    batch, sq, heads, _ = q.shape
    skv = k.shape[1]
    keep = as_4d(attn_mask)[:, 0, 0, :].expand(batch, skv)  # True = a real key
    real = keep.reshape(-1).nonzero().squeeze(1)
    k, v = (x.reshape(batch * skv, *x.shape[2:]).index_select(0, real) for x in (k, v))
    cu_k = F.pad(keep.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_q = torch.arange(0, (batch + 1) * sq, sq, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(q.reshape(batch * sq, heads, -1), k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                 max_seqlen_q=sq, max_seqlen_k=skv, dropout_p=0.0, softmax_scale=scale)
    return out.reshape(batch, sq, heads, -1).transpose(1, 2)


flash_attention = attention_op("osp_cuda::flash_attention", _flash_attention)


def flash_attn_available() -> bool:
    try:
        importlib.import_module("flash_attn")
    except ImportError:
        return False
    return True


def flash_refusal(query, key, value, attn_mask, dropout_p, is_causal) -> str | None:
    """Why flash-attn cannot run this SDPA call (None: it can)."""
    shapes = shape_refusal(query, key, value)
    if shapes:
        return shapes
    if query.dtype not in FLASH_DTYPES:
        return f"flash-attn needs float16/bfloat16, not {query.dtype}"
    if query.shape[-1] > FLASH_MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} > {FLASH_MAX_HEAD_DIM}"
    if is_causal:
        return "causal attention"
    if dropout_p:
        return "dropout (the recomputing backward cannot replay the mask)"
    if attn_mask is not None:
        mask = as_4d(attn_mask)
        if mask.dtype != torch.bool or mask.shape[1] != 1 or mask.shape[2] != 1:
            return "a mask that is not a boolean key-padding mask [B, 1, 1, Skv]"
    return None


def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` on flash-attn; calls it cannot take (`flash_refusal`) run SDPA."""
    if flash_refusal(query, key, value, attn_mask, dropout_p, is_causal) is not None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return flash_attention(query, key, value, attn_mask, query.shape[-1] ** -0.5 if scale is None else scale,
                           enable_gqa)


def _flash_check(node) -> str | None:
    if not flash_attn_available():
        return "flash-attn is not installed: PyTorch's SDPA picks flash / cuDNN / memory-efficient"
    return flash_refusal(**attention_facts(node))


register_kernel("scaled_dot_product_attention", "cuda", name="flash-attn (flash_attn_func / varlen)",
                check=_flash_check)(flash_sdpa)
