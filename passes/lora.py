"""LoRA pass: add a trainable low-rank adapter beside the chosen linears of each captured graph.

    out = linear(x, W, b) + osp.lora_delta(x, A, B, scale),   lora_delta = ((x @ A^T) @ B^T) * scale

A [r, in] is kaiming-uniform, B [out, r] is zero, so the adapted model equals the base at init.
The pass runs on the converted graph (after Skiparse and the optional HiF8 linears, whose first
three arguments are also input, weight, bias), so the adapters train the model as it will run.

Where the adapters live: one `LoRAAdapters` module per session, `ctx.state["lora"]`, keyed by the
weight's parameter name. Dynamo captures again whenever a guard fails (grad mode, shapes,
requires_grad), and each new graph must use the *same* parameters, so the store is created once
and a new adapter only when a weight is seen for the first time. The store is registered as the
submodule ``osp_lora`` of every graph module and read with get_attr nodes: with inner="eager" the
graph reads the Parameters themselves; under Inductor, AOTAutograd lifts a graph module's
parameters and buffers to graph inputs, so gradients reach the same Parameters there too.

Enable switch: the store's 0-d buffer ``scale`` (alpha/rank when on, 0 when off) is multiplied in
at run time. Toggling it is an in-place ``fill_`` that every compiled graph sees, with no guard and
no recompilation. Off still computes the (exactly zeroed) delta: cheap at rank r, and it keeps one
graph for both the policy and its reference.
"""
from __future__ import annotations

import fnmatch
import math
import zlib
from typing import TYPE_CHECKING, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import osp_compile.ops  # noqa: F401  (defines the osp namespace this file adds to)
from osp_compile.report import PassReport
from .fx_utils import declare_store_to_aot, linear_calls, meta_value, shape_of

if TYPE_CHECKING:
    from osp_compile.pipeline import PassContext

STORE_NAME = "osp_lora"

#: Attention q/k/v/o of self- and cross-attention (OSP-Next's LoRA targets), in Wan2.1 and diffusers names.
DEFAULT_TARGETS = (
    "*self_attn.[qkvo].weight",
    "*cross_attn.[qkvo].weight",
    "*attn[12].to_[qkv].weight",
    "*attn[12].to_out.0.weight",
)

# x @ W (matmul/mm/addmm) stores W as [in, out]; F.linear and the HiF8 linears store [out, in]
_TRANSPOSED_FORMS = ("matmul", "mm", "addmm")

_lib = torch.library.Library("osp", "FRAGMENT")
_lib.define("lora_delta(Tensor x, Tensor A, Tensor B, Tensor scale) -> Tensor")


@torch.library.impl(_lib, "lora_delta", "CompositeImplicitAutograd")
def _lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """((x @ A^T) @ B^T) * scale, in the adapters' dtype (float32), returned in x's dtype.

    Adapters stay float32 whatever the base dtype, so a bf16 model trains fp32 adapters.
    The switch is cloned so that backward keeps the value of the forward: toggling it between a
    forward and its backward (a reference forward with adapters off) is then no in-place error.
    CompositeImplicitAutograd: autograd and Inductor see these plain torch ops.
    """
    return (F.linear(F.linear(x.to(A.dtype), A), B) * scale.clone()).to(x.dtype)


lora_delta = torch.ops.osp.lora_delta.default


def adapter_key(fqn: str) -> str:
    """A ParameterDict key for a weight name ('blocks.0.self_attn.q.weight' -> 'blocks__0__self_attn__q')."""
    return fqn.removesuffix(".weight").replace(".", "__")


class LoRAAdapters(nn.Module):
    """The adapters of one session: ``lora_A[key]`` [r, in] and ``lora_B[key]`` [out, r] per weight.

    `fqns[key]` is the adapted weight's parameter name, `transposed[key]` whether that weight is
    stored [in, out] (x @ W) rather than [out, in] (F.linear). Buffer `scale` is the enable switch.
    """

    def __init__(self, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.fqns: dict[str, str] = {}
        self.transposed: dict[str, bool] = {}
        self.register_buffer("scale", torch.tensor(self.scaling))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def enabled(self) -> bool:
        return bool(self.scale.item() != 0.0)

    def set_enabled(self, on: bool) -> None:
        """Switch the adapters on or off in place: no recompilation (see the module docstring)."""
        self.scale.fill_(self.scaling if on else 0.0)

    def get_or_create(self, fqn: str, in_features: int, out_features: int, device: torch.device,
                      transposed: bool = False) -> str:
        """The key of `fqn`'s adapter, creating it on first sight.

        A is drawn from a generator seeded by the weight name, so every process (data-parallel
        ranks, a resumed run) creates identical adapters without communicating.
        """
        key = adapter_key(fqn)
        if key in self.lora_A:
            return key
        gen = torch.Generator().manual_seed(zlib.crc32(fqn.encode()))
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), nn.Linear's (and PEFT's) init
        a = (torch.rand(self.rank, in_features, generator=gen) * 2 - 1) * bound
        self.lora_A[key] = nn.Parameter(a.to(device))
        self.lora_B[key] = nn.Parameter(torch.zeros(out_features, self.rank, device=device))
        self.fqns[key] = fqn
        self.transposed[key] = transposed
        self.scale.data = self.scale.data.to(device)
        return key

    def items(self) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
        """(weight fqn, A, B) of every adapter."""
        for key, fqn in self.fqns.items():
            yield fqn, self.lora_A[key], self.lora_B[key]

    def delta_weight(self, key: str) -> torch.Tensor:
        """scaling * B @ A in the layout of the adapted weight (transposed for x @ W weights)."""
        d = self.scaling * (self.lora_B[key] @ self.lora_A[key])
        return d.T if self.transposed[key] else d

    def extra_repr(self) -> str:
        return f"{len(self.fqns)} adapter(s), rank={self.rank}, alpha={self.alpha:g}, enabled={self.enabled}"


def _store(ctx: PassContext) -> LoRAAdapters:
    store = ctx.state.get("lora")
    if store is None:
        store = ctx.state["lora"] = LoRAAdapters(ctx.config.lora_rank, ctx.config.lora_alpha)
    return store


def _features(call: dict) -> tuple[int, int, bool]:
    """(in_features, out_features, transposed) of a linear call's weight."""
    rows, cols = shape_of(call["weight"])
    if call["form"] in _TRANSPOSED_FORMS:
        return rows, cols, True
    return cols, rows, False


def lora_pass(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassReport]:
    """Add an adapter beside every linear whose weight name matches `config.lora_targets`."""
    cfg = ctx.config
    patterns = list(cfg.lora_targets) if cfg.lora_targets is not None else list(DEFAULT_TARGETS)
    store = _store(ctx)
    gm.add_submodule(STORE_NAME, store)
    g = gm.graph
    scale = None
    rows = []
    for call in linear_calls(gm):
        node, fqn = call["node"], call["fqn"]
        chosen = fqn is not None and any(fnmatch.fnmatchcase(fqn, p) for p in patterns)
        rows.append({"linear": fqn or f"(node {node.name})", "form": call["form"],
                     "shape": shape_of(call["weight"]), "adapter": "yes" if chosen else "no"})
        if not chosen:
            continue
        in_f, out_f, transposed = _features(call)
        key = store.get_or_create(fqn, in_f, out_f, meta_value(call["weight"]).device, transposed)
        with g.inserting_before(node):
            if scale is None:
                scale = g.get_attr(f"{STORE_NAME}.scale")
            a = g.get_attr(f"{STORE_NAME}.lora_A.{key}")
            b = g.get_attr(f"{STORE_NAME}.lora_B.{key}")
        with g.inserting_after(node):
            delta = g.call_function(lora_delta, (call["input"], a, b, scale))
        with g.inserting_after(delta):
            out = g.call_function(torch.add, (node, delta))
        for n in (delta, out):
            n.meta.update({k: node.meta[k] for k in ("example_value", "nn_module_stack", "stack_trace") if k in node.meta})
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    declare_store_to_aot(gm, STORE_NAME, [n for n, _ in [*store.named_parameters(), *store.named_buffers()]])
    gm.recompile()
    adapted = sum(r["adapter"] == "yes" for r in rows)
    return gm, PassReport(
        "lora",
        f"{adapted} of {len(rows)} linear(s) got a rank-{store.rank} adapter (alpha {store.alpha:g})",
        rows,
    )
