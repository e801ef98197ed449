"""Identity-dropout pass: a dropout that cannot drop anything (``p == 0``, or ``training=False``)
is removed, its readers reading its input.

Why: third-party models keep their dropout calls in the graph Dynamo captures. diffusers'
``FeedForward`` runs GELU -> Dropout -> Linear and its attention output goes through one; at
inference (and at ``p == 0`` in training) each is the identity, but it is a node between
neighbours that the fusion passes pair: a GELU and the HiF8 linear reading it
(`passes/gelu_hif8_linear.py`) were not fused in diffusers' CogVideoX for that reason alone.
Inductor drops such calls too, but only after the passes have looked.

Which calls: ``F.dropout`` and its variants (``dropout1d/2d/3d``, ``alpha_dropout``,
``feature_alpha_dropout``) whose ``p`` and ``training`` are constants of the graph. One whose
``p`` or ``training`` is computed in the graph stays, and so does a dropout that drops.
"""
from __future__ import annotations

import torch.fx as fx

from osp_compile.report import PassReport
from .fx_utils import call_args, op_name

DROPOUTS = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")
"""Functions of ``torch.nn.functional`` (and torch's own ``dropout``) with (input, p, training, inplace)."""


def identity_dropout_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    g = gm.graph
    rows = []
    for node in list(g.nodes):
        name = op_name(node) if node.op == "call_function" else None
        if name not in DROPOUTS:
            continue
        a = call_args(node, ["input", "p", "training", "inplace"], {"p": 0.5, "training": True, "inplace": False})
        p, training = a["p"], a["training"]
        if not (isinstance(p, (int, float)) and isinstance(training, bool)) or (p != 0 and training):
            continue
        node.replace_all_uses_with(a["input"])
        g.erase_node(node)
        rows.append({"node": node.name, "op": name, "why": "p = 0" if p == 0 else "training=False"})
    if rows:
        gm.recompile()
    return gm, PassReport("identity_dropout", f"{len(rows)} dropout call(s) that drop nothing removed", rows)
