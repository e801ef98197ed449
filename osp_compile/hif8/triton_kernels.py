"""Triton kernels for the HiF8 codec: the same bit arithmetic as ``codec.py``, fused per element.

Triton is optional.  This module imports it only when a kernel is first needed, so
``import osp_compile.hif8`` works without it.  The kernel bodies below are plain Python
functions; ``_kernels(interpret)`` wraps them with ``triton.jit`` for CUDA tensors, and with
Triton's interpreter (``triton.runtime.interpreter.InterpretedFunction``, what ``triton.jit``
returns under ``TRITON_INTERPRET=1``) for CPU tensors.  Building both from the same source is
what lets one process run the interpreter on CPU (tests, at small sizes: it is slow) and
compiled kernels on the GPU, without setting ``TRITON_INTERPRET`` before Triton is imported.

Kernels are 1D over the flattened (contiguous) tensor, one ``BLOCK`` of elements per program.
``_round_kernel`` encodes (``OUT_CODES``) or quantizes (writes the rounded value in the output
dtype, optionally scaling by ``scale`` before and dividing by it after, all in float32);
``_decode_kernel`` reads the 256-entry value table.  Every result is bit-identical to the torch
codec; ``tests/test_hif8_kernels.py`` checks that.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from . import codec

__all__ = ["triton_available", "encode_triton", "decode_triton", "quantize_triton", "jit_wrapper"]

BLOCK = 1024
PROBE_BLOCK = 16


def _import_triton():
    try:
        import triton
        import triton.language as tl
    except Exception:  # ImportError, or a broken install (missing compiler / driver bits)
        return None, None
    return triton, tl


def _interpreter_cls():
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:
        return None
    return InterpretedFunction


def cuda_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run on CUDA here (None: they can), for lowering's report."""
    if _import_triton()[0] is None:
        return "Triton is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device here"
    return None


def interpreter_unavailable_reason() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here (None: it can): Triton missing, no
    interpreter to import, or an interpreter that fails `_probe_failure`'s kernel."""
    triton = _import_triton()[0]
    if triton is None:
        return "Triton is not installed"
    if _interpreter_cls() is None and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton {triton.__version__} has no interpreter to import (set TRITON_INTERPRET=1 before importing it)"
    return _probe_failure()


@functools.lru_cache(maxsize=None)
def _probe_failure() -> str | None:
    """Runs, once, a kernel that loops up to a kernel argument as the GEMM and norm kernels do:
    some pairings of Triton and NumPy cannot (Triton 3.6's interpreter under NumPy 2 fails
    ``range(0, n, BLOCK)`` with "only 0-dimensional arrays can be converted to Python scalars"), and
    a kernel that cannot run is better reported here than failing inside a conversion."""
    triton = _import_triton()[0]
    x = torch.arange(2 * PROBE_BLOCK, dtype=torch.float32)
    out = torch.empty(PROBE_BLOCK, dtype=torch.float32)
    try:
        _loop_probe(True)[(1,)](x, out, x.numel(), BLOCK=PROBE_BLOCK)
    except Exception as exc:  # whatever the interpreter raises
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop bounded by a kernel argument "
                f"here ({type(exc).__name__}: {str(exc)[:200]})")
    if not torch.equal(out, x[:PROBE_BLOCK] + x[PROBE_BLOCK:]):
        return f"Triton {triton.__version__}'s interpreter computed a wrong sum in its probe kernel"
    return None


def unavailable_reason(device: torch.device | str = "cuda") -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None: they can): CUDA needs Triton and a GPU
    (`cuda_unavailable_reason`); CPU needs Triton's interpreter in working order
    (`interpreter_unavailable_reason`; slow: meant for tests); no other device has them."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_unavailable_reason()
    if device.type == "cpu":
        return interpreter_unavailable_reason()
    return f"no Triton kernels for {device.type} devices"


def triton_available(device: torch.device | str = "cuda") -> bool:
    """Whether the Triton kernels can run on ``device`` (`unavailable_reason` says why not)."""
    return unavailable_reason(device) is None


tl = None  # triton.language once _kernels() has run.  Until then the `tl.constexpr` annotations
# below are never evaluated (postponed by `from __future__ import annotations`); Triton reads
# them as the string "tl.constexpr".

# --------------------------------------------------------------------------------------------
# Kernel bodies (undecorated: see the module docstring).  The constants mirror codec.py.
# --------------------------------------------------------------------------------------------

def _round_kernel(x_ptr, out_ptr, scale_ptr, n,
                  HYBRID: tl.constexpr, SATURATE: tl.constexpr, OUT_CODES: tl.constexpr,
                  HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=1.0).to(tl.float32)
    if HAS_SCALE:
        s = tl.load(scale_ptr)
        x = x * s
    bits = x.to(tl.int32, bitcast=True)
    a = bits & 0x7FFFFFFF
    is_nan = a > 0x7F800000
    overflow = (a >= 0x47200000) & (a <= 0x7F800000)  # |x| >= 40960, Inf included
    a = tl.where(overflow | is_nan, 0, a)

    # Round the magnitude onto the HiF8 grid of its binade (codec._round_magnitude).
    e = (a >> 23) - 127
    ae = tl.abs(e)
    m = tl.where(ae <= 3, 3, tl.where(ae <= 7, 2, 1))
    m = tl.where(e < -15, 0, m)
    d = 23 - m
    ulp = tl.full(a.shape, 1, tl.int32) << d
    keep = ~(ulp - 1)
    is_e23 = e == -23
    r = (a + (ulp >> 1)) & keep
    r = tl.where(is_e23, 0x34800000, r)
    if HYBRID:
        discarded = a & (ulp - 1)
        top14 = tl.where(is_e23, 8192 + ((a & 0x7FFFFF) >> 10), discarded >> (d - 14))
        up = (top14 >= (a & 0x3FFF)) & ((discarded != 0) | is_e23)
        sr = tl.where(up, (a & keep) + ulp, a & keep)
        sr = tl.where(is_e23, tl.where(up, 0x34800000, 0), sr)
        r = tl.where(ae >= 4, sr, r)
        r = tl.minimum(r, 0x47000000)
    r = tl.where(e < -23, 0, r)

    if OUT_CODES:
        # Code of the rounded magnitude (codec._magnitude_code), then sign and specials.
        er = (r >> 23) - 127
        mant = r & 0x7FFFFF
        aer = tl.abs(er)
        neg_e = (er < 0).to(tl.int32)
        m3 = mant >> 20
        code = tl.where(
            er == 0, 0x08 | m3,
            tl.where(aer == 1, 0x10 | (neg_e << 3) | m3,
                     tl.where(aer <= 3, 0x20 | (neg_e << 4) | ((aer - 2) << 3) | m3,
                              tl.where(aer <= 7, 0x40 | (neg_e << 4) | ((aer - 4) << 2) | (mant >> 21),
                                       tl.where(er >= -15, 0x60 | (neg_e << 4) | ((aer - 8) << 1) | (mant >> 22),
                                                er + 23)))))
        code = tl.where(r == 0, 0, code)
        code = tl.where(overflow, 0x6E if SATURATE else 0x6F, code)
        code = tl.where((bits < 0) & (code != 0), code | 0x80, code)
        code = tl.where(is_nan, 0x80, code)
        tl.store(out_ptr + offs, code.to(tl.uint8), mask=inb)
    else:
        # The value directly: sign | rounded magnitude (negative results that round to 0 give +0).
        vbits = tl.where(overflow, 0x47000000 if SATURATE else 0x7F800000, r)
        vbits = tl.where((bits < 0) & (vbits != 0), vbits | (-2147483647 - 1), vbits)
        vbits = tl.where(is_nan, 0x7FC00000, vbits)
        q = vbits.to(tl.float32, bitcast=True)
        if HAS_SCALE:
            q = tl.math.div_rn(q, s)
            if out_ptr.dtype.element_ty == tl.bfloat16:
                # q / s is no longer a HiF8 value, so the bfloat16 store rounds.  Round to nearest
                # even by hand: Triton's interpreter truncates float32 -> bfloat16 casts, the GPU
                # rounds to nearest even; this gives the GPU's (and torch's) bits on both.
                qb = q.to(tl.int32, bitcast=True)
                hi = (qb + 0x7FFF + ((qb >> 16) & 1)) >> 16
                hi = tl.where(q != q, 0x7FC0, hi & 0xFFFF)
                q = hi.to(tl.int16).to(tl.bfloat16, bitcast=True)
        tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=inb)


def _loop_probe_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.full((BLOCK,), 0.0, tl.float32)  # tl.zeros is a @jit function the interpreter cannot enter
    for start in range(0, n, BLOCK):
        acc += tl.load(x_ptr + start + offs)
    tl.store(out_ptr + offs, acc)


def _decode_kernel(codes_ptr, table_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    c = tl.load(codes_ptr + offs, mask=inb, other=0).to(tl.int32)
    v = tl.load(table_ptr + c, mask=inb, other=0.0)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=inb)


def jit_wrapper(interpret: bool):
    """``(triton, tl, wrap)``: ``wrap(fn)`` compiles a kernel body for CUDA (``triton.jit``) or, with
    ``interpret``, wraps it for Triton's CPU interpreter.  Shared by every HiF8 kernel module
    (``triton_gemm``, ``triton_fp8``), each of which keeps its own ``tl`` global the same way."""
    triton, tl_mod = _import_triton()
    if triton is None:
        raise RuntimeError("Triton is not importable; use backend='torch'")
    if interpret and os.environ.get("TRITON_INTERPRET") != "1":
        wrap = _interpreter_cls()
        if wrap is None:
            raise RuntimeError("this Triton has no interpreter to run on CPU; set TRITON_INTERPRET=1 "
                               "before importing triton, or use backend='torch'")
    else:
        wrap = triton.jit  # under TRITON_INTERPRET=1 this is the interpreter too
    return triton, tl_mod, wrap


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """(round_kernel, decode_kernel) compiled for CUDA, or wrapped for the CPU interpreter."""
    global tl
    _, tl, wrap = jit_wrapper(interpret)  # the kernel bodies read `tl` as a module global
    return wrap(_round_kernel), wrap(_decode_kernel)


@functools.lru_cache(maxsize=None)
def _loop_probe(interpret: bool):
    global tl
    _, tl, wrap = jit_wrapper(interpret)
    return wrap(_loop_probe_kernel)


def _kernels_for(t: torch.Tensor):
    if t.device.type == "cuda":
        return _kernels(False)
    if t.device.type == "cpu":
        return _kernels(True)
    raise RuntimeError(f"no Triton HiF8 kernels for device {t.device}; use backend='torch'")


def _grid(n: int):
    return (max(1, -(-n // BLOCK)),)


def _on(device: torch.device):
    """Launch on the tensor's GPU, not whichever one is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _round(x: torch.Tensor, rounding: str, saturate: bool, out_codes: bool, scale) -> torch.Tensor:
    codec._check_input(x)
    codec._check_rounding(rounding)
    round_kernel, _ = _kernels_for(x)
    xc = x.detach().contiguous()
    out = torch.empty(x.shape, dtype=torch.uint8 if out_codes else x.dtype, device=x.device)
    if scale is None:
        scale_t = torch.ones((), dtype=torch.float32, device=x.device)  # unread placeholder
    else:
        scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())
    n = xc.numel()
    if n:
        with _on(x.device):
            round_kernel[_grid(n)](xc, out, scale_t, n, HYBRID=rounding == "hybrid", SATURATE=bool(saturate),
                                   OUT_CODES=out_codes, HAS_SCALE=scale is not None, BLOCK=BLOCK)
    return out


def encode_triton(x: torch.Tensor, rounding: str = "ta", saturate: bool = False, scale=None) -> torch.Tensor:
    """Triton ``codec.encode``: HiF8 ``uint8`` codes of a float32/bfloat16/float16 tensor.

    With ``scale`` (a float or a one-element tensor): the codes of ``x * scale``, the product taken
    in float32 inside the kernel (what ``codec.encode(x.float() * scale)`` computes)."""
    return _round(x, rounding, saturate, True, scale)


def quantize_triton(x: torch.Tensor, scale=None, rounding: str = "ta", saturate: bool = False) -> torch.Tensor:
    """Triton fake-quant in one pass, in ``x``'s dtype.

    ``scale=None``: ``decode(encode(x))``.  With ``scale`` (a float or a one-element tensor):
    ``decode(encode(x * scale)) / scale``, computed in float32 (correctly rounded division), i.e.
    ``codec.quantize_scaled``'s arithmetic for a given scale."""
    return _round(x, rounding, saturate, False, scale)


def decode_triton(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton ``codec.decode``: table lookup of ``uint8`` codes into ``dtype``."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"HiF8 codes must be a torch.uint8 tensor, got {got}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"decode dtype must be a floating torch.dtype, got {dtype!r}")
    _, decode_kernel = _kernels_for(codes)
    cc = codes.contiguous()
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    table = _table(codes.device)
    n = cc.numel()
    if n:
        with _on(codes.device):
            decode_kernel[_grid(n)](cc, table, out, n, BLOCK=BLOCK)
    return out


@functools.lru_cache(maxsize=None)
def _table(device: torch.device) -> torch.Tensor:
    return codec.decode_table().to(device)
