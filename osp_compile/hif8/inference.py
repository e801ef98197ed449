"""HiF8 inference linear: weights stored once as HiF8 codes plus a per-tensor scale.

    osp::hif8_linear(x, codes, bias, scale, group="", amax=None) = fq(x, 15) @ (decode(codes) / scale)^T + bias

``codes`` (uint8, [out, in]) are the HiF8 codes of ``W * scale``, ``scale = 15 / max|W|``
(float32, 0-dim), so ``decode(codes) / scale`` is bit for bit the QAT forward's ``fq(W, 15)``;
activations get the QAT forward's per-tensor quantization on the fly.  The argument order keeps
(input, weight, bias) first, as ``passes.fx_utils.linear_calls`` (and so LoRA) reads every linear.
The default implementation here is the portable reference (decode, then a float matmul); the
per-target kernels (``osp_compile/lowering/hif8_kernels.py``) compute the same thing faster.
``group`` is the sequence-parallel group ``x``'s tokens are split over ("" for one process): the
activation's scale is then the whole tensor's, all-reduced over the group (``group.py``).

Where the codes live.  A Dynamo graph takes the parameters as inputs, so the converted graph cannot
hold the codes itself.  The pass quantizes each weight once into a session store,
``ctx.state["hif8"]``, a `HiF8WeightStore` module whose buffers mirror the weight names
(``blocks.0.self_attn.q.weight`` -> uint8 codes, ``blocks.0.self_attn.q.weight_scale`` -> scale).
Dynamo captures again whenever a guard fails (grad mode, shapes); the new graph finds the codes
already there and reuses them.  The store is registered as the submodule ``osp_hif8`` of each
graph module and read with ``get_attr`` nodes, so a code change (``load_hif8_state_dict``) is seen
by every compiled graph without recompiling.  Its ``state_dict`` is the deployable artefact:
`hif8_state_dict` / `load_hif8_state_dict` (safetensors-friendly: plain named tensors).
"""
import functools
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import api
from .fp8 import forget_e4m3_weight, transcode_weight
from .group import group_amax
from .qat import W_SCALE_MAX, X_SCALE_MAX

STATE_KEY = "hif8"
"""Key of the weight store in a session's ``ctx.state`` / ``OSPModule.osp_state``."""
SCALE_SUFFIX = "_scale"
E4M3_SUFFIX, DEQUANT_SUFFIX = "_e4m3", "_e4m3_dequant"
FAST_ACCUM_KEY = "osp_fp8_fast_accum"
"""Node meta set by the HiF8 pass from ``OSPConfig.fp8_fast_accum``; lowering's CUDA choice reads it."""


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of a weight [out, in]: uint8 codes of ``W * scale``, float32 0-dim scale."""
    codes, scale = api.encode_scaled(weight.detach(), W_SCALE_MAX)
    return codes.contiguous(), scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                      backend: str = "auto") -> torch.Tensor:
    """``decode(codes) / scale`` in float32, cast to ``dtype``: the QAT forward's ``fq(W, 15)``."""
    return (api.decode(codes, backend=backend) / scale).to(dtype)


def hif8_linear_reference(x: torch.Tensor, codes: torch.Tensor, bias: Optional[torch.Tensor],
                          scale: torch.Tensor, group: str = "", amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op's meaning in plain torch: quantize ``x`` per tensor, decode the weight, float matmul."""
    x_q = api.quantize_scaled(x, X_SCALE_MAX, amax=group_amax(x, group, amax))
    return F.linear(x_q, dequantize_weight(codes, scale, x.dtype), bias)


HIF8_LINEAR_SCHEMA = '(Tensor x, Tensor codes, Tensor? bias, Tensor scale, str group="", Tensor? amax=None) -> Tensor'
"""``amax``: ``max|x|`` of this rank's ``x``, where the graph computes it (``passes/hif8_absmax.py``)."""
GELU_HIF8_LINEAR_SCHEMA = ('(Tensor x, Tensor codes, Tensor? bias, Tensor scale, str group="", '
                           'str approximate="none") -> Tensor')
"""``osp::gelu_hif8_linear``: ``osp::hif8_linear(F.gelu(x, approximate=approximate), ...)``."""


def _setup_context(ctx, inputs, output, gelu: bool) -> None:
    x, codes, bias, scale, _, last = inputs  # last: amax, or with a GELU prologue its approximate
    ctx.approximate = last if gelu else None
    ctx.save_for_backward(codes, scale, x if ctx.approximate is not None else None)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor):
    """Straight-through for ``x`` (gradient of the dequantized linear), so adapters or inputs
    upstream of a frozen HiF8 model (LoRA beside it) still train; the codes get no gradient.
    Linear in ``grad``, so no scale (and no collective) is involved under sequence parallelism.
    With a GELU prologue, the GELU's own derivative follows.
    AOTAutograd traces this: the decode is the torch codec (Triton cannot run on fake tensors)."""
    codes, scale, x = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ dequantize_weight(codes, scale, ctx.x_dtype, backend="torch")
        if ctx.approximate is not None:
            grad_x = torch.ops.aten.gelu_backward(grad_x, x, approximate=ctx.approximate)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, None, grad_b, None, None, None


def hif8_linear_op(qualname: str, impl, schema: str = HIF8_LINEAR_SCHEMA):
    """``impl(x, codes, bias, scale, group, amax | approximate)`` as an opaque custom op with the
    semantics of ``osp::hif8_linear`` (or, with ``GELU_HIF8_LINEAR_SCHEMA``, of
    ``osp::gelu_hif8_linear``): fake implementation (shapes only) and the straight-through backward.

    ``osp::hif8_linear`` itself and each per-target kernel (``lowering/hif8_kernels.py``) are
    made here, so that Dynamo, AOTAutograd and Inductor see one node per linear whatever the
    target, never trace into Triton / cuBLAS / torch_npu calls, and every kernel differentiates
    the same way."""
    op = torch.library.custom_op(qualname, lambda x, codes, bias, scale, *rest: impl(x, codes, bias, scale, *rest)
                                 .contiguous(), mutates_args=(), schema=schema)
    op.register_fake(lambda x, codes, bias, scale, *rest: x.new_empty((*x.shape[:-1], codes.shape[0])))
    op.register_autograd(_backward, setup_context=functools.partial(_setup_context, gelu=schema == GELU_HIF8_LINEAR_SCHEMA))
    return op


hif8_linear = hif8_linear_op("osp::hif8_linear", hif8_linear_reference)
"""HiF8-weight linear (see the module docstring); its own implementation is the portable reference."""

torch.library.define("osp::gelu_hif8_linear", GELU_HIF8_LINEAR_SCHEMA)


@torch.library.impl("osp::gelu_hif8_linear", "CompositeImplicitAutograd")
def _gelu_hif8_linear(x, codes, bias, scale, group="", approximate="none"):
    """``osp::hif8_linear(F.gelu(x, approximate=approximate), codes, bias, scale, group)`` as one node
    (``passes/gelu_hif8_linear.py``), so that a target can apply the GELU inside the activation's
    quantization instead of writing and reading its output (CUDA: ``hif8/triton_fp8.py``). As a
    composite, autograd and other targets see the two calls."""
    return hif8_linear(F.gelu(x, approximate=approximate), codes, bias, scale, group)


gelu_hif8_linear = torch.ops.osp.gelu_hif8_linear.default


class HiF8WeightStore(nn.Module):
    """HiF8 weights of one session, as buffers in a module tree that mirrors the weight names.

    For the weight ``a.b.weight``: submodule ``a.b`` holds buffer ``weight`` (uint8 codes,
    [out, in]) and ``weight_scale`` (float32 0-dim).  ``state_dict()`` keys are therefore
    ``a.b.weight`` and ``a.b.weight_scale``; the graph reads them with ``get_attr``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fqns: list[str] = []

    def _owner(self, fqn: str, create: bool) -> tuple[nn.Module | None, str]:
        *path, leaf = fqn.split(".")
        module: nn.Module = self
        for name in path:
            child = module._modules.get(name)
            if child is None:
                if not create:
                    return None, leaf
                child = nn.Module()
                module.add_module(name, child)
            module = child
        return module, leaf

    def __contains__(self, fqn: str) -> bool:
        return fqn in self.fqns

    def put(self, fqn: str, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Store (or replace) the codes and scale of weight ``fqn``."""
        if codes.dtype != torch.uint8 or codes.dim() != 2:
            raise TypeError(f"HiF8 codes of {fqn} must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
        owner, leaf = self._owner(fqn, create=True)
        owner.register_buffer(leaf, codes.contiguous())
        owner.register_buffer(leaf + SCALE_SUFFIX, scale.detach().to(torch.float32).reshape(()).to(codes.device))
        if fqn not in self.fqns:
            self.fqns.append(fqn)
        self.refresh_e4m3(fqn)

    def get_or_quantize(self, fqn: str, weight: torch.Tensor) -> tuple[str, str]:
        """The attribute paths (codes, scale) of ``fqn``, quantizing ``weight`` [out, in] on first sight."""
        if fqn not in self.fqns:
            self.put(fqn, *quantize_weight(weight))
        return fqn, fqn + SCALE_SUFFIX

    def _stored(self, fqn: str) -> tuple[nn.Module, str]:
        """``_owner`` of a weight the store holds; a KeyError for any other."""
        owner, leaf = self._owner(fqn, create=False)
        if owner is None or fqn not in self.fqns:
            raise KeyError(f"no HiF8 weight {fqn!r} in the store")
        return owner, leaf

    def entry(self, fqn: str) -> tuple[torch.Tensor, torch.Tensor]:
        owner, leaf = self._stored(fqn)
        return getattr(owner, leaf), getattr(owner, leaf + SCALE_SUFFIX)

    def e4m3_entry(self, fqn: str) -> tuple[str, str]:
        """The attribute paths (E4M3 data, float32 0-dim dequantization scale) of weight ``fqn``
        transcoded for FP8 tensor cores (``fp8.transcode_weight``), made on the first request as
        buffers beside the codes. Lowering reads them with ``get_attr`` (``lowering/hif8_kernels.py``),
        so they exist before a graph first runs: nothing is allocated inside a CUDA graph's pool.
        Not persistent (``state_dict``, the deployable artefact, holds codes and scales only);
        `load_hif8_state_dict` transcodes them again when it writes the codes."""
        owner, leaf = self._stored(fqn)
        if not hasattr(owner, leaf + E4M3_SUFFIX):
            self._transcode(fqn)
        return fqn + E4M3_SUFFIX, fqn + DEQUANT_SUFFIX

    def _transcode(self, fqn: str) -> None:
        """(Re)write the E4M3 buffers of ``fqn`` from its codes (in place where they exist)."""
        owner, leaf = self._owner(fqn, create=False)
        weight = transcode_weight(*self.entry(fqn))
        data, dequant = getattr(owner, leaf + E4M3_SUFFIX, None), getattr(owner, leaf + DEQUANT_SUFFIX, None)
        if data is None:
            owner.register_buffer(leaf + E4M3_SUFFIX, weight.data, persistent=False)
            owner.register_buffer(leaf + DEQUANT_SUFFIX, weight.dequant, persistent=False)
            return
        with torch.no_grad():
            data.copy_(weight.data)
            dequant.copy_(weight.dequant)

    def refresh_e4m3(self, fqn: str) -> None:
        """After the codes of ``fqn`` were written: transcode its E4M3 buffers again, if it has them."""
        owner, leaf = self._owner(fqn, create=False)
        if owner is not None and hasattr(owner, leaf + E4M3_SUFFIX):
            self._transcode(fqn)

    def extra_repr(self) -> str:
        return f"{len(self.fqns)} HiF8 weight(s)"


def weight_store(obj: Any) -> HiF8WeightStore:
    """The store of a converted module (``convert(..., OSPConfig(quant="hif8-infer"))``), of a
    session state dict (``osp_compile.backend.state_for(options)``), or the store itself."""
    if isinstance(obj, HiF8WeightStore):
        return obj
    state = obj if isinstance(obj, dict) else getattr(obj, "osp_state", None)
    store = (state or {}).get(STATE_KEY)
    if store is None:
        raise ValueError("no HiF8 weight store here: convert the model with OSPConfig(quant='hif8-infer') "
                         "(and run it once if it was compiled with backend='osp')")
    return store


def hif8_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The HiF8 weights as named tensors: ``<weight name>`` -> uint8 codes [out, in] and
    ``<weight name>_scale`` -> float32 0-dim scale.  Ready for ``safetensors.torch.save_file``."""
    return {k: v.detach() for k, v in weight_store(obj).state_dict().items()}


def load_hif8_state_dict(obj: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """Load HiF8 weights saved by `hif8_state_dict` into a converted module's store.

    Entries the store lacks are added (a later capture then uses them instead of quantizing the
    module's float weights); existing ones are overwritten in place, so already compiled graphs
    see the new codes.  Strict: every weight of the store must be in ``state_dict`` and every key
    of ``state_dict`` must be a codes or scale entry."""
    store = weight_store(obj)
    codes_keys = [k for k, v in state_dict.items() if v.dtype == torch.uint8]
    expected = set(codes_keys) | {k + SCALE_SUFFIX for k in codes_keys}
    if set(state_dict) != expected:
        raise KeyError(f"not a HiF8 state dict: unpaired keys {sorted(set(state_dict) ^ expected)[:5]} "
                       f"(each uint8 '<name>' needs a float '<name>{SCALE_SUFFIX}')")
    missing = [f for f in store.fqns if f not in state_dict]
    if missing:
        raise KeyError(f"HiF8 state dict lacks {len(missing)} weight(s) of this model, e.g. {missing[:3]}")
    for fqn in codes_keys:
        codes, scale = state_dict[fqn], state_dict[fqn + SCALE_SUFFIX]
        if fqn in store:
            old_codes, old_scale = store.entry(fqn)
            if old_codes.shape != codes.shape:
                raise ValueError(f"HiF8 weight {fqn}: shape {tuple(codes.shape)} in the state dict, "
                                 f"{tuple(old_codes.shape)} in the model")
            with torch.no_grad():
                old_codes.copy_(codes)
                old_scale.copy_(scale.reshape(()))
            forget_e4m3_weight(old_codes)
            store.refresh_e4m3(fqn)
        else:
            store.put(fqn, codes, scale)
