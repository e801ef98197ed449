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


_ATTENTION_OPTIONS = "int rank=0, int world=1, float dropout_p=0.0, float? scale=None, bool enable_gqa=False"

_lib.define(
    "folded_attention(Tensor q, Tensor k, Tensor v, SymInt T, SymInt H, SymInt W, int P, str pattern, "
    f"{_ATTENTION_OPTIONS}) -> Tensor"
)
_lib.define(
    "folded_attention_linear(Tensor q, Tensor k, Tensor v, SymInt T, SymInt H, SymInt W, int P, str pattern, "
    f"Tensor weight, Tensor? bias, {_ATTENTION_OPTIONS}) -> Tensor"
)
_lib.define(
    "folded_attention_classes(Tensor q, Tensor k, Tensor v, SymInt T, SymInt H, SymInt W, int P, str pattern, "
    f"{_ATTENTION_OPTIONS}) -> Tensor[]"
)


def _class_view(t, offset, count, n):
    """A class's rows of packed `t` [B, h, tokens, D] as one dense batch [B*count, h, n, D] (a view)."""
    return t.narrow(-2, offset, count * n).unflatten(-2, (count, n)).movedim(-3, 1).flatten(0, 1)


def _length_classes(q, k, v, T, H, W, P, pattern, rank, world):
    """Per length class of this rank's packed subsequences: (q, k, v) as [B*count, heads, n, D] views
    of their rows (subsequences of equal length as one dense batch: no mask, no padding, no copy)."""
    mine = owned_subsequences(P, world, rank)
    for cls in real_length_classes((int(T), int(H), int(W)), P, pattern, mine.start, len(mine)):
        yield _class_view(q, *cls), _class_view(k, *cls), _class_view(v, *cls)


def _class_rows(out, batch):
    """A class's attention output [B*count, h, n, D] back as its rows [B, h, count*n, D]."""
    return out.unflatten(0, (batch, -1)).movedim(1, -3).flatten(-3, -2)


def _class_rows_merged(out, batch):
    """`_class_rows` with the heads merged, [B, count*n, h*D]: what an output projection reads."""
    return _class_rows(out, batch).transpose(-3, -2).flatten(-2)


@torch.library.impl(_lib, "folded_attention", "CompositeImplicitAutograd")
def _folded_attention(q, k, v, T, H, W, P, pattern, rank=0, world=1, dropout_p=0.0, scale=None, enable_gqa=False):
    """Dense attention inside each subsequence of packed q, k, v ([B, heads, tokens, D], the real
    tokens of this rank's subsequences one after another; `token_layouts`), one dense batch per
    length class (`_length_classes`), the classes' outputs concatenated in token order."""
    outs = []
    for qkv in _length_classes(q, k, v, T, H, W, P, pattern, rank, world):
        o = F.scaled_dot_product_attention(*qkv, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
        outs.append(_class_rows(o, q.shape[0]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


@torch.library.impl(_lib, "folded_attention_linear", "CompositeImplicitAutograd")
def _folded_attention_linear(q, k, v, T, H, W, P, pattern, weight, bias, rank=0, world=1, dropout_p=0.0, scale=None,
                             enable_gqa=False):
    """``F.linear(folded_attention(...).transpose(-3, -2).flatten(-2), weight, bias)``: the heads merged
    and the output projection applied per length class, [B, tokens, out_features].

    Why: the classes' attention outputs are separate tensors, and one projection of all tokens needs
    them concatenated first (a copy of the whole activation per sparse site). Projected per class, only
    the projections' outputs are joined, and a compiler folds that join into the elementwise op that
    reads them (the gated residual add), so nothing is copied."""
    outs = []
    for qkv in _length_classes(q, k, v, T, H, W, P, pattern, rank, world):
        o = F.scaled_dot_product_attention(*qkv, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
        outs.append(F.linear(_class_rows_merged(o, q.shape[0]), weight, bias))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


@torch.library.impl(_lib, "folded_attention_classes", "CompositeImplicitAutograd")
def _folded_attention_classes(q, k, v, T, H, W, P, pattern, rank=0, world=1, dropout_p=0.0, scale=None,
                              enable_gqa=False):
    """Each length class's attention output with its heads merged, [B, tokens of the class,
    heads * D], in token order: ``folded_attention(...).transpose(-3, -2).flatten(-2)`` split at the
    class boundaries, without the concatenation.

    Why: for a projection that cannot be applied per class inside one op (a HiF8 linear scales its
    whole activation by one ``max|x|``), the graph itself projects each class
    (``passes/attention_projection.py``), with one max taken over all of them."""
    return [_class_rows_merged(F.scaled_dot_product_attention(*qkv, dropout_p=dropout_p, scale=scale,
                                                              enable_gqa=enable_gqa), q.shape[0])
            for qkv in _length_classes(q, k, v, T, H, W, P, pattern, rank, world)]


_lib.define("linear_gelu(Tensor x, Tensor weight, Tensor? bias, str approximate='none') -> Tensor")


@torch.library.impl(_lib, "linear_gelu", "CompositeImplicitAutograd")
def _linear_gelu(x, weight, bias, approximate="none"):
    """``F.gelu(F.linear(x, weight, bias), approximate=approximate)`` as one node, so that a target
    can run the GELU in its GEMM's epilogue (CUDA: cuBLASLt) instead of as a pass over the output."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


_lib.define("rms_norm_rope(Tensor x, Tensor weight, float eps, Tensor cos, Tensor sin, int heads) -> Tensor")


@torch.library.impl(_lib, "rms_norm_rope", "CompositeImplicitAutograd")
def _rms_norm_rope(x, weight, eps, cos, sin, heads):
    """A q or k projection's RMSNorm over the model width, split into ``heads``, then rotary
    embedding of interleaved pairs ``(2i, 2i+1)`` by the tables ``cos``/``sin`` (broadcast to
    ``[..., S, heads, head_dim]``), each step rounded to ``x``'s dtype as the calls it replaces
    (``passes/norm_rope.py``) round. One node, so that a target can run it as one pass over the
    activation: fused by a compiler, the pairs' partner reads are gathers it cannot vectorize."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight
    y = y.view(*y.shape[:-1], heads, -1)
    yf = y.float()
    even, odd = yf.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-odd, even), dim=-1).flatten(-2)
    return (yf * cos + rotated * sin).type_as(y)


skiparse_relayout = torch.ops.osp.skiparse_relayout.default
folded_attention = torch.ops.osp.folded_attention.default
folded_attention_linear = torch.ops.osp.folded_attention_linear.default
folded_attention_classes = torch.ops.osp.folded_attention_classes.default
linear_gelu = torch.ops.osp.linear_gelu.default
rms_norm_rope = torch.ops.osp.rms_norm_rope.default
