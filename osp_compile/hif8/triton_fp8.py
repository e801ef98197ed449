"""Fused activation quantization for the FP8 path: ``x -> HiF8(x * s) * 2^k`` as E4M3, one pass.

``fp8.quantize_act_e4m3_reference`` in one Triton kernel, so that the HiF8 linear on FP8 tensor
cores costs a GEMM plus two memory-bound passes over ``x`` (``max|x|``, a torch reduction that
reads ``x`` once, then this kernel: read ``x``, write one byte per element), instead of a
chain of elementwise torch ops.  Each program computes ``s = scale_max / max|x|`` itself (correctly
rounded, as the torch codec does); program 0 also writes the dequantization scale
``1 / (s * 2^k)`` for ``torch._scaled_mm``, so nothing waits on the host.  A precomputed
``max|x|`` (the sequence-parallel group's, see ``group.py``) replaces the reduction: the kernel
reads the max from memory either way, so its bits are those of the whole tensor with that max.

The rounding is the codec's TA rounding on the float32 bit pattern, specialised to what reaches
E4M3, with few integer instructions (the pass must stay memory-bound at ~3 TB/s): the scaled values
are below 16 (``scale_max < 16``), so a binade keeps 3 mantissa bits from 2^-3 up, 2 from 2^-7,
else 1, chosen by two float compares.  Below 2^-15 HiF8 has denormals with another grid; after
the shift (``k <= 5``, so ``scale_max >= 7``) all of those are below 2^-10, which E4M3 rounds to 0
either way, so the kernel does not special-case them.  Values that
land under E4M3's normal range (2^-6) are rounded to its subnormal grid (multiples of 2^-9, ties
to even) by hand, ``(v + 1.5 * 2^14) - 1.5 * 2^14``, so that the final cast is always exact: the
GPU's and the interpreter's float -> E4M3 casts then agree (the interpreter's rounds differently).
Inputs must be finite.  Tested bit for bit against the torch reference under the interpreter.

A GELU prologue (``gelu``, for the FFN's second linear, ``osp::gelu_hif8_linear``) applies
``F.gelu`` to ``x`` inside both passes, rounded to ``x``'s dtype as ``F.gelu``'s output is, so the
GELU output is never written: the max pass reads ``x`` (each block's max folded into one float by
an atomic max; under the interpreter the host takes the max), the quantize pass reads ``x`` and
writes one byte per element, where GELU, max and quantize as separate kernels read or write the
activation five times.  The GELU is computed in float32 (the tanh form as a sigmoid), within a few
float32 ulps of PyTorch's, so an element can round to the neighbouring bfloat16 value where
PyTorch's lands on the other side of a rounding boundary (tested against a float64 GELU).
"""
from __future__ import annotations

import functools

import torch

from . import triton_kernels

BLOCK_INTERPRET = 1024

tl = None  # triton.language, set by _kernel() (see triton_kernels' module docstring)


GELU_CODES = {None: 0, "tanh": 1, "none": 2}
"""The kernel's ``GELU`` constant per ``F.gelu`` ``approximate`` (None: no GELU prologue)."""


def _act_e4m3_kernel(x_ptr, amax_ptr, out_ptr, dequant_ptr, n, scale_max,
                     POW2: tl.constexpr, GELU: tl.constexpr, AMAX: tl.constexpr, INTERPRET: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    y = x.to(tl.float32)
    # GELU prologue, rounded to x's dtype as F.gelu's output would be (GELU(0) = 0: masked lanes stay 0)
    if GELU != 0:
        if GELU == 1:  # tanh approximation: 0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + 2^(-2u log2 e))
            y = y / (1.0 + tl.exp2(y * (-2.302208198144325 - 0.1029432395800235 * y * y)))  # 2u log2(e) = y (a + b y^2)
        else:  # erf
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        if x.dtype == tl.bfloat16:  # to nearest even by hand: the interpreter's bfloat16 cast truncates
            bits = y.to(tl.int32, bitcast=True)
            y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
        else:
            y = y.to(x.dtype).to(tl.float32)
    if AMAX:  # the max pass: max |y| into out_ptr[0] (zeroed)
        if INTERPRET:  # an interpreter entered without TRITON_INTERPRET cannot run tl.max: the host takes it
            tl.store(out_ptr + offs, tl.abs(y), mask=inb)
        else:
            tl.atomic_max(out_ptr, tl.max(tl.abs(y), axis=0))
    else:
        amax = tl.load(amax_ptr).to(tl.float32)
        amax_bits = amax.to(tl.int32, bitcast=True)
        ok = (amax_bits > 0) & (amax_bits < 0x7F800000)  # max|x| > 0 and finite
        s = tl.where(ok, tl.math.div_rn(tl.where(ok, scale_max, 1.0), tl.where(ok, amax, 1.0)), 1.0)
        tl.store(dequant_ptr, tl.math.div_rn(s * 0.0 + 1.0, s * POW2), mask=pid == 0)
        y = y * s  # |y| <= scale_max < 16
        # TA rounding on the bits: add half an ulp of the binade's HiF8 grid, clear the ulp's bits.
        # The sign bit rides along (the add never carries into it; the masks keep it).
        ay = tl.abs(y)
        half = tl.where(ay < 0.0078125, 0x200000, tl.where(ay < 0.125, 0x100000, 0x80000))  # 1|2|3 mantissa bits
        mask = tl.where(ay < 0.0078125, -0x400000, tl.where(ay < 0.125, -0x200000, -0x100000))
        v = ((y.to(tl.int32, bitcast=True) + half) & mask).to(tl.float32, bitcast=True) * POW2
        v = tl.where(tl.abs(v) < 0.015625, (v + 24576.0) - 24576.0, v)  # below 2^-6: E4M3 subnormal grid
        tl.store(out_ptr + offs, v.to(tl.float8e4nv), mask=inb)


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The kernel for CUDA (autotuned over BLOCK and warps) or the interpreter."""
    global tl
    triton, tl, wrap = triton_kernels.jit_wrapper(interpret)
    kernel = wrap(_act_e4m3_kernel)
    if interpret:
        return kernel
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)]
    # the max pass accumulates with atomics: every trial leaves the same max, so tuning it is harmless
    return triton.autotune(configs, key=["n", "GELU", "AMAX"])(kernel)


def quantize_act_e4m3_triton(x: torch.Tensor, scale_max: float, amax: torch.Tensor | None = None,
                             gelu: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.quantize_act_e4m3_reference(x, scale_max, amax, gelu)`` as Triton kernels (CUDA, or the
    CPU interpreter): ``(x8, dequant)``, ``x8`` E4M3 of ``x``'s shape, ``dequant`` float32 0-dim.
    ``amax``: ``max|x|`` (of ``GELU(x)`` with ``gelu``) computed elsewhere, a 0-dim or one-element
    tensor on ``x``'s device. ``gelu``: ``F.gelu``'s ``approximate`` to apply to ``x`` first, in the
    same pass (the GELU output is never written), or None."""
    from .fp8 import act_shift

    shift = act_shift(scale_max)
    if not (shift <= 5 and scale_max < 16):
        raise ValueError(f"the fused kernel takes 7 <= scale_max < 16, got {scale_max}")
    xc = x.detach().contiguous()
    out = torch.empty(xc.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n = xc.numel()
    if n == 0:
        return out, torch.ones((), dtype=torch.float32, device=x.device)
    if amax is None:
        amax = absmax_triton(xc, gelu)
    amax = amax.to(device=x.device, dtype=torch.float32).reshape(1)
    dequant = torch.empty((), dtype=torch.float32, device=x.device)
    _launch(xc, amax, out, dequant, scale_max, shift, gelu)
    return out, dequant


def absmax_triton(x: torch.Tensor, gelu: str | None = None) -> torch.Tensor:
    """float32 0-dim ``max|x|``, or ``max|GELU(x)|`` (``gelu`` as in `quantize_act_e4m3_triton`)
    without writing the GELU output: one pass, each program folding its block's max into one float
    with an atomic max (magnitudes only, so from a zeroed float nothing is lost)."""
    xc = x.detach().contiguous()
    if xc.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    if gelu is None:
        return torch.linalg.vector_norm(xc, float("inf")).to(torch.float32)
    interpret = xc.device.type == "cpu"
    out = torch.zeros(xc.numel() if interpret else 1, dtype=torch.float32, device=x.device)
    _launch(xc, out, out, out, 1.0, 0, gelu, amax_pass=True)
    return out.amax() if interpret else out.reshape(())


def _launch(xc, amax, out, dequant, scale_max: float, shift: int, gelu: str | None, amax_pass: bool = False) -> None:
    if gelu not in GELU_CODES:
        raise ValueError(f"gelu must be one of {sorted(GELU_CODES, key=str)} (F.gelu's approximate), got {gelu!r}")
    n = xc.numel()
    interpret = xc.device.type == "cpu"
    args = (xc, amax, out, dequant, n, float(scale_max))
    consts = {"POW2": 2.0 ** shift, "GELU": GELU_CODES[gelu], "AMAX": amax_pass, "INTERPRET": interpret}
    with triton_kernels._on(xc.device):
        if interpret:
            _kernel(True)[(-(-n // BLOCK_INTERPRET),)](*args, **consts, BLOCK=BLOCK_INTERPRET)
        else:
            _kernel(False)[lambda meta: (-(-n // meta["BLOCK"]),)](*args, **consts)
