"""GELU + HiF8 linear pass: a HiF8 inference linear whose input is a GELU read by nothing else
becomes one ``osp::gelu_hif8_linear`` node.

Why: in a HiF8 model the FFN's first linear cannot take the GELU into its GEMM's epilogue in a
form the next linear can use (cuBLASLt has a GELU epilogue, but refuses to write ``max|D|`` of a
bfloat16 output, ``hif8/cublaslt.py``), so the GELU runs as its own kernel over the widest
activation of the block, and the second linear's per-tensor quantization then reads its output
twice more (its max, then the quantize pass). The quantization can apply the GELU itself while it
reads: the GELU output is then never written. On the Wan-14B shape at 720P that activation is
75,600 x 13,824 per block. The op is target-neutral (its implementation is the two calls);
lowering picks the fused kernel where the target has one (CUDA: ``hif8/triton_fp8.py``).

Which linears: ``osp::hif8_linear`` nodes (``quant="hif8-infer"``) whose input is a ``gelu`` call
with no other reader. The report lists each fused pair.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from osp_compile.hif8.inference import gelu_hif8_linear
from osp_compile.report import PassReport
from .fx_utils import gelu_args, op_args, param_fqn
from .hif8_linear import store_fqn


def _weight_name(codes: fx.Node) -> str:
    """The weight's name: from the session store (``quant="hif8-infer"``), or the buffer of a
    released ``HiF8Linear`` module, else the node's."""
    return store_fqn(codes) or param_fqn(codes) or codes.name


def gelu_hif8_linear_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    g = gm.graph
    rows = []
    for node in list(g.find_nodes(op="call_function", target=torch.ops.osp.hif8_linear.default)):
        a = op_args(node)
        gelu = a["x"]
        b = gelu_args(gelu)
        if b is None or len(gelu.users) != 1:
            continue
        with g.inserting_before(node):
            fused = g.call_function(gelu_hif8_linear, (b["input"], a["codes"], a["bias"], a["scale"], a["group"],
                                                       b["approximate"]))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        g.erase_node(node)
        g.erase_node(gelu)
        rows.append({"node": fused.name, "weight": _weight_name(a["codes"]), "approximate": b["approximate"]})
    gm.recompile()
    return gm, PassReport("gelu_hif8_linear", f"{len(rows)} GELU + HiF8 linear pair(s) as osp::gelu_hif8_linear", rows)
