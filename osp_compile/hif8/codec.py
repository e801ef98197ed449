"""HiFloat8 (HiF8) reference codec in plain, vectorised torch ops.

This is the ground truth the Triton kernels (``triton_kernels.py``) are tested against, and
itself tested bit for bit against ``en_dtypes.hifloat8`` (see ``tests/test_hif8_codec.py``).
It uses only elementwise torch ops on the float32 bit pattern, so it runs unchanged on any
device and never loops over elements in Python.

Format (facts: ``/work/shared/reference/hif8.md``): ``sign | dot | exponent | mantissa``.
The dot prefix picks how many bits the exponent and the mantissa get:

=====  ====================  =============  ===============================
dot    exponent bits         mantissa bits  exponents E
=====  ====================  =============  ===============================
11     sign + 3 (hidden 1)   1              +-8 .. +-15
10     sign + 2 (hidden 1)   2              +-4 .. +-7
01     sign + 1 (hidden 1)   3              +-2, +-3
001    sign                  3              +-1
0001   --                    3              0
0000   denormal M=1..7       --             value 2^(M-23), i.e. 2^-22 .. 2^-16
=====  ====================  =============  ===============================

Specials: 0x00 = 0 (no negative zero), 0x80 = NaN, 0x6F/0xEF = +-Inf, 0x6E = 32768 (max).

Encoding works on the bit pattern ``a`` of ``|x|`` as float32 (an int32): for the source
exponent ``e`` the HiF8 grid inside the binade ``[2^e, 2^(e+1)]`` keeps ``m(e)`` mantissa bits
(``m = 0`` in the denormal binades, whose grid is just ``{2^e, 2^(e+1)}``, so the midpoint is
the linear ``1.5 * 2^e``).  Rounding clears the ``d = 23 - m`` low bits of ``a``; an add that
carries out of the mantissa lands in the exponent field, which is exactly the move into the
next binade (and so into the next dot/exponent/mantissa field width) -- the carried result is
a power of two, representable at any width.
"""
from __future__ import annotations

import torch

__all__ = ["HIF8_MAX", "ROUNDINGS", "encode", "decode", "quantize", "quantize_scaled", "decode_table"]

HIF8_MAX = 32768.0
"""Largest finite HiF8 magnitude, 2^15 (codes 0x6E / 0xEE)."""

ROUNDINGS = ("ta", "hybrid")

# float32 bit patterns of the thresholds we compare |x| against.
_F32_INF = 0x7F800000
_F32_OVERFLOW = 0x47200000  # 40960.0 = 1.25 * 2^15: TA midpoint between 2^15 and the Inf slot 1.5 * 2^15
_F32_MAX = 0x47000000  # 32768.0 = 2^15
_F32_MIN_DENORMAL = 0x34800000  # 2^-22
_ABS_MASK = 0x7FFFFFFF
_MANT_MASK = 0x007FFFFF
_LOW14 = 0x3FFF

_CODE_NAN = 0x80
_CODE_INF = 0x6F
_CODE_MAX = 0x6E
_SIGN = 0x80

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS} ('ta' = ties away from zero, "
                         f"'hybrid' = TA for |exponent| < 4 else deterministic stochastic), got {rounding!r}")


def _check_input(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        hint = (" (convert with .float() first; float64 is refused because rounding it to float32 "
                "first could round twice)") if x.dtype == torch.float64 else ""
        raise TypeError(f"HiF8 encode takes float32, bfloat16 or float16 tensors; {what} has dtype "
                        f"{x.dtype}{hint}")


def _mantissa_bits(e: torch.Tensor) -> torch.Tensor:
    """HiF8 mantissa width m(e) for a source binade exponent e (0 in the denormal binades)."""
    ae = e.abs()
    m = torch.where(ae <= 3, 3, torch.where(ae <= 7, 2, 1))
    return torch.where(e < -15, 0, m).to(torch.int32)


def _round_magnitude(a: torch.Tensor, hybrid: bool) -> torch.Tensor:
    """Round |x| (float32 bits ``a``, finite, below the overflow threshold) onto the HiF8 grid.

    Returns the float32 bit pattern of the rounded magnitude.  TA adds half a HiF8 ulp and
    truncates (round half away from zero, since ``a`` is a magnitude).  Hybrid mode: see
    ``encode``'s docstring.
    """
    e = (a >> 23) - 127
    d = 23 - _mantissa_bits(e)  # number of discarded float32 mantissa bits, 20..23
    one = torch.ones_like(a)
    ulp = one << d
    keep = ~(ulp - 1)
    rounded = (a + (ulp >> 1)) & keep  # TA

    # [2^-23, 2^-22): the grid there is {0, 2^-22}; TA always takes 2^-22 (2^-23 is the tie).
    is_e23 = e == -23
    if hybrid:
        discarded = a & (ulp - 1)
        top14 = discarded >> (d - 14)
        # At e = -23 the value is 0.1fff... in units of 2^-22: discarded bits are the hidden 1
        # followed by all 23 mantissa bits; their top 14 bits are 2^13 + (mantissa >> 10).
        top14 = torch.where(is_e23, (1 << 13) + ((a & _MANT_MASK) >> 10), top14)
        low14 = a & _LOW14
        inexact = (discarded != 0) | is_e23
        up = (top14 >= low14) & inexact
        sr = torch.where(up, (a & keep) + ulp, a & keep)
        sr = torch.where(is_e23, up.to(torch.int32) * _F32_MIN_DENORMAL, sr)
        use_sr = e.abs() >= 4
        rounded = torch.where(use_sr, sr, rounded)
        # Rounding up from [2^15, 1.25 * 2^15) would reach the Inf slot 1.5 * 2^15: stay at the max.
        rounded = torch.clamp(rounded, max=_F32_MAX)
    else:
        rounded = torch.where(is_e23, _F32_MIN_DENORMAL, rounded)
    return torch.where(e < -23, 0, rounded)


def _magnitude_code(r: torch.Tensor) -> torch.Tensor:
    """HiF8 code (sign bit clear) of a rounded magnitude given as float32 bits ``r`` (int32)."""
    e = (r >> 23) - 127
    mant = r & _MANT_MASK
    ae = e.abs()
    neg_e = (e < 0).to(torch.int32)
    m3 = mant >> 20
    code = torch.where(
        e == 0, 0x08 | m3,
        torch.where(
            ae == 1, 0x10 | (neg_e << 3) | m3,
            torch.where(
                ae <= 3, 0x20 | (neg_e << 4) | ((ae - 2) << 3) | m3,
                torch.where(
                    ae <= 7, 0x40 | (neg_e << 4) | ((ae - 4) << 2) | (mant >> 21),
                    torch.where(e >= -15, 0x60 | (neg_e << 4) | ((ae - 8) << 1) | (mant >> 22),
                                e + 23)))))  # denormals 2^-22 .. 2^-16 -> 1 .. 7
    return torch.where(r == 0, 0, code)


def encode(x: torch.Tensor, rounding: str = "ta", saturate: bool = False) -> torch.Tensor:
    """Encode a float tensor to HiF8 codes (``uint8``, same shape), in torch ops.

    ``x`` is float32, bfloat16 or float16 (the latter two are upcast to float32 first, which is
    exact).  ``rounding="ta"``: round to nearest, ties away from zero -- bit-identical to
    ``en_dtypes.hifloat8`` and Huawei's reference codec.  Edges: ``|x| >= 40960`` (and +-Inf)
    -> +-Inf code 0x6F/0xEF, or +-32768 (0x6E/0xEE) with ``saturate=True``; ``[32768, 40960)``
    -> 32768; ``|x| < 2^-23`` (float32 subnormals included) -> 0x00; ``[2^-23, 2^-22)`` ->
    2^-22; NaN -> 0x80 (also with ``saturate``; the Ascend saturating cast maps NaN to 0, we keep
    NaN visible); ``-0`` and negative values that round to 0 -> 0x00 (HiF8 has no -0).

    ``rounding="hybrid"`` (HR, meant for gradients), for the float32 source ``x`` with binade
    exponent ``e = floor(log2|x|)`` (before rounding):

    * ``|e| < 4``: TA, as above.
    * otherwise "deterministic stochastic" rounding, following Huawei's ``_fp32_ssr_round_to_hif8``:
      let ``d = 23 - m(e)`` be the number of float32 mantissa bits HiF8 drops (``m(e)`` is the
      HiF8 mantissa width of that binade, 0 in the denormal binades, so ``d`` is 20..23 and
      always >= 14: the "top 14 discarded bits" never need padding).  ``top14`` = the highest 14
      of those ``d`` discarded bits as an integer, ``low14`` = the lowest 14 bits of the float32
      mantissa as an integer (the pseudo-random threshold).  Round the magnitude up (away from
      zero) to the next HiF8 value iff ``top14 >= low14``, else truncate toward zero.  In the
      binade ``[2^-23, 2^-22)`` the grid is ``{0, 2^-22}`` and the discarded bits are the hidden
      leading 1 plus all 23 mantissa bits (``top14 = 2^13 + (mantissa >> 10)``), as in Huawei's
      code.  Below 2^-23 the result is 0, as in TA and Huawei's code.

    Interpretations where the rule as written would misbehave (each differs from Huawei's Python
    reference, which we otherwise follow):

    * An exactly representable ``x`` (all discarded bits zero, so ``top14 == low14 == 0``) is
      returned unchanged: ">=" taken literally would move it up one HiF8 step.
    * The overflow edges are those of TA in both modes: ``|x| >= 40960`` -> Inf/saturate and
      ``[32768, 40960)`` -> 32768.  HR never rounds a finite ``x`` below 40960 up into the Inf
      slot (1.5 * 2^15, code 0x6F), which Huawei's code can do.
    * bfloat16/float16 sources are upcast and the float32 rule applied (Huawei has a separate
      float16 rule).  Their upcast has zero low mantissa bits (``low14`` is 0 for bfloat16 and 0
      or 8192 for float16), so HR then rounds up almost whenever inexact: feed float32 if you
      want the dithering.
    """
    _check_input(x)
    _check_rounding(rounding)
    x = x.detach()
    bits = x.to(torch.float32).view(torch.int32)
    a = bits & _ABS_MASK
    is_nan = a > _F32_INF
    overflow = (a >= _F32_OVERFLOW) & ~is_nan  # +-Inf included
    a_fin = torch.where(overflow | is_nan, 0, a)  # keep the arithmetic on in-range magnitudes
    code = _magnitude_code(_round_magnitude(a_fin, rounding == "hybrid"))
    code = torch.where(overflow, _CODE_MAX if saturate else _CODE_INF, code)
    code = torch.where((bits < 0) & (code != 0), code | _SIGN, code)
    code = torch.where(is_nan, _CODE_NAN, code)
    return code.to(torch.uint8)


def _decode_f32(codes: torch.Tensor) -> torch.Tensor:
    """Decode HiF8 codes to float32 from the bit fields (no lookup table)."""
    c = codes.to(torch.int32)
    low = c & 0x7F
    top2 = low >> 5
    esign = (low >> 4) & 1
    # Normal codes: (exponent magnitude, mantissa, mantissa width) per dot prefix.
    ae = torch.where(top2 == 3, 8 + ((low >> 1) & 7),
                     torch.where(top2 == 2, 4 + ((low >> 2) & 3),
                                 torch.where(top2 == 1, 2 + ((low >> 3) & 1),
                                             ((low >> 4) == 1).to(torch.int32))))
    mbits = torch.where(top2 == 3, 1, torch.where(top2 == 2, 2, 3)).to(torch.int32)
    mant = low & ((1 << mbits) - 1)
    neg_e = torch.where(top2 >= 1, esign, (low >> 3) & 1)  # the 001 prefix has its sign at bit 3
    e = torch.where(neg_e == 1, -ae, ae)
    # Denormals 0000MMM: 2^(M-23); zero is M = 0.
    is_denormal = low < 8
    e = torch.where(is_denormal, low - 23, e)
    mant = torch.where(is_denormal, 0, mant)
    mbits = torch.where(is_denormal, 0, mbits)
    vbits = ((e + 127) << 23) | (mant << (23 - mbits))
    vbits = torch.where(low == 0, 0, vbits)
    vbits = torch.where(low == _CODE_INF, _F32_INF, vbits)
    vbits = torch.where(c >= _SIGN, vbits | torch.iinfo(torch.int32).min, vbits)
    vbits = torch.where(c == _CODE_NAN, 0x7FC00000, vbits)
    return vbits.view(torch.float32)  # every step above stays int32 (scalar operands don't promote)


def decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode ``uint8`` HiF8 codes to floats of ``dtype`` (exact for float32/bfloat16/float16,
    which hold every HiF8 value).  0x80 -> NaN, 0x6F/0xEF -> +-Inf."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"HiF8 codes must be a torch.uint8 tensor, got {got}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"decode dtype must be a floating torch.dtype, got {dtype!r}")
    return _decode_f32(codes).to(dtype)


def decode_table() -> torch.Tensor:
    """The value of every code 0..255 as a float32 tensor (CPU): NaN at 0x80, +-Inf at 0x6F/0xEF."""
    return decode(torch.arange(256, dtype=torch.int32).to(torch.uint8))


def quantize(x: torch.Tensor, rounding: str = "ta", saturate: bool = False) -> torch.Tensor:
    """Round ``x`` to the nearest HiF8 value (``decode(encode(x))``), returned in ``x``'s dtype.

    Not differentiable (the result is detached); a QAT layer wraps it in its own autograd
    function (straight-through or otherwise)."""
    return decode(encode(x, rounding, saturate), x.dtype)


def absmax(x: torch.Tensor) -> torch.Tensor:
    """float32 0-dim ``max|x|`` (exact: the max of the magnitudes is one of them); 0 for an empty ``x``."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.detach().abs().amax().to(torch.float32)


MAX_SCALE_MAX = 32768.0
"""The largest ``scale_max``: HiF8's largest finite value, so that nothing finite overflows."""


def check_scale_max(scale_max: float) -> None:
    if not 0 < scale_max <= MAX_SCALE_MAX:  # NaN fails too
        raise ValueError(f"scale_max={scale_max!r}: the largest magnitude is scaled to it, so it must be in "
                         f"(0, {MAX_SCALE_MAX:g}] (HiF8's largest finite value); OSP-Next uses 15 and 224")


def _per_tensor_scale(x: torch.Tensor, scale_max: float, amax: torch.Tensor | None = None) -> torch.Tensor:
    """float32 0-dim scale ``scale_max / max|x|``; 1 where ``max|x|`` is 0 or not finite, or so
    small (a float32 subnormal, below ``scale_max / 3.4e38``) that the quotient overflows: every
    element of such a tensor is then below HiF8's smallest value and quantizes to 0.

    ``amax``: ``max|x|`` computed elsewhere (over every shard of a sequence-parallel tensor,
    ``group.group_amax``); by default that of ``x`` itself.
    Stays a tensor (no host sync), so it is cheap on GPU and traceable."""
    check_scale_max(scale_max)
    amax = absmax(x) if amax is None else amax.to(torch.float32).reshape(())
    ok = torch.isfinite(amax) & (amax > 0)
    # A tensor numerator: `float / tensor` is computed as a reciprocal times the float, which is
    # not the correctly rounded quotient; full_like also avoids a host-to-device copy.
    scale = torch.full_like(amax, float(scale_max)) / torch.where(ok, amax, 1.0)
    return torch.where(ok & torch.isfinite(scale), scale, 1.0)


def quantize_scaled(x: torch.Tensor, scale_max: float, rounding: str = "ta",
                    amax: torch.Tensor | None = None) -> torch.Tensor:
    """Per-tensor scaled HiF8 fake-quant: ``quantize(x * s) / s`` with ``s = scale_max / max|x|``
    (``max|x|`` given as ``amax`` where ``x`` is one shard of the tensor, see `_per_tensor_scale`).

    This is OSP-Next's ``hif8_linear`` recipe (scale_max 15 for activations and weights, 224 for
    gradients): the largest magnitude lands on ``scale_max``, where HiF8 still has 2-3 mantissa
    bits, instead of wherever it happens to fall.  The arithmetic is in float32 (``x`` upcast),
    the result cast back to ``x``'s dtype.  ``max|x| == 0`` (all zeros) -> ``s = 1``, so zeros
    stay zeros; a non-finite ``max|x|`` also gives ``s = 1`` (Inf/NaN then pass through as
    HiF8 Inf/NaN instead of turning every element into NaN).  Not saturating: with
    ``scale_max <= 32768`` nothing finite overflows.  Not differentiable (detached).
    """
    _check_input(x)
    _check_rounding(rounding)
    scale = _per_tensor_scale(x, scale_max, amax)
    xf = x.detach().to(torch.float32)
    return (quantize(xf * scale, rounding) / scale).to(x.dtype)
