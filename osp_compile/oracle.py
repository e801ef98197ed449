"""The masked dense attention oracle of skiparse.md, written independently of the Skiparse code path.

It shares nothing with `skiparse_layout`/`ops`: subsequence ids come from the formula, and the
model runs its own dense attention with a boolean mask. Tests and `osp-compile demo` check against it.

`masked_oracle(layout, grid, P)` patches `torch.nn.functional.scaled_dot_product_attention` so that
the k-th video self-attention call (query and key length T*H*W) whose layout entry is token/group
runs DENSE attention with the mask sid(i) == sid(j) computed from the formula, not from any fold.

Joint text+video attention (CogVideoX, HunyuanVideo): with `text_len` and `video_offset` given, the
calls of length T*H*W + text_len are the sites, and the mask over the joined sequence is the one of
`joint_skiparse_mask` (text rows full; a video row sees every text key and its subsequence's video
keys), combined with the model's own mask (e.g. text padding).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def subsequence_id(grid, p, pattern):
    """sid of every frame-major token i = (t*H + y)*W + x, as one integer y_id*P + x_id."""
    t, h, w = grid
    i = torch.arange(t * h * w)
    y = (i // w) % h
    x = i % w
    if pattern == "token":
        return (y % p) * p + (x % p)
    return ((y // p) % p) * p + ((x // p) % p)


def skiparse_mask(grid, p, pattern):
    sid = subsequence_id(grid, p, pattern)
    return sid[:, None] == sid[None, :]


def joint_skiparse_mask(grid, p, pattern, video_offset, text_len):
    """[N, N] bool over a joined sequence with the video tokens at [video_offset, video_offset + T*H*W)."""
    video = grid[0] * grid[1] * grid[2]
    n = video + text_len
    is_video = torch.zeros(n, dtype=torch.bool)
    is_video[video_offset:video_offset + video] = True
    sid = torch.full((n,), -1, dtype=torch.long)
    sid[is_video] = subsequence_id(grid, p, pattern)
    same = sid[:, None] == sid[None, :]
    return ~is_video[:, None] | ~is_video[None, :] | same


def _combine(mask, model_mask):
    """The model's own mask (bool or additive) restricted further by a bool mask."""
    if model_mask is None:
        return mask
    if model_mask.dtype == torch.bool:
        return model_mask & mask
    return model_mask.masked_fill(~mask, float("-inf"))


@contextlib.contextmanager
def masked_oracle(layout, grid, p, text_len=0, video_offset=0):
    tokens = grid[0] * grid[1] * grid[2] + text_len
    original = F.scaled_dot_product_attention
    calls = []

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = query, key, value
        if q.shape[-2] == tokens and k.shape[-2] == tokens:
            entry = layout[len(calls)]
            calls.append(entry)
            if entry != "full":
                mask = joint_skiparse_mask(grid, p, entry, video_offset, text_len).to(q.device)
                attn_mask = _combine(mask, attn_mask)
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert len(calls) == len(layout), f"oracle saw {len(calls)} video self-attention calls, layout has {len(layout)}"


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
