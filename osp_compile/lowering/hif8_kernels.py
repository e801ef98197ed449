"""Kernels of ``osp::hif8_linear(x, codes, bias, scale, group, amax)`` per target (``register_kernel``).

Each computes what the op computes (``osp_compile/hif8/inference.py``): the activation quantized
per tensor with scale_max 15, times the HiF8 weight ``decode(codes) / scale``, plus bias.  Each
is an opaque custom op made by ``inference.hif8_linear_op`` (fake implementation, the op's
straight-through backward), so Inductor and AOTAutograd never trace into a device library.
Each takes ``group``, the sequence-parallel group ``x``'s tokens are split over, and scales the
activation by the group's absmax (``hif8/group.py``: one all-reduce MAX of a 0-dim tensor).

* ``cpu``: the reference (decode, float matmul) -- the op's own implementation.
* ``cuda``, inference on FP8 tensor cores (capability >= 8.9, features multiples of 16, no
  autograd): two nodes instead of one (`expand_fp8`). ``osp_cuda::fp8_act_quant`` quantizes the
  activation (a fused Triton pass, ``hif8/fp8.py``), once for all the linears that read the same
  tensor (q, k and v) -- shared in the graph, not by a run-time cache -- and
  ``osp_cuda::fp8_mm`` multiplies it with the weight's E4M3 copy (``fp8.fp8_matmul``: cuBLASLt
  with its algorithm timed per shape, ``hif8/cublaslt.py``), a
  buffer of the weight store made at lowering (`HiF8WeightStore.e4m3_entry`). Every tensor the
  step makes is an op's output, so Inductor's CUDA graphs can record the step.
* ``cuda`` otherwise (``osp_cuda::hif8_linear``, one op per linear): under autograd (LoRA
  trained beside a HiF8 model) the same FP8 path with the E4M3 weights cached on first use and the
  last activation's quantization reused at run time (``fp8.fp8_linear``); where FP8 tensor cores
  are missing, the Triton GEMM that decodes the codes in-kernel (``hif8/triton_gemm.py``).
* ``osp::gelu_hif8_linear`` (the FFN's second linear with its GELU) on ``cuda``: the same kernels,
  with the GELU applied inside the activation's quantization passes (``hif8/triton_fp8.py``); on
  ``cpu`` and ``npu``, ``F.gelu`` and then that target's ``osp::hif8_linear`` kernel.
* ``npu`` (``osp_npu::hif8_linear``): Ascend 950 multiplies HiF8 natively:
  ``torch_npu.npu_quant_matmul(x1, x2, scale, *, pertoken_scale, bias, output_dtype, x1_dtype,
  x2_dtype)`` with ``x1_dtype = x2_dtype = torch_npu.hifloat8`` (T-T mode, documented as
  ``out = x1 @ x2 * scale * pertoken_scale + bias`` with float32 per-tensor scales of shape (1,)
  and a float32 bias; x1 [m, k], x2 [k, n], HiF8 carried in 8-bit tensors).  Our codes are
  Ascend's HiF8 bit layout, so the stored codes go in as they are (transposed view).  The
  activation is cast with ``torch_npu.npu_dtype_cast(x * s, torch_npu.hifloat8)`` (Ascend's cast
  rounds there; the emulation in the tests assumes ties away, like our codec).  NEVER RUN ON
  ASCEND HARDWARE: torch_npu is imported lazily (it cannot be imported without CANN) and the call
  is checked only against an emulation of the documented semantics (tests/test_hif8_infer.py).
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from osp_compile.hif8 import api, fp8, inference, triton_gemm, triton_kernels
from osp_compile.hif8.group import group_amax
from osp_compile.hif8.qat import X_SCALE_MAX
from passes.fx_utils import declare_store_to_aot, differentiated, meta_value, op_args
from passes.hif8_linear import STORE_NAME, store_attr, store_fqn

from .registry import register_kernel


def hif8_linear_cuda_impl(x: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None,
                          scale: torch.Tensor, group: str = "", amax: torch.Tensor | None = None, *,
                          gelu: str | None = None, fast_accum: bool = False) -> torch.Tensor:
    """FP8 tensor cores (``fp8.fp8_linear``) where possible, else the Triton decode GEMM. ``gelu``
    (``osp::gelu_hif8_linear``'s ``approximate``): GELU first, inside the FP8 path's quantization."""
    n, k = codes.shape
    if fp8.scaled_mm_supported(x.device) and k % 16 == 0 and n % 16 == 0:
        return fp8.fp8_linear(x, fp8.cached_e4m3_weight(codes, scale), bias, use_fast_accum=fast_accum, group=group,
                              gelu=gelu, amax=amax)
    if gelu is not None:
        x = F.gelu(x, approximate=gelu)
    return triton_gemm.hif8_linear_triton(x, codes, bias, scale, group, amax)


def gelu_hif8_linear_cuda_impl(x: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None,
                               scale: torch.Tensor, group: str = "", approximate: str = "none",
                               fast_accum: bool = False) -> torch.Tensor:
    """``osp::gelu_hif8_linear``: `hif8_linear_cuda_impl` with the GELU inside the quantization."""
    return hif8_linear_cuda_impl(x, codes, bias, scale, group, gelu=approximate, fast_accum=fast_accum)


def hif8_linear_npu_impl(x: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None,
                         scale: torch.Tensor, group: str = "", amax: torch.Tensor | None = None) -> torch.Tensor:
    """``torch_npu.npu_quant_matmul`` on HiF8 x HiF8 (see the module docstring)."""
    import torch_npu

    n, k = codes.shape
    x_scale = api.per_tensor_scale(x, X_SCALE_MAX, group_amax(x, group, amax))
    x_hif8 = torch_npu.npu_dtype_cast(x.reshape(-1, k).to(torch.float32) * x_scale, torch_npu.hifloat8)
    out = torch_npu.npu_quant_matmul(
        x_hif8, codes.t(), (1.0 / scale.to(torch.float32)).reshape(1),
        pertoken_scale=(1.0 / x_scale).reshape(1),
        bias=None if bias is None else bias.to(torch.float32),
        output_dtype=x.dtype, x1_dtype=torch_npu.hifloat8, x2_dtype=torch_npu.hifloat8,
    )
    return out.reshape(*x.shape[:-1], n)


def gelu_hif8_linear_npu_impl(x: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None,
                              scale: torch.Tensor, group: str = "", approximate: str = "none") -> torch.Tensor:
    """``F.gelu`` (its own kernel there), then `hif8_linear_npu_impl`."""
    return hif8_linear_npu_impl(F.gelu(x, approximate=approximate), codes, bias, scale, group)


hif8_linear_cuda = inference.hif8_linear_op("osp_cuda::hif8_linear", hif8_linear_cuda_impl)
hif8_linear_cuda_fast_accum = inference.hif8_linear_op(
    "osp_cuda::hif8_linear_fast_accum", functools.partial(hif8_linear_cuda_impl, fast_accum=True))
gelu_hif8_linear_cuda = inference.hif8_linear_op(
    "osp_cuda::gelu_hif8_linear", gelu_hif8_linear_cuda_impl, inference.GELU_HIF8_LINEAR_SCHEMA)
gelu_hif8_linear_cuda_fast_accum = inference.hif8_linear_op(
    "osp_cuda::gelu_hif8_linear_fast_accum", functools.partial(gelu_hif8_linear_cuda_impl, fast_accum=True),
    inference.GELU_HIF8_LINEAR_SCHEMA)
hif8_linear_npu = inference.hif8_linear_op("osp_npu::hif8_linear", hif8_linear_npu_impl)
gelu_hif8_linear_npu = inference.hif8_linear_op(
    "osp_npu::gelu_hif8_linear", gelu_hif8_linear_npu_impl, inference.GELU_HIF8_LINEAR_SCHEMA)


@torch.library.custom_op("osp_cuda::fp8_act_quant", mutates_args=())
def fp8_act_quant(x: torch.Tensor, group: str = "", amax: torch.Tensor | None = None,
                  gelu: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x8, dequant)``: ``x`` [..., K] (``F.gelu(x, approximate=gelu)`` where ``gelu`` is set)
    quantized per tensor to HiF8 and written as E4M3 [..., K], with its float32 0-dim
    dequantization scale (``fp8._activation_e4m3``, without its run-time reuse: the graph shares
    this node instead)."""
    x8, dequant = fp8._activation_e4m3(x, False, group, gelu or None, amax)
    return x8.view(x.shape), dequant


@fp8_act_quant.register_fake
def _(x, group="", amax=None, gelu=""):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("osp_cuda::fp8_mm", mutates_args=())
def fp8_mm(x8: torch.Tensor, x_dequant: torch.Tensor, w8: torch.Tensor, w_dequant: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """``fp8.fp8_matmul`` of an E4M3 activation [..., K] and an E4M3 weight [N, K]: [..., N]."""
    out = fp8.fp8_matmul(x8.reshape(-1, x8.shape[-1]), x_dequant, w8, w_dequant, bias, out_dtype, fast_accum)
    return out.view(*x8.shape[:-1], w8.shape[0])


@fp8_mm.register_fake
def _(x8, x_dequant, w8, w_dequant, bias, out_dtype, fast_accum=False):
    return x8.new_empty((*x8.shape[:-1], w8.shape[0]), dtype=out_dtype)


def fp8_expansion_refusal(node: fx.Node) -> str | None:
    """Why a HiF8 linear node cannot be the two nodes of `expand_fp8` (None: it can)."""
    reason = triton_kernels.cuda_unavailable_reason()
    if reason is not None:
        return reason
    a = op_args(node)
    x, codes = meta_value(a["x"]), meta_value(a["codes"])
    if not isinstance(x, torch.Tensor) or not isinstance(codes, torch.Tensor):
        return "no example values for the inputs"
    if not fp8.scaled_mm_supported(x.device):
        return f"no FP8 tensor cores for inputs on {x.device} (CUDA capability >= 8.9 needed)"
    if codes.shape[0] % 16 or codes.shape[1] % 16:
        return f"weight {tuple(codes.shape)}: FP8 GEMMs need features that are multiples of 16"
    if differentiated(a["x"], a["bias"]):
        return "autograd: the E4M3 activation has no gradient (training keeps one op per linear)"
    if store_fqn(a["codes"]) is None:
        return "the codes are not a weight store buffer"
    return None


def expand_fp8(gm: fx.GraphModule, node: fx.Node, shared: dict, fast_accum: bool = False) -> fx.Node:
    """Write a HiF8 linear node as ``osp_cuda::fp8_act_quant`` + ``osp_cuda::fp8_mm`` (module
    docstring). Linears that read the same ``x`` with the same ``group``, ``amax`` and GELU share
    one quantization node: it goes before the first of them, where all its inputs exist."""
    a = op_args(node)
    gelu = a.get("approximate", "")  # osp::gelu_hif8_linear's (F.gelu's); osp::hif8_linear has no GELU
    amax = a.get("amax")  # osp::hif8_linear's; the GELU's max is the quantization's own
    g = gm.graph
    store = gm.get_submodule(STORE_NAME)
    data_attr, dequant_attr = store.e4m3_entry(store_fqn(a["codes"]))
    key = ("fp8_act_quant", a["x"], a["group"], amax, gelu)
    with g.inserting_before(node):
        if key not in shared:
            quant = g.call_function(torch.ops.osp_cuda.fp8_act_quant.default, (a["x"], a["group"], amax, gelu))
            shared[key] = (g.call_function(operator.getitem, (quant, 0)), g.call_function(operator.getitem, (quant, 1)))
        x8, x_dequant = shared[key]
        w8, w_dequant = store_attr(g, store, data_attr, node), store_attr(g, store, dequant_attr, node)
        out = g.call_function(torch.ops.osp_cuda.fp8_mm.default,
                              (x8, x_dequant, w8, w_dequant, a["bias"], meta_value(node).dtype, fast_accum))
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    g.erase_node(node)
    for weight_node in (a["codes"], a["scale"]):
        if not weight_node.users:
            g.erase_node(weight_node)
    declare_store_to_aot(gm, STORE_NAME, (data_attr, dequant_attr))
    return out


def _cuda_check(node) -> str | None:
    return triton_kernels.cuda_unavailable_reason()


def _when_fast_accum(check):
    """``check``, for a kernel chosen only when the config asks for fast accumulation
    (``OSPConfig.fp8_fast_accum``; the HiF8 pass marks the node)."""
    def fast_accum_check(node: fx.Node) -> str | None:
        if not node.meta.get(inference.FAST_ACCUM_KEY):
            return "not asked for (OSPConfig.fp8_fast_accum=False)"
        return check(node)

    return fast_accum_check


register_kernel("hif8_linear", "cpu", name="HiF8 reference (decode + float matmul)")(
    torch.ops.osp.hif8_linear.default)
for _op in ("hif8_linear", "gelu_hif8_linear"):
    _what = "GELU in the shared HiF8 quantization" if _op == "gelu_hif8_linear" else "shared HiF8 quantization"
    register_kernel(_op, "cuda", name=f"{_what} + FP8 tensor cores (cuBLASLt, fast accumulation)",
                    check=_when_fast_accum(fp8_expansion_refusal),
                    expand=functools.partial(expand_fp8, fast_accum=True))(torch.ops.osp_cuda.fp8_mm.default)
    register_kernel(_op, "cuda", name=f"{_what} + FP8 tensor cores (cuBLASLt)", check=fp8_expansion_refusal,
                    expand=expand_fp8)(torch.ops.osp_cuda.fp8_mm.default)
register_kernel("hif8_linear", "cuda", name="HiF8 FP8 tensor cores (cuBLASLt, fast accumulation)",
                check=_when_fast_accum(_cuda_check))(torch.ops.osp_cuda.hif8_linear_fast_accum.default)
register_kernel("hif8_linear", "cuda", name="HiF8 FP8 tensor cores (cuBLASLt) / Triton decode GEMM",
                check=_cuda_check)(torch.ops.osp_cuda.hif8_linear.default)
register_kernel("gelu_hif8_linear", "cuda", name="GELU in the HiF8 quantization + FP8 tensor cores (fast accumulation)",
                check=_when_fast_accum(_cuda_check))(torch.ops.osp_cuda.gelu_hif8_linear_fast_accum.default)
register_kernel("gelu_hif8_linear", "cuda", name="GELU in the HiF8 quantization + FP8 tensor cores / Triton decode GEMM",
                check=_cuda_check)(torch.ops.osp_cuda.gelu_hif8_linear.default)
register_kernel("hif8_linear", "npu", name="torch_npu.npu_quant_matmul (HiF8 x HiF8)",
                imports=("import torch_npu",))(torch.ops.osp_npu.hif8_linear.default)
register_kernel("gelu_hif8_linear", "cpu", name="GELU + HiF8 reference")(torch.ops.osp.gelu_hif8_linear.default)
register_kernel("gelu_hif8_linear", "npu", name="GELU + torch_npu.npu_quant_matmul (HiF8 x HiF8)",
                imports=("import torch_npu",))(torch.ops.osp_npu.gelu_hif8_linear.default)
