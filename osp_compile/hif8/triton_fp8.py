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
E4M3: the scaled values are below 16 (``scale_max < 16``), so a binade keeps 3 mantissa bits from
2^-3 up, 2 from 2^-7, else 1.  Below 2^-15 HiF8 has denormals with another grid; after the shift
(``k <= 5``, so ``scale_max >= 7``) all of those are below 2^-10, which E4M3 rounds to 0 either
way, so the kernel does not special-case them.  Values that land under E4M3's normal range (2^-6)
are then rounded to its subnormal grid (multiples of 2^-9, ties to even) by the cast.  Inputs must
be finite.

These passes are bound by instruction issue as much as by memory (about 20 instructions per
element against ~3 TB/s, and the whole step runs power-capped at a lower clock), so the compiled
kernel (``COMPILED``) lets the hardware do what it does exactly: the float32 -> bfloat16 and
float32 -> E4M3 casts round to nearest even, and the GELU's division is ``div.approx.f32``, as
accurate as the ``div.full.f32`` Triton emits for ``/`` (2 ulp).  Triton's CPU interpreter
truncates in both casts, so there the kernel rounds by hand (``+0x7FFF`` and the tie bit for
bfloat16; ``(v + 1.5 * 2^14) - 1.5 * 2^14`` for E4M3's subnormals), and divides with ``/``.
Tested bit for bit against the torch reference: under the interpreter, and on the GPU.

A GELU prologue (``gelu``, for the FFN's second linear, ``osp::gelu_hif8_linear``) applies
``F.gelu`` to ``x`` inside both passes, rounded to ``x``'s dtype as ``F.gelu``'s output is, so the
GELU output is never written: the max pass reads ``x`` (each block's max folded into one float by
an atomic max), the quantize pass reads ``x`` and writes one byte per element, where GELU, max and
quantize as separate kernels read or write the activation five times.  The GELU is computed in
float32 (the tanh form as a sigmoid), within a few float32 ulps of PyTorch's, so an element can
round to the neighbouring bfloat16 value where PyTorch's lands on the other side of a rounding
boundary (tested against a float64 GELU).
"""
from __future__ import annotations

import functools

import torch

from . import triton_kernels

BLOCK_INTERPRET = 1024

tl = None  # triton.language, set by _kernel() (see triton_kernels' module docstring)


GELU_CODES = {None: 0, "tanh": 1, "none": 2}
"""The kernel's ``GELU`` constant per ``F.gelu`` ``approximate`` (None: no GELU prologue)."""

QUANTIZE, ABS_MAX = 0, 1
"""The kernel's passes (``PASS``): write E4M3, or ``max|y|`` (y: x or its GELU) atomically into
``out[0]``."""


def _act_e4m3_kernel(x_ptr, amax_ptr, out_ptr, dequant_ptr, n, scale_max,
                     POW2: tl.constexpr, GELU: tl.constexpr, PASS: tl.constexpr, EVEN: tl.constexpr, WIDE: tl.constexpr,
                     COMPILED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = (pid.to(tl.int64) if WIDE else pid) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    if EVEN:
        x = tl.load(x_ptr + offs)
    else:
        x = tl.load(x_ptr + offs, mask=inb, other=0.0)  # masked lanes: 0, whose GELU is 0
    y = x.to(tl.float32)
    # GELU prologue, rounded to x's dtype as F.gelu's output would be
    if GELU != 0:
        if GELU == 1:  # tanh approximation: 0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + 2^(-2u log2 e))
            d = 1.0 + tl.exp2(y * (-2.302208198144325 - 0.1029432395800235 * y * y))  # 2u log2(e) = y (a + b y^2)
            if COMPILED:
                y = tl.inline_asm_elementwise("div.approx.f32 $0, $1, $2;", "=r,r,r", [y, d],
                                              dtype=tl.float32, is_pure=True, pack=1)
            else:
                y = y / d
        else:  # erf
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        if x.dtype == tl.bfloat16 and not COMPILED:  # to nearest even by hand (the interpreter truncates)
            bits = y.to(tl.int32, bitcast=True)
            y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
        else:
            y = y.to(x.dtype).to(tl.float32)
    if PASS == 1:  # ABS_MAX (magnitudes only: from a zeroed float nothing is lost)
        y = tl.abs(y)
        tl.atomic_max(out_ptr, tl.reduce(y, 0, tl.standard._elementwise_max))  # tl.max, as the interpreter runs it
        return
    amax = tl.load(amax_ptr).to(tl.float32)
    amax_bits = amax.to(tl.int32, bitcast=True)
    ok = (amax_bits > 0) & (amax_bits < 0x7F800000)  # max|x| > 0 and finite
    s = tl.where(ok, tl.math.div_rn(tl.where(ok, scale_max, 1.0), tl.where(ok, amax, 1.0)), 1.0)
    s = tl.where(s.to(tl.int32, bitcast=True) < 0x7F800000, s, 1.0)  # a subnormal max|x|: as for 0
    if pid == 0:
        tl.store(dequant_ptr, tl.math.div_rn(s * 0.0 + 1.0, s * POW2))
    y = y * s  # |y| <= scale_max < 16
    # TA rounding on the bits: add half an ulp of the binade's HiF8 grid, clear the ulp's bits.
    # Binades from 2^-3 (exponent field 124) up keep 3 mantissa bits, from 2^-7 (120) 2, below 1:
    # `keep` counts the bits past 1 from the field's quarter, with min/max rather than compares
    # (the compiler spilled the predicates of 16 elements a thread into integers and back).
    # The sign bit rides along (the add never carries into it; the mask keeps it).
    bits = y.to(tl.int32, bitcast=True)
    keep = tl.minimum(tl.maximum(((bits & 0x7FFFFFFF) >> 25) - 29, 0), 2)
    v = ((bits + (0x200000 >> keep)) & (-0x400000 >> keep)).to(tl.float32, bitcast=True) * POW2
    if not COMPILED:  # below 2^-6: to E4M3's subnormal grid (nearest even) by hand, as the GPU's cast does
        v = tl.where(tl.abs(v) < 0.015625, (v + 24576.0) - 24576.0, v)
    if EVEN:
        tl.store(out_ptr + offs, v.to(tl.float8e4nv))
    else:
        tl.store(out_ptr + offs, v.to(tl.float8e4nv), mask=inb)


def _shape_constants(n: int, block: int) -> dict:
    """``EVEN``: no partial block (no masks); ``WIDE``: offsets need 64 bits."""
    return {"EVEN": n % block == 0, "WIDE": n + block > 2 ** 31 - 1}


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The kernel for CUDA (autotuned over BLOCK and warps) or the interpreter (launched with
    ``COMPILED`` False: see the module docstring).  The max pass reduces with ``tl.reduce`` over ``tl.standard``'s combine function, which the
    interpreter recognises: ``tl.max`` itself is a compiled ``@jit`` function that an interpreter
    entered without ``TRITON_INTERPRET`` cannot call.  The atomics are the GPU's code."""
    global tl
    triton, tl, wrap = triton_kernels.jit_wrapper(interpret)
    kernel = wrap(_act_e4m3_kernel)
    if interpret:
        return kernel
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)]
    shape = triton.heuristics({name: (lambda args, name=name: _shape_constants(args["n"], args["BLOCK"])[name])
                               for name in ("EVEN", "WIDE")})
    # the max passes accumulate with atomics: every trial leaves the same max, so tuning them is harmless
    return triton.autotune(configs, key=["n", "GELU", "PASS"])(shape(kernel))


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
    _launch(xc, amax, out, dequant, scale_max, shift, gelu, QUANTIZE)
    return out, dequant


def absmax_triton(x: torch.Tensor, gelu: str | None = None) -> torch.Tensor:
    """float32 0-dim ``max|x|``, or ``max|GELU(x)|`` (``gelu`` as in `quantize_act_e4m3_triton`)
    without writing the GELU output: one pass, each program folding its block's max into one float
    with an atomic max (magnitudes only, so from a zeroed float nothing is lost).  Without a GELU,
    torch's reduction, which was faster than these atomics on the H100."""
    xc = x.detach().contiguous()
    if xc.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    if gelu is None:
        return torch.linalg.vector_norm(xc, float("inf")).to(torch.float32)
    out = torch.zeros(1, dtype=torch.float32, device=x.device)
    _launch(xc, out, out, out, 1.0, 0, gelu, ABS_MAX)
    return out.reshape(())


def _launch(xc, amax, out, dequant, scale_max: float, shift: int, gelu: str | None, pass_: int) -> None:
    if gelu not in GELU_CODES:
        raise ValueError(f"gelu must be one of {sorted(GELU_CODES, key=str)} (F.gelu's approximate), got {gelu!r}")
    n = xc.numel()
    interpret = xc.device.type == "cpu"
    kernel = _kernel(interpret)
    args = (xc, amax, out, dequant, n, float(scale_max))
    consts = {"POW2": 2.0 ** shift, "GELU": GELU_CODES[gelu], "PASS": pass_, "COMPILED": not interpret}
    with triton_kernels._on(xc.device):
        if interpret:
            kernel[(-(-n // BLOCK_INTERPRET),)](*args, **consts, **_shape_constants(n, BLOCK_INTERPRET),
                                               BLOCK=BLOCK_INTERPRET)
        else:
            kernel[lambda meta: (-(-n // meta["BLOCK"]),)](*args, **consts)
