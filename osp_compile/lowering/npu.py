"""Ascend NPU: attention on ``torch_npu.npu_fusion_attention`` (FlashAttentionScore).

NEVER RUN ON ASCEND HARDWARE: checked only on CPU against an emulation of the documented semantics
(tests/npu_standin/torch_npu). The documented signature (torch_npu API reference,
"torch_npu.npu_fusion_attention", https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000850.html):

    npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
        atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647,
        inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
        gen_mask_parallel=True, sync=False) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)

- the attention output is element [0] of the seven outputs, in the input layout;
- input_layout "BSND": query [B, Sq, N1, D], key/value [B, Skv, N2, D], N2 a factor of N1 (GQA);
  head_num = N1;
- atten_mask: bool, True (1) = that position does NOT take part; shapes BNSS, B1SS, 11SS or SS;
- scale multiplies QK^T and defaults to 1.0 (not 1/sqrt(D)): it is always passed;
- keep_prob = 1 - dropout probability; query/key/value float16, bfloat16 or float32 (the 6.0.0
  reference; the CANN 7.0 one lists float16/bfloat16 only).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_ops import as_4d, attention_facts, attention_op, shape_refusal
from .registry import register_kernel

NPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _npu_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], scale: float,
                          enable_gqa: bool) -> Tensor:
    """SDPA semantics ([B, N, S, D], bool attn_mask True = attend) on torch_npu.npu_fusion_attention."""
    import torch_npu

    batch, heads, sq, _ = query.shape
    atten_mask = None
    if attn_mask is not None:
        mask = as_4d(attn_mask)
        atten_mask = ~mask.expand(batch, mask.shape[1], sq, key.shape[-2])  # B1SS or BNSS, True = masked out
    q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))  # BNSD -> BSND
    out = torch_npu.npu_fusion_attention(q, k, v, heads, "BSND", atten_mask=atten_mask, scale=scale,
                                         keep_prob=1.0)[0]
    return out.transpose(1, 2)


npu_attention = attention_op("osp_npu::fusion_attention", _npu_attention)


def npu_refusal(query, key, value, attn_mask, dropout_p, is_causal) -> str | None:
    """Why npu_fusion_attention cannot run this SDPA call (None: it can)."""
    shapes = shape_refusal(query, key, value)
    if shapes:
        return shapes
    if query.dtype not in NPU_DTYPES:
        return f"{query.dtype} is not a dtype of npu_fusion_attention"
    if is_causal:
        return "causal attention"
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        return "an additive (float) mask"
    if dropout_p:
        return "dropout (the recomputing backward cannot replay its mask)"
    return None


def npu_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` on the NPU fused kernel; calls it cannot take (`npu_refusal`) run SDPA."""
    if npu_refusal(query, key, value, attn_mask, dropout_p, is_causal) is not None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return npu_attention(query, key, value, attn_mask, query.shape[-1] ** -0.5 if scale is None else scale,
                                enable_gqa)


register_kernel("scaled_dot_product_attention", "npu", name="npu_fusion_attention (BSND)",
                check=lambda node: npu_refusal(**attention_facts(node)))(npu_sdpa)
