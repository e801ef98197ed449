"""Static-shapes pass: a graph captured with symbolic sizes is compiled for this call's sizes.

Why: OSP's index maps (subsequence ids, packed layouts, all-to-all routing) are compile-time
constants of the token grid, and the passes build them from the sizes the graph was captured at.
Dynamo captures symbolic sizes under ``torch.compile(dynamic=True)``, and by default ("automatic
dynamic shapes") as soon as a compiled model is called at a second input shape; a graph compiled
for one grid would then be reused for another. Here every symbolic size of the graph's inputs is
read as an int, which records a guard (size == this call's value) in Dynamo's shape environment:
the graph is compiled for exactly these sizes, every derived size simplifies to a constant, and
Dynamo recompiles for other shapes, as under ``dynamic=False``. `convert()` captures with
``dynamic=False`` and never gets here with anything to do.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from osp_compile.report import PassReport
from .fx_utils import meta_value


def _symbolic_sizes(value) -> list[torch.SymInt]:
    if isinstance(value, torch.SymInt):
        return [value]
    if isinstance(value, torch.Tensor):
        sizes = [*value.shape, *value.stride(), value.storage_offset()]
        return [s for s in sizes if isinstance(s, torch.SymInt)]
    return []


def static_shapes_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    specialized = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        for size in _symbolic_sizes(meta_value(node)):
            specialized.setdefault(str(size.node.expr), int(size))  # int() guards: size == this value
    if not specialized:
        return gm, PassReport("static_shapes", "static sizes: nothing to specialize")
    rows = [{"symbol": name, "value": value} for name, value in specialized.items()]
    return gm, PassReport(
        "static_shapes", f"{len(specialized)} symbolic size(s) specialized to this call's values (a new input shape "
                         f"recompiles: OSP's index maps are constants of the token grid)", rows)
