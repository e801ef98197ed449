"""`osp::skiparse_joint_attention`: Skiparse-2D at an attention call over text and video tokens joined.

CogVideoX (text, then video) and HunyuanVideo (video, then text) run one attention over a sequence
that joins the two. At a sparse site the meaning is that of a mask over the joined sequence:

  * a video query attends every (unmasked) text key and the video keys of its own subsequence;
  * a text query attends every (unmasked) key: text stays full attention.

It is never computed as that mask over the whole sequence (that costs as much as dense attention).
Video queries are folded into P*P subsequences (`skiparse_layout.fold`, the batch becomes P*P*B) and
each subsequence attends its own video keys with the text keys/values placed alongside; text
queries run one small full attention over all keys. Both are plain SDPA calls, so the op is
CompositeImplicitAutograd like `osp::skiparse_attention`: one readable node in a graph, exact
autograd and Inductor fusion underneath, any target's dense kernel can run the pieces.

The only mask the op accepts from the model is a key mask (Hunyuan's text padding): one that does
not vary with the query, shape [B or 1, heads or 1, 1, N] (or fewer leading dims). Its video part is
folded with the keys; padding added by the fold is masked as well.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .skiparse_layout import fold, padded_extent, subsequence_length, unfold

_lib = torch.library.Library("osp", "FRAGMENT")
_lib.define(
    "skiparse_joint_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, SymInt T, SymInt H, SymInt W, "
    "int P, str pattern, SymInt video_offset, float dropout_p=0.0, float? scale=None, bool enable_gqa=False) -> Tensor"
)


def _text_part(x: torch.Tensor, offset, video_len) -> torch.Tensor:
    """The text tokens of the joined dim -2 (before and after the video segment), in order."""
    return torch.cat([x[..., :offset, :], x[..., offset + video_len:, :]], dim=-2)


def _blocked(mask: torch.Tensor):
    """The value that blocks a key in a mask of this dtype (False, or -inf for an additive mask)."""
    return False if mask.dtype == torch.bool else float("-inf")


def _folded_key_mask(key_mask: torch.Tensor | None, n, batch: int, grid, p: int, pattern: str, offset,
                     device: torch.device) -> torch.Tensor | None:
    """The key mask of the folded video queries: [P*P*B, heads|1, 1, Lt + L], text keys first.

    The text part is the model's (repeated for every subsequence), the video part is folded like the
    keys, and the fold's padding is blocked. None when nothing needs masking.
    """
    t, h, w = grid
    video_len = t * h * w
    if key_mask is None:
        if padded_extent(h, p) == h and padded_extent(w, p) == w:
            return None
        key_mask = torch.ones(1, 1, 1, n, dtype=torch.bool, device=device)
    text = _text_part(key_mask.unsqueeze(-1), offset, video_len).squeeze(-1)
    video = key_mask[..., offset:offset + video_len]
    text = text.expand(batch, *text.shape[1:]).repeat(p * p, 1, 1, 1)
    video = fold(video.expand(batch, *video.shape[1:]), -1, grid, p, pattern, pad_value=_blocked(video))
    return torch.cat([text, video], dim=-1)


def _skiparse_joint_attention(q, k, v, key_mask, T, H, W, P, pattern, video_offset, dropout_p=0.0, scale=None,
                              enable_gqa=False):
    """q, k, v: [B, heads, N, D], the video tokens (T*H*W of them, frame-major) at [offset, offset + T*H*W)."""
    grid, offset = (T, H, W), video_offset
    video_len = T * H * W
    pp = P * P
    if key_mask is not None:
        key_mask = key_mask.reshape((1,) * (4 - key_mask.dim()) + tuple(key_mask.shape))
    sdpa = dict(dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)

    # video queries: P*P subsequences in the batch, each with every text key/value alongside
    qv, kv, vv = (fold(x[..., offset:offset + video_len, :], -2, grid, P, pattern) for x in (q, k, v))
    kt, vt = (_text_part(x, offset, video_len).repeat(pp, 1, 1, 1) for x in (k, v))
    mask = _folded_key_mask(key_mask, q.shape[-2], q.shape[0], grid, P, pattern, offset, q.device)
    out_video = F.scaled_dot_product_attention(qv, torch.cat([kt, kv], dim=-2), torch.cat([vt, vv], dim=-2),
                                               attn_mask=mask, **sdpa)
    out_video = unfold(out_video, -2, grid, P, pattern)

    # text queries: full attention over the whole joined sequence
    out_text = F.scaled_dot_product_attention(_text_part(q, offset, video_len), k, v, attn_mask=key_mask, **sdpa)
    return torch.cat([out_text[..., :offset, :], out_video, out_text[..., offset:, :]], dim=-2)


torch.library.impl(_lib, "skiparse_joint_attention", "CompositeImplicitAutograd")(_skiparse_joint_attention)

skiparse_joint_attention = torch.ops.osp.skiparse_joint_attention.default


def skiparse_attention_flops(batch: int, heads: int, head_dim: int, grid, p: int, text_len: int = 0) -> int:
    """Multiply-adds x2 of QK^T and PV at a sparse site as the ops compute them (padding included):
    `osp::skiparse_attention` when text_len is 0, else `osp::skiparse_joint_attention`."""
    sub = subsequence_length(grid, p)
    video = p * p * batch * sub * (text_len + sub)
    text = batch * text_len * (text_len + grid[0] * grid[1] * grid[2])
    return 4 * heads * head_dim * (video + text)
