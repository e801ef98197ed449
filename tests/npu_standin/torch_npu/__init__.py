"""EMULATION of `torch_npu` for CPU tests. This is NOT torch_npu and has never touched Ascend hardware.

It implements, in plain PyTorch on the CPU, the documented semantics of exactly the torch_npu calls
that osp-compile emits, and asserts that every call keeps to the documented signature. Tests put
its parent directory on sys.path only while they run; nothing else may import it.

Emulated call, from the torch_npu API reference "torch_npu.npu_fusion_attention"
(https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000850.html):

    npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
        atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647,
        inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
        gen_mask_parallel=True, sync=False) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)

  attention_out = Dropout(Softmax(Mask(scale * query @ key^T, atten_mask)), keep_prob) @ value
  * seven outputs; [0] is attention_out, in the input layout;
  * input_layout "BSND": query [B, Sq, N1, D], key/value [B, Skv, N2, D]; N2 a factor of N1 (GQA);
    head_num is N1;
  * atten_mask bool, True (1) = the position does not take part; shapes BNSS, B1SS, 11SS, SS;
  * scale defaults to 1.0; keep_prob is the kept fraction (1.0 = no dropout);
  * query/key/value float16, bfloat16 or float32.
Only what osp-compile emits is emulated: other layouts, pse, padding_mask (documented as
unsupported), prefix / varlen arguments, sparse modes other than 0 and dropout raise NotImplementedError.
"""
from __future__ import annotations

import inspect

import torch

EMULATION = True
CALLS: list[dict] = []
"""Every call made, bound to the documented parameter names (tests read it)."""

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX = 2147483647


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1., keep_prob=1., pre_tockens=_MAX, next_tockens=_MAX, inner_precise=0, prefix=None,
                         actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True,
                         sync=False):
    """EMULATION of torch_npu.npu_fusion_attention (see the module docstring for the documented contract)."""
    CALLS.append(inspect.signature(npu_fusion_attention).bind(
        query, key, value, head_num, input_layout, pse=pse, padding_mask=padding_mask, atten_mask=atten_mask,
        scale=scale, keep_prob=keep_prob, pre_tockens=pre_tockens, next_tockens=next_tockens,
        inner_precise=inner_precise, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
        actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode, gen_mask_parallel=gen_mask_parallel,
        sync=sync).arguments)
    if input_layout != "BSND":
        raise NotImplementedError(f"emulation: only input_layout 'BSND' is emulated, got {input_layout!r}")
    if pse is not None or padding_mask is not None or prefix is not None or actual_seq_qlen is not None \
            or actual_seq_kvlen is not None or sparse_mode != 0 or (pre_tockens, next_tockens) != (_MAX, _MAX):
        raise NotImplementedError("emulation: pse / padding_mask / prefix / varlen / sparse modes are not emulated")
    if keep_prob != 1.0:
        raise NotImplementedError("emulation: dropout (keep_prob < 1) is not emulated")
    for name, t in (("query", query), ("key", key), ("value", value)):
        assert isinstance(t, torch.Tensor) and t.dim() == 4, f"{name} must be a 4-D BSND tensor"
        assert t.dtype in _DTYPES, f"{name}: dtype {t.dtype} is not float16/bfloat16/float32"
    assert query.dtype == key.dtype == value.dtype, "query, key and value must share one dtype"
    b, sq, n1, d = query.shape
    _, skv, n2, _ = key.shape
    assert isinstance(head_num, int) and head_num == n1, f"head_num must be N1 of BSND ({n1}), got {head_num!r}"
    assert key.shape == value.shape and key.shape[0] == b and key.shape[3] == d, "key/value must be [B, Skv, N2, D]"
    assert n1 % n2 == 0, f"N2={n2} must be a factor of N1={n1}"
    assert isinstance(scale, float) and isinstance(keep_prob, float), "scale and keep_prob are host-side doubles"

    q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))  # BSND -> BNSD, computed in float32
    k, v = (t.repeat_interleave(n1 // n2, dim=1) for t in (k, v))
    scores = scale * (q @ k.transpose(-2, -1))  # [B, N1, Sq, Skv]
    if atten_mask is not None:
        assert atten_mask.dtype == torch.bool, "atten_mask must be bool (True = masked out)"
        allowed = [(b, n1, sq, skv), (b, 1, sq, skv), (1, 1, sq, skv), (sq, skv)]
        assert tuple(atten_mask.shape) in allowed, f"atten_mask shape {tuple(atten_mask.shape)} is not BNSS/B1SS/11SS/SS"
        scores = scores.masked_fill(atten_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).transpose(1, 2).to(query.dtype)  # back to BSND
    softmax_max = scores.amax(-1, keepdim=True).expand(b, n1, sq, 8).contiguous()
    softmax_sum = (scores - softmax_max[..., :1]).exp().sum(-1, keepdim=True).expand(b, n1, sq, 8).contiguous()
    return out, softmax_max, softmax_sum, torch.empty(0, dtype=query.dtype), 0, 0, 0
