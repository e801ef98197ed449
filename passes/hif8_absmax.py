"""HiF8 absmax pass: each HiF8 inference linear's activation absmax becomes graph ops.

Why: a HiF8 linear scales its activation per tensor, by ``max|x|``. Computed inside the opaque op
(``osp::hif8_linear``), that max is one more pass over ``x`` after ``x`` was written. Written in
the graph as ``amax(abs(x), -1)`` and then the max of those row maxima, it is a row reduction that
a fusing compiler (Inductor) folds into the kernel producing ``x`` - the norm and modulation
before q/k/v and the FFN, the concatenation of an attention's length classes - so ``x`` is read
once less. The op then takes the max as its ``amax`` argument; under sequence parallelism it is
still this rank's, and the op all-reduces it over the group as before (``hif8/group.py``).
Left to the op: an activation that an attention call wrote (through views only: the head merge).
Nothing fuses into that kernel, so the max would run alone, and there Inductor's two-step
reduction was slower than the op's own (torch's, 0.35-0.42 against 0.29 ms for a 14B activation
on the H100). Also an empty activation: the op's max of nothing is 0, torch's reduction refuses it.

Which linears: ``osp::hif8_linear`` nodes without an ``amax``. Linears that read one activation
(q, k and v) share one max. The report lists each activation with its readers and where its max
is computed.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from osp_compile.report import PassReport
from .analysis import _PERMUTES, _RESHAPES
from .fx_utils import call_kind, call_with_example, is_sdpa, meta_value


def _attention_behind(x: fx.Node) -> fx.Node | None:
    """The attention call that wrote ``x``, seen through views (reshapes, transposes), or None."""
    node = x
    views = _RESHAPES | _PERMUTES
    while call_kind(node) in views:
        node = node.args[0]
    return node if is_sdpa(node) else None


def absmax_nodes(g: fx.Graph, x: fx.Node) -> fx.Node:
    """``max|x|`` as graph ops at the graph's insertion point: each row's max, then their max (a row
    reduction a fusing compiler folds into the kernel writing ``x``); the 0-dim node of the max."""
    magnitude = call_with_example(g, torch.abs, (x,))
    row_max = call_with_example(g, torch.amax, (magnitude,), {"dim": -1})
    return call_with_example(g, torch.amax, (row_max,))


def hif8_absmax_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    readers: dict[fx.Node, list[fx.Node]] = {}
    for node in g.find_nodes(op="call_function", target=torch.ops.osp.hif8_linear.default):
        x = node.args[0]
        if node.kwargs.get("amax") is None and len(node.args) < 6 and isinstance(meta_value(x), torch.Tensor):
            readers.setdefault(x, []).append(node)
    rows = []
    for x, linears in readers.items():
        row = {"activation": x.name, "readers": ", ".join(n.name for n in linears)}
        attention = _attention_behind(x)
        if attention is not None:
            rows.append({**row, "max": f"the op's own: written by attention ({attention.name})"})
            continue
        if meta_value(x).numel() == 0:  # a max over no element is an error in torch; the op's is 0
            rows.append({**row, "max": "the op's own: the activation is empty"})
            continue
        with g.inserting_before(min(linears, key=order.__getitem__)):
            amax = absmax_nodes(g, x)
        for node in linears:
            node.kwargs = {**node.kwargs, "amax": amax}
        rows.append({**row, "max": "in the graph"})
    gm.recompile()
    in_graph = sum(r["max"] == "in the graph" for r in rows)
    return gm, PassReport("hif8_absmax", f"{in_graph} of {len(rows)} activation max(es) in the graph, for "
                          f"{sum(len(v) for v in readers.values())} HiF8 linear(s)", rows)
