"""Linear + GELU pass: a linear whose only reader is a GELU becomes one ``osp::linear_gelu`` node.

Why: the GELU of a DiT's feed-forward reads and writes the widest activation of the block (the FFN's
hidden layer, 2.7x the model width) once more, as its own kernel (~1.4 ms a block for the Wan-14B
shape at 720P on an H100, bandwidth-bound). A GEMM can apply it in its epilogue while the tile is
still in registers. The op is target-neutral (its implementation is the two calls); lowering picks
the fused kernel where the target has one (CUDA: cuBLASLt's GELU epilogue, tanh approximation, for
inference) and keeps the two calls elsewhere.

Which linears: plain ``F.linear`` calls (a HiF8 or LoRA linear keeps its own form) whose output is
read by nothing but ``gelu``. The report lists each fused pair.
"""
from __future__ import annotations

import torch.fx as fx

from osp_compile.ops import linear_gelu
from osp_compile.report import PassReport
from .fx_utils import gelu_args, linear_calls, shape_of


def _gelu_reader(linear: fx.Node) -> tuple[fx.Node, str] | None:
    """(the GELU call that is the linear's only reader, its ``approximate``), or None."""
    users = list(linear.users)
    gelu = gelu_args(users[0]) if len(users) == 1 else None
    return (users[0], gelu["approximate"]) if gelu is not None and gelu["input"] is linear else None


def linear_gelu_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    g = gm.graph
    rows = []
    for call in linear_calls(gm):
        if call["form"] != "linear" or len(shape_of(call["weight"]) or ()) != 2:
            continue
        reader = _gelu_reader(call["node"])
        if reader is None:
            continue
        gelu, approximate = reader
        with g.inserting_before(gelu):
            fused = g.call_function(linear_gelu, (call["input"], call["weight"], call["bias"], approximate))
        fused.meta.update({k: v for k, v in gelu.meta.items() if k != "source_fn_stack"})
        gelu.replace_all_uses_with(fused)
        g.erase_node(gelu)
        g.erase_node(call["node"])
        rows.append({"node": fused.name, "weight": call["fqn"] or call["weight"].name, "approximate": approximate})
    gm.recompile()
    return gm, PassReport("linear_gelu", f"{len(rows)} linear + GELU pair(s) as osp::linear_gelu", rows)
