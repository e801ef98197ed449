"""HiF8 linear pass: the linears of the transformer blocks become one HiF8 op each.

``OSPConfig(quant="hif8")`` (quantization-aware training): ``osp::hif8_qat_linear(x, W, b)``,
OSP-Next's recipe (``osp_compile/hif8/qat.py``).  ``quant="hif8-infer"``: ``osp::hif8_linear(x,
codes, b, scale)`` reading HiF8 codes that are computed once per weight into the session store
``ctx.state["hif8"]`` (``osp_compile/hif8/inference.py`` says why a store).

Which linears: every linear call the graph has (``F.linear``/``aten.linear``, or
``matmul``/``mm``/``addmm`` on a parameter; ``fx_utils.linear_calls``) whose weight name matches
none of the exclude patterns (fnmatch on the parameter name).  The default patterns keep the
patch embedding, the timestep / text embedding MLPs and the output head in high precision, as
OSP-Next does, under the reference model's (Wan2.1) and diffusers' Wan, CogVideoX and HunyuanVideo
names.  The defaults also keep every *per-sample* linear (one input row per sample: the adaLN
modulation and conditioning MLPs that diffusers' blocks carry, under any name): they belong to the
conditioning path the recipe leaves in high precision, and on one row FP8 saves nothing while its
activation quantization adds launches (HunyuanVideo at 720P: 22 ms of a 2.2 s step with the GPU
waiting on the host).  A model that nests the DiT under a prefix needs its own
``OSPConfig.quant_exclude``, which replaces the defaults, the per-sample rule included.
A weight that is not a parameter (computed in the graph) is left alone: it has no name to match
and, for inference, nothing to store.  The report has one row per linear with the decision.

Sequence parallelism (``OSPConfig(sequence_parallel=...)``): the pass runs after the token layout
pass and reads where each linear's input stands from its relayouts (``meta["osp_relayout"]``):
``sharded`` (one rank's shard of the tokens: downstream of a relayout into a sharded layout, before
the gather) gets the SP group, so its scales are the whole tensor's; ``replicated`` (whole on every
rank, before or beside the sharded region, so its output gradient arrives in partial sums) gets the
group and ``replicated=True`` under QAT (``hif8/qat.py`` says why and what it costs); ``gathered``
(replicated after the gather: the same values and full gradients on every rank) gets nothing, as
one process.  ``hif8-infer`` has a straight-through (linear) backward, so only ``sharded`` matters.
HiF8 ops the model calls itself (the ``HiF8Linear`` modules of ``hif8.release_float_weights``) get
the same arguments.  The report's rows then carry each linear's ``sp`` role.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from osp_compile.errors import OSPAnalysisError
from osp_compile.hif8 import inference, qat  # noqa: F401  (qat defines osp::hif8_qat_linear)
from osp_compile.report import PassReport
from .fx_utils import declare_store_to_aot, downstream, linear_calls, meta_value, op_args, shape_of
from .token_layout import sp_info

DEFAULT_EXCLUDE = (
    "patch_embedding*",  # Wan2.1 and diffusers: the Conv3d patchifier (and any linear form of it)
    "time_embedding*", "time_projection*", "text_embedding*", "img_emb*",  # Wan2.1 conditioning MLPs
    "condition_embedder*",  # diffusers Wan: time/text/image embedders and time_proj
    "head*",  # Wan2.1 output head
    "proj_out*",  # diffusers Wan output projection
    "patch_embed*",  # diffusers CogVideoX: the patchifier and its text projection
    "context_embedder*",  # diffusers HunyuanVideo: the text token refiner
)
PER_SAMPLE = "kept: per-sample conditioning (one row per sample)"

STORE_NAME = "osp_hif8"
_TRANSPOSED_FORMS = ("matmul", "mm", "addmm")  # x @ W: the weight is stored [in, out]
_HIF8_FORMS = ("hif8_qat_linear", "hif8_linear")
_META_KEYS = ("example_value", "nn_module_stack", "stack_trace", "source_fn_stack")


def _decision(call: dict, patterns: list[str], batch: int | None) -> str | None:
    """Why a linear is left alone, or None to quantize it. ``batch``: the video's batch when the
    per-sample rule applies (the default patterns and a graph with video attention), else None."""
    if call["form"] in _HIF8_FORMS:
        return "kept: already HiF8"
    if call["fqn"] is None:
        return "kept: weight is not a parameter"
    for p in patterns:
        if fnmatch.fnmatchcase(call["fqn"], p):
            return f"excluded by pattern {p!r}"
    shape = shape_of(call["input"])
    if batch is not None and shape and math.prod(shape[:-1]) <= batch:
        return PER_SAMPLE
    if call["form"] == "addmm" and (call["node"].kwargs.get("beta", 1) != 1 or call["node"].kwargs.get("alpha", 1) != 1):
        return "kept: addmm with alpha/beta"
    return None


def _real_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The parameter behind a weight node: a Dynamo graph input's example, or a get_attr target."""
    if node.op == "get_attr":
        return gm.get_parameter(str(node.target))
    example = getattr(node.meta.get("grapharg"), "example", None)
    if not isinstance(example, torch.Tensor):
        raise RuntimeError(f"hif8-infer: cannot read the value of weight {node.name}")
    return example


def fake_like(like: fx.Node, real: torch.Tensor):
    """A fake tensor for a new node's meta, in the graph's fake mode (shape/dtype readers need one).
    Static shapes: a store buffer's size is fixed, and a symbolic one would reach every reader of
    the node (the LoRA pass sizes its adapters from it)."""
    mode = getattr(meta_value(like), "fake_mode", None)
    return mode.from_tensor(real, static_shapes=True) if mode is not None else real


def store_attr(g: fx.Graph, store: torch.nn.Module, attr: str, like: fx.Node) -> fx.Node:
    """A ``get_attr`` node reading the store's buffer ``attr``, with a fake example value in the
    graph's fake mode (`fake_like`); inserted where the graph's insertion point is."""
    node = g.get_attr(f"{STORE_NAME}.{attr}")
    node.meta["example_value"] = fake_like(like, store.get_buffer(attr))
    return node


def store_fqn(node: fx.Node) -> str | None:
    """The weight name a node reads from the store (``osp_hif8.<name>``), or None if it reads none."""
    prefix = f"{STORE_NAME}."
    if node.op == "get_attr" and str(node.target).startswith(prefix):
        return str(node.target)[len(prefix):]
    return None


def _replace(g: fx.Graph, node: fx.Node, target, args: tuple) -> fx.Node:
    with g.inserting_before(node):
        new = g.call_function(target, args)
    new.meta.update({k: node.meta[k] for k in _META_KEYS if k in node.meta})
    node.replace_all_uses_with(new)
    g.erase_node(node)
    return new


SHARDED, REPLICATED, GATHERED = "sharded", "replicated", "gathered"


@dataclass
class _SPRoles:
    """Where the tensors of a sequence-parallel graph stand (see the module docstring)."""

    group: str = ""  # "" for one process: no role, no extra op arguments
    sharded: set = field(default_factory=set)
    gathered: set = field(default_factory=set)

    def role(self, x: fx.Node) -> str | None:
        if not self.group:
            return None
        return SHARDED if x in self.sharded else GATHERED if x in self.gathered else REPLICATED

    def extra_args(self, x: fx.Node, infer: bool) -> tuple:
        """The trailing ``(group[, replicated])`` arguments of the HiF8 op reading ``x``."""
        role = self.role(x)
        if role == SHARDED:
            return (self.group,)
        if role == REPLICATED and not infer:
            return (self.group, True)
        return ()


def _set_sp_args(node: fx.Node, extra: tuple) -> None:
    """Give a HiF8 op already in the graph the SP arguments ``extra`` (replacing any it had)."""
    names = [a.name for a in node.target._schema.arguments]
    given = op_args(node)
    head = names[:names.index("group")]  # positional; what follows the SP arguments goes by name
    node.args = tuple(given[n] for n in head) + extra
    node.kwargs = {n: given[n] for n in names[len(head):] if n not in ("group", "replicated") and given[n] is not None}


def _relayout(n: fx.Node) -> dict | None:
    return n.meta.get("osp_relayout")


def _is_gather(n: fx.Node) -> bool:
    """A relayout into the replicated ("full") layout."""
    info = _relayout(n)
    return info is not None and info["dst"] == "full"


def _sp_roles(gm: fx.GraphModule, ctx) -> _SPRoles:
    sp = sp_info(ctx.config)
    if sp.world <= 1:
        return _SPRoles()
    relayouts = [n for n in gm.graph.nodes if _relayout(n) is not None]
    if not relayouts and ctx.analysis is not None and ctx.analysis.video_sites:
        raise OSPAnalysisError(
            "hif8_linear: a sequence-parallel graph with video attention but no relayout node carrying "
            "meta['osp_relayout']: cannot tell sharded tokens from replicated tensors, so HiF8 cannot share "
            "its scales correctly (the token layout pass must run first and mark its relayouts)"
        )
    sharded = downstream([n for n in relayouts if not _is_gather(n)], _is_gather)
    gathered = downstream([n for n in relayouts if _is_gather(n)], lambda n: _relayout(n) is not None)
    return _SPRoles(sp.group, sharded, gathered - sharded)


def hif8_linear_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    """Replace each chosen linear by ``osp::hif8_qat_linear`` or ``osp::hif8_linear``."""
    infer = ctx.config.quant == "hif8-infer"
    sp = _sp_roles(gm, ctx)
    defaults = ctx.config.quant_exclude is None
    patterns = list(DEFAULT_EXCLUDE) if defaults else list(ctx.config.quant_exclude)
    sites = ctx.analysis.layout_sites if ctx.analysis is not None else []
    batch = max(s.batch for s in sites) if defaults and sites else None
    g = gm.graph
    store = None
    if infer:
        store = ctx.state.get(inference.STATE_KEY)
        if store is None:
            store = ctx.state[inference.STATE_KEY] = inference.HiF8WeightStore()
        gm.add_submodule(STORE_NAME, store)

    rows = []
    replaced: dict[fx.Node, fx.Node] = {}  # a linear's input may be a linear replaced before it
    for call in linear_calls(gm):
        node, weight, fqn = call["node"], call["weight"], call["fqn"]
        x = replaced.get(call["input"], call["input"])
        why = _decision(call, patterns, batch)
        transposed = call["form"] in _TRANSPOSED_FORMS
        rows.append({"linear": fqn or f"(node {node.name})", "form": call["form"], "shape": shape_of(weight),
                     "decision": why or ("quantized: HiF8 codes" if infer else "quantized: HiF8 QAT")})
        if sp.group:
            rows[-1]["sp"] = sp.role(call["input"])
        if why is not None:
            if sp.group and call["form"] in _HIF8_FORMS:
                _set_sp_args(node, sp.extra_args(call["input"], infer=call["form"] == "hif8_linear"))
            continue
        extra = sp.extra_args(call["input"], infer)
        if infer:
            real = _real_weight(gm, weight).detach()
            codes_attr, scale_attr = store.get_or_quantize(fqn, real.T if transposed else real)
            with g.inserting_before(node):
                codes, scale = store_attr(g, store, codes_attr, node), store_attr(g, store, scale_attr, node)
            replaced[node] = _replace(g, node, torch.ops.osp.hif8_linear.default, (x, codes, call["bias"], scale, *extra))
        else:
            if transposed:
                with g.inserting_before(node):
                    weight_t = g.call_function(torch.t, (weight,))
                weight_t.meta["example_value"] = meta_value(weight).t()
                weight = weight_t
            replaced[node] = _replace(g, node, torch.ops.osp.hif8_qat_linear.default, (x, weight, call["bias"], *extra))
    if infer:
        declare_store_to_aot(gm, STORE_NAME, [name for name, _ in store.named_buffers()])
        for node in gm.graph.find_nodes(op="call_function", target=torch.ops.osp.hif8_linear.default):
            node.meta[inference.FAST_ACCUM_KEY] = ctx.config.fp8_fast_accum  # read by lowering's CUDA kernel choice
    gm.recompile()
    done = sum(r["decision"].startswith("quantized") for r in rows)
    excluded = sum(r["decision"].startswith("excluded") for r in rows)
    per_sample = sum(r["decision"] == PER_SAMPLE for r in rows)
    what = "HiF8 weight codes + on-the-fly activation quantization" if infer else "HiF8 QAT (x, W: scale_max 15; grad: 224)"
    return gm, PassReport(
        "hif8_linear",
        f"{done} of {len(rows)} linear(s) quantized ({what}); {excluded} excluded by pattern, {per_sample} "
        f"per-sample conditioning, {len(rows) - done - excluded - per_sample} kept otherwise",
        rows,
    )
