"""A lowered Dynamo graph as the `forward` of a standalone module.

Dynamo's graph takes the model's parameters as inputs (placeholders); the lowering pass recorded
each placeholder's Dynamo source. Here a copy of the graph is made in which
- the user inputs (``L['x']``) become the forward's arguments, named and ordered as in the model's
  own forward;
- parameters, buffers and other tensors of the model (``L['self']...``) and `get_attr` tensors
  become attributes of the module, read just before their first use, named after their path in the
  model (``blocks.0.self_attn.q.weight`` -> ``blocks_0_self_attn_q_weight``);
- osp ops and lowered kernels become calls of Python functions that `SourceEmitter` copies in;
- the output is the model's own output structure (a tensor, or tuples / lists / dicts of tensors).
FX's code generator then prints the forward.
"""
from __future__ import annotations

import inspect
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..lowering import SOURCE_KEY
from ..lowering.composites import composite_function
from .source import ExportError, SourceEmitter, is_copied

_FROM_IMPORTS = {"inf": "math", "nan": "math", "device": "torch"}  # globals FX's code may use


@dataclass
class ForwardCode:
    """The forward of the export, and what it needs: parameters and the functions it calls."""

    code: str  # "def forward(self, ...):" and its body, at indentation 0
    inputs: dict[str, Any]  # argument (or "argument[i]") -> example value (FakeTensor)
    arguments: list[str] = field(default_factory=list)  # the forward's arguments, in order
    ignored: dict[str, Any] = field(default_factory=dict)  # further arguments of the model: accepted, not read
    parameters: dict[str, str] = field(default_factory=dict)  # attribute -> name in the model
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # name in the model -> value


_PATH_PART = re.compile(r"\.(?:__dict__\[')?_(?:modules|parameters|buffers)'?\]?\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


def model_path(source: str) -> str | None:
    """'L['self']._modules['blocks']._modules['0']._parameters['weight']' -> 'blocks.0.weight'."""
    prefix = "L['self']"
    if not source.startswith(prefix):
        return None
    rest, parts = source[len(prefix):], []
    while rest:
        m = _PATH_PART.match(rest)
        if m is None:
            return None
        parts.append(next(g for g in m.groups() if g is not None))
        rest = rest[m.end():]
    return ".".join(parts) or None


def input_source(source: str, parameters: list[str]) -> tuple[str, tuple] | None:
    """(forward argument, indices into it) of a Dynamo source: ``L['x']`` -> ('x', ()), through a
    ``*args, **kwargs`` wrapper of forward (diffusers) ``L['args'][0]`` -> (first of `parameters`, ())
    and ``L['kwargs']['x']``; a tuple argument's element ``L['x'][0]`` -> ('x', (0,))."""
    if m := re.fullmatch(r"L\['args'\]\[(\d+)\]((?:\[\d+\])*)", source):
        if int(m.group(1)) >= len(parameters):
            return None
        name = parameters[int(m.group(1))]
    elif m := re.fullmatch(r"L\[(?:'kwargs'\]\[)?'([A-Za-z_]\w*)'\]((?:\[\d+\])*)", source):
        name = m.group(1)
    else:
        return None
    return name, tuple(int(i) for i in re.findall(r"\d+", m.group(2)))


def _attribute(path: str, taken: set[str]) -> str:
    name = re.sub(r"\W", "_", path)
    name = name if name.isidentifier() else f"p_{name}"
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _tensor_at(model: torch.nn.Module, path: str) -> torch.Tensor:
    value: Any = model
    for part in path.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise ExportError(f"the graph reads {path!r} of the model, which is a {type(value).__name__}, not a tensor")
    return value


def _callee(node: fx.Node) -> tuple[Callable, str] | None:
    """(function to copy, name to call it by) for a node the export must provide code for."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "osp":
        op = target._schema.name.split("::")[-1]
        fn = composite_function(op)
        if fn is None:
            raise ExportError(f"node {node.name!r} calls {target.namespace}::{op}, which has no standalone "
                              f"implementation the export can copy (register a kernel for it, or list its "
                              f"composite in osp_compile.lowering.composites.COMPOSITES)")
        return fn, op
    if is_copied(target):
        return target, target.__name__
    return None


def _graph_inputs(placeholders: list[fx.Node], order: list[str]) -> tuple[list[tuple], dict[fx.Node, str]]:
    """Dynamo's placeholders as (position, forward argument, indices, node) and {node: model path}."""
    inputs, state = [], {}
    for node in placeholders:
        source = node.meta.get(SOURCE_KEY)
        if source is None:
            raise ExportError(f"graph input {node.name!r} has no recorded source: was the graph lowered "
                              f"(passes/lowering.py runs last in the default pipeline)?")
        argument, path = input_source(source, order), model_path(source)
        if argument is not None:
            inputs.append((order.index(argument[0]) if argument[0] in order else len(order), *argument, node))
        elif path is not None:
            state[node] = path
        else:
            raise ExportError(f"graph input {node.name!r} comes from {source}: only the forward's own "
                              f"arguments (tensors, or tuples of them) and tensors of the model can be exported")
    return sorted(inputs, key=lambda entry: entry[:3]), state


def _add_arguments(graph: fx.Graph, inputs: list[tuple], order: list[str], call: dict[str, Any],
                   result: ForwardCode, env: dict[fx.Node, Any]) -> None:
    """The forward's arguments: the graph's inputs first, then the model's other arguments (accepted
    with the example's value as default, not read: the graph was specialised to them or never uses them)."""
    arguments: dict[str, fx.Node] = {}
    for _, name, _, _ in inputs:
        if name not in arguments:
            arguments[name] = graph.placeholder(name)
    for _, name, indices, node in inputs:
        value = arguments[name]
        for i in indices:  # an element of a tuple argument
            value = graph.call_function(operator.getitem, (value, i))
        env[node] = value
        result.inputs[name + "".join(f"[{i}]" for i in indices)] = node.meta.get("example_value")
    result.arguments = list(arguments)
    for name in order:
        if name not in arguments:
            value = call.get(name)
            default = value if isinstance(value, (bool, int, float, str, type(None))) else None
            graph.placeholder(name, default_value=default)
            result.ignored[name] = default


def _print(graph: fx.Graph, callees: dict[Callable, str], emitter: SourceEmitter) -> str:
    """FX's code for the graph, its calls of copied functions renamed to the names `emitter` gives them."""
    code = graph.python_code(root_module="self")
    header, body = code.src.strip().split("\n", 1)
    locals_ = {n.name for n in graph.nodes}
    for global_name, value in code.globals.items():
        if value in callees:
            name = callees[value] if callees[value] not in locals_ else f"{callees[value]}_fn"
            body = re.sub(rf"\b{global_name}\b", emitter.function(value, name), body)
        elif global_name == "torch" or not re.search(rf"(?<![.\w]){global_name}\b(?!\s*=)", body):
            continue
        elif global_name in _FROM_IMPORTS:
            emitter.add_import(_FROM_IMPORTS[global_name], global_name, "the forward")
        else:
            raise ExportError(f"the forward refers to {global_name!r} ({type(value).__name__}), which cannot be "
                              f"written into a standalone module")
    return f"{header}\n{body}\n"


def forward_code(gm: fx.GraphModule, model: torch.nn.Module, call: dict[str, Any], output: Any,
                 emitter: SourceEmitter) -> ForwardCode:
    """Rebuild `gm` as the module's forward. `call`: the example call's arguments by name (the
    model's forward signature); `output`: the model's output on it."""
    order = [name for name, p in inspect.signature(model.forward).parameters.items()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # follows functools.wraps to the real forward
    graph, env, result = fx.Graph(), {}, ForwardCode("", {})
    inputs, state = _graph_inputs(list(gm.graph.find_nodes(op="placeholder")), order)
    _add_arguments(graph, inputs, order, call, result, env)
    taken: set[str] = set()

    def parameter(path: str, value: torch.Tensor) -> fx.Node:
        attr = _attribute(path, taken)
        result.parameters[attr] = path
        result.tensors[path] = value
        return graph.get_attr(attr)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:  # a tensor of the model, read just before its first use
            env[node] = parameter(state[node], _tensor_at(model, state[node]))
        return env[node]

    # the capture's device, baked into factory calls (torch.arange(..., device=meta)), becomes the
    # device of the first input at run time, so the module runs wherever it is loaded
    first = next((env[n] for *_, n in inputs if isinstance(n.meta.get("example_value"), torch.Tensor)), None)
    captured = next((v.device for v in result.inputs.values() if isinstance(v, torch.Tensor)), None)
    device: list[fx.Node] = []

    def runtime_device(value: Any) -> Any:
        if isinstance(value, torch.device) and value == captured:
            if not device:
                device.append(graph.create_node("call_function", getattr, (first, "device"), name="device"))
            return device[0]
        return value

    callees: dict[Callable, str] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":
            value = _tensor_at(gm, str(node.target))
            if value.is_meta:  # made by a pass on the meta copy the export captures (see export_model)
                raise ExportError(f"the graph reads {node.target!r}, a tensor a pass created during conversion "
                                  f"(LoRA adapters, HiF8 codes): exporting such graphs is not supported yet")
            env[node] = parameter(str(node.target), value)
            continue
        new = graph.node_copy(node, lookup)
        with graph.inserting_before(new):
            new.args, new.kwargs = fx.node.map_aggregate((new.args, new.kwargs), runtime_device)
        if node.op == "call_function" and (callee := _callee(node)) is not None:
            fn, name = callee
            new.target, callees[fn] = fn, name
        env[node] = new

    outputs = [lookup(n) if isinstance(n, fx.Node) else n for n in pytree.tree_leaves(gm.graph.output_node().args[0])]
    leaves, spec = pytree.tree_flatten(output)
    if len(leaves) != len(outputs) or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise ExportError(f"the model returns {len(leaves)} value(s) ({spec}), the graph {len(outputs)}: only "
                          f"outputs that are tensors, or tuples / lists / dicts of tensors, can be exported")
    graph.output(pytree.tree_unflatten(outputs, spec))
    result.code = _print(graph, callees, emitter)
    return result


def describe(value: Any) -> str:
    """'float32[1, 4, 3, 12, 20]' for a tensor (or fake tensor) example value."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}[{', '.join(str(s) for s in value.shape)}]"
    return type(value).__name__
