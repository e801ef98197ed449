"""Target-neutral operators that the passes insert (namespace ``osp``).

They are registered with `torch.library` as CompositeImplicitAutograd: in a Dynamo/FX graph each is
one readable node that lowering can map to a kernel per target, while autograd, FakeTensor tracing
and Inductor see their plain-torch decomposition (so backward and fusion come for free and exact).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .skiparse_layout import fold, key_padding_mask, real_length_classes, relayout_local, unfold
from .token_layouts import owned_subsequences

_lib = torch.library.Library("osp", "DEF")

_lib.define(
    "skiparse_attention(Tensor q, Tensor k, Tensor v, SymInt T, SymInt H, SymInt W, int P, str pattern, "
    "float dropout_p=0.0, float? scale=None, bool enable_gqa=False) -> Tensor"
)


@torch.library.impl(_lib, "skiparse_attention", "CompositeImplicitAutograd")
def _skiparse_attention(q, k, v, T, H, W, P, pattern, dropout_p=0.0, scale=None, enable_gqa=False):
    """Skiparse-2D self-attention on [B, heads, T*H*W, D] tensors (SDPA layout).

    Folds the P*P subsequences into the batch, runs dense attention inside each (padded keys
    masked out), and unfolds. Equal to dense attention under the mask sid(i) == sid(j).
    """
    grid = (T, H, W)
    qf, kf, vf = (fold(t, -2, grid, P, pattern) for t in (q, k, v))
    mask = key_padding_mask(grid, P, pattern, q.shape[0], q.device)
    out = F.scaled_dot_product_attention(
        qf, kf, vf, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa
    )
    return unfold(out, -2, grid, P, pattern)


skiparse_attention = torch.ops.osp.skiparse_attention.default


_lib.define(
    "skiparse_relayout(Tensor x, int dim, SymInt T, SymInt H, SymInt W, int P, str src, str dst) -> Tensor"
)


@torch.library.impl(_lib, "skiparse_relayout", "CompositeImplicitAutograd")
def _skiparse_relayout(x, dim, T, H, W, P, src, dst):
    """Move a token tensor between the natural and the folded token/group layouts (one process)."""
    return relayout_local(x, dim, (T, H, W), P, src, dst)


_lib.define(
    "folded_attention(Tensor q, Tensor k, Tensor v, SymInt T, SymInt H, SymInt W, int P, str pattern, "
    "int rank=0, int world=1, float dropout_p=0.0, float? scale=None, bool enable_gqa=False) -> Tensor"
)


@torch.library.impl(_lib, "folded_attention", "CompositeImplicitAutograd")
def _folded_attention(q, k, v, T, H, W, P, pattern, rank=0, world=1, dropout_p=0.0, scale=None, enable_gqa=False):
    """Dense attention inside each subsequence of packed q, k, v ([B, heads, tokens, D], the real
    tokens of this rank's subsequences one after another; `token_layouts`). Subsequences of equal
    length run as one dense batch on a view of their rows: no mask and no padding, so the fastest
    dense kernel applies and no row is computed twice."""
    grid = (int(T), int(H), int(W))
    mine = owned_subsequences(P, world, rank)
    outs = []
    for offset, count, n in real_length_classes(grid, P, pattern, mine.start, len(mine)):
        def run(t):  # [B, h, count*n, D] rows -> [B*count, h, n, D]
            t = t.narrow(-2, offset, count * n).unflatten(-2, (count, n))
            return t.movedim(-3, 1).flatten(0, 1)

        o = F.scaled_dot_product_attention(run(q), run(k), run(v), dropout_p=dropout_p, scale=scale,
                                           enable_gqa=enable_gqa)
        outs.append(o.unflatten(0, (q.shape[0], count)).movedim(1, -3).flatten(-3, -2))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


skiparse_relayout = torch.ops.osp.skiparse_relayout.default
folded_attention = torch.ops.osp.folded_attention.default
