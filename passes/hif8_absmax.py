"""HiF8 absmax pass: each HiF8 inference linear's activation absmax becomes graph ops.

Why: a HiF8 linear scales its activation per tensor, by ``max|x|``. Computed inside the opaque op
(``osp::hif8_linear``), that max is one more pass over ``x`` after ``x`` was written. Written in
the graph as ``amax(abs(x), -1)`` and then the max of those row maxima, it is a row reduction that
a fusing compiler (Inductor) folds into the kernel producing ``x`` - the norm and modulation
before q/k/v and the FFN, the concatenation of an attention's length classes - so ``x`` is read
once less. The op then takes the max as its ``amax`` argument; under sequence parallelism it is
still this rank's, and the op all-reduces it over the group as before (``hif8/group.py``).
Where nothing fuses (an opaque producer), the reduction costs what the op's own did.

Which linears: ``osp::hif8_linear`` nodes without an ``amax``. Linears that read one activation
(q, k and v) share one max. The report lists each activation with its readers.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from osp_compile.report import PassReport
from .fx_utils import meta_value


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
        with g.inserting_before(min(linears, key=order.__getitem__)):
            magnitude = g.call_function(torch.abs, (x,))
            row_max = g.call_function(torch.amax, (magnitude,), {"dim": -1})
            amax = g.call_function(torch.amax, (row_max,))
        magnitude.meta["example_value"] = torch.abs(meta_value(x))
        row_max.meta["example_value"] = torch.amax(magnitude.meta["example_value"], dim=-1)
        amax.meta["example_value"] = torch.amax(row_max.meta["example_value"])
        for node in linears:
            node.kwargs = {**node.kwargs, "amax": amax}
        rows.append({"activation": x.name, "readers": ", ".join(n.name for n in linears)})
    gm.recompile()
    return gm, PassReport("hif8_absmax", f"{len(rows)} activation max(es) in the graph for "
                          f"{sum(len(v) for v in readers.values())} HiF8 linear(s)", rows)
