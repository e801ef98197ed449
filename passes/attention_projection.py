"""Attention projection pass: a packed sparse site's output projection moves into the site's op.

A packed Skiparse site (``osp::folded_attention``) runs one dense attention per length class of its
subsequences (at 720P: 23- and 22-row subsequences) and concatenates the classes' outputs, so that
the model's own head merge and output projection see one tensor. That concatenation copies the
whole attention output once per sparse site. When the site's output reaches a linear through
nothing but the head merge (``transpose(1, 2)`` then a reshape to ``[B, S, heads * D]``), the pass
projects each class separately and joins the projected classes instead; Inductor folds that join
into the elementwise op that reads it (the gated residual add), so no copy remains. Same
arithmetic: each output row is the same dot products.

* A plain ``F.linear``: the three nodes become ``osp::folded_attention_linear``, which merges heads
  and projects per class inside the op.
* A HiF8 inference linear (``osp::hif8_linear``), which scales its whole activation by one
  ``max|x|``: the graph gets the classes' outputs (``osp::folded_attention_classes``), their max
  (each class's, then the larger), and one HiF8 linear per class given that max, so every class
  is quantized with the scale the whole activation had - the same bits. The per-class linears
  stay ``osp::hif8_linear`` nodes, so lowering gives them the target's kernel as any other.
  A site with one length class has no concatenation to save and is left alone.

Left alone (the report says why): any other projection (the QAT linear quantizes the whole
activation and its gradient, LoRA reads the merged heads too), or any other reader between the
attention and the projection.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from osp_compile.ops import folded_attention, folded_attention_classes, folded_attention_linear
from osp_compile.report import PassReport
from .analysis import _RESHAPES, _kind_of
from .fx_utils import call_args, call_with_example, example_of, linear_calls, shape_of
from .hif8_absmax import absmax_nodes

_PROJECTIONS = ("linear", "hif8_linear")

_TRANSPOSES = {"transpose", "swapaxes", "swapdims"}


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _swaps_heads_and_tokens(node: fx.Node) -> bool:
    """``x.transpose(1, 2)`` (or -3/-2, or ``permute(0, 2, 1, 3)``) of a 4-d [B, heads, S, D] tensor."""
    kind = _kind_of(node, node.graph.owning_module)
    args = list(node.args[1:])
    if kind in _TRANSPOSES:
        dims = {d % 4 for d in args[:2] if isinstance(d, int)}
        return dims == {1, 2}
    if kind == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        return [d % 4 if isinstance(d, int) else d for d in dims] == [0, 2, 1, 3]
    return False


def _head_merge_reader(attention: fx.Node, calls: dict[fx.Node, dict]) -> tuple[fx.Node | None, str]:
    """(the linear that reads the site's merged heads, "") or (None, why not). ``calls``: the graph's
    linear calls by node (`fx_utils.linear_calls`)."""
    attention_shape = shape_of(attention)
    if len(attention_shape or ()) != 4:
        return None, "the attention output has no recorded [B, heads, S, D] shape"
    batch, heads, _, head_dim = attention_shape
    swap = _only_user(attention)
    if swap is None or not _swaps_heads_and_tokens(swap):
        return None, "the attention output is read by something other than one head-merging transpose"
    gm = attention.graph.owning_module
    merged = _only_user(swap)
    if merged is not None and _kind_of(merged, gm) == "contiguous":
        merged = _only_user(merged)
    shape = shape_of(merged) if merged is not None else None
    if (merged is None or _kind_of(merged, gm) not in _RESHAPES or shape is None or len(shape) != 3
            or shape[0] != batch or shape[2] != heads * head_dim):
        return None, "the transposed output is not reshaped to [B, S, heads * head_dim] alone"
    linear = _only_user(merged)
    call = calls.get(linear)
    if call is None or call["input"] is not merged:
        return None, "the merged heads are not read by one linear alone"
    if call["form"] not in _PROJECTIONS:
        return None, f"the output projection is {call['form']} (it needs the whole activation at once)"
    return linear, ""


def _project_linear(g: fx.Graph, attention: fx.Node, linear: fx.Node) -> tuple[fx.Node, str]:
    """``osp::folded_attention_linear`` in place of the site and its plain linear projection."""
    a = call_args(linear, ["input", "weight", "bias"], {"bias": None})
    with g.inserting_before(linear):  # the same arguments, with the projection's after the first eight
        fused = g.call_function(folded_attention_linear,
                                (*attention.args[:8], a["weight"], a["bias"], *attention.args[8:]), dict(attention.kwargs))
    fused.meta.update(linear.meta)
    return fused, "projected per length class"


def _project_hif8(g: fx.Graph, attention: fx.Node, linear: fx.Node) -> tuple[fx.Node | None, str]:
    """The classes' outputs, their joint max, a HiF8 linear per class given it, and the join; or
    (None, why not). The max is graph ops on the attention outputs: they run alone (nothing fuses
    into cuDNN's output), where the concatenation's max was folded into the kernel that wrote it.

    Left alone under sequence parallelism: each HiF8 linear all-reduces its scale over the group,
    so a rank would run one collective per class, and ranks can hold different numbers of classes
    (P = 4 on 2 ranks with H = 15: rows of 4, 4 | 4, 3): their collectives would not pair up."""
    a = call_args(linear, ["input", "weight", "bias", "scale", "group", "amax"], {"group": "", "amax": None})
    if a["amax"] is not None:
        return None, "kept: the HiF8 projection already has its activation's max"
    if a["group"]:
        return None, "kept: sequence parallel (one scale all-reduce per class; ranks may differ in classes)"
    example = example_of(folded_attention_classes, attention.args, attention.kwargs)
    count = len(example)
    if count == 1:
        return None, "kept: one length class (no concatenation to save)"
    with g.inserting_before(linear):
        classes = g.call_function(folded_attention_classes, attention.args, dict(attention.kwargs))
        classes.meta["example_value"] = example  # computed once, above
        parts = [call_with_example(g, operator.getitem, (classes, i)) for i in range(count)]
        amax = absmax_nodes(g, parts[0])
        for part in parts[1:]:
            amax = call_with_example(g, torch.maximum, (amax, absmax_nodes(g, part)))
        outs = [call_with_example(g, linear.target, (part, *linear.args[1:]), {**linear.kwargs, "amax": amax})
                for part in parts]
        for out in outs:  # the HiF8 pass's marks (fast accumulation) for lowering
            out.meta.update({k: v for k, v in linear.meta.items() if k != "example_value"})
        joined = g.call_function(torch.cat, (outs,), {"dim": -2})
    joined.meta.update(linear.meta)
    return joined, f"projected per length class ({count} HiF8 linears, one max over the classes)"


def attention_projection_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    g = gm.graph
    rows = []
    calls = {c["node"]: c for c in linear_calls(gm)}
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not folded_attention:
            continue
        linear, why = _head_merge_reader(node, calls)
        if linear is None:
            rows.append({"site": node.name, "projection": "-", "decision": f"kept: {why}"})
            continue
        project = _project_linear if calls[linear]["form"] == "linear" else _project_hif8
        fused, decision = project(g, node, linear)
        weight = calls[linear]["weight"].name
        if fused is None:
            rows.append({"site": node.name, "projection": weight, "decision": decision})
            continue
        linear.replace_all_uses_with(fused)
        chain = [linear]
        while chain[-1] is not node:
            chain.append(chain[-1].args[0])
        for dead in chain:
            g.erase_node(dead)
        rows.append({"site": fused.name, "projection": weight, "decision": decision})
    gm.recompile()
    fused_count = sum(r["decision"].startswith("projected") for r in rows)
    return gm, PassReport("attention_projection",
                          f"{fused_count} of {len(rows)} packed sparse site(s) project per length class", rows)
