"""`osp::skiparse_joint_attention`: Skiparse-2D at an attention call over text and video tokens joined.

CogVideoX (text, then video) and HunyuanVideo (video, then text) run one attention over a sequence
that joins the two. At a sparse site the meaning is that of a mask over the joined sequence:

  * a video query attends every (unmasked) text key and the video keys of its own subsequence;
  * a text query attends every (unmasked) key: text stays full attention.

It is never computed as that mask over the whole sequence (that costs as much as dense attention).
The video queries are packed (`token_layouts`: the real tokens of each of the P*P subsequences, one
subsequence after another, no padding) and attend one dense batch per length class of
subsequences, each subsequence with the text keys/values placed alongside; text queries run one
small full attention over all keys. Both are plain SDPA calls, so the op is CompositeImplicitAutograd
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

import torch
import torch.nn.functional as F

from .ops import _class_rows, _class_view, _packed_classes
from .skiparse_layout import packed_attention_pairs, relayout_local, subsequence_length

_lib = torch.library.Library("osp", "FRAGMENT")
_lib.define(
    "skiparse_joint_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, SymInt T, SymInt H, SymInt W, "
    "int P, str pattern, SymInt video_offset, float dropout_p=0.0, float? scale=None, bool enable_gqa=False) -> Tensor"
)


def _text_part(x: torch.Tensor, offset, video_len) -> torch.Tensor:
    """The text tokens of the joined dim -2 (before and after the video segment), in order."""
    return torch.cat([x[..., :offset, :], x[..., offset + video_len:, :]], dim=-2)


def _alongside(x: torch.Tensor, count: int) -> torch.Tensor:
    """[B, ...] -> [B*count, ...]: a per-sample tensor beside each of a class's `count` subsequences
    (the batch order of `_class_view`)."""
    return x.unsqueeze(1).expand(x.shape[0], count, *x.shape[1:]).flatten(0, 1)


def _class_key_masks(key_mask: torch.Tensor | None, batch: int, grid, p: int, pattern: str, offset,
                     classes: tuple) -> list:
    """Per length class, the key mask of its video queries, [B*count, heads|1, 1, Lt + n] with the
    text keys first: the model's mask of the text keys beside every subsequence, and its mask of the
    class's own video keys. None for every class when the model gives no mask."""
    if key_mask is None:
        return [None] * len(classes)
    video_len = grid[0] * grid[1] * grid[2]
    key_mask = key_mask.expand(batch, *key_mask.shape[1:])
    text = _text_part(key_mask.unsqueeze(-1), offset, video_len).squeeze(-1)
    video = relayout_local(key_mask[..., offset:offset + video_len], -1, grid, p, "natural", pattern)
    video = video.transpose(-1, -2)  # the keys as rows, as `_class_view` reads them
    return [torch.cat([_alongside(text, count), _class_view(video, start, count, n).transpose(-1, -2)], dim=-1)
            for start, count, n in classes]


def _skiparse_joint_attention(q, k, v, key_mask, T, H, W, P, pattern, video_offset, dropout_p=0.0, scale=None,
                              enable_gqa=False):
    """q, k, v: [B, heads, N, D], the video tokens (T*H*W of them, frame-major) at [offset, offset + T*H*W)."""
    grid, offset = (T, H, W), video_offset
    video_len = T * H * W
    batch = q.shape[0]
    if key_mask is not None:
        key_mask = key_mask.reshape((1,) * (4 - key_mask.dim()) + tuple(key_mask.shape))
    sdpa = dict(dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)

    # video queries: packed, one dense batch per length class, every text key/value alongside
    qv, kv, vv = (relayout_local(x[..., offset:offset + video_len, :], -2, grid, P, "natural", pattern)
                  for x in (q, k, v))
    kt, vt = (_text_part(x, offset, video_len) for x in (k, v))
    classes = _packed_classes(T, H, W, P, pattern, 0, 1)
    outs = []
    for (start, count, n), mask in zip(classes, _class_key_masks(key_mask, batch, grid, P, pattern, offset, classes)):
        keys = torch.cat([_alongside(kt, count), _class_view(kv, start, count, n)], dim=-2)
        values = torch.cat([_alongside(vt, count), _class_view(vv, start, count, n)], dim=-2)
        o = F.scaled_dot_product_attention(_class_view(qv, start, count, n), keys, values, attn_mask=mask, **sdpa)
        outs.append(_class_rows(o, batch))
    out_video = relayout_local(torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0], -2, grid, P, pattern, "natural")

    # text queries: full attention over the whole joined sequence
    out_text = F.scaled_dot_product_attention(_text_part(q, offset, video_len), k, v, attn_mask=key_mask, **sdpa)
    return torch.cat([out_text[..., :offset, :], out_video, out_text[..., offset:, :]], dim=-2)


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
