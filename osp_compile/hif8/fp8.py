"""HiF8 linears on FP8 (E4M3) tensor cores: exact transcode with a power-of-two shift.

NVIDIA GPUs have no HiF8, but every HiF8 value in [2^-9, 448] except +-1.5*2^-9 is exactly an
E4M3 value (hif8.md, "Hardware").  Multiplying a HiF8 tensor by 2^k changes no bits of its
values' mantissas, so a per-tensor power-of-two shift moves it into that window and
``torch._scaled_mm`` then multiplies the HiF8 values themselves, with the shift folded into the
dequantization scale.  What falls outside the window (tiny magnitudes that E4M3 rounds, or values
that would need clamping above 448) is counted, per weight, when it is transcoded.

* Weights: `transcode_weight` maps the stored codes through a 256-entry table once (the shift is
  chosen from the code histogram: first no clamped values, then the most exact ones);
  `cached_e4m3_weight` keeps the result beside the codes for the one-op CUDA kernel (graphs under
  autograd); inference graphs read it from a buffer of the weight store, made at lowering
  (``inference.HiF8WeightStore.e4m3_entry``).
* Activations: quantized on the fly exactly as the QAT forward does (scale 15 / max|x|, HiF8
  round to nearest, ties away) and written as E4M3 shifted by ``2^act_shift(15) = 16`` (15 * 16 =
  240 <= 448).  On CUDA this is one fused Triton pass after an absmax reduction
  (``triton_fp8.py``); `quantize_act_e4m3_reference` is the same in torch ops, bit for bit.
  Under sequence parallelism the absmax is the SP group's (``group.py``), passed in as ``amax``.
* `fp8_matmul`: on CUDA capability >= 8.9 (Ada/Hopper) cuBLASLt with a timed algorithm choice
  (``cublaslt.py``; ``torch._scaled_mm`` where it refuses), else the same arithmetic emulated in
  float32 (E4M3 x E4M3 products are exact in float32), used on CPU.
  `fp8_linear` is the quantization and `fp8_matmul` in one call.
"""
from __future__ import annotations

import functools
import math
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import api, codec, cublaslt, triton_kernels
from .group import group_amax, reduce_amax
from .qat import X_SCALE_MAX

E4M3_MAX = 448.0
_SHIFTS = range(-30, 31)  # candidate k: HiF8 spans 2^-22 .. 2^15, E4M3's window 2^-9 .. 448


@dataclass(frozen=True)
class E4M3Weight:
    """A HiF8 weight transcoded for FP8 tensor cores: ``W ~= data.float() * dequant``."""

    data: torch.Tensor  # float8_e4m3fn [out, in]
    dequant: torch.Tensor  # float32 0-dim: 1 / (scale * 2^shift)
    shift: int
    outside: int  # elements not exactly representable after the shift (rounded or clamped)

    @property
    def numel(self) -> int:
        return self.data.numel()


@functools.lru_cache(maxsize=None)
def _values_e4m3(shift: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every HiF8 code: (E4M3 bits of its value * 2^shift, exact?, clamped?) on CPU (read-only)."""
    v = codec.decode_table().double() * 2.0 ** shift
    over = v.abs() > E4M3_MAX  # +-Inf codes included
    e4m3 = v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    exact = e4m3.double() == v  # NaN code: False
    return e4m3.view(torch.uint8), exact, over


def choose_shift(histogram: torch.Tensor) -> tuple[int, int]:
    """``(shift, outside)`` for a 256-bin code histogram: the power-of-two shift that first avoids
    clamping (a clamped weight is off by up to 2^15 / 448; an underflowed one by < 2^-9 of the
    shifted scale), then leaves the fewest values outside E4M3's exact window; ties go to the
    larger shift.  ``outside`` counts the elements not exactly representable at that shift."""
    histogram = histogram.to(torch.int64).cpu()
    best = None
    for k in _SHIFTS:
        _, exact, over = _values_e4m3(k)
        cost = (int(histogram[over].sum()), int(histogram[~exact].sum()), -k)
        if best is None or cost < best[0]:
            best = (cost, k)
    (_, outside, _), shift = best
    return shift, outside


def _histogram(codes: torch.Tensor) -> torch.Tensor:
    return torch.bincount(codes.reshape(-1).to(torch.int64), minlength=256)


def window_report(store) -> list[dict]:
    """Per stored weight (an ``inference.HiF8WeightStore``): the shift its E4M3 transcode takes and
    how many of its elements fall outside E4M3's exact window there (what the FP8 path rounds)."""
    rows = []
    for fqn in store.fqns:
        codes, _ = store.entry(fqn)
        shift, outside = choose_shift(_histogram(codes))
        rows.append({"weight": fqn, "shift": shift, "outside": outside, "numel": codes.numel()})
    return rows


def transcode_weight(codes: torch.Tensor, scale: torch.Tensor) -> E4M3Weight:
    """E4M3 copy of a stored HiF8 weight (codes of ``W * scale``), exact where the window allows."""
    shift, outside = choose_shift(_histogram(codes))
    table = _values_e4m3(shift)[0].to(codes.device)
    data = table[codes.to(torch.int64)].view(torch.float8_e4m3fn)
    dequant = (1.0 / (scale.to(torch.float32) * 2.0 ** shift)).reshape(())
    return E4M3Weight(data, dequant, shift, outside)


_CACHE = WeakIdKeyDictionary()  # codes tensor -> ((codes version, scale version), E4M3Weight)


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place write); None for a tensor made under
    ``torch.inference_mode``, which has none."""
    return None if t.is_inference() else t._version


def cached_e4m3_weight(codes: torch.Tensor, scale: torch.Tensor) -> E4M3Weight:
    """`transcode_weight`, computed once per codes tensor (and again if it is written in place,
    e.g. by ``load_hif8_state_dict``, which also calls `forget_e4m3_weight` for codes made under
    inference mode, whose writes no counter records): the E4M3 copy lives as long as the codes do."""
    version = (_version(codes), _version(scale))
    hit = _CACHE.get(codes)
    if hit is None or hit[0] != version:
        hit = _CACHE[codes] = (version, transcode_weight(codes, scale))
    return hit[1]


def forget_e4m3_weight(codes: torch.Tensor) -> None:
    """Drop the cached E4M3 copy of ``codes`` (their values were just written)."""
    _CACHE.pop(codes, None)


@functools.lru_cache(maxsize=None)
def act_shift(scale_max: float = X_SCALE_MAX) -> int:
    """Largest k with ``HiF8(scale_max) * 2^k <= 448``: the largest activation lands in range.
    Cached: it runs the torch codec on the CPU, which would otherwise stall every FP8 linear call
    for about a millisecond while the GPU waits."""
    top = float(codec.quantize(torch.tensor([scale_max], dtype=torch.float32)))
    return math.floor(math.log2(E4M3_MAX / top))


def quantize_act_e4m3_reference(x: torch.Tensor, scale_max: float = X_SCALE_MAX,
                                amax: torch.Tensor | None = None,
                                gelu: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x8, dequant)``: E4M3 ``HiF8(x * s) * 2^k`` and float32 0-dim ``1 / (s * 2^k)``, in torch ops.

    ``s = scale_max / max|x|`` as in the QAT forward (``max|x|`` given as ``amax`` where ``x`` is
    one shard of the tensor).  E4M3 holds the shifted HiF8 values (at most 15 * 2^k = 240) exactly
    from 2^-9 up, except +-1.5 * 2^-9 (HiF8's 1.5 * 2^-13 before the shift); those and the values
    below 2^-9 (|x| < 2^-9 / 240 of max|x|) round to E4M3's subnormal grid, nearest even: an error
    of at most 2^-10 / 240 of max|x| each.  They are not counted at run time (that would be one
    more reduction per activation); weights are (`transcode_weight`).  Zeros may come out as -0.  ``gelu``: quantize
    ``F.gelu(x, approximate=gelu)`` instead (``amax`` is then that of the GELU output)."""
    if gelu is not None:
        x = F.gelu(x, approximate=gelu)
    k = act_shift(scale_max)
    s = api.per_tensor_scale(x, scale_max, amax)
    q = codec.quantize(x.detach().to(torch.float32) * s)
    return (q * 2.0 ** k).to(torch.float8_e4m3fn), (1.0 / (s * 2.0 ** k)).reshape(())


def _fused_kernels(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and triton_kernels.triton_available(x.device)


def quantize_act_e4m3(x: torch.Tensor, scale_max: float = X_SCALE_MAX, amax: torch.Tensor | None = None,
                      gelu: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_act_e4m3_reference`, as the fused Triton kernels on CUDA."""
    if _fused_kernels(x):
        from .triton_fp8 import quantize_act_e4m3_triton

        return quantize_act_e4m3_triton(x, scale_max, amax, gelu)
    return quantize_act_e4m3_reference(x, scale_max, amax, gelu)


def _group_amax(x: torch.Tensor, group: str, gelu: str | None, amax: torch.Tensor | None) -> torch.Tensor | None:
    """``group.group_amax`` of ``x`` (``amax``: this shard's, computed by the caller), or of
    ``F.gelu(x)`` computed by the fused kernels without writing it (``gelu``: CUDA only)."""
    if gelu is None:
        return group_amax(x, group, amax)
    if not group:
        return None
    from .triton_fp8 import absmax_triton

    return reduce_amax(absmax_triton(x, gelu), group)


_LAST_ACTIVATION: tuple | None = None  # (weakref to x, x's version, (group, gelu, amax), (x8, dequant))


def _activation_e4m3(x: torch.Tensor, reuse: bool, group: str, gelu: str | None = None,
                     amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_act_e4m3`` of ``x`` [..., K] as [M, K] (scaled over the SP ``group``; of
    ``F.gelu(x)`` with ``gelu``; ``amax``: ``max|x|`` computed by the caller); with ``reuse``, the
    result of the previous call when ``x`` is the same, unmodified tensor: the q, k and v
    projections of a block read one ``x``, which is then quantized once (and its absmax
    all-reduced once: every rank runs the same calls, so they hit or miss alike).  One entry, held
    by a weak reference to ``x`` (a freed ``x`` can never match) and its version counter (an
    in-place write invalidates it).  Only a call with the same ``group``, ``gelu`` and ``amax``
    (the same tensor, as the linears reading one activation get) reuses it.  A tensor made under
    ``torch.inference_mode`` has no version counter, so it is never reused: under inference mode
    q, k and v quantize their input each (``torch.no_grad`` keeps the reuse)."""
    global _LAST_ACTIVATION
    reuse = reuse and not x.is_inference()
    if reuse and _LAST_ACTIVATION is not None:
        ref, version, (last_group, last_gelu, last_amax), result = _LAST_ACTIVATION
        if ref() is x and x._version == version and (last_group, last_gelu) == (group, gelu) and last_amax is amax:
            return result
    act, prologue = x, gelu
    if gelu is not None and not _fused_kernels(x):  # no fused GELU here: computed once, for the max and the pass
        act, prologue = F.gelu(x, approximate=gelu), None
    rows = act.reshape(-1, act.shape[-1])
    result = quantize_act_e4m3(rows, X_SCALE_MAX, _group_amax(act, group, prologue, amax), prologue)
    _LAST_ACTIVATION = (weakref.ref(x), x._version, (group, gelu, amax), result) if reuse else None
    return result


def scaled_mm_supported(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA capability >= 8.9 (Ada, Hopper and later)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: E4M3Weight, bias: torch.Tensor | None = None,
               use_fast_accum: bool = False, reuse_activation: bool = True, group: str = "",
               gelu: str | None = None, amax: torch.Tensor | None = None) -> torch.Tensor:
    """``HiF8(x) @ W^T + bias`` on E4M3 operands, in ``x``'s dtype (``HiF8(F.gelu(x)) @ ...`` with
    ``gelu``, F.gelu's ``approximate``: the GELU runs inside the quantization's passes).

    `fp8_matmul` of the quantized activation.  ``use_fast_accum`` (Hopper's faster, less precise
    FP8 accumulation) only affects ``_scaled_mm``.  ``reuse_activation``: see `_activation_e4m3`
    (benchmarks of one linear turn it off).  ``group``: the sequence-parallel group ``x``'s tokens
    are split over ("" for one process; ``group.py``).  ``amax``: this rank's ``max|x|`` where the
    graph computed it (``passes/hif8_absmax.py``)."""
    x8, x_dequant = _activation_e4m3(x, reuse_activation, group, gelu, amax)
    out = fp8_matmul(x8, x_dequant, weight.data, weight.dequant, bias, x.dtype, use_fast_accum)
    return out.reshape(*x.shape[:-1], weight.data.shape[0])


GEMMS = ("cublaslt", "scaled_mm")
GEMM = os.environ.get("OSP_FP8_GEMM", "cublaslt")
"""The CUDA FP8 GEMM (``$OSP_FP8_GEMM``): ``"cublaslt"`` (`cublaslt.fp8_gemm`: cuBLASLt called
directly, its algorithm timed per shape on first use or read from the pick cache; where cuBLASLt
refuses a problem, ``torch._scaled_mm``) or ``"scaled_mm"`` (the heuristic's first guess, as torch
runs it).  Read at run time, so one compiled graph can be timed with both
(``scripts/gpu_fp8_gemm_ab.py``)."""
if GEMM not in GEMMS:
    raise ValueError(f"OSP_FP8_GEMM={GEMM!r}: use one of {GEMMS} (or unset it for cublaslt)")


def fp8_matmul(x8: torch.Tensor, x_dequant: torch.Tensor, w8: torch.Tensor, w_dequant: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype, use_fast_accum: bool = False) -> torch.Tensor:
    """``(x8 @ w8^T) * x_dequant * w_dequant + bias`` in ``out_dtype``, [M, N], for E4M3 ``x8``
    [M, K] and ``w8`` [N, K] with float32 0-dim dequantization scales.

    On CUDA capability >= 8.9 with K and N multiples of 16: cuBLASLt (`GEMM`; 16-bit outputs), or
    ``torch._scaled_mm`` (any number of rows: it needs K and N multiples of 16 only); else
    emulated in float32 (E4M3 x E4M3 products are exact there)."""
    k, n = x8.shape[1], w8.shape[0]
    if scaled_mm_supported(x8.device) and k % 16 == 0 and n % 16 == 0:
        sixteen_bit = out_dtype in (torch.bfloat16, torch.float16)  # cuBLASLt's FP8 bias epilogue writes these
        if GEMM == "cublaslt" and x8.is_cuda and sixteen_bit:
            out = cublaslt.fp8_gemm_or_none(x8, x_dequant, w8, w_dequant, bias, out_dtype, fast_accum=use_fast_accum)
            if out is not None:
                return out
        fused_bias = bias is not None and sixteen_bit
        out = torch._scaled_mm(x8, w8.t(), scale_a=x_dequant.reshape(()), scale_b=w_dequant,
                               bias=bias.to(out_dtype) if fused_bias else None, out_dtype=out_dtype,
                               use_fast_accum=use_fast_accum)
        if bias is not None and not fused_bias:
            out = out + bias.to(out.dtype)
        return out
    out = (x8.float() @ w8.float().T) * (x_dequant * w_dequant)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
