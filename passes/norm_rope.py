"""Norm + RoPE pass: a q or k projection's RMSNorm and rotary embedding become one ``osp::rms_norm_rope``.

Why: the rotation of interleaved pairs ``(2i, 2i+1)`` reads each element's partner. Fused by
Inductor with the RMSNorm before it, those partner reads (of the activation and of the norm's
weight) become masked, strided gathers it cannot vectorize: on an H100 the Wan-14B q/k kernel at
720P moves its 3.1 GB at 1.8 TB/s, where a copy moves 2.9 TB/s, and it runs once per block. As
one op, a target can load whole rows and split the pairs in registers (CUDA:
``osp_compile/lowering/cuda_norm_rope.py``); elsewhere the op is the same calls.

Which subgraphs: the reference spelling (``reference_model.model.RMSNorm`` then ``apply_rope``)::

    xf = x.float(); y = (xf * rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
    q = y.view(..., heads, head_dim); qf = q.float(); a, b = qf.unflatten(-1, (-1, 2)).unbind(-1)
    out = (qf * cos + stack((-b, a), -1).flatten(-2) * sin).type_as(q)

where nothing else reads the intermediate values, ``weight`` has ``x``'s dtype and the tables are
the same for every head. The report lists each fused node, and why any norm followed by a view was
left alone.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from osp_compile.ops import rms_norm_rope
from osp_compile.report import PassReport
from .fx_utils import call_args, call_kind, meta_value

_MUL, _ADD = "mul", "add"


def _other(node: fx.Node, one) -> object:
    """The operand of a binary ``node`` that is not ``one`` (None unless exactly one operand is)."""
    a, b = node.args[:2]
    return b if a is one and b is not one else a if b is one and a is not one else None


def _rms_norm(y: fx.Node) -> dict | None:
    """``{"x", "weight", "eps"}`` of ``y = (xf * rsqrt(mean(xf^2, -1, keepdim) + eps)).type_as(x) * weight``,
    its nodes (users first) and whether any of them is read outside it (``xf`` is read twice inside)."""
    if call_kind(y) != _MUL:
        return None
    for cast, weight in ((y.args[0], y.args[1]), (y.args[1], y.args[0])):
        if call_kind(cast) != "type_as" or not isinstance(weight, fx.Node):
            continue
        scaled, x = cast.args[:2]
        if call_kind(scaled) != _MUL:
            continue
        for xf, rsqrt in ((scaled.args[0], scaled.args[1]), (scaled.args[1], scaled.args[0])):
            if call_kind(xf) != "float" or xf.args[0] is not x or call_kind(rsqrt) != "rsqrt":
                continue
            shifted = rsqrt.args[0]
            if call_kind(shifted) != _ADD:
                continue
            mean = next((a for a in shifted.args[:2] if call_kind(a) == "mean"), None)
            eps = _other(shifted, mean) if mean is not None else None
            if not isinstance(eps, float):
                continue
            m = call_args(mean, ["input", "dim", "keepdim"], {"keepdim": False})
            square = m["input"]
            if (m["dim"] not in (-1, [-1], (-1,)) or not m["keepdim"] or call_kind(square) != "pow"
                    or square.args[0] is not xf or square.args[1:2] != (2,)):
                continue
            nodes = [y, cast, scaled, rsqrt, shifted, mean, square, xf]
            inside = any(len(n.users) != 1 for n in nodes[:-1]) or set(xf.users) != {scaled, square}
            return {"x": x, "weight": weight, "eps": eps, "nodes": nodes, "read_elsewhere": inside}
    return None


def _rope(view: fx.Node) -> dict | None:
    """``{"out", "cos", "sin"}`` of the interleaved rotation of ``view`` (module docstring)."""
    readers = list(view.users)
    qf = next((u for u in readers if call_kind(u) == "float"), None)
    out = next((u for u in readers if call_kind(u) == "type_as" and u.args[1] is view), None)
    if qf is None or out is None or len(readers) != 2:
        return None
    total = out.args[0]
    if call_kind(total) != _ADD or len(total.args) != 2 or not all(call_kind(a) == _MUL for a in total.args[:2]):
        return None
    by_cos = next((m for m in total.args[:2] if qf in m.args[:2]), None)
    by_sin = _other(total, by_cos) if by_cos is not None else None
    if by_cos is None or by_sin is None:
        return None
    cos = _other(by_cos, qf)
    rotated = next((a for a in by_sin.args[:2] if call_kind(a) == "flatten"), None)
    sin = _other(by_sin, rotated) if rotated is not None else None
    if not isinstance(cos, fx.Node) or not isinstance(sin, fx.Node) or rotated.args[1:2] != (-2,):
        return None
    stack = rotated.args[0]
    pair = call_args(stack, ["tensors", "dim"], {"dim": 0}) if call_kind(stack) == "stack" else None
    if pair is None or pair["dim"] != -1 or len(pair["tensors"]) != 2:
        return None
    neg, even = pair["tensors"]
    odd = neg.args[0] if call_kind(neg) == "neg" else None
    halves = [even, odd]
    if not all(isinstance(h, fx.Node) and h.target is operator.getitem for h in halves):
        return None
    unbind = even.args[0]
    if odd.args[0] is not unbind or (even.args[1], odd.args[1]) != (0, 1) or call_kind(unbind) != "unbind":
        return None
    pairs = unbind.args[0]
    if (unbind.args[1:2] != (-1,) or call_kind(pairs) != "unflatten" or pairs.args[0] is not qf
            or tuple(pairs.args[1:3]) != (-1, (-1, 2))):
        return None
    inner = [out, total, by_cos, by_sin, rotated, stack, neg, odd, even, unbind, pairs, qf]
    shared = {unbind: {even, odd}, qf: {by_cos, pairs}}  # the values read twice; any other reader: no match
    if any(set(n.users) != shared[n] if n in shared else len(n.users) != 1 for n in inner[1:]):
        return None
    return {"out": out, "cos": cos, "sin": sin, "nodes": inner}


def _refusal(norm: dict, rope: dict) -> str | None:
    """Why the matched calls are not what the op computes (None: they are). Tables another pass
    inserted (a token layout's copy) carry no example value; the kernels check them when they run."""
    x, weight, out = (meta_value(n) for n in (norm["x"], norm["weight"], rope["out"]))
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, out)):
        return "no example values"
    if weight.dtype != x.dtype or weight.shape != x.shape[-1:]:
        return f"the norm's weight ({weight.dtype}, {tuple(weight.shape)}) is not one {x.dtype} value per channel"
    if out.dim() < 3 or out.shape[:-2] != x.shape[:-1] or out.shape[-2] * out.shape[-1] != x.shape[-1]:
        return f"the view {tuple(out.shape)} does not split the last dim of {tuple(x.shape)} into heads"
    for name in ("cos", "sin"):
        t = meta_value(rope[name])
        if isinstance(t, torch.Tensor) and not table_fits(t.shape, out.shape):
            return f"{name} {tuple(t.shape)} is not one row per token, shared by every head"
    return None


def table_fits(table: torch.Size, out: torch.Size) -> bool:
    """A rotary table the op's kernels index as ``[tokens or 1, head_dim]``: ``[..., tokens or 1, 1,
    head_dim]`` with ones before, where the output is ``[..., tokens, heads, head_dim]``."""
    return (len(table) >= 3 and table[-2:] == (1, out[-1]) and table[-3] in (1, out[-3])
            and all(s == 1 for s in table[:-3]) and len(table) <= len(out))


def norm_rope_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    g = gm.graph
    rows = []
    for view in list(g.nodes):
        if call_kind(view) not in ("view", "reshape") or not isinstance(view.args[0], fx.Node):
            continue
        norm = _rms_norm(view.args[0])
        if norm is None:
            continue
        rope = _rope(view)
        why = "no interleaved rotary embedding reads the view alone" if rope is None else _refusal(norm, rope)
        if why is None and norm["read_elsewhere"]:
            why = "an intermediate value of the norm has another reader"
        if why is not None:
            rows.append({"node": view.name, "decision": f"kept: {why}"})
            continue
        heads = meta_value(rope["out"]).shape[-2]
        with g.inserting_before(rope["out"]):
            args = (norm["x"], norm["weight"], norm["eps"], rope["cos"], rope["sin"], heads)
            fused = g.call_function(rms_norm_rope, args)
        fused.meta["example_value"] = meta_value(rope["out"])
        rope["out"].replace_all_uses_with(fused)
        for dead in rope["nodes"] + [view] + norm["nodes"]:
            g.erase_node(dead)
        rows.append({"node": fused.name, "decision": f"fused: RMSNorm (eps {norm['eps']:g}) + RoPE, {heads} heads"})
    gm.recompile()
    fused_count = sum(r["decision"].startswith("fused") for r in rows)
    return gm, PassReport("norm_rope", f"{fused_count} RMSNorm + RoPE pair(s) as osp::rms_norm_rope", rows)
