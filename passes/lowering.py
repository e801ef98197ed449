"""Lowering, the last pass: the target-neutral ops of the graph get the kernels of `OSPConfig.target`.

Which nodes: every `F.scaled_dot_product_attention` call and every ``osp::`` op. For each, the
kernels registered for (op, target) (`osp_compile.lowering`) are tried in order and the first that
accepts the node replaces its target, or the node itself where the kernel is several nodes
(`Kernel.expand`: a HiF8 linear on FP8 tensor cores is an activation quantization, shared by the
linears that read one tensor, and a GEMM). An ``osp::`` attention composite (Skiparse, ...) without a
kernel of its own runs its own code with its attention on the target's SDPA kernel
(`composites.on_attention_kernel`). Anything else keeps its portable implementation. A kernel
computes what the op computes, so lowering never changes the model's outputs.

``target="auto"`` is the device the graph's inputs live on (meta tensors: cpu). The report lists
every such node with the kernel it got and, where a faster kernel was refused, why.

The pass also records, on each placeholder, the Dynamo source it stands for (``L['x']``, a
parameter's module path): Dynamo deletes that metadata after compiling, and `osp_compile.export`
needs it to turn the graph back into a module with named inputs and parameters.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from osp_compile.lowering import KERNEL_KEY, SOURCE_KEY, TARGET_KEY
from osp_compile.lowering.composites import calls_attention, composite_function, on_attention_kernel
from osp_compile.lowering.registry import Kernel, kernels_for
from osp_compile.report import PassReport
from .fx_utils import is_sdpa, meta_value

SDPA = "scaled_dot_product_attention"


def resolve_target(gm: fx.GraphModule, target: str) -> tuple[str, str]:
    """(target, why): `target` itself, or for "auto" the device type of the graph's tensor inputs."""
    if target != "auto":
        return target, "OSPConfig.target"
    devices = {v.device.type for n in gm.graph.find_nodes(op="placeholder")
               if isinstance(v := meta_value(n), torch.Tensor)}
    for kind in ("cuda", "npu"):
        if kind in devices:
            return kind, f"auto: inputs on {kind}"
    return "cpu", f"auto: inputs on {', '.join(sorted(devices)) or 'no device'}"


def lowerable_op(node: fx.Node) -> str | None:
    """The op name lowering looks up for a node ('scaled_dot_product_attention', an osp op), or None."""
    if node.op != "call_function":
        return None
    if is_sdpa(node):
        return SDPA
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "osp":
        return target._schema.name.split("::")[-1]
    return None


def _record_sources(gm: fx.GraphModule) -> None:
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        if source is not None:
            node.meta[SOURCE_KEY] = source.name() if callable(source.name) else source.name


def _choose(op: str, target: str, node: fx.Node) -> tuple[Kernel | None, list[str]]:
    """The kernel for a node, and why the kernels tried before it were refused."""
    refused = []
    own = kernels_for(op, target)
    composite = composite_function(op)
    attention = kernels_for(SDPA, target) if not own and composite is not None and calls_attention(composite) else []
    for kernel in own + attention:
        reason = kernel.refuses(node)
        if reason is None:
            if kernel in attention:
                fn = on_attention_kernel(op, kernel.fn)
                return Kernel(fn, f"composite, attention on {kernel.name}", imports=kernel.imports), refused
            return kernel, refused
        refused.append(f"{kernel.name}: {reason}")
    return None, refused


def _portable(op: str) -> str:
    if op == SDPA:
        return "PyTorch SDPA"
    return "composite (portable torch)" if composite_function(op) is not None else "the op's own implementation"


def lowering_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    target, why = resolve_target(gm, ctx.config.target)
    gm.meta[TARGET_KEY] = target
    _record_sources(gm)
    rows = []
    shared: dict = {}  # what kernel expansions share within this graph (Kernel.expand)
    for node in list(gm.graph.nodes):
        op = lowerable_op(node)
        if op is None:
            continue
        kernel, refused = _choose(op, target, node)
        if kernel is not None and kernel.expand is not None:
            kernel.expand(gm, node, shared).meta[KERNEL_KEY] = kernel
        elif kernel is not None:
            node.target = kernel.fn
            node.meta[KERNEL_KEY] = kernel
        rows.append({"node": node.name, "op": op if op == SDPA else f"osp::{op}",
                     "kernel": kernel.name if kernel is not None else _portable(op),
                     "refused": "; ".join(refused) or "-"})
    gm.recompile()
    counts = Counter(r["kernel"] for r in rows)
    summary = ", ".join(f"{n} x {k}" for k, n in counts.items()) or "no attention or osp op"
    return gm, PassReport("lowering", f"target {target} ({why}): {summary}", rows)
