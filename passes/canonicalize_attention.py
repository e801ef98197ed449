"""Canonicalize attention: every attention computation becomes one `scaled_dot_product_attention` node.

Models spell attention in several ways; the later passes should see one. Rewritten here:
- `flash_attn_func(q, k, v, dropout_p, softmax_scale, causal)` on [B, S, H, D] (when it appears in
  the graph as one call) -> transpose, SDPA, transpose;
- the chain `(q @ k^T) [* c | / c] -> softmax(-1) [-> cast] -> @ v` -> SDPA(q, k, v, scale=c).
The chain is only rewritten when its intermediates have no other use (e.g. attention weights that
are also returned stay as they are) - the report lists what was and was not rewritten, and why.
"""
from __future__ import annotations

import numbers

import torch.fx as fx
import torch.nn.functional as F

from osp_compile.report import PassReport
from .fx_utils import call_args, call_kind, shape_of

_CASTS = {"to", "float", "half", "bfloat16", "type_as", "type", "contiguous"}
_MATMUL = {"matmul", "bmm"}


def _skip_casts(node, chain):
    while call_kind(node) in _CASTS:
        chain.append(node)
        node = node.args[0]
    return node


def _transposed_last_two(node) -> fx.Node | None:
    """k if node is k.transpose(-2, -1) / k.mT / k.permute(..., -1, -2), else None."""
    kind = call_kind(node)
    shape = shape_of(node)
    if shape is None:
        return None
    n = len(shape)
    if kind == "mT":
        return node.args[0]
    if kind in ("transpose", "swapaxes"):
        a = call_args(node, ["input", "dim0", "dim1"])
        if {a["dim0"] % n, a["dim1"] % n} == {n - 1, n - 2}:
            return a["input"]
    if kind == "permute":
        dims = node.args[1:] if len(node.args) > 2 else node.args[1]
        dims = [d % n for d in dims]
        if dims == list(range(n - 2)) + [n - 1, n - 2]:
            return node.args[0]
    return None


def _match_chain(out: fx.Node):
    """Return (q, k, v, scale, intermediate nodes) for a matmul-softmax-matmul chain ending at `out`."""
    if call_kind(out) not in _MATMUL or len(out.args) < 2:
        return None
    chain: list[fx.Node] = []
    probs, v = out.args[0], out.args[1]
    node = _skip_casts(probs, chain)
    if call_kind(node) == "dropout":
        a = call_args(node, ["input", "p", "training"], {"p": 0.5, "training": True})
        if a["p"] != 0.0:
            return None
        chain.append(node)
        node = _skip_casts(a["input"], chain)
    if call_kind(node) != "softmax":
        return None
    dim = call_args(node, ["input", "dim"]).get("dim")
    n = len(shape_of(node) or ())
    if dim is None or dim % n != n - 1:
        return None
    chain.append(node)
    node = _skip_casts(node.args[0], chain)
    scale = 1.0
    if call_kind(node) in ("mul", "truediv", "div"):
        lhs, rhs = node.args[0], node.args[1]
        if isinstance(rhs, numbers.Number):
            scale = float(rhs) if call_kind(node) == "mul" else 1.0 / float(rhs)
        elif isinstance(lhs, numbers.Number) and call_kind(node) == "mul":
            scale, rhs, lhs = float(lhs), lhs, rhs
        else:
            return None
        chain.append(node)
        node = _skip_casts(lhs, chain)
    if call_kind(node) not in _MATMUL:
        return None
    chain.append(node)
    q, kt = node.args[0], node.args[1]
    k = _transposed_last_two(kt)
    if k is None:
        return None
    chain.append(kt)
    inside = set(chain) | {out}
    if any(any(u not in inside for u in c.users) for c in chain):
        return None  # an intermediate (e.g. the attention weights) is used elsewhere
    return q, k, v, scale, chain


def canonicalize_attention_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    g = gm.graph
    rows = []
    for node in list(g.nodes):
        kind = call_kind(node)
        if kind == "flash_attn_func":
            a = call_args(node, ["q", "k", "v", "dropout_p", "softmax_scale", "causal"],
                          {"dropout_p": 0.0, "softmax_scale": None, "causal": False})
            extra = set(node.kwargs) - {"q", "k", "v", "dropout_p", "softmax_scale", "causal"}
            if extra or len(node.args) > 6:
                rows.append({"node": node.name, "form": "flash_attn_func", "rewritten": f"no: options {sorted(extra)}"})
                continue
            with g.inserting_before(node):
                q, k, v = (g.call_method("transpose", (a[x], 1, 2)) for x in ("q", "k", "v"))
                o = g.call_function(F.scaled_dot_product_attention, (q, k, v), {
                    "dropout_p": a["dropout_p"], "is_causal": a["causal"], "scale": a["softmax_scale"]})
                out = g.call_method("transpose", (o, 1, 2))
            node.replace_all_uses_with(out)
            g.erase_node(node)
            rows.append({"node": node.name, "form": "flash_attn_func", "rewritten": "yes"})
            continue
        m = _match_chain(node) if kind in _MATMUL else None
        if m is None:
            continue
        q, k, v, scale, chain = m
        with g.inserting_before(node):
            sdpa = g.call_function(F.scaled_dot_product_attention, (q, k, v), {"scale": scale})
        sdpa.meta.update({k_: v_ for k_, v_ in node.meta.items() if k_ in ("example_value", "val", "stack_trace", "nn_module_stack")})
        node.replace_all_uses_with(sdpa)
        g.erase_node(node)
        for c in chain:  # producers after consumers
            if not c.users:
                g.erase_node(c)
        rows.append({"node": sdpa.name, "form": "matmul-softmax-matmul", "rewritten": f"yes (scale {scale:g})"})
    gm.recompile()
    n = sum(1 for r in rows if r["rewritten"].startswith("yes"))
    return gm, PassReport("canonicalize_attention", f"{n} attention chain(s) rewritten to SDPA", rows)
