"""Analysis pass: find the attention calls, tell video self-attention from the rest, infer the grid.

How: a forward dataflow over the graph that tracks, for every tensor, which of its dimensions hold
the video tokens (frame-major, on the (T, H, W) grid). The source is the patch embedding: a 3-D
convolution whose output [B, C, T, H, W] carries the grid in dims 2..4. Reshapes are followed by
prefix products (sympy when sizes are symbolic), permutes by their dim order, and per-token ops
(elementwise, linears and norms over the channel dims, reductions elsewhere, chunk/split/getitem
on other dims) keep the annotation. Any other op that touches annotated dims ends the trail there
and is recorded as a *stop*, so an error can name the node where the search ended.

An attention call whose query, key and value all carry tokens of one origin on their sequence dim
is video self-attention; a video query with other keys is cross-attention; the rest is "other".
`OSPConfig.grid` overrides the inferred grid, and with it (or a grid an earlier graph of the same
compile session found) attention calls are also classified by their sequence length.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from osp_compile.errors import OSPAnalysisError
from .fx_utils import (
    call_args,
    hint,
    is_sdpa,
    meta_value,
    normalize_dim,
    op_name,
    product,
    same_size,
    sdpa_args,
    shape_of,
)


@dataclass(frozen=True)
class TokenAxis:
    """Consecutive dims of a tensor that hold the video tokens, frame-major, and where they came from."""

    dims: tuple[int, ...]
    grid: tuple[Any, Any, Any]
    origin: fx.Node

    def shifted(self, offset: int) -> "TokenAxis":
        return TokenAxis(tuple(d + offset for d in self.dims), self.grid, self.origin)

    def with_dims(self, dims: tuple[int, ...]) -> "TokenAxis":
        return TokenAxis(dims, self.grid, self.origin)


@dataclass
class AttentionSite:
    """One attention call in a graph."""

    node: fx.Node
    kind: str  # "video_self" | "cross" | "other"
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    grid: tuple | None = None
    origin: fx.Node | None = None
    how: str = ""  # how it was classified, or why not video self-attention
    key: tuple = ()
    index: int | None = None  # global index among video self-attention sites (call order)
    layout: str = "-"
    decision: str = ""

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
    def video_sites(self) -> list[AttentionSite]:
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
_LINEAR = {"linear", "matmul"}
_NORMS = {"layer_norm", "rms_norm"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "norm", "softmax", "log_softmax", "cumsum", "logsumexp"}
_PERMUTES = {"transpose", "permute", "movedim", "swapaxes", "swapdims", "mT", "t"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as"}
_SPLITS = {"chunk", "split", "unbind", "tensor_split", "split_with_sizes"}
_CONV3D = {"conv3d"}
_MODULE_KINDS = {
    torch.nn.Linear: "linear", torch.nn.LayerNorm: "layer_norm", torch.nn.Conv3d: "conv3d",
    torch.nn.Dropout: "dropout", torch.nn.GELU: "gelu", torch.nn.SiLU: "silu", torch.nn.Identity: "clone",
}


def _kind_of(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for cls, kind in _MODULE_KINDS.items():
            if isinstance(mod, cls):
                return kind
        return f"module:{type(mod).__name__}"
    name = op_name(node)
    return name[len("method:"):] if name.startswith("method:") else name


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(meta_value(a), torch.Tensor)]


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
            if kind in _CONV3D:
                self._conv3d(node)
                continue
            if is_sdpa(node):
                self._attention(node)
                continue
            inputs = [a for a in _tensor_inputs(node) if a in self.axes]
            if not inputs or (kind != "getitem" and not isinstance(meta_value(node), (torch.Tensor, tuple, list))):
                continue
            try:
                out = self._propagate(node, kind, inputs)
            except (TypeError, ValueError, IndexError, KeyError) as exc:  # an argument form the rules do not know
                out = None
                self.stop(node, f"{kind}: could not follow the token dims ({exc})")
            if out is not None:
                self.axes[node] = out
        return self.result

    def _conv3d(self, node: fx.Node) -> None:
        shape = shape_of(node)
        if shape is not None and len(shape) == 5:
            self.axes[node] = TokenAxis((2, 3, 4), tuple(shape[2:]), node)
            self.result.origins.append(node)

    def _propagate(self, node: fx.Node, kind: str, inputs: list[fx.Node]) -> Any:
        src = inputs[0]
        ax_in = self.axes.get(src)
        out_shape = shape_of(node)
        if kind == "getitem":
            return self._getitem(node)
        if not isinstance(ax_in, TokenAxis):
            self.stop(node, f"{kind}: input is a tuple")
            return None
        in_shape = shape_of(src)
        if kind in _SPLITS:
            return self._split(node, kind, ax_in, in_shape)
        if out_shape is None:
            return None
        if kind in _PERMUTES:
            return self._permute(node, kind, ax_in, in_shape, out_shape)
        if kind in _RESHAPES:
            return self._reshape(node, kind, ax_in, in_shape, out_shape)
        if kind in ("cat", "concat", "stack"):
            return self._cat(node, kind, inputs, out_shape)
        if kind in _ELEMENTWISE:
            return self._broadcast(node, kind, inputs, out_shape)
        if kind in _LINEAR:
            return self._linear(node, kind, inputs, ax_in, in_shape, out_shape)
        if kind in _NORMS:
            args = call_args(node, ["input", "normalized_shape"])
            n_norm = len(args.get("normalized_shape", ())) if kind != "layer_norm" or node.op != "call_module" else len(
                self.gm.get_submodule(node.target).normalized_shape)
            if max(ax_in.dims) < len(in_shape) - n_norm:
                return ax_in
            self.stop(node, f"{kind} normalizes over the token dims")
            return None
        if kind in _REDUCTIONS:
            return self._reduction(node, kind, ax_in, in_shape, out_shape)
        self.stop(node, f"'{kind}' is not known to act per token")
        return None

    def _broadcast(self, node, kind, inputs, out_shape):
        mapped = None
        for a in inputs:
            ax = self.axes.get(a)
            if not isinstance(ax, TokenAxis):
                continue
            m = ax.shifted(len(out_shape) - len(shape_of(a)))
            if mapped is not None and (m.dims != mapped.dims or m.origin is not mapped.origin):
                self.stop(node, f"{kind} combines tokens from different dims or sources")
                return None
            mapped = m
        in_shape = shape_of(inputs[0])
        ax0 = self.axes[inputs[0]]
        for d_out, d_in in zip(mapped.dims, ax0.dims):
            if not same_size(out_shape[d_out], in_shape[d_in]):
                self.stop(node, f"{kind} changes the size of a token dim")
                return None
        return mapped

    def _linear(self, node, kind, inputs, ax_in, in_shape, out_shape):
        if len(inputs) > 1 and self.axes.get(inputs[1]) is not None:
            self.stop(node, f"{kind} contracts two token tensors (an attention product not canonicalized)")
            return None
        if node.args and node.args[0] is not inputs[0]:
            self.stop(node, f"{kind} has the token tensor as its right operand")
            return None
        if max(ax_in.dims) >= len(in_shape) - 1:
            self.stop(node, f"{kind} contracts over the token dim")
            return None
        return ax_in.shifted(len(out_shape) - len(in_shape))

    def _reduction(self, node, kind, ax_in, in_shape, out_shape):
        args = call_args(node, ["input", "dim"])
        dims = self._dims_arg(args.get("dim"), len(in_shape))
        if dims is None:
            self.stop(node, f"{kind} reduces over all dims")
            return None
        if set(dims) & set(ax_in.dims):
            self.stop(node, f"{kind} over dim {dims} mixes tokens")
            return None
        if len(out_shape) == len(in_shape):
            return ax_in
        return ax_in.shifted(-sum(1 for d in dims if d < ax_in.dims[0]))

    def _permute(self, node, kind, ax_in, in_shape, out_shape):
        n = len(in_shape)
        order = list(range(n))
        args = list(node.args[1:] if node.op == "call_method" else node.args[1:])
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
        new = tuple(j for j in range(n) if order[j] in ax_in.dims)
        if [order[j] for j in new] != list(ax_in.dims) or any(b - a != 1 for a, b in zip(new, new[1:])):
            self.stop(node, f"{kind} splits or reorders the token dims")
            return None
        return ax_in.with_dims(new)

    def _reshape(self, node, kind, ax_in, in_shape, out_shape):
        pre = product(in_shape[: ax_in.dims[0]])
        t, h, w = ax_in.grid
        boundaries = [t, t * h, t * h * w]
        # find where the token block starts in the output, skipping size-1 dims
        start = None
        for a in range(len(out_shape)):
            if same_size(product(out_shape[:a]), pre) and not (same_size(out_shape[a], 1) and not same_size(t, 1)):
                start = a
                break
        if start is not None:
            acc = 1
            for b in range(start, len(out_shape)):
                acc = acc * out_shape[b]
                if not any(same_size(acc, x) for x in boundaries):
                    break
                if same_size(acc, boundaries[-1]):
                    return ax_in.with_dims(tuple(range(start, b + 1)))
        self.stop(node, f"{kind} {tuple(in_shape)} -> {tuple(out_shape)} merges the token dims with other dims")
        return None

    def _split(self, node, kind, ax_in, in_shape):
        args = call_args(node, ["input", "split_size_or_sections" if kind != "unbind" else "dim", "dim"])
        if kind == "unbind":
            dim = normalize_dim(args.get("dim", 0), len(in_shape))
        else:
            dim = normalize_dim(node.kwargs.get("dim", args.get("dim", 0)), len(in_shape))
        if dim in ax_in.dims:
            self.stop(node, f"{kind} along the token dim")
            return None
        out = meta_value(node)
        shift = -1 if (kind == "unbind" and dim < ax_in.dims[0]) else 0
        return [ax_in.shifted(shift) for _ in range(len(out))]

    def _getitem(self, node):
        src, idx = node.args[0], node.args[1]
        ax = self.axes.get(src)
        if isinstance(ax, list):
            return ax[idx] if isinstance(idx, int) and idx < len(ax) else None
        if not isinstance(ax, TokenAxis):
            return None
        in_shape = shape_of(src)
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(i is Ellipsis for i in items):
            k = items.index(Ellipsis)
            consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
            items = items[:k] + [slice(None)] * (len(in_shape) - consumed) + items[k + 1:]
        out_dim, in_dim, new = 0, 0, []
        for it in items:
            if it is None:
                out_dim += 1
                continue
            if isinstance(it, fx.Node) or not isinstance(it, (int, slice)):
                if in_dim in ax.dims:
                    self.stop(node, "tensor index on the token dims")
                    return None
                self.stop(node, "advanced indexing")
                return None
            if in_dim in ax.dims:
                if not (isinstance(it, slice) and it == slice(None)):
                    self.stop(node, "indexing selects part of the tokens")
                    return None
                new.append(out_dim)
            if isinstance(it, slice):
                out_dim += 1
            in_dim += 1
        for d in range(in_dim, len(in_shape)):
            if d in ax.dims:
                new.append(out_dim)
            out_dim += 1
        return ax.with_dims(tuple(new))

    def _cat(self, node, kind, inputs, out_shape):
        args = call_args(node, ["tensors", "dim"], {"dim": 0})
        axes = [self.axes.get(a) for a in args["tensors"]]
        if any(not isinstance(a, TokenAxis) for a in axes) or len({(a.dims, a.origin) for a in axes}) != 1:
            self.stop(node, f"{kind} joins video tokens with other tensors (joint attention is not followed yet)")
            return None
        ax = axes[0]
        n_in = len(shape_of(args["tensors"][0]))
        dim = normalize_dim(args["dim"], n_in + (1 if kind == "stack" else 0))
        if kind == "cat":
            if dim in ax.dims:
                self.stop(node, "cat along the token dim")
                return None
            return ax
        return ax.shifted(1) if dim <= ax.dims[0] else ax

    def _attention(self, node: fx.Node) -> None:
        a = sdpa_args(node)
        q, k, v = a["query"], a["key"], a["value"]
        qs, ks = shape_of(q), shape_of(k)
        site = AttentionSite(
            node=node, kind="other", batch=hint(product(qs[:-3])) if len(qs) > 3 else hint(qs[0]),
            heads=hint(qs[-3]) if len(qs) >= 3 else 1, q_len=hint(qs[-2]), kv_len=hint(ks[-2]), head_dim=hint(qs[-1]),
        )
        qa, ka, va = (self.axis(x) for x in (q, k, v))
        seq = lambda ax, shape: ax is not None and ax.dims == (len(shape) - 2,)  # noqa: E731
        if seq(qa, qs) and seq(ka, ks) and seq(va, shape_of(v)) and ka.origin is qa.origin and va.origin is qa.origin:
            site.kind, site.grid, site.origin = "video_self", qa.grid, qa.origin
            site.how = "tokens followed from the patch embedding"
        elif seq(qa, qs):
            site.kind, site.grid, site.origin = "cross", qa.grid, qa.origin
            site.how = "video queries, keys from elsewhere"
        else:
            site.how = "query is not video tokens on its sequence dim"
        if qa is not None and seq(qa, qs):
            self.axes[node] = qa
        self.result.sites.append(site)


def analyse(gm: fx.GraphModule) -> Analysis:
    """Run the token-axis dataflow and classify every attention call of `gm`."""
    return _Tracker(gm).run()


def classify_by_grid(analysis: Analysis, grid: tuple[int, int, int]) -> None:
    """With a known grid, classify the remaining attention calls by their sequence lengths."""
    tokens = grid[0] * grid[1] * grid[2]
    for site in analysis.sites:
        if site.kind == "video_self":
            continue
        if site.q_len == tokens and site.kv_len == tokens:
            site.kind, site.grid, site.how = "video_self", tuple(grid), "sequence length equals T*H*W of the grid"
        elif site.q_len == tokens and site.kind == "other":
            site.kind, site.grid, site.how = "cross", tuple(grid), "query length equals T*H*W of the grid"


def describe_stops(analysis: Analysis, limit: int = 3) -> str:
    if not analysis.origins:
        return "no patch embedding (3-D convolution with a [B, C, T, H, W] output) was found in this graph"
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
        for s in an.video_sites:
            if s.q_len != tokens:
                raise OSPAnalysisError(
                    f"OSPConfig.grid={cfg.grid} has {tokens} tokens but the video self-attention at node "
                    f"'{s.node.name}' has {s.q_len}: give the token grid after patch embedding."
                )
            s.grid, s.origin, s.how = tuple(cfg.grid), None, "grid from OSPConfig.grid"
        classify_by_grid(an, cfg.grid)
    elif not an.video_sites and reg.grid is not None:
        classify_by_grid(an, reg.grid)
    if an.video_sites and reg.grid is None:
        reg.grid = tuple(hint(g) for g in an.video_sites[0].grid)
    ctx.analysis = an
    if an.sites and not an.video_sites and not reg.keys:
        err = no_grid_error(an)
        if cfg.on_unsupported == "error":
            raise err
        for s in an.sites:
            s.decision = f"kept dense: {err}"
    _keyed(an.sites)
    for s in an.video_sites:
        s.index = reg.index_of(s.key)
    layouts = reg.layouts(len(an.video_sites)) if an.video_sites else []
    for s in an.sites:
        if s.kind == "video_self":
            s.layout = layouts[s.index]
        ctx.report.record_site(s.key, SiteRow(
            where=s.key[0] or s.node.name, kind=s.kind, index=s.index, layout=s.layout, batch=s.batch,
            heads=s.heads, tokens=s.q_len, kv_tokens=s.kv_len, head_dim=s.head_dim,
            grid=tuple(hint(g) for g in s.grid) if s.grid else None, subsequence_len=None,
            flops_before=s.attention_flops, flops_after=s.attention_flops, decision=s.decision or s.how,
        ))
    kinds = {k: sum(1 for s in an.sites if s.kind == k) for k in ("video_self", "cross", "other")}
    grid = reg.grid if reg.grid else "unknown"
    summary = (f"{len(an.sites)} attention call(s): {kinds['video_self']} video self, {kinds['cross']} cross, "
               f"{kinds['other']} other; grid {grid}")
    return gm, PassReport("analysis", summary, [{"node": s.node.name, "kind": s.kind, "how": s.how} for s in an.sites])
