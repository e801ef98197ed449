"""The block-level dataflow of a captured graph, as a networkx graph and as an SVG picture.

An FX graph of a DiT has thousands of nodes; a reader wants blocks. Every node is put in the block
of the module that called it (module path cut after its first list index: `blocks.3.attn.q` ->
`blocks.3`; without an index, the top-level child: `patch_embedding`). Nodes called by the model's
own `forward` belong to no block: edges pass through them. Model inputs and the output are nodes of
their own; parameters are not drawn.

What the passes inserted is marked generically, by op: every ``osp::`` op (and every dense attention
call) is counted on the block that holds it, or - outside any block, e.g. a relayout or all-to-all
between two blocks - drawn as a node of its own. Its colour comes from words in its name
(`CATEGORIES`), so an op a new pass adds shows up without changes here.
"""
from __future__ import annotations

import re
from collections import Counter

import networkx as nx
import torch
import torch.fx as fx

from .svg import Svg, text_width

#: (category, words in the op name, colour); the first match wins, osp ops matching none are "osp op"
CATEGORIES = (
    ("communication", ("all_to_all", "all_gather", "gather", "scatter", "reduce", "broadcast", "send", "recv"), "#d62728"),
    ("sparse attention", ("attention",), "#ff7f0e"),
    ("rearrangement", ("relayout", "fold", "switch", "permut", "rearrange", "shard"), "#1f77b4"),
    ("HiF8 linear", ("hif8",), "#9467bd"),
)
OSP_OTHER = ("osp op", "#2ca02c")
DENSE = ("dense attention", "#7f7f7f")


def category(op: str) -> tuple[str, str]:
    """(category, colour) of a mark: an osp op name, or 'dense attention'."""
    if op == DENSE[0]:
        return DENSE
    for name, words, colour in CATEGORIES:
        if any(w in op for w in words):
            return name, colour
    return OSP_OTHER


def _mark(node: fx.Node) -> str | None:
    """'<op>[str args]' for an osp:: op (e.g. skiparse_attention[token]), 'dense attention' for SDPA."""
    t = node.target
    if node.op != "call_function":
        return None
    if isinstance(t, torch._ops.OpOverload) and t.namespace == "osp":
        strings = [a for a in node.args if isinstance(a, str)]
        return t._schema.name.split("::")[-1] + (f"[{', '.join(strings)}]" if strings else "")
    if getattr(t, "__name__", "") == "scaled_dot_product_attention":
        return DENSE[0]
    return None


def _block(node: fx.Node) -> str | None:
    from osp_compile.pipeline import site_key

    path = site_key(node)[0]
    if not path:
        return None
    parts = path.split(".")
    cut = next((i for i, p in enumerate(parts) if p.isdigit()), 0)
    return ".".join(parts[:cut + 1])


def _input_name(node: fx.Node) -> str:
    """Dynamo's placeholder names back to the call's: l_args_0_ -> args[0], l_kwargs_timestep_ -> timestep."""
    m = re.fullmatch(r"[lL]_(?:args_(\d+)|kwargs_(.+?)|(.+?))_?", node.name)
    if m is None:
        return node.name
    return f"args[{m.group(1)}]" if m.group(1) else (m.group(2) or m.group(3))


def block_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The block-level dataflow of `gm` (see the module docstring). Node attributes: kind
    ('input' | 'block' | 'op' | 'output'), label, order (first FX position), marks (Counter of ops)."""
    from passes.fx_utils import param_fqn

    g = nx.DiGraph()
    group_of: dict[fx.Node, str | None] = {}
    feeds: dict[fx.Node, set[str]] = {}
    for i, node in enumerate(gm.graph.nodes):
        mark = _mark(node)
        if node.op == "placeholder":
            tensor = isinstance(node.meta.get("example_value", node.meta.get("val")), torch.Tensor)
            group = f"input:{_input_name(node)}" if tensor and param_fqn(node) is None else None
            kind = "input"
        elif node.op == "output":
            group, kind = "output", "output"
        elif node.op == "get_attr":
            group, kind = None, ""
        else:
            group, kind = _block(node), "block"
            if group is None and mark is not None:
                group, kind = f"{mark}@{node.name}", "op"
        if group is not None and group not in g:
            label = group.split("@")[0].removeprefix("input:")
            g.add_node(group, kind=kind, label=label, order=i, marks=Counter())
        if group is not None and mark is not None:
            g.nodes[group]["marks"][mark] += 1
        incoming: set[str] = set()
        for m in node.all_input_nodes:
            incoming |= {group_of[m]} if group_of.get(m) else feeds.get(m, set())
        group_of[node], feeds[node] = group, incoming
        for src in incoming:
            if group is not None and src != group:
                g.add_edge(src, group)
    return g


# -- drawing ---------------------------------------------------------------------------------------
_LINE_H, _GAP_X, _GAP_Y, _PAD, _MAX_W = 15, 16, 34, 8, 250.0
_FILL = {"input": "#e8f1fb", "output": "#e6f5e6", "block": "#ffffff", "op": "#ffffff"}


def _layers(g: nx.DiGraph) -> list[list[str]]:
    """Rows top to bottom: a node sits one row below the lowest of its predecessors that come earlier
    in the graph (later ones are back edges of a collapsed cycle and do not push it down). A node fed
    by no drawn node (tables built from constants, e.g. RoPE, or their relayouts) sits right above
    the first node it feeds, beside the stream, not in the top row."""
    order = sorted(g.nodes, key=lambda n: g.nodes[n]["order"])
    depth: dict[str, int] = {}
    for n in order:
        preds = [p for p in g.predecessors(n) if p in depth]
        depth[n] = 1 + max((depth[p] for p in preds), default=-1)
    for n in reversed(order):
        below = [depth[m] for m in g.successors(n) if depth[m] > depth[n]]
        if g.in_degree(n) == 0 and g.nodes[n]["kind"] != "input" and below:
            depth[n] = min(below) - 1
    rows: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for n in order:
        rows[depth[n]].append(n)
    return rows


def _main_path(g: nx.DiGraph) -> list[str]:
    """The longest chain from the first model input (the video latent of a DiT): the stream of
    hidden states through the blocks, drawn down the middle."""
    if not nx.is_directed_acyclic_graph(g) or not g.nodes:
        return []
    inputs = sorted((n for n in g.nodes if g.nodes[n]["kind"] == "input"), key=lambda n: g.nodes[n]["order"])
    if not inputs:
        return nx.dag_longest_path(g)
    best: dict[str, list[str]] = {inputs[0]: [inputs[0]]}
    for n in nx.topological_sort(g):
        for m in g.successors(n):
            if n in best and len(best[n]) + 1 > len(best.get(m, [])):
                best[m] = best[n] + [m]
    return max(best.values(), key=len)


def _box_lines(g: nx.DiGraph, n: str) -> list[tuple[str, str | None]]:
    """(text, colour of the mark or None) lines of a node's box: its label, then one line per mark."""
    lines: list[tuple[str, str | None]] = [(g.nodes[n]["label"], None)]
    for mark, count in sorted(g.nodes[n]["marks"].items()):
        if g.nodes[n]["kind"] == "op" and count == 1 and mark == g.nodes[n]["label"]:
            continue
        colour = DENSE[1] if mark == DENSE[0] else category(_op_of(mark))[1]
        lines.append((mark + (f" x{count}" if count > 1 else ""), colour))
    return lines


def _op_of(mark: str) -> str:
    return mark.split("[")[0]


def _place(rows: list[list[str]], main: set[str], widths: dict[str, float]) -> tuple[dict[str, float], float]:
    """x of every box centre relative to the middle: the main path on it, the others packed
    alternately right and left of it. Returns the centres and the half-width of the picture."""
    centre: dict[str, float] = {}
    half = 0.0
    for row in rows:
        middle = [n for n in row if n in main]
        others = [n for n in row if n not in main]
        right = left = widths[middle[0]] / 2 if middle else -_GAP_X / 2
        for n in middle:
            centre[n] = 0.0
        for i, n in enumerate(others):
            go_right = (i % 2 == 0) if middle else (i % 2 == 1)
            if go_right or not middle and i == 0:
                centre[n] = right + _GAP_X + widths[n] / 2
                right += _GAP_X + widths[n]
            else:
                centre[n] = -(left + _GAP_X + widths[n] / 2)
                left += _GAP_X + widths[n]
        half = max(half, right, left)
    return centre, half


def draw_dataflow(g: nx.DiGraph, title: str) -> str:
    """A layered top-to-bottom picture of a block graph: the main path down the middle with bold
    edges, side inputs (embeddings, masks, RoPE tables) beside it, marks coloured by category."""
    rows = _layers(g)
    main_path = _main_path(g)
    main_edges = set(zip(main_path, main_path[1:]))
    lines = {n: _box_lines(g, n) for n in g.nodes}
    widths = {n: min(_MAX_W, max(90.0, *(text_width(t, 12) + (34 if c else 20) for t, c in lines[n]))) for n in g.nodes}
    heights = {n: _PAD * 2 + _LINE_H * len(lines[n]) for n in g.nodes}
    centre, half = _place(rows, set(main_path), widths)
    legend = [DENSE, *[(name, colour) for name, _, colour in CATEGORIES], OSP_OTHER]
    legend_w = sum(text_width(name, 11) + 30 for name, _ in legend)
    width = max(2 * half + 2 * _GAP_X, legend_w + 2 * _GAP_X, text_width(title, 14) + 2 * _GAP_X)
    pos: dict[str, tuple[float, float]] = {}
    y = 62.0
    for row in rows:
        for n in row:
            pos[n] = (width / 2 + centre[n] - widths[n] / 2, y)
        y += max(heights[n] for n in row) + _GAP_Y
    svg = Svg(width, y + 4, title)
    svg.rect(0, 0, width, y + 4, fill="white")
    svg.text(_GAP_X, 22, title, size=14, font_weight="bold")
    lx = _GAP_X
    for name, colour in legend:
        svg.rect(lx, 34, 12, 12, fill=colour, rx=2)
        svg.text(lx + 16, 44, name, size=11)
        lx += text_width(name, 11) + 30
    arrows = {True: svg.arrow_marker("#333"), False: svg.arrow_marker("#b5b5b5")}
    for a, b in sorted(g.edges, key=lambda e: e in main_edges):  # the main path on top
        (xa, ya), (xb, yb) = pos[a], pos[b]
        x1, y1, x2, y2 = xa + widths[a] / 2, ya + heights[a], xb + widths[b] / 2, yb
        if y2 <= y1:  # a back edge (a cycle collapsed into blocks): round the right side
            x1, y1, x2, y2 = xa + widths[a], ya + heights[a] / 2, xb + widths[b], yb + heights[b] / 2
            d = f"M {x1:.1f} {y1:.1f} C {x1 + 40:.1f} {y1:.1f}, {x2 + 40:.1f} {y2:.1f}, {x2:.1f} {y2:.1f}"
        else:
            mid = (y1 + y2) / 2 if y2 - y1 < 2 * _GAP_Y else y2 - _GAP_Y / 2
            d = f"M {x1:.1f} {y1:.1f} C {x1:.1f} {mid:.1f}, {x2:.1f} {mid:.1f}, {x2:.1f} {y2:.1f}"
        main = (a, b) in main_edges
        svg.path(d, fill="none", stroke="#333" if main else "#c4c4c4", stroke_width=2 if main else 1,
                 marker_end=arrows[main])
    for n, (x, y0) in pos.items():
        box_w = widths[n]
        kind = g.nodes[n]["kind"]
        border = category(_op_of(n.split("@")[0]))[1] if kind == "op" else "#555"
        svg.rect(x, y0, box_w, heights[n], fill=_FILL[kind], stroke=border, stroke_width=2 if kind == "op" else 1, rx=6)
        svg.tooltip(n)
        for i, (content, colour) in enumerate(lines[n]):
            ty = y0 + _PAD + _LINE_H * (i + 1) - 3
            if colour is None:
                svg.text(x + box_w / 2, ty, _fit(content, 12, box_w - 12), size=12, anchor="middle", font_weight="bold")
            else:
                svg.rect(x + 8, ty - 10, 10, 10, fill=colour, rx=2)
                svg.text(x + 22, ty, _fit(content, 11, box_w - 30), size=11, fill=colour)
    return str(svg)


def _fit(content: str, size: float, room: float) -> str:
    """Cut text that would overflow its box (the full name is in the box's tooltip)."""
    n = int(room / (0.6 * size))
    return content if len(content) <= n else content[:n - 1] + "…"
