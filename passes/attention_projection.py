"""Attention projection pass: a packed sparse site's output projection moves into the site's op.

A packed Skiparse site (``osp::folded_attention``) runs one dense attention per length class of its
subsequences (at 720P: 23- and 22-row subsequences) and concatenates the classes' outputs, so that
the model's own head merge and output projection see one tensor. That concatenation copies the
whole attention output once per sparse site. When the site's output reaches a plain ``F.linear``
through nothing but the head merge (``transpose(1, 2)`` then a reshape to ``[B, S, heads * D]``),
the pass replaces the three by ``osp::folded_attention_linear``, which merges heads and projects
each class separately and joins the projected classes instead; Inductor folds that join into the
elementwise op that reads it (the gated residual add), so no copy remains. Same arithmetic: each
output row is the same dot products.

Left alone (the report says why): a projection that is not a plain linear (HiF8 quantizes the whole
activation with one per-tensor scale, LoRA reads the merged heads too), or any other reader between
the attention and the projection.
"""
from __future__ import annotations

import torch.fx as fx

from osp_compile.ops import folded_attention, folded_attention_linear
from osp_compile.report import PassReport
from .analysis import _RESHAPES, _kind_of
from .fx_utils import call_args, linear_calls, shape_of

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
    if call["form"] != "linear":
        return None, f"the output projection is {call['form']} (it needs the whole activation at once)"
    return linear, ""


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
        a = call_args(linear, ["input", "weight", "bias"], {"bias": None})
        with g.inserting_before(linear):  # the same arguments, with the projection's after the first eight
            fused = g.call_function(folded_attention_linear,
                                    (*node.args[:8], a["weight"], a["bias"], *node.args[8:]), dict(node.kwargs))
        fused.meta.update(linear.meta)
        linear.replace_all_uses_with(fused)
        chain = [linear]
        while chain[-1] is not node:
            chain.append(chain[-1].args[0])
        for dead in chain:
            g.erase_node(dead)
        rows.append({"site": fused.name, "projection": a["weight"].name, "decision": "projected per length class"})
    gm.recompile()
    fused_count = sum(r["decision"].startswith("projected") for r in rows)
    return gm, PassReport("attention_projection",
                          f"{fused_count} of {len(rows)} packed sparse site(s) project per length class", rows)
