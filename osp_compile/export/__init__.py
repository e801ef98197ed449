"""Export: the converted, lowered model as a standalone Python module for one target.

    result = export_model(model, args, kwargs, OSPConfig(...), "npu", "out_dir")

writes ``out_dir/model.py`` (the rewritten forward and the code of every op it calls, importing only
torch, numpy, the target's libraries and, to load, safetensors; no osp_compile) and
``out_dir/parameters.safetensors`` (the tensors it reads, under their names in the model). On the
target machine, copy the directory and run::

    import sys; sys.path.insert(0, "out_dir"); import model
    net = model.load("out_dir", device="npu")   # an nn.Module
    out = net(x, t, context)                     # the model's inputs, same shapes and dtypes

The module is generated from the lowered FX graph (`OSPReport.graphs[i].module`), so it computes
what `convert()` computes. Like `convert()`'s capture it is specialised to the example inputs' shapes
and dtypes (export once per resolution and dtype). One graph only: a model that Dynamo splits at a
graph break is refused with the break's reason and place. Graphs that read tensors a pass created
(LoRA adapters, HiF8 weight codes) are refused too, for now.
"""
from __future__ import annotations

import copy
import inspect
import os
import textwrap
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .. import __version__
from ..config import OSPConfig
from ..lowering import KERNEL_KEY, TARGET_KEY
from ..lowering.attention_ops import OPAQUE_IMPLS
from ..report import format_table
from .graph import ForwardCode, describe, forward_code
from .source import ExportError, SourceEmitter

MODULE_FILE = "model.py"
PARAMETERS_FILE = "parameters.safetensors"
LIBRARIES = {"cpu": (), "cuda": ("flash_attn",), "npu": ("torch_npu",)}
"""Libraries an export for each target may import besides torch."""
RESERVED = ("os", "OSPNextModel", "PARAMETERS", "load")


@dataclass
class ExportResult:
    directory: str
    module_path: str
    parameters_path: str
    target: str
    kernels: list[dict]  # the lowering report's rows: node, op, kernel, refused


def _single_graph(report, model, args, kwargs) -> fx.GraphModule:
    graphs = [g.module for g in report.graphs]
    if len(graphs) == 1:
        return graphs[0]
    explained = torch._dynamo.explain(model)(*args, **kwargs)
    reasons = [(r.reason.strip().splitlines() or ["?"])[0] for r in explained.break_reasons]
    breaks = "; ".join(f"{reason} at {r.user_stack[-1].filename}:{r.user_stack[-1].lineno}" if r.user_stack else reason
                       for reason, r in zip(reasons, explained.break_reasons))
    raise ExportError(f"export writes single-graph models only, but Dynamo captured {len(graphs)} graph(s); "
                      f"graph break(s): {breaks or 'none reported (see torch._dynamo.explain)'}. Remove the break "
                      f"(e.g. a print, .item() or data-dependent Python control flow in forward) and export again.")


def _module_text(fwd: ForwardCode, emitter: SourceEmitter, target: str, kernels: list[dict], model_name: str) -> str:
    imports, helpers = emitter.module_code()
    inputs = "\n".join(f"    {name}: {describe(v)}" for name, v in fwd.inputs.items())
    if fwd.ignored:
        inputs += "\n" + textwrap.fill(
            "Further arguments of the model are accepted and not read (the graph was specialised to the example's "
            "values, or does not use them): " + ", ".join(f"{k}={v!r}" for k, v in fwd.ignored.items()), 100)
    counts = Counter((r["op"], r["kernel"]) for r in kernels)
    table = format_table([{"op": op, "kernel": kernel, "calls": n} for (op, kernel), n in counts.items()])
    kernel_table = "\n".join(f"    {line}" for line in table.splitlines())
    forward = "\n".join(f"    {line}" if line else line for line in fwd.code.splitlines())
    checks = "".join(f"        _expect_input({name!r}, {name}, {tuple(v.shape)!r}, {str(v.dtype)!r})\n"
                     for name, v in fwd.inputs.items() if isinstance(v, torch.Tensor))
    forward = forward.replace("):\n", f'):\n        """The rewritten forward; returns what {model_name}.forward returns."""\n{checks}', 1)
    parameters = "\n".join(f"    {attr!r}: {path!r}," for attr, path in fwd.parameters.items())
    return f'''"""{model_name} rewritten by osp-compile {__version__} into the OSP-Next model, for target "{target}".

Generated, standalone: imports torch{", " + ", ".join(LIBRARIES[target]) if LIBRARIES[target] else ""} (numpy where the layout code needs it) and, to
load the parameters, safetensors. Specialised to these inputs (shapes and dtypes):
{inputs}

Kernels chosen by the lowering (calls = nodes of the graph):
{kernel_table}

Use: net = load(directory, device); out = net({", ".join(fwd.arguments)})
"""
from __future__ import annotations

import os

{imports}

{helpers}

def _expect_input(name, value, shape, dtype):
    """The graph is specialised to the example's shapes and dtypes: others would fail deep inside, or worse."""
    if not isinstance(value, torch.Tensor) or (tuple(value.shape), str(value.dtype)) != (shape, dtype):
        got = f"{{tuple(value.shape)}} {{value.dtype}}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"input {{name}}: this export is specialised to shape {{shape}} {{dtype}}, got {{got}}; "
                         f"export the model again with such inputs (osp-compile export)")


class OSPNextModel(torch.nn.Module):
    """The converted model; its tensors are attributes named after their path in the original model."""

{forward}

PARAMETERS = {{
{parameters}
}}
"""attribute of OSPNextModel -> name in {PARAMETERS_FILE} (the original model's state_dict key)."""


def load(directory: str | None = None, device: str | torch.device = "cpu") -> OSPNextModel:
    """The model with its parameters from `directory` (default: this file's), on `device`."""
    from safetensors.torch import load_file

    directory = directory or os.path.dirname(os.path.abspath(__file__))
    tensors = load_file(os.path.join(directory, "{PARAMETERS_FILE}"))
    model = OSPNextModel()
    for attr, name in PARAMETERS.items():
        model.register_parameter(attr, torch.nn.Parameter(tensors[name], requires_grad=False))
    return model.to(device).eval()
'''


def _save_tensors(tensors: dict[str, torch.Tensor], path: str, target: str) -> None:
    from safetensors.torch import save_file

    out, storages = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        out[name] = t.clone() if key in storages else t  # safetensors refuses tensors that share memory
        storages.add(key)
    save_file(out, path, metadata={"generated_by": f"osp-compile {__version__}", "target": target})


def _on_meta(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose tensors are on the meta device.

    The export captures and lowers this copy: tracing needs shapes only, and the lowered graph runs
    once during capture, where a meta tensor takes the kernels' fake implementations instead of
    torch_npu or flash-attn, which this machine may not have. The values come from `model`.
    """
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        tensors = [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in memo:
                meta = t.detach().to("meta")
                memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _portable_where_not_written(gm: fx.GraphModule, rows: list[dict]) -> None:
    """A kernel the export cannot write out - a Triton kernel, where the export is torch and the
    target's library - gives its node back the portable ``osp::`` op, and the kernel table says so
    (library calls wrapped as opaque ops, flash-attn or torch_npu attention, are written out)."""
    by_node = {r["node"]: r for r in rows}
    for node in gm.graph.nodes:
        op = node.target
        if (not isinstance(op, torch._ops.OpOverload) or not op.namespace.startswith("osp_")
                or any(op is opaque for opaque in OPAQUE_IMPLS)):
            continue
        node.target = getattr(torch.ops.osp, op._schema.name.split("::")[-1]).default
        node.meta.pop(KERNEL_KEY, None)
        row = by_node[node.name]
        refused = f"{row['kernel']}: not exported (a Triton kernel; the export writes torch and the target's library)"
        row["refused"] = refused if row["refused"] == "-" else f"{row['refused']}; {refused}"
        row["kernel"] = "composite (portable torch)"
    gm.recompile()


def export_model(model: torch.nn.Module, args: tuple, kwargs: dict | None, config: OSPConfig, target: str,
                 directory: str) -> ExportResult:
    """Convert `model` for `target` (cpu, cuda or npu) and write it to `directory` (see the module doc)."""
    from ..convert import convert

    if target not in LIBRARIES:
        raise ExportError(f"unknown export target {target!r}: use one of {', '.join(LIBRARIES)}")
    if config.lora_rank:
        raise ExportError(f"lora_rank={config.lora_rank}: exporting LoRA adapters is not supported yet; merge them "
                          f"into the weights first (osp_compile.grpo.merge_adapters) and export with lora_rank=0")
    meta_model = _on_meta(model)
    meta_args, meta_kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs or {}))
    converted = convert(meta_model, meta_args, meta_kwargs, config.replace(target=target))
    gm = _single_graph(converted.osp_report, meta_model, meta_args, meta_kwargs)
    if gm.meta.get(TARGET_KEY) != target:
        raise ExportError("the captured graph was not lowered (the lowering pass runs last in the default pipeline)")
    kernels = next(p.rows for p in converted.osp_report.graphs[0].passes if p.name == "lowering")
    _portable_where_not_written(gm, kernels)
    with torch.no_grad():
        output = meta_model(*meta_args, **meta_kwargs)
    emitter = SourceEmitter(LIBRARIES[target], RESERVED)
    emitter.add_import("torch", "torch", "the module", from_module=False)
    call = inspect.signature(model.forward).bind(*meta_args, **meta_kwargs).arguments
    fwd = forward_code(gm, model, call, output, emitter)
    for node in gm.graph.nodes:
        for line in getattr(node.meta.get(KERNEL_KEY), "imports", ()):
            emitter.import_statement(line, f"the kernel of node {node.name!r}")
    os.makedirs(directory, exist_ok=True)
    module_path = os.path.join(directory, MODULE_FILE)
    with open(module_path, "w") as f:
        f.write(_module_text(fwd, emitter, target, kernels, type(model).__name__))
    parameters_path = os.path.join(directory, PARAMETERS_FILE)
    _save_tensors(fwd.tensors, parameters_path, target)
    return ExportResult(directory, module_path, parameters_path, target, kernels)
