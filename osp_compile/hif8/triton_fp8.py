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
"""
from __future__ import annotations

import functools

import torch

from . import triton_kernels

BLOCK_INTERPRET = 1024

tl = None  # triton.language, set by _kernel() (see triton_kernels' module docstring)


def _act_e4m3_kernel(x_ptr, amax_ptr, out_ptr, dequant_ptr, n, scale_max,
                     POW2: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    amax = tl.load(amax_ptr).to(tl.float32)
    amax_bits = amax.to(tl.int32, bitcast=True)
    ok = (amax_bits > 0) & (amax_bits < 0x7F800000)  # max|x| > 0 and finite
    s = tl.where(ok, tl.math.div_rn(tl.where(ok, scale_max, 1.0), tl.where(ok, amax, 1.0)), 1.0)
    tl.store(dequant_ptr, tl.math.div_rn(s * 0.0 + 1.0, s * POW2), mask=pid == 0)

    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    y = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32) * s  # |y| <= scale_max < 16
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
    global tl
    triton, tl, wrap = triton_kernels.jit_wrapper(interpret)
    kernel = wrap(_act_e4m3_kernel)
    if interpret:
        return kernel
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)]
    return triton.autotune(configs, key=["n"])(kernel)


def quantize_act_e4m3_triton(x: torch.Tensor, scale_max: float,
                             amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.quantize_act_e4m3_reference(x, scale_max, amax)`` as a Triton kernel (CUDA, or the CPU
    interpreter): ``(x8, dequant)``, ``x8`` E4M3 of ``x``'s shape, ``dequant`` float32 0-dim.
    ``amax``: ``max|x|`` computed elsewhere (a 0-dim or one-element tensor on ``x``'s device)."""
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
        amax = torch.linalg.vector_norm(xc, float("inf"))
    amax = amax.to(device=x.device, dtype=torch.float32).reshape(1)
    dequant = torch.empty((), dtype=torch.float32, device=x.device)
    interpret = x.device.type == "cpu"
    kernel = _kernel(interpret)
    args = (xc, amax, out, dequant, n, float(scale_max))
    with triton_kernels._on(x.device):
        if interpret:
            kernel[(-(-n // BLOCK_INTERPRET),)](*args, POW2=2.0 ** shift, BLOCK=BLOCK_INTERPRET)
        else:
            kernel[lambda meta: (-(-n // meta["BLOCK"]),)](*args, POW2=2.0 ** shift)
    return out, dequant
