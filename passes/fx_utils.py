"""Small helpers every pass needs: shapes of FX nodes, argument lookup, op names.

Sizes are ints: `passes/static_shapes.py` runs first and leaves no symbolic size behind."""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx


def meta_value(node: Any) -> Any:
    """The example value of a node (Dynamo's `example_value`, or make_fx/export's `val`)."""
    if not isinstance(node, fx.Node):
        return node
    if "example_value" in node.meta:
        return node.meta["example_value"]
    return node.meta.get("val")


def example_of(target: Any, args: tuple, kwargs: dict | None = None) -> Any:
    """What a call of ``target`` on these arguments gives, computed on their example values (fake tensors)."""
    return target(*fx.node.map_arg(args, meta_value), **fx.node.map_arg(kwargs or {}, meta_value))


def call_with_example(g: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """A call node at the graph's insertion point, with its example value (`example_of`), for the
    passes after the one that adds it."""
    node = g.call_function(target, args, kwargs or {})
    node.meta["example_value"] = example_of(target, args, kwargs)
    return node


def shape_of(node: Any) -> tuple | None:
    v = meta_value(node)
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    return None


def product(sizes: Sequence[Any]) -> Any:
    return math.prod(sizes, start=1)


def op_name(node: fx.Node) -> str:
    """A readable, stable name of what a node calls: 'linear', 'add', 'method:view', 'module:Linear'."""
    t = node.target
    if node.op == "call_method":
        return f"method:{t}"
    if node.op == "call_module":
        return f"module:{t}"
    if node.op == "call_function":
        if t in (operator.getitem,):
            return "getitem"
        name = getattr(t, "__name__", None) or str(t)
        if isinstance(t, torch._ops.OpOverload):
            name = t._schema.name.split("::")[-1]
        elif isinstance(t, torch._ops.OpOverloadPacket):
            name = t._qualified_op_name.split("::")[-1]
        return name
    return node.op


_SIGNATURES: dict[Any, list[str]] = {
    "scaled_dot_product_attention": ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"],
}


def differentiated(*nodes: Any) -> bool:
    """Whether autograd records through any of these nodes (or example values): grad mode is on and
    one of their example values requires grad. A kernel without a backward refuses such a node."""
    return torch.is_grad_enabled() and any(isinstance(v := meta_value(n), torch.Tensor) and v.requires_grad
                                           for n in nodes)


def call_kind(node: Any) -> str:
    """What a call node calls, without the ``method:`` prefix ('mul', 'layer_norm', 'view'); '' for
    anything that is not a call_function / call_method node."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return ""
    name = op_name(node)
    return name[len("method:"):] if name.startswith("method:") else name


def call_args(node: fx.Node, names: Sequence[str], defaults: dict | None = None) -> dict:
    """Positional and keyword arguments of a call, by parameter name."""
    out = dict(defaults or {})
    args = list(node.args)  # for call_method, args[0] is self and binds to the first name
    for name, value in zip(names, args):
        out[name] = value
    for key, value in node.kwargs.items():
        out[key] = value
    return out


def op_args(node: fx.Node) -> dict:
    """The arguments of a call of a ``torch.library`` op (an OpOverload: ``osp::hif8_linear``, ...)
    by its schema's names, the schema's defaults filled in for those not given."""
    schema = node.target._schema.arguments
    return call_args(node, [a.name for a in schema], {a.name: a.default_value for a in schema if a.has_default_value()})


def gelu_args(node) -> dict | None:
    """``{"input", "approximate"}`` of a GELU call (``F.gelu``, ``aten.gelu``), or None for any other node."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and op_name(node) == "gelu"):
        return None
    return call_args(node, ["input", "approximate"], {"approximate": "none"})


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) in (
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ) and not isinstance(node.target, torch._ops.OpOverload)


def sdpa_args(node: fx.Node) -> dict:
    return call_args(
        node,
        _SIGNATURES["scaled_dot_product_attention"],
        {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False},
    )


def downstream(starts: Sequence[fx.Node], stop: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """``starts`` and every node reachable from them through users, never entering a node where
    ``stop`` holds (e.g. the region between a relayout and the next one)."""
    seen: set[fx.Node] = set()
    todo = list(starts)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(u for u in n.users if not stop(u))
    return seen


def normalize_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else d


def param_fqn(node: Any) -> str | None:
    """Fully qualified parameter name of a Dynamo graph input (e.g. 'blocks.0.self_attn.q.weight').

    Dynamo passes parameters as placeholders whose source reads like
    ``L['self']._modules['blocks']._modules['0']._parameters['weight']``; get_attr nodes (FX
    symbolic traces) name the attribute directly.
    """
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return str(node.target)
    if node.op != "placeholder":
        return None
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", None)
    example = getattr(grapharg, "example", None)
    if not name or not ("_parameters[" in name or isinstance(example, torch.nn.Parameter)):
        return None
    import re

    path = re.sub(r"^L\['self'\]\.?", "", name)
    path = re.sub(r"(?:__dict__\[')?_(?:modules|parameters|buffers)'?\]?\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return ".".join(p for p in path.split(".") if p) or None


# F.linear and the osp:: linears that replace it (their first three arguments are input, weight, bias)
LINEAR_OP_NAMES = ("linear", "hif8_qat_linear", "hif8_linear")


def linear_calls(gm: fx.GraphModule) -> list[dict]:
    """Every linear layer call of the graph: F.linear / aten.linear, or matmul/addmm/mm on a weight.

    Returns dicts with the call `node`, its `input`, `weight` and `bias` nodes (bias may be None),
    the call's `form` (``linear``/osp linear ops compute x @ W^T; ``matmul``/``mm``/``addmm`` x @ W),
    and the weight's parameter name `fqn` when it is a parameter.
    """
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node)
        if name in LINEAR_OP_NAMES:
            a = call_args(node, ["input", "weight", "bias"], {"bias": None})
            out.append({"node": node, "input": a["input"], "weight": a["weight"], "bias": a["bias"],
                        "form": name, "fqn": param_fqn(a["weight"])})
        elif name in ("matmul", "mm") and len(node.args) == 2 and param_fqn(node.args[1]) is not None:
            w = node.args[1]
            if len(shape_of(w) or ()) == 2:
                out.append({"node": node, "input": node.args[0], "weight": w, "bias": None,
                            "form": name, "fqn": param_fqn(w)})
        elif name == "addmm" and len(node.args) >= 3 and param_fqn(node.args[2]) is not None:
            out.append({"node": node, "input": node.args[1], "weight": node.args[2], "bias": node.args[0],
                        "form": "addmm", "fqn": param_fqn(node.args[2])})
    return out


def declare_store_to_aot(gm: fx.GraphModule, store_name: str, names: Sequence[str]) -> None:
    """Name a Dynamo source for each of a store submodule's tensors ``store_name.<name>``, as
    Dynamo does for the parameters it bakes in.

    Under Inductor, AOTAutograd lifts a graph module's parameters and buffers to inputs and needs a
    source for each (it dedups guards by source); a store that a pass added (HiF8 codes, LoRA
    adapters) is not Dynamo's, so its tensors get a constant source of their own. Outside Dynamo
    (an FX trace, export) there is nothing to declare."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        return
    from torch._dynamo.source import ConstantSource

    for name in names:
        sources.setdefault(f"{store_name}.{name}", ConstantSource(f"__{store_name}_{name.replace('.', '_')}"))
