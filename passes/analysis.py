"""Analysis pass: find the attention calls, tell video self-attention from the rest, infer the grid.

How: a forward dataflow over the graph that tracks, for every tensor, where its video tokens are
(`passes/token_dims.py`: per dim, the factors it is made of, tokens read frame-major). Sources
are patch embeddings: a Conv3d whose output [B, C, T, H, W] carries the grid in dims 2..4, or a
Conv2d on frames folded into the batch ([B*F, C, H, W], the input a reshape of [B, F, C, H, W],
as diffusers' CogVideoXPatchEmbed). Reshapes regroup the factors, permutes
reorder dims, and per-token ops (elementwise, linears and norms over the channel dims,
reductions elsewhere, splits/indexing on other dims) keep them. `cat` along the sequence dim of
video tokens and tensors without tokens (text) makes a *joined* sequence whose video segment
(offset, length) is tracked; slicing or splitting it gives the video tokens or the text back.
Any other op that touches token dims ends the trail there and is recorded as a *stop*, so an error
can name the node where the search ended.

An attention call whose query, key and value all carry the same tokens on their sequence dim is
video self-attention, or joint attention when that dim is a joined text+video sequence; a video
query with other keys is cross-attention; the rest is "other". `OSPConfig.grid` overrides the
inferred grid, and with it (or a grid an earlier graph of the same compile session found) attention
calls are also classified by their sequence length (video self-attention only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from osp_compile.errors import OSPAnalysisError
from osp_compile.report import LAYOUT_KINDS
from .fx_utils import (
    call_args,
    call_kind,
    is_sdpa,
    meta_value,
    normalize_dim,
    product,
    sdpa_args,
    shape_of,
)
from .static_shapes import require_static_sizes
from .token_dims import (
    JOINT,
    OTHER,
    TOK,
    Factor,
    Segment,
    TokenAxis,
    holds_tokens,
    normalize_dim as normalize_layout_dim,
    other_dim,
    permute,
    regroup,
    slice_joint,
)


@dataclass
class AttentionSite:
    """One attention call in a graph."""

    node: fx.Node
    kind: str  # "video_self" | "joint" | "cross" | "other"
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    grid: tuple | None = None
    origin: fx.Node | None = None
    how: str = ""  # how it was classified, or why not video self-attention
    key: tuple = ()
    index: int | None = None  # global index among the sites that get a layout (call order)
    layout: str = "-"
    decision: str = ""
    video_offset: int = 0  # joint: where the video tokens start in the joined sequence
    text_len: int = 0  # joint: how many other (text) tokens the joined sequence holds
    unsupported: str | None = None  # why the site cannot be made sparse (a mask that varies per query, ...)
    reached: bool = False  # the dataflow followed video tokens to its query (whatever it then found)

    @property
    def attention_flops(self) -> int:
        """Multiply-adds x2 of QK^T and PV."""
        return 4 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim


@dataclass
class Analysis:
    sites: list[AttentionSite] = field(default_factory=list)
    stops: list[tuple[fx.Node, str]] = field(default_factory=list)
    origins: list[fx.Node] = field(default_factory=list)
    axes: dict[fx.Node, Any] = field(default_factory=dict)

    @property
    def layout_sites(self) -> list[AttentionSite]:
        """The sites that get a layout entry: video self-attention and joint text+video attention."""
        return [s for s in self.sites if s.kind in LAYOUT_KINDS]

    @property
    def video_sites(self) -> list[AttentionSite]:
        """Video self-attention sites alone (a pass that does not know joint attention sees only these)."""
        return [s for s in self.sites if s.kind == "video_self"]


_ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "floordiv", "neg", "pos", "pow", "rsqrt", "sqrt", "exp", "log",
    "tanh", "sigmoid", "silu", "gelu", "relu", "leaky_relu", "softplus", "mish", "erf", "square",
    "reciprocal", "abs", "sign", "cos", "sin", "clamp", "clamp_min", "clamp_max", "where", "masked_fill",
    "lerp", "addcmul", "addcdiv", "nan_to_num", "dropout", "float", "half", "bfloat16", "double", "to",
    "type", "type_as", "contiguous", "clone", "detach", "requires_grad_", "iadd", "isub", "imul",
    "itruediv", "add_", "sub_", "mul_", "div_", "empty_like", "zeros_like", "ones_like", "full_like",
    "randn_like", "rand_like", "expand", "expand_as", "broadcast_to", "view_as_real_copy",
}
# elementwise ops whose other tensor arguments give only a dtype or a shape, not values
_FIRST_ONLY = {"type_as", "to", "expand_as", "empty_like", "zeros_like", "ones_like", "full_like", "randn_like",
               "rand_like"}
_LINEAR = {"linear", "matmul"}
_NORMS = {"layer_norm", "rms_norm"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "norm", "softmax", "log_softmax", "cumsum", "logsumexp"}
_PERMUTES = {"transpose", "permute", "movedim", "swapaxes", "swapdims", "mT", "t"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as"}
_SPLITS = {"chunk", "split", "unbind", "tensor_split", "split_with_sizes"}
_CONV3D = {"conv3d"}
_CONV2D = {"conv2d"}
_MODULE_KINDS = {
    torch.nn.Linear: "linear", torch.nn.LayerNorm: "layer_norm", torch.nn.Conv3d: "conv3d", torch.nn.Conv2d: "conv2d",
    torch.nn.Dropout: "dropout", torch.nn.GELU: "gelu", torch.nn.SiLU: "silu", torch.nn.Identity: "clone",
}


def _kind_of(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for cls, kind in _MODULE_KINDS.items():
            if isinstance(mod, cls):
                return kind
        return f"module:{type(mod).__name__}"
    return call_kind(node) or node.op


class _Tracker:
    """Runs the dataflow once over a graph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.result = Analysis()
        self.axes = self.result.axes  # node -> TokenAxis | list[TokenAxis | None] (tuple outputs)

    # -- helpers ---------------------------------------------------------------------------------
    def axis(self, node: Any) -> TokenAxis | None:
        a = self.axes.get(node) if isinstance(node, fx.Node) else None
        return a if isinstance(a, TokenAxis) else None

    def stop(self, node: fx.Node, reason: str) -> None:
        self.result.stops.append((node, reason))

    @staticmethod
    def _dims_arg(value: Any, ndim: int) -> tuple[int, ...] | None:
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return tuple(normalize_dim(int(v), ndim) for v in value)
        return (normalize_dim(int(value), ndim),)

    # -- rules -----------------------------------------------------------------------------------
    def run(self) -> Analysis:
        for node in self.gm.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            kind = _kind_of(node, self.gm)
            if kind in _CONV3D and self._conv3d(node):
                continue
            if kind in _CONV2D and self._conv2d(node):
                continue
            if is_sdpa(node):
                self._attention(node)
                continue
            try:
                if kind == "setitem":
                    self._setitem(node)
                    continue
                inputs = [a for a in node.all_input_nodes if a in self.axes]  # tuples too (split -> getitem)
                if not inputs or (kind != "getitem" and not isinstance(meta_value(node), (torch.Tensor, tuple, list))):
                    continue
                out = self._propagate(node, kind, inputs)
            except (TypeError, ValueError, IndexError, KeyError) as exc:  # an argument form the rules do not know
                out = None
                self.stop(node, f"{kind}: could not follow the token dims ({exc})")
            if out is not None:
                self.axes[node] = out
        return self.result

    def _origin(self, node: fx.Node, grid: tuple, layout: list) -> bool:
        self.axes[node] = TokenAxis(tuple(normalize_layout_dim(d) for d in layout), grid, node)
        self.result.origins.append(node)
        return True

    def _conv3d(self, node: fx.Node) -> bool:
        """Conv3d: [B, C, T, H, W], the grid in dims 2..4."""
        shape = shape_of(node)
        if shape is None or len(shape) != 5:
            return False
        b, c, t, h, w = shape
        layout = [other_dim(b), other_dim(c), *((Factor(TOK, n),) for n in (t, h, w))]
        return self._origin(node, (t, h, w), layout)

    def _conv2d(self, node: fx.Node) -> bool:
        """Conv2d on frames folded into the batch: its input is [B, F, C, H, W] reshaped to [B*F, C, H, W]."""
        shape, x = shape_of(node), node.args[0] if node.args else None
        video = x.args[0] if isinstance(x, fx.Node) and _kind_of(x, self.gm) in _RESHAPES and x.args else None
        vshape, xshape = shape_of(video), shape_of(x)
        if shape is None or len(shape) != 4 or vshape is None or len(vshape) != 5 or xshape is None:
            return False
        b, f = vshape[0], vshape[1]
        if not (xshape[0] == b * f and all(a == z for a, z in zip(xshape[1:], vshape[2:]))):
            return False
        _, c, h, w = shape
        layout = [(Factor(OTHER, b), Factor(TOK, f)), other_dim(c), (Factor(TOK, h),), (Factor(TOK, w),)]
        return self._origin(node, (f, h, w), layout)

    def _propagate(self, node: fx.Node, kind: str, inputs: list[fx.Node]) -> Any:
        out_shape = shape_of(node)
        if kind == "getitem":
            return self._getitem(node)
        if kind in ("cat", "concat", "stack"):
            return self._cat(node, kind, out_shape)
        if kind in _ELEMENTWISE and kind not in _FIRST_ONLY:
            return self._broadcast(node, kind, inputs, out_shape)
        if kind in _LINEAR:
            return self._linear(node, kind, out_shape)
        src = node.args[0] if node.args else None
        if src not in self.axes:  # tokens only in a shape, dtype or weight argument
            return None
        ax_in = self.axes[src]
        if not isinstance(ax_in, TokenAxis):
            self.stop(node, f"{kind}: input is a tuple")
            return None
        in_shape = shape_of(src)
        if kind in _SPLITS:
            return self._split(node, kind, ax_in, in_shape)
        if out_shape is None:
            return None
        if kind in _PERMUTES:
            return self._permute(node, kind, ax_in, in_shape)
        if kind in _RESHAPES:
            layout = regroup(ax_in.layout, out_shape)
            if layout is None:
                self.stop(node, f"{kind} {tuple(in_shape)} -> {tuple(out_shape)} merges the token dims with other dims")
                return None
            return ax_in.with_layout(layout)
        if kind in _FIRST_ONLY:
            return self._broadcast(node, kind, [src], out_shape)
        if kind in _NORMS:
            args = call_args(node, ["input", "normalized_shape"])
            n_norm = len(args.get("normalized_shape", ())) if kind != "layer_norm" or node.op != "call_module" else len(
                self.gm.get_submodule(node.target).normalized_shape)
            if not any(holds_tokens(d) for d in ax_in.layout[len(in_shape) - n_norm:]):
                return ax_in
            self.stop(node, f"{kind} normalizes over the token dims")
            return None
        if kind in _REDUCTIONS:
            return self._reduction(node, kind, ax_in, in_shape, out_shape)
        self.stop(node, f"'{kind}' is not known to act per token")
        return None

    def _broadcast(self, node, kind, inputs, out_shape):
        """Elementwise: right-aligned dims; every input with tokens must agree on the dims it does not broadcast."""
        axes = [(self.axes[a], len(shape_of(a))) for a in inputs if isinstance(self.axes.get(a), TokenAxis)]
        first = axes[0][0]
        if any(not ax.same_tokens(first) for ax, _ in axes):
            self.stop(node, f"{kind} combines tokens from different sources")
            return None
        layout = []
        for j, size in enumerate(out_shape):
            dims = {ax.layout[j - len(out_shape) + rank] for ax, rank in axes if j - len(out_shape) + rank >= 0}
            dims.discard(())
            if len(dims) > 1:
                self.stop(node, f"{kind} combines tensors whose dim {j} holds different tokens")
                return None
            dim = dims.pop() if dims else other_dim(size)
            if holds_tokens(dim) and product(f.size for f in dim) != size:
                self.stop(node, f"{kind} changes the size of a token dim")
                return None
            layout.append(dim)
        return first.with_layout(layout)

    def _linear(self, node, kind, out_shape):
        x = node.args[0]
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight", node.kwargs.get("other"))
        if self.axis(w) is not None:
            self.stop(node, f"{kind} contracts two token tensors (an attention product not canonicalized)"
                      if self.axis(x) is not None else f"{kind} has the token tensor as its right operand")
            return None
        ax_in = self.axis(x)
        if ax_in is None:
            return None
        if holds_tokens(ax_in.layout[-1]) or len(out_shape) != len(ax_in.layout):
            self.stop(node, f"{kind} contracts over the token dim")
            return None
        return ax_in.with_layout((*ax_in.layout[:-1], other_dim(out_shape[-1])))

    def _reduction(self, node, kind, ax_in, in_shape, out_shape):
        args = call_args(node, ["input", "dim"])
        dims = self._dims_arg(args.get("dim"), len(in_shape))
        if dims is None:
            self.stop(node, f"{kind} reduces over all dims")
            return None
        if any(holds_tokens(ax_in.layout[d]) for d in dims):
            self.stop(node, f"{kind} over dim {dims} mixes tokens")
            return None
        if len(out_shape) == len(in_shape):  # keepdim, or a softmax/cumsum along a channel dim
            return ax_in.with_layout([() if d in dims and out_shape[d] == 1 else ax_in.layout[d]
                                      for d in range(len(in_shape))])
        return ax_in.with_layout([ax_in.layout[d] for d in range(len(in_shape)) if d not in dims])

    def _permute(self, node, kind, ax_in, in_shape):
        n = len(in_shape)
        order = list(range(n))
        args = list(node.args[1:])
        if kind in ("mT",):
            order[-1], order[-2] = order[-2], order[-1]
        elif kind == "t":
            order = order[::-1]
        elif kind in ("transpose", "swapaxes", "swapdims"):
            a = call_args(node, ["input", "dim0", "dim1"])
            d0, d1 = normalize_dim(a["dim0"], n), normalize_dim(a["dim1"], n)
            order[d0], order[d1] = order[d1], order[d0]
        elif kind == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            dims = node.kwargs.get("dims", dims)
            order = [normalize_dim(int(d), n) for d in dims]
        elif kind == "movedim":
            a = call_args(node, ["input", "source", "destination"])
            src, dst = normalize_dim(a["source"], n), normalize_dim(a["destination"], n)
            order.remove(src)
            order.insert(dst, src)
        layout = permute(ax_in.layout, order)
        if layout is None:
            self.stop(node, f"{kind} reorders the token dims")
            return None
        return ax_in.with_layout(layout)

    def _pieces(self, node, ax_in, dim, sizes) -> list | None:
        """The token axes of consecutive pieces of `dim` with these sizes (split, chunk, ...)."""
        d = ax_in.layout[dim]
        if not holds_tokens(d):
            return [ax_in.with_layout([other_dim(s) if i == dim else x for i, x in enumerate(ax_in.layout)])
                    for s in sizes]
        if d[0].kind != JOINT or len(d) != 1:
            self.stop(node, "split along the token dim")
            return None
        out, start = [], 0
        for s in sizes:
            piece, reason = slice_joint(ax_in, dim, start, start + s)
            if reason is not None:
                self.stop(node, f"split of the joined text+video sequence: {reason}")
                return None
            out.append(piece)
            start += s
        return out

    def _split(self, node, kind, ax_in, in_shape):
        args = call_args(node, ["input", "split_size_or_sections" if kind != "unbind" else "dim", "dim"])
        if kind == "unbind":
            dim = normalize_dim(args.get("dim", 0), len(in_shape))
        else:
            dim = normalize_dim(node.kwargs.get("dim", args.get("dim", 0)), len(in_shape))
        out = meta_value(node)
        if kind == "unbind":
            if holds_tokens(ax_in.layout[dim]):
                self.stop(node, "unbind along the token dim")
                return None
            return [ax_in.with_layout(ax_in.layout[:dim] + ax_in.layout[dim + 1:]) for _ in range(len(out))]
        return self._pieces(node, ax_in, dim, [o.shape[dim] for o in out])

    def _index(self, node, src, idx) -> tuple[TokenAxis | None, str | None]:
        """The token axis of src[idx] (basic indexing), or (None, reason it cannot be followed)."""
        ax = self.axis(src)
        in_shape = shape_of(src)
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(i is Ellipsis for i in items):
            k = items.index(Ellipsis)
            consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
            items = items[:k] + [slice(None)] * (len(in_shape) - consumed) + items[k + 1:]
        items += [slice(None)] * (len(in_shape) - sum(1 for i in items if i is not None))
        layout, in_dim, joint_cut = [], 0, None
        for it in items:
            if it is None:
                layout.append(())
                continue
            dim, n = ax.layout[in_dim], in_shape[in_dim]
            if isinstance(it, fx.Node) or not isinstance(it, (int, slice)):
                return None, ("tensor index on the token dims" if holds_tokens(dim) else "advanced indexing")
            if isinstance(it, int):
                if holds_tokens(dim):
                    return None, "indexing selects part of the tokens"
            elif it == slice(None):
                layout.append(dim)
            elif any(isinstance(v, fx.Node) for v in (it.start, it.stop, it.step)):
                return None, "a slice with bounds computed in the graph"
            else:
                start, stop, step = it.indices(n)
                if not holds_tokens(dim):
                    layout.append(other_dim(len(range(start, stop, step))))
                elif dim == (dim[0],) and dim[0].kind == JOINT and step == 1:  # a whole range too: no text
                    joint_cut = (len(layout), start, stop)  # around the video is the video alone
                    layout.append(dim)
                elif (start, stop, step) == (0, n, 1):
                    layout.append(dim)
                else:
                    return None, "indexing selects part of the tokens"
            in_dim += 1
        out = ax.with_layout(layout)
        if joint_cut is not None and out is not None:
            return slice_joint(out, *joint_cut)
        return out, None

    def _getitem(self, node):
        src, idx = node.args[0], node.args[1]
        ax = self.axes.get(src)
        if isinstance(ax, list):
            return ax[idx] if isinstance(idx, int) and idx < len(ax) else None
        if not isinstance(ax, TokenAxis):
            return None
        out, reason = self._index(node, src, idx)
        if reason is not None:
            self.stop(node, reason)
        return out

    def _setitem(self, node):
        """x[idx] = value, in place: the values written must be the tokens already at those places."""
        target, idx, value = node.args[:3]
        if self.axis(target) is None:
            if self.axis(value) is not None:
                self.stop(node, "writes video tokens into a tensor without tokens")
            return
        region, reason = self._index(node, target, idx)
        va = self.axis(value)
        if reason is None and va is not None:
            lead = len(region.layout) - len(va.layout) if region is not None else 0
            if region is None or lead < 0 or not va.same_tokens(region) or any(
                    d != r for d, r in zip(va.layout, region.layout[lead:]) if d):
                reason = "writes tokens at other places than where they were"
        if reason is not None:
            self.stop(node, f"in-place write: {reason}")
            del self.axes[target]

    def _cat(self, node, kind, out_shape):
        args = call_args(node, ["tensors", "dim"], {"dim": 0})
        tensors = list(args["tensors"])
        axes = [self.axis(t) for t in tensors]
        tracked = [(i, a) for i, a in enumerate(axes) if a is not None]
        if not tracked:
            return None
        dim = normalize_dim(args["dim"], len(out_shape))
        first = tracked[0][1]
        if any(not a.same_tokens(first) for _, a in tracked):
            self.stop(node, f"{kind} joins tokens from different sources")
            return None
        if kind == "stack":
            if any(a.layout != first.layout for _, a in tracked):
                self.stop(node, "stack of tensors that hold tokens in different dims")
                return None
            return first.with_layout([*first.layout[:dim], other_dim(len(tensors)), *first.layout[dim:]])
        on_seq = [(i, a) for i, a in tracked if holds_tokens(a.layout[dim])]
        if not on_seq:
            rest = {a.layout[:dim] + a.layout[dim + 1:] for _, a in tracked}
            if len(rest) != 1:
                self.stop(node, f"{kind} joins tensors that hold tokens in different dims")
                return None
            return first.with_layout([other_dim(out_shape[d]) if d == dim else x for d, x in enumerate(first.layout)])
        if len(tracked) != 1:
            self.stop(node, f"{kind} along the sequence joins video tokens with other token tensors")
            return None
        i, ax = on_seq[0]
        seq = ax.layout[dim]
        sizes = [shape_of(t)[dim] for t in tensors]
        if len(seq) != 1:
            self.stop(node, f"{kind} along a dim that holds tokens and other factors")
            return None
        inner = ax.segment.offset if seq[0].kind == JOINT else 0
        layout = [(Factor(JOINT, sum(sizes)),) if d == dim else x for d, x in enumerate(ax.layout)]
        return ax.with_layout(layout, segment=Segment(sum(sizes[:i]) + inner, sum(sizes)))

    def _attention(self, node: fx.Node) -> None:
        a = sdpa_args(node)
        q, k, v = a["query"], a["key"], a["value"]
        qs, ks = shape_of(q), shape_of(k)
        site = AttentionSite(
            node=node, kind="other", batch=product(qs[:-3]) if len(qs) > 3 else qs[0],
            heads=qs[-3] if len(qs) >= 3 else 1, q_len=qs[-2], kv_len=ks[-2], head_dim=qs[-1],
        )
        qa, ka, va = (self.axis(x) for x in (q, k, v))
        on_seq = lambda ax, x: ax is not None and ax.seq_dim() == len(shape_of(x)) - 2  # noqa: E731
        if on_seq(qa, q) and on_seq(ka, k) and on_seq(va, v) and ka.same_tokens(qa) and va.same_tokens(qa):
            site.grid, site.origin = qa.grid, qa.origin
            if qa.is_joint:
                site.kind, site.video_offset = "joint", qa.segment.offset
                site.text_len = site.q_len - product(qa.grid)
                site.how = (f"joint text+video attention: {site.text_len} text tokens, video tokens at "
                            f"[{site.video_offset}, {site.video_offset + site.q_len - site.text_len}) of the sequence")
                _check_joint_mask(site)
            else:
                site.kind, site.how = "video_self", "tokens followed from the patch embedding"
        elif on_seq(qa, q) and not qa.is_joint:
            site.kind, site.grid, site.origin = "cross", qa.grid, qa.origin
            site.how = "video queries, keys from elsewhere"
        elif on_seq(qa, q):
            site.how = "joint text+video queries whose keys or values are not the same joined sequence"
        else:
            site.how = "query is not video tokens on its sequence dim"
        if on_seq(qa, q):
            site.reached = True
            self.axes[node] = qa.with_layout((*qa.layout[:-1], other_dim(shape_of(node)[-1])))
        self.result.sites.append(site)


def _check_joint_mask(site: AttentionSite) -> None:
    """A joint site keeps only a key mask (text padding): one that varies per query cannot be folded."""
    mask = sdpa_args(site.node)["attn_mask"]
    if mask is not None and (shape_of(mask) is None or (len(shape_of(mask)) >= 2 and shape_of(mask)[-2] != 1)):
        site.unsupported = "the attention mask varies per query (only a key mask, e.g. text padding, is kept)"


def analyse(gm: fx.GraphModule) -> Analysis:
    """Run the token-axis dataflow and classify every attention call of `gm` (static sizes only:
    `passes/static_shapes.py` runs before)."""
    require_static_sizes(gm)
    return _Tracker(gm).run()


def classify_by_grid(analysis: Analysis, grid: tuple[int, int, int], joint: set[tuple[int, int]] = frozenset()) -> None:
    """With a known grid, classify the attention calls the dataflow could not account for by their
    sequence lengths: those whose query it never reached, in a graph where it cannot have reached
    every video token (no patch embedding here - a graph after a graph break, a model that takes
    tokens - or a trail that stopped). Where it followed the tokens from the embedding without a
    stop, a call it did not reach is not video, whatever its length: a text as long as the video
    stays text. `joint`: (joined length, video offset) of the joint text+video attention earlier
    graphs found, so that such calls after a graph break are found again by their length."""
    if analysis.origins and not analysis.stops:
        return
    tokens = grid[0] * grid[1] * grid[2]
    offsets = dict(joint)
    for site in analysis.sites:
        if site.reached or site.kind != "other":
            continue
        if site.q_len == tokens and site.kv_len == tokens:
            site.kind, site.grid, site.how = "video_self", tuple(grid), "sequence length equals T*H*W of the grid"
        elif site.q_len == site.kv_len and site.q_len in offsets:
            site.kind, site.grid, site.video_offset = "joint", tuple(grid), offsets[site.q_len]
            site.text_len = site.q_len - tokens
            site.how = (f"sequence length equals an earlier graph's joint text+video attention ({site.text_len} text "
                        f"tokens, video tokens at {site.video_offset})")
            _check_joint_mask(site)
        elif site.q_len == tokens:
            site.kind, site.grid, site.how = "cross", tuple(grid), "query length equals T*H*W of the grid"


def describe_stops(analysis: Analysis, limit: int = 3) -> str:
    if not analysis.origins:
        return ("no patch embedding (a 3-D convolution with a [B, C, T, H, W] output, or a 2-D convolution on "
                "frames folded into the batch) was found in this graph")
    if not analysis.stops:
        return "the token dims were followed but reached no attention call"
    parts = [f"node '{n.name}' ({r})" for n, r in analysis.stops[:limit]]
    more = f" and {len(analysis.stops) - limit} more" if len(analysis.stops) > limit else ""
    return "the token-grid search stopped at " + "; ".join(parts) + more


def no_grid_error(analysis: Analysis) -> OSPAnalysisError:
    return OSPAnalysisError(
        f"found {len(analysis.sites)} attention call(s) but could not prove any of them is video self-attention: "
        f"{describe_stops(analysis)}. Pass OSPConfig(grid=(T, H, W)) (the token grid after patch embedding) "
        f"so attention calls can be matched by sequence length."
    )


def _keyed(sites: list[AttentionSite]) -> None:
    """Give each site a stable key; repeated keys in one graph (a loop) get an occurrence number."""
    from osp_compile.pipeline import site_key

    seen: dict[tuple, int] = {}
    for s in sites:
        base = site_key(s.node)
        seen[base] = seen.get(base, -1) + 1
        s.key = (*base, seen[base])


def analysis_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, "PassReport"]:
    """Classify the attention calls, fix the grid, number the video sites and give each its layout."""
    from osp_compile.report import PassReport, SiteRow

    an = analyse(gm)
    cfg, reg = ctx.config, ctx.registry
    if cfg.grid is not None:
        tokens = cfg.grid[0] * cfg.grid[1] * cfg.grid[2]
        for s in an.layout_sites:
            if s.q_len - s.text_len != tokens:
                raise OSPAnalysisError(
                    f"OSPConfig.grid={cfg.grid} has {tokens} tokens but the video self-attention at node "
                    f"'{s.node.name}' has {s.q_len - s.text_len}: give the token grid after patch embedding."
                )
            found = s.grid
            if found is not None and found != cfg.grid:
                raise OSPAnalysisError(
                    f"OSPConfig.grid={cfg.grid} contradicts the grid {found} the analysis read for the attention at "
                    f"node '{s.node.name}' ({s.how}): its tokens are ordered as that grid. Drop grid= (it is for "
                    f"models where no grid can be found), or correct it."
                )
            s.grid, s.origin, s.how = tuple(cfg.grid), None, "grid from OSPConfig.grid"
        classify_by_grid(an, cfg.grid, reg.joint)
    elif not an.layout_sites and reg.grid is not None:
        classify_by_grid(an, reg.grid, reg.joint)
    if an.layout_sites and reg.grid is None:
        reg.grid = an.layout_sites[0].grid
    reg.joint |= {(s.q_len, s.video_offset) for s in an.layout_sites if s.kind == "joint"}
    ctx.analysis = an
    if an.sites and not an.layout_sites and not reg.keys:
        err = no_grid_error(an)
        if cfg.on_unsupported == "error":
            raise err
        for s in an.sites:
            s.decision = f"kept dense: {err}"
    _keyed(an.sites)
    for s in an.sites:
        if s.kind not in LAYOUT_KINDS and s.key in reg.keys:  # a recompile (new inputs) lost a site
            msg = (f"the attention at '{s.key[0] or s.node.name}' was video self-attention site {reg.keys[s.key]} "
                   f"in an earlier graph of this model, but not in this one (new input shapes?): {s.how}")
            if cfg.on_unsupported == "error":
                raise OSPAnalysisError(msg + ". Convert again for these inputs (with grid= if they need one), or use "
                                             "OSPConfig(on_unsupported='skip') to run such calls dense.")
            s.decision = f"kept dense: {msg}"
    for s in an.layout_sites:
        s.index = reg.index_of(s.key)
    layouts = reg.layouts(len(an.layout_sites)) if an.layout_sites else []
    for s in an.sites:
        if s.kind in LAYOUT_KINDS:
            s.layout = layouts[s.index]
        ctx.report.record_site(s.key, SiteRow(
            where=s.key[0] or s.node.name, kind=s.kind, index=s.index, layout=s.layout, batch=s.batch,
            heads=s.heads, tokens=s.q_len, kv_tokens=s.kv_len, head_dim=s.head_dim,
            grid=s.grid, subsequence_len=None,
            flops_before=s.attention_flops, flops_after=s.attention_flops, decision=s.decision or s.how,
            text_tokens=s.text_len,
        ))
    kinds = {k: sum(1 for s in an.sites if s.kind == k) for k in ("video_self", "joint", "cross", "other")}
    grid = reg.grid if reg.grid else "unknown"
    summary = (f"{len(an.sites)} attention call(s): {kinds['video_self']} video self, {kinds['joint']} joint "
               f"text+video, {kinds['cross']} cross, {kinds['other']} other; grid {grid}")
    return gm, PassReport("analysis", summary, [{"node": s.node.name, "kind": s.kind, "how": s.how} for s in an.sites])
