"""`osp::skiparse_joint_attention`: Skiparse-2D at an attention call over text and video tokens joined.

CogVideoX (text, then video) and HunyuanVideo (video, then text) run one attention over a sequence
that joins the two. At a sparse site the meaning is that of a mask over the joined sequence:

  * a video query attends every (unmasked) text key and the video keys of its own subsequence;
  * a text query attends every (unmasked) key: text stays full attention.

It is never computed as that mask over the whole sequence (that costs as much as dense attention).
The video queries are packed (the real tokens of each of the P*P subsequences, no padding) and
attend one dense batch per length class of subsequences, each subsequence with the text
keys/values in front of its own (`_joint_plan`: q, k and v are each gathered once, and the output
comes back in one concatenation and one gather); text queries run one small full attention over
all keys. Both are plain SDPA calls, so the op is CompositeImplicitAutograd
like `osp::skiparse_attention`: one readable node in a graph, exact autograd and Inductor fusion
underneath, any target's dense kernel can run the pieces.

Packing instead of padding the grid keeps padded keys out, so no mask is needed where the model
gives none (CogVideoX): the attention stays on flash/cuDNN-class kernels, which an attention mask
would rule out, and no padded query or key is computed (CogVideoX-5B's 30x45 grid pads to 32x48,
13.8% more video tokens). The only mask the op accepts from the model is a key mask (Hunyuan's
text padding): one that does not vary with the query, shape [B or 1, heads or 1, 1, N] (or fewer
leading dims). Its video part is packed like the keys.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .ops import _class_rows, _class_view
from .skiparse_layout import packed_attention_pairs, subsequence_length, subsequence_tokens
from .token_layouts import as_index

_lib = torch.library.Library("osp", "FRAGMENT")
_lib.define(
    "skiparse_joint_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, SymInt T, SymInt H, SymInt W, "
    "int P, str pattern, SymInt video_offset, float dropout_p=0.0, float? scale=None, bool enable_gqa=False) -> Tensor"
)


@lru_cache(maxsize=None)
def _joint_plan(grid: tuple, p: int, pattern: str, offset: int, total: int) -> tuple:
    """Where every token of one joined sequence goes: ``(classes, spans, queries, keys, output)``.

    The video queries of one length class of subsequences run as one dense batch, the classes one
    after another, so a grid whose subsequences alternate in length (an odd W, token-wise) still
    makes one launch per class. ``classes``: (subsequences, length) per class; ``queries``: the
    token index of every video query, class by class, subsequence by subsequence; ``keys``: per
    class and subsequence, the text tokens followed by the subsequence's video tokens (one gather,
    no concatenation); ``spans``: (start, subsequences, keys per subsequence) of each class in
    ``keys``; ``output``: for every token of the sequence, its row in [text outputs, class outputs].
    A tuple of numpy arrays, not a class: an export copies functions and constants only."""
    video_len = grid[0] * grid[1] * grid[2]
    text = np.concatenate([np.arange(offset), np.arange(offset + video_len, total)])
    by_length: dict[int, list] = {}
    for tokens in subsequence_tokens(grid, p, pattern):
        by_length.setdefault(len(tokens), []).append(offset + tokens)
    classes = tuple((len(subs), n) for n, subs in by_length.items())
    queries = np.concatenate([t for subs in by_length.values() for t in subs])
    keys = np.concatenate([np.concatenate([text, t]) for subs in by_length.values() for t in subs])
    spans, start = [], 0
    for count, n in classes:
        spans.append((start, count, len(text) + n))
        start += count * (len(text) + n)
    output = np.empty(total, dtype=np.int64)
    output[text] = np.arange(len(text))
    output[queries] = len(text) + np.arange(video_len)
    return classes, tuple(spans), queries, keys, output


def _take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(-2, index)`` for [..., heads, N, D], on the view whose dims after the token
    dim are contiguous, so that each token is one contiguous row (a vectorized copy on the GPU; a
    strided one falls back to an element-wise gather, twice as slow here). A token-major ``x``
    stays token-major."""
    token_major = x.transpose(-3, -2)
    if token_major.is_contiguous():
        return token_major.index_select(-3, index).transpose(-3, -2)
    return x.index_select(-2, index)


def _class_key_mask(key_mask: torch.Tensor | None, batch: int, keys: torch.Tensor, span: tuple):
    """The model's key mask for one class's video queries, [B*count, heads|1, 1, text + n]: its
    columns ``keys`` (`_joint_plan`'s) of the class's span; None when the model gives none."""
    if key_mask is None:
        return None
    start, count, n = span
    cols = key_mask.index_select(-1, keys.narrow(0, start, count * n))
    return _class_view(cols.expand(batch, *cols.shape[1:]).transpose(-1, -2), 0, count, n).transpose(-1, -2)


def _skiparse_joint_attention(q, k, v, key_mask, T, H, W, P, pattern, video_offset, dropout_p=0.0, scale=None,
                              enable_gqa=False):
    """q, k, v: [B, heads, N, D], the video tokens (T*H*W of them, frame-major) at [offset, offset + T*H*W)."""
    grid, offset, total = (int(T), int(H), int(W)), int(video_offset), int(q.shape[-2])
    classes, spans, *plan = _joint_plan(grid, int(P), pattern, offset, total)
    query_index, key_index, output_index = (
        as_index(a, q.device, ("joint", grid, int(P), pattern, offset, total, i)) for i, a in enumerate(plan))
    batch = q.shape[0]
    if key_mask is not None:
        key_mask = key_mask.reshape((1,) * (4 - key_mask.dim()) + tuple(key_mask.shape))
    sdpa = dict(dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)

    # video queries: one dense batch per length class, every text key/value beside each subsequence
    queries = _take_tokens(q, query_index)
    keys, values = (_take_tokens(x, key_index) for x in (k, v))
    outs, row = [], 0
    for (count, n), span in zip(classes, spans):
        mask = _class_key_mask(key_mask, batch, key_index, span)
        o = F.scaled_dot_product_attention(_class_view(queries, row, count, n), _class_view(keys, *span),
                                           _class_view(values, *span), attn_mask=mask, **sdpa)
        outs.append(_class_rows(o, batch))
        row += count * n

    # text queries: full attention over the whole joined sequence
    video_end = offset + grid[0] * grid[1] * grid[2]
    text_q = torch.cat([q[..., :offset, :], q[..., video_end:, :]], dim=-2)
    out_text = F.scaled_dot_product_attention(text_q, k, v, attn_mask=key_mask, **sdpa)
    # back in sequence order, token-major in memory ([B, N, heads, D] transposed), as dense attention
    # leaves it: the model's usual transpose(1, 2).reshape(B, N, heads * D) is then a view, not a copy
    joined = torch.cat([x.transpose(-3, -2) for x in (out_text, *outs)], dim=-3)
    return joined.index_select(-3, output_index).transpose(-3, -2)


torch.library.impl(_lib, "skiparse_joint_attention", "CompositeImplicitAutograd")(_skiparse_joint_attention)

skiparse_joint_attention = torch.ops.osp.skiparse_joint_attention.default


def skiparse_attention_flops(batch: int, heads: int, head_dim: int, grid, p: int) -> int:
    """Multiply-adds x2 of QK^T and PV of `osp::skiparse_attention` as it computes them (padding included)."""
    sub = subsequence_length(grid, p)
    return 4 * heads * head_dim * p * p * batch * sub * sub


def joint_attention_flops(batch: int, heads: int, head_dim: int, grid, p: int, pattern: str, text_len: int) -> int:
    """Multiply-adds x2 of QK^T and PV of `osp::skiparse_joint_attention`: each subsequence's real
    tokens against the text keys and themselves, and the text queries against every key."""
    grid = tuple(int(g) for g in grid)
    video_len = grid[0] * grid[1] * grid[2]
    video = batch * (video_len * text_len + packed_attention_pairs(grid, p, pattern))
    text = batch * text_len * (text_len + video_len)
    return 4 * heads * head_dim * (video + text)
