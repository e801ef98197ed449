"""Kernels of ``osp::hif8_linear(x, codes, bias, scale, group, amax)`` per target (``register_kernel``).

Each computes what the op computes (``osp_compile/hif8/inference.py``): the activation quantized
per tensor with scale_max 15, times the HiF8 weight ``decode(codes) / scale``, plus bias.  Each
is an opaque custom op made by ``inference.hif8_linear_op`` (fake implementation, the op's
straight-through backward), so Inductor and AOTAutograd never trace into a device library.
Each takes ``group``, the sequence-parallel group ``x``'s tokens are split over, and scales the
activation by the group's absmax (``hif8/group.py``: one all-reduce MAX of a 0-dim tensor).

* ``cpu``: the reference (decode, float matmul) -- the op's own implementation.
* ``cuda`` (``osp_cuda::hif8_linear``): FP8 tensor cores where the GPU has them (capability >= 8.9)
  and the features are multiples of 16 -- weights transcoded to E4M3 once (``hif8/fp8.py``),
  activations by a fused Triton kernel, ``torch._scaled_mm``; otherwise the Triton GEMM that
  decodes the codes in-kernel (``hif8/triton_gemm.py``).
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

import torch
import torch.nn.functional as F

from osp_compile.hif8 import api, fp8, inference, triton_gemm, triton_kernels
from osp_compile.hif8.group import group_amax
from osp_compile.hif8.qat import X_SCALE_MAX

from .registry import register_kernel


def hif8_linear_cuda_impl(x: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None,
                          scale: torch.Tensor, group: str = "", amax: torch.Tensor | None = None, *,
                          gelu: str | None = None, fast_accum: bool = False) -> torch.Tensor:
    """FP8 tensor cores (``_scaled_mm``) where possible, else the Triton decode GEMM. ``gelu``
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


def _cuda_check(node) -> str | None:
    return triton_kernels.cuda_unavailable_reason()


def _fast_accum_check(node) -> str | None:
    """Chosen only when the config asks (``OSPConfig.fp8_fast_accum``; the HiF8 pass marks the node)."""
    if not node.meta.get(inference.FAST_ACCUM_KEY):
        return "not asked for (OSPConfig.fp8_fast_accum=False)"
    return _cuda_check(node)


register_kernel("hif8_linear", "cpu", name="HiF8 reference (decode + float matmul)")(
    torch.ops.osp.hif8_linear.default)
register_kernel("hif8_linear", "cuda", name="HiF8 FP8 tensor cores (_scaled_mm, fast accumulation)",
                check=_fast_accum_check)(torch.ops.osp_cuda.hif8_linear_fast_accum.default)
register_kernel("hif8_linear", "cuda", name="HiF8 FP8 tensor cores (_scaled_mm) / Triton decode GEMM",
                check=_cuda_check)(torch.ops.osp_cuda.hif8_linear.default)
register_kernel("gelu_hif8_linear", "cuda", name="GELU in the HiF8 quantization + FP8 tensor cores (fast accumulation)",
                check=_fast_accum_check)(torch.ops.osp_cuda.gelu_hif8_linear_fast_accum.default)
register_kernel("gelu_hif8_linear", "cuda", name="GELU in the HiF8 quantization + FP8 tensor cores / Triton decode GEMM",
                check=_cuda_check)(torch.ops.osp_cuda.gelu_hif8_linear.default)
register_kernel("hif8_linear", "npu", name="torch_npu.npu_quant_matmul (HiF8 x HiF8)",
                imports=("import torch_npu",))(torch.ops.osp_npu.hif8_linear.default)
register_kernel("gelu_hif8_linear", "cpu", name="GELU + HiF8 reference")(torch.ops.osp.gelu_hif8_linear.default)
register_kernel("gelu_hif8_linear", "npu", name="GELU + torch_npu.npu_quant_matmul (HiF8 x HiF8)",
                imports=("import torch_npu",))(torch.ops.osp_npu.gelu_hif8_linear.default)
