"""Token-layout pass: one permutation per pattern switch (local equivalence), SSP and Ulysses.

The Skiparse pass rearranges q, k, v and the output at every sparse site (four permutations).
Here the rearrangement moves onto the hidden state instead: every token tensor of the graph gets a
*layout* (`osp_compile.token_layouts`) and runs in it, so per-token work (norms, linears,
modulation, FFN, cross-attention) happens in the packed layout, and the layout changes only where
the model moves from one attention site's block to the next. A packed layout is a permutation of
the token dim (real tokens only, subsequence after subsequence): per-sample tensors broadcast as
they are, and no padded row ever reaches a linear.

Where the change happens is read from the graph: the *anchor* of a site is the residual-stream
tensor entering its block - found by walking up the dominator tree of the site's q, k, v (over
token tensors only) until a node also feeds something else (the residual add). Every token node
then takes the layout of the latest anchor above it, so each anchor's output is converted once,
shared by all its consumers: exactly one relayout per block boundary. An op that cannot run in a
permuted layout (it mixes or slices tokens, indexes them with a tensor, reads a size, has shape
arguments computed in the graph) is *blocking*: it gets the natural layout, and the report names it.

With a process group of S ranks (`OSPConfig(sequence_parallel="ssp" | "ulysses")`), the layouts
are sharded: ``ssp`` runs sparse sites on whole subsequences held locally (their switch is one
all-to-all) and full sites with Ulysses; ``ulysses`` runs every site with Ulysses (four
all-to-alls per attention). Before the first block the graph runs replicated; the last relayout
is one gather. See `osp_compile/distributed.py` for how gradients are made exact.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from osp_compile.ops import folded_attention, skiparse_relayout
from osp_compile.errors import OSPUnsupportedError
from osp_compile.report import PassReport
from osp_compile.skiparse_layout import packed_attention_pairs, subsequence_tokens
from osp_compile.token_layouts import FOLDED, check_world, local_tokens
from .analysis import _ELEMENTWISE, _LINEAR, _NORMS, _PERMUTES, _REDUCTIONS, _SPLITS, TokenAxis, _kind_of
from .fx_utils import call_args, downstream, is_sdpa, meta_value, normalize_dim, sdpa_args, shape_of

_SIZED = {"view", "reshape", "expand", "broadcast_to"}


@dataclass
class SPInfo:
    mode: str | None  # None (one process), "ssp", "ulysses"
    world: int = 1
    rank: int = 0
    group: str = ""


def sp_info(config) -> SPInfo:
    if config.sequence_parallel is None:
        return SPInfo(None)
    import torch.distributed as dist

    from osp_compile.distributed import PlanningGroup
    from osp_compile.errors import OSPConfigError

    if isinstance(config.sp_group, PlanningGroup):
        return SPInfo(config.sequence_parallel, config.sp_group.world, config.sp_group.rank, config.sp_group.group_name)
    if not dist.is_available() or not dist.is_initialized():
        raise OSPConfigError(
            f"sequence_parallel={config.sequence_parallel!r} needs torch.distributed initialised (e.g. launched with "
            f"torchrun and dist.init_process_group) before the model is converted."
        )
    group = config.sp_group or dist.group.WORLD
    return SPInfo(config.sequence_parallel, dist.get_world_size(group), dist.get_rank(group), group.group_name)


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, ctx):
        self.gm, self.g, self.ctx = gm, gm.graph, ctx
        self.cfg = ctx.config
        self.p = self.cfg.sparse_ratio
        self.sp = sp_info(self.cfg)
        an = ctx.analysis
        self.sites = [s for s in an.video_sites if s.node.graph is self.g]
        self.site_nodes = {s.node for s in self.sites}
        self.grid = self.sites[0].grid
        self.tokens_total = self.grid[0] * self.grid[1] * self.grid[2]
        live = set(self.g.nodes)
        self.dim: dict[fx.Node, int] = {}
        for n, ax in an.axes.items():
            if n not in live:
                continue
            if isinstance(ax, TokenAxis) and len(ax.dims) == 1:
                self.dim[n] = ax.dims[0]
            elif isinstance(ax, list) and ax and all(isinstance(a, TokenAxis) and len(a.dims) == 1 for a in ax):
                self.dim[n] = ax[0].dims[0]  # chunk/split: a tuple of token tensors
        for s in self.sites:  # site nodes were replaced by the Skiparse pass: same token dim as q
            self.dim[s.node] = len(shape_of(s.node)) - 2
        # in-place writes into a token tensor (diffusers' RoPE: out = empty_like(x); out[..., 0::2] = ...)
        self.writes: dict[fx.Node, list[fx.Node]] = {}
        for n in self.g.nodes:
            if n.op == "call_function" and n.target is operator.setitem and n.args[0] in self.dim:
                self.writes.setdefault(n.args[0], []).append(n)
                self.dim[n] = self.dim[n.args[0]]
        self.setitems = {w for ws in self.writes.values() for w in ws}
        self.shape = {n: shape_of(n.args[0] if n in self.setitems else n) for n in self.dim}
        self.label: dict[fx.Node, str] = {}
        self.blocked: list[str] = []
        self.converted: dict[tuple[fx.Node, str], fx.Node] = {}
        self.relayouts: list[fx.Node] = []
        self.latest: dict[fx.Node, int | None] = {}  # index of the latest anchor above each token node

    def _safe_write(self, n: fx.Node) -> bool:
        """A write that leaves the batch and token dims whole (e.g. out[..., 0::2] = v)."""
        idx = n.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if items and items[0] is Ellipsis:
            return len(items) == 2 or all(isinstance(i, slice) for i in items[1:])
        d = self.dim[n]
        return all(i == slice(None) for i in items[: d + 1])

    # -- layouts ---------------------------------------------------------------------------------
    def site_label(self, site) -> str:
        if self.sp.mode == "ulysses":
            return "natural"
        if site.layout == "full":
            return "natural" if self.sp.mode == "ssp" else "full"
        return site.layout

    def _token_users(self, n: fx.Node) -> list[fx.Node]:
        return [u for u in n.users if u in self.dim]

    def anchors(self) -> dict[fx.Node, int]:
        """The residual-stream tensor entering each site's block (see module docstring)."""
        graph = nx.DiGraph()
        root = "root"
        graph.add_node(root)
        for n in self.dim:
            preds = [m for m in n.all_input_nodes if m in self.dim]
            for m in preds:
                graph.add_edge(m, n)
            if not preds:
                graph.add_edge(root, n)
        idom = nx.immediate_dominators(graph, root)
        out: dict[fx.Node, int] = {}
        for site in self.sites:
            a = sdpa_args(site.node) if is_sdpa(site.node) else {"query": site.node.args[0], "key": site.node.args[1], "value": site.node.args[2]}
            qkv = [a["query"], a["key"], a["value"]]
            if not all(x in self.dim for x in qkv):
                self.blocked.append(f"site {site.index}: q/k/v are not all video-token tensors; converted at the site")
                continue
            chains = []
            for x in qkv:
                chain, c = [], x
                while c != root:
                    chain.append(c)
                    c = idom[c]
                chains.append(chain)
            common = next((c for c in chains[0] if all(c in ch for ch in chains[1:])), None)
            feeding = set(qkv).union(*(nx.ancestors(graph, x) for x in qkv))
            c = common
            while c is not None and c != root and all(u in feeding for u in self._token_users(c)):
                c = idom.get(c)
            if c is None or c == root:
                self.blocked.append(f"site {site.index}: no residual-stream tensor dominates q, k, v")
                continue
            out[c] = site.index
        return out

    def assign(self) -> None:
        anchors = self.anchors()
        by_index = {s.index: s for s in self.sites}
        latest = self.latest
        for n in self.g.nodes:
            if n not in self.dim:
                continue
            best = None
            for m in n.all_input_nodes:
                if m in self.dim:
                    for cand in (latest.get(m), anchors.get(m)):
                        if cand is not None and (best is None or cand > best):
                            best = cand
            latest[n] = best
            label = self.site_label(by_index[best]) if best is not None else "full"
            if _kind_of(n, self.gm) == "getitem" and n.args[0] in self.label:
                self.label[n] = self.label[n.args[0]]  # an element of a split takes the split's layout
                continue
            if n in self.setitems:
                self.label[n] = self.label[n.args[0]]  # a write happens in the layout of what it writes
                continue
            if label != "full":
                reason = self.blocking_reason(n)
                if reason is not None:
                    self.blocked.append(f"node '{n.name}': {reason}")
                    label = "full"
            self.label[n] = label
        for s in self.sites:
            self.label[s.node] = self.site_label(s)

    def blocking_reason(self, n: fx.Node) -> str | None:
        """Why `n` cannot run in a folded or sharded layout, or None if it can."""
        kind = _kind_of(n, self.gm)
        d = self.dim[n]
        for w in self.writes.get(n, []):
            if not self._safe_write(w):
                return f"written in place by '{w.name}' across the batch or token dims"
        for u in n.users:
            if u in self.writes.get(n, []) or (u.target is operator.setitem and n is u.args[2]):
                continue
            v = meta_value(u)
            if not (isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and all(isinstance(e, torch.Tensor) for e in v))):
                return f"its size or value is read by '{u.name}'"
        if n in self.site_nodes or is_sdpa(n):
            return None
        shape = self.shape[n]
        if shape is not None and shape[d] != self.tokens_total:
            return f"its token dim ({d}) holds {shape[d]} rows, not the {self.tokens_total} tokens alone"
        if kind in _SIZED:
            sizes = self._sizes(n)
            if sizes is None or len(sizes) != len(self.shape[n]) or not all(isinstance(v, int) for v in sizes):
                return f"{kind} with non-constant sizes"
            return None
        if kind in ("squeeze", "unsqueeze", "flatten", "unflatten"):
            a = call_args(n, ["input", "dim"])
            if kind == "unflatten" and normalize_dim(a["dim"], len(shape_of(n.args[0]))) == self.dim.get(n.args[0]):
                return "unflatten of the token dim"
            return None
        if kind in _PERMUTES or kind in _REDUCTIONS:
            return None  # a layout permutes the token dim only: other dims move and reduce freely
        if kind in _SPLITS or kind in ("cat", "concat", "stack"):
            if kind in ("cat", "concat", "stack"):
                a = call_args(n, ["tensors", "dim"], {"dim": 0})
                rank = len(shape_of(a["tensors"][0])) + (kind == "stack")
                src_dim = self.dim.get(a["tensors"][0])
            else:
                a = call_args(n, ["input", "dim"] if kind == "unbind" else ["input", "split_size_or_sections", "dim"], {"dim": 0})
                rank = len(shape_of(n.args[0]))
                src_dim = self.dim.get(n.args[0])
            return f"{kind} along the token dim" if normalize_dim(a["dim"], rank) == src_dim else None
        if kind == "getitem":
            idx = n.args[1]
            items = list(idx) if isinstance(idx, (tuple, list)) else [idx]
            if any(isinstance(i, fx.Node) for i in items):
                return "indexes with a tensor (may pick or reorder tokens)"
            return None  # basic indexing that keeps all N tokens (checked above) keeps their order
        if kind in _ELEMENTWISE or kind in _LINEAR or kind in _NORMS:
            return None
        return f"'{kind}' is not known to run per token in a packed layout"

    def _sizes(self, n: fx.Node):
        args = list(n.args[1:])
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            return list(args[0])
        if "size" in n.kwargs:
            return list(n.kwargs["size"])
        return args

    # -- rewriting -------------------------------------------------------------------------------
    def in_layout(self, m: fx.Node, label: str, site: int | None = None) -> fx.Node:
        """`m`'s value in `label`, converting once (the conversion is shared by all consumers)."""
        src = self.label.get(m, "full")
        if src == label or (self.sp.world == 1 and {src, label} <= {"full", "natural"}):
            return m
        key = (m, label)
        if key not in self.converted:
            last_write = self.writes.get(m, [m])[-1]  # never convert a buffer before its last write
            with self.g.inserting_after(last_write):
                self.converted[key] = self._relayout_node(m, self.dim[m], src, label)
            self.relayouts.append(self.converted[key])
            shape, item = self.shape[m], meta_value(m).element_size()
            self.converted[key].meta["osp_relayout"] = {"src": src, "dst": label, "shape": tuple(shape),
                                                        "itemsize": item, "site": site}
        return self.converted[key]

    def _relayout_node(self, x, dim, src, dst) -> fx.Node:
        t, h, w = self.grid
        if self.sp.world == 1:
            return self.g.call_function(skiparse_relayout, (x, dim, t, h, w, self.p, src, dst))
        from osp_compile.distributed import sp_relayout

        return self.g.call_function(sp_relayout, (x, dim, t, h, w, self.p, src, dst, self.sp.rank, self.sp.world, self.sp.group))

    def rewrite(self) -> None:
        site_of = {s.node: s for s in self.sites}
        for n in list(self.g.nodes):
            if n.op == "output":
                for m in [m for m in n.all_input_nodes if m in self.dim]:
                    n.replace_input_with(m, self.in_layout(m, "full"))
                continue
            label = self.label.get(n, "full") if n in self.dim else "full"
            for m in [m for m in n.all_input_nodes if m in self.dim]:
                conv = self.in_layout(m, label, self.latest.get(n))
                if conv is not m:
                    n.replace_input_with(m, conv)
            if n not in self.dim or label == "full" or (self.sp.world == 1 and label == "natural"):
                continue
            self._adapt_operands(n, label, is_site=n in site_of)
            if _kind_of(n, self.gm) in _SIZED:
                self._rewrite_sizes(n, label)
            if n in site_of:
                self._replace_site(n, site_of[n], label)

    def _adapt_operands(self, n: fx.Node, label: str, is_site: bool) -> None:
        """Positional tables (e.g. RoPE) take the layout too; per-sample operands (text, modulation)
        broadcast as they are, since a layout only permutes the token dim. A positional table is an
        operand of an elementwise op, aligned with the token dim and as long as it. So are the q, k
        and v of a video self-attention site that the dataflow did not reach (a graph after a graph
        break, whose sites were found by their length): they are its tokens by the site's
        classification. An operand of anything else - the text keys of a cross-attention, a linear's
        weight - never is, whatever its length (a text as long as the video is no position table)."""
        if not is_site and _kind_of(n, self.gm) not in _ELEMENTWISE:
            return
        out_shape = self.shape[n]
        d = self.dim[n]
        for a in list(n.all_input_nodes):
            if a in self.dim or not isinstance(meta_value(a), torch.Tensor):
                continue
            shape = shape_of(a)
            off = len(out_shape) - len(shape)
            jd = d - off
            if off >= 0 and jd >= 0 and shape[jd] == self.tokens_total:
                n.replace_input_with(a, self._positional(a, shape, off, jd, label))

    def _positional(self, a, shape, off, jd, label):
        key = (a, label, off)
        if key not in self.converted:
            with self.g.inserting_after(a):
                view = self.g.call_method("reshape", (a, (*([1] * off), *shape)))
            with self.g.inserting_after(view):
                self.converted[key] = self._relayout_node(view, jd + off, "full", label)
        return self.converted[key]

    def _rewrite_sizes(self, n: fx.Node, label: str) -> None:
        sizes = self._sizes(n)
        d = self.dim[n]
        new = list(sizes)
        if new[d] != -1:
            new[d] = local_tokens(label, self.grid, self.p, self.sp.world, self.sp.rank)
        n.args = (n.args[0], tuple(new))
        n.kwargs = {k: v for k, v in n.kwargs.items() if k != "size"}

    def _replace_site(self, n: fx.Node, site, label: str) -> None:
        t, h, w = self.grid
        a = sdpa_args(n) if is_sdpa(n) else {"query": n.args[0], "key": n.args[1], "value": n.args[2], **n.kwargs}
        kw = {"dropout_p": a.get("dropout_p", 0.0), "scale": a.get("scale"), "enable_gqa": a.get("enable_gqa", False)}
        q, k, v = a["query"], a["key"], a["value"]
        with self.g.inserting_before(n):
            if label in FOLDED:
                new = self.g.call_function(folded_attention, (q, k, v, t, h, w, self.p, label, self.sp.rank, self.sp.world), kw)
                row = self.ctx.report.sites.get(site.key)
                if row is not None:  # packed: real tokens only, so fewer FLOPs than the padded fold
                    lengths = sorted({len(t) for t in subsequence_tokens(self.grid, self.p, label)}, reverse=True)
                    row.subsequence_len = lengths[0]
                    row.flops_after = 4 * site.heads * site.head_dim * site.batch * packed_attention_pairs(self.grid, self.p, label)
                    row.decision += f"; packed layout, real tokens only (subsequences of {'/'.join(map(str, lengths))})"
            else:
                from osp_compile.distributed import ulysses_attention

                check_world(self.grid, self.p, self.sp.world, heads=site.heads, where=f" at site {site.index}",
                            subsequences=False)
                pattern = "full" if site.layout == "full" else site.layout
                new = self.g.call_function(ulysses_attention, (q, k, v, self.sp.world, self.sp.group, pattern, t, h, w, self.p), kw)
                new.meta["osp_ulysses"] = {"shape": shape_of(n), "itemsize": meta_value(n).element_size(),
                                           "site": site.index}
        new.meta.update({k_: v_ for k_, v_ in n.meta.items() if k_ not in new.meta})
        n.replace_all_uses_with(new)
        self.g.erase_node(n)
        self.dim[new], self.label[new], self.shape[new] = self.dim.pop(n), label, self.shape.pop(n)
        site.node = new

    # -- SP gradients ----------------------------------------------------------------------------
    def scale_replicated_after_gather(self) -> None:
        """Replicated work after the gather sees the same full gradient on every rank: scale its
        replicated inputs by 1/S so that the SUM over ranks is exact."""
        from osp_compile.distributed import sp_grad_scale

        gathers = [r for r in self.relayouts if r.meta["osp_relayout"]["dst"] == "full"]
        scatters = {r for r in self.relayouts if r.meta["osp_relayout"]["src"] == "full"}  # back to partial gradients
        after = downstream(gathers, lambda u: u.op == "output" or u in scatters) - set(gathers)
        scaled: dict[fx.Node, fx.Node] = {}
        for u in [n for n in self.g.nodes if n in after]:
            for a in list(u.all_input_nodes):
                if a in after or a in gathers or not isinstance(meta_value(a), torch.Tensor):
                    continue
                if a not in scaled:
                    with self.g.inserting_before(u):
                        scaled[a] = self.g.call_function(sp_grad_scale, (a, 1.0 / self.sp.world))
                u.replace_input_with(a, scaled[a])


def token_layout_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    cfg = ctx.config
    an = ctx.analysis
    sites = [s for s in an.video_sites] if an is not None else []
    joint = [s for s in an.layout_sites if s.kind == "joint"] if an is not None else []
    if cfg.sequence_parallel is not None and joint and not sites:
        msg = (f"sequence_parallel={cfg.sequence_parallel!r}: this graph's {len(joint)} attention site(s) are joint "
               f"text+video attention, which SSP/Ulysses do not shard yet")
        if cfg.on_unsupported == "error":
            raise OSPUnsupportedError(msg + "; every rank would run the whole model. Drop sequence_parallel, or pass "
                                            "OSPConfig(on_unsupported='skip') to run replicated on every rank.")
        return gm, PassReport("token_layout", msg + ": running replicated on every rank (on_unsupported='skip')")
    if not sites or (cfg.sequence_parallel is None and not cfg.fuse_permutations):
        return gm, PassReport("token_layout", "nothing to do (no video sites, or fusion off)")
    if cfg.sequence_parallel is None and all(s.layout == "full" for s in sites):
        return gm, PassReport("token_layout", "all sites full: the natural layout everywhere")
    rw = _Rewriter(gm, ctx)
    if rw.sp.world > 1:
        ssp = rw.sp.mode == "ssp"
        check_world(rw.grid, rw.p, rw.sp.world, subsequences=ssp and any(s.layout != "full" for s in sites),
                    natural=not ssp or any(s.layout == "full" for s in sites))
    before = 4 * sum(1 for s in sites if s.layout != "full")
    rw.assign()
    rw.rewrite()
    if rw.sp.world > 1:
        if torch.is_grad_enabled():
            _refuse_inexact_training(rw)
        rw.scale_replicated_after_gather()
    gm.graph.lint()
    gm.recompile()
    moved = sum(_bytes(r) for r in rw.relayouts)
    rows = [{"relayout": r.name, "from": r.meta["osp_relayout"]["src"], "to": r.meta["osp_relayout"]["dst"],
             "bytes": _bytes(r)} for r in rw.relayouts]
    for reason in rw.blocked:
        rows.append({"blocked": reason})
    mode = {None: "one process", "ssp": f"SSP over {rw.sp.world} ranks", "ulysses": f"Ulysses over {rw.sp.world} ranks"}[rw.sp.mode]
    summary = (f"{mode}: layout changes {before} per-site permutations -> {len(rw.relayouts)} relayouts of the hidden "
               f"state ({moved / 1e6:.2f} MB moved per forward)")
    if rw.blocked:
        summary += f"; {len(rw.blocked)} blocking op(s): " + "; ".join(rw.blocked[:3])
    ctx.report.layout_changes = {"before": before, "after": len(rw.relayouts), "bytes": moved}
    return gm, PassReport("token_layout", summary, rows)


def _refuse_inexact_training(rw: _Rewriter) -> None:
    """The SP gradient bookkeeping (partial sums all-reduced, 1/S after the one gather at the end)
    is exact for a forward that shards once and gathers once at the end. Two graphs it does not
    cover give wrong gradients, so they are refused in training (outputs stay exact: inference runs):
    the tokens gathered in the middle while sharded blocks go on (a token-mixing op between blocks), and an
    output that requires grad computed before the sharded region (its full gradient, on every rank,
    would be summed S times)."""
    gathers = [r for r in rw.relayouts if r.meta["osp_relayout"]["dst"] == "full"]
    after = downstream(gathers, lambda u: False)
    early = [o for o in rw.g.output_node().all_input_nodes
             if o not in after and getattr(meta_value(o), "requires_grad", False)]
    # a gather followed by another one (downstream includes g itself); the pass's nodes carry no
    # example value, what they gather does
    middle = [g for g in gathers if getattr(meta_value(g.args[0]), "requires_grad", False)
              and len(downstream([g], lambda u: False).intersection(gathers)) > 1]
    if middle:
        why = (f"the tokens are gathered in the middle of the graph (node '{middle[0].name}', for an op that needs "
               f"every token) and the sharded blocks go on after it")
    elif early:
        why = f"the graph output '{early[0].name}' requires grad and is computed before the sharded region"
    else:
        return
    raise OSPUnsupportedError(
        f"sequence_parallel={rw.ctx.config.sequence_parallel!r} training: {why}, and SP gradients are exact only for a "
        f"forward that shards once and gathers once at the end. Run it under torch.no_grad() (outputs stay exact), "
        f"change the model (no token-mixing op between blocks; return only the final output), or train without "
        f"sequence_parallel.")


def _bytes(node: fx.Node) -> int:
    info = node.meta["osp_relayout"]
    n = 1
    for s in info["shape"]:
        n *= s
    return n * info["itemsize"]
