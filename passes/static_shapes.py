"""Static-shapes pass: a graph captured with symbolic sizes becomes the graph of this call's sizes.

Why: OSP's index maps (subsequence ids, packed layouts, all-to-all routing) are compile-time
constants of the token grid, and the analysis reads the grid from constant sizes in the graph (a
`view(b, f, c, h, w)` after the patch embedding). Dynamo captures symbolic sizes under
``torch.compile(dynamic=True)``, and by default ("automatic dynamic shapes") as soon as a compiled
model is called at a second input shape: sizes then arrive as graph inputs and size arithmetic
nodes, and a graph compiled for one grid would be reused for another.

Here every symbolic input size is read as an int, which records a guard (size == this call's
value) in Dynamo's shape environment, so Dynamo recompiles for other shapes, as under
``dynamic=False``. Under those guards every size the graph computes is a constant: each node
whose value is a symbolic size is replaced by that constant in its users, the size arithmetic
left without users is removed, and every example value gets static sizes (a fake tensor of the
same mode, dtype, device, strides and requires_grad). The result is the graph, and the metadata,
that a static capture would have given, so no later pass meets a symbolic size.
`convert()` captures with ``dynamic=False`` and never gets here with anything to do.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from osp_compile.errors import OSPAnalysisError
from osp_compile.report import PassReport
from .fx_utils import meta_value

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _concrete(value):
    """A symbolic scalar as a Python value (reading it records the guard)."""
    if isinstance(value, torch.SymBool):
        return bool(value)
    if isinstance(value, torch.SymFloat):
        return float(value)
    return int(value)


def _symbolic_sizes(value) -> list[torch.SymInt]:
    """The symbolic sizes, strides and offset of a graph input."""
    if isinstance(value, torch.SymInt):
        return [value]
    if isinstance(value, torch.Tensor):
        return [s for s in (*value.shape, *value.stride(), value.storage_offset()) if isinstance(s, torch.SymInt)]
    return []


def _symbolic_layout(value) -> bool:
    """A tensor whose shape or strides hold a symbolic size."""
    return isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride()))


def _static(value):
    """An example value with every symbolic size replaced by its (guarded) constant."""
    if isinstance(value, _SYMBOLIC):
        return _concrete(value)
    if isinstance(value, torch.Tensor):
        if not _symbolic_layout(value):
            return value
        with value.fake_mode:
            out = torch.empty_strided([int(s) for s in value.shape], [int(s) for s in value.stride()],
                                      dtype=value.dtype, device=value.device)
        return out.requires_grad_() if value.requires_grad else out
    if isinstance(value, (tuple, list)):
        return type(value)(_static(v) for v in value)
    return value


def _is_size_value(value) -> bool:
    """A symbolic scalar, or a tuple of sizes (what `x.size()` gives)."""
    if isinstance(value, _SYMBOLIC):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, (int, *_SYMBOLIC)) for v in value)


def static_shapes_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    g = gm.graph
    specialized = {}
    for node in g.find_nodes(op="placeholder"):
        for size in _symbolic_sizes(meta_value(node)):
            if size.node.expr.free_symbols:  # else an earlier guard fixed it already
                specialized[str(size.node.expr)] = _concrete(size)
    if not specialized:
        return gm, PassReport("static_shapes", "static sizes: nothing to specialize")
    constants = 0
    for node in list(g.nodes):
        value = meta_value(node)
        if isinstance(value, _SYMBOLIC) and node.users:
            for user in list(node.users):
                user.replace_input_with(node, _concrete(value))
            constants += 1
    removed = 0
    for node in reversed(list(g.nodes)):  # users before what they read
        if node.op in ("call_function", "call_method") and not node.users and _is_size_value(meta_value(node)):
            g.erase_node(node)
            removed += 1
    for node in g.nodes:
        for key in ("example_value", "val"):
            if key in node.meta:
                node.meta[key] = _static(node.meta[key])
    g.lint()
    gm.recompile()
    rows = [{"symbol": name, "value": value} for name, value in specialized.items()]
    return gm, PassReport(
        "static_shapes", f"{len(specialized)} symbolic size(s) specialized to this call's values, {constants} size "
                         f"node(s) made constants, {removed} removed (a new input shape recompiles: OSP's index maps "
                         f"are constants of the token grid)", rows)


def require_static_sizes(gm: fx.GraphModule) -> None:
    """The passes after this one work with int sizes only: a graph that still has a symbolic size
    (passes run without this one first) stops here, naming the node, instead of failing later."""
    for node in gm.graph.nodes:
        value = meta_value(node)
        if isinstance(value, _SYMBOLIC) or _symbolic_layout(value):
            raise OSPAnalysisError(
                f"node '{node.name}' has a symbolic size ({value if isinstance(value, _SYMBOLIC) else value.shape}): "
                f"the OSP passes need the static sizes of one call. Run passes.static_shapes.static_shapes_pass "
                f"first (osp_compile.pipeline.default_passes does), or capture with torch.compile(dynamic=False).")
