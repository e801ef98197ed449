"""The torch HiF8 codec against en_dtypes.hifloat8 (an independent implementation), bit for bit.

en_dtypes: ``x_f32.astype(en_dtypes.hifloat8).view(np.uint8)`` encodes (round half away from
zero, like Huawei's codec: overflow -> the Inf code 0x6F/0xEF, NaN -> 0x80, -0 -> 0x00) and
``codes.view(en_dtypes.hifloat8).astype(np.float32)`` decodes.  Its behaviour matches hif8.md on
every edge checked here, so TA is compared exactly with no exceptions.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import osp_compile.hif8 as hif8

en_dtypes = pytest.importorskip("en_dtypes")
HIF8 = en_dtypes.hifloat8


# ---------------------------------------------------------------------------------- helpers

def ref_encode(x) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # en_dtypes warns on NaN inputs (and encodes them 0x80)
        return np.asarray(x, dtype=np.float32).astype(HIF8).view(np.uint8)


def ref_decode(codes) -> np.ndarray:
    return np.asarray(codes, dtype=np.uint8).view(HIF8).astype(np.float32)


def enc(x, **kw) -> np.ndarray:
    return hif8.encode(torch.from_numpy(np.asarray(x, dtype=np.float32)), backend="torch", **kw).numpy()


def assert_codes_equal(x, got, want):
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, (f"{bad.size} mismatches, first: x={x[bad[:8]].tolist()} "
                           f"got={[hex(c) for c in got[bad[:8]]]} want={[hex(c) for c in want[bad[:8]]]}")


def random_f32(n: int, seed: int, emin: int = -26, emax: int = 17) -> np.ndarray:
    """Random sign, exponent uniform in [emin, emax], random 23 mantissa bits (never zero)."""
    rng = np.random.default_rng(seed)
    sign = rng.integers(0, 2, n, dtype=np.uint32) << 31
    exp = (rng.integers(emin, emax + 1, n) + 127).astype(np.uint32) << 23
    mant = rng.integers(0, 1 << 23, n, dtype=np.uint32)
    return (sign | exp | mant).view(np.float32)


TABLE = ref_decode(np.arange(256))
FINITE_CODES = [c for c in range(256) if np.isfinite(TABLE[c])]  # 253: 0, 126 positive, 126 negative
POS_VALUES = np.unique(TABLE[np.isfinite(TABLE) & (TABLE >= 0)])  # 0 and the 126 positive values


# ---------------------------------------------------------------------------------- decode

def test_decode_table_matches_en_dtypes():
    mine = hif8.decode_table().numpy()
    assert mine.dtype == np.float32 and mine.shape == (256,)
    np.testing.assert_array_equal(mine, TABLE)  # NaN positions must match too
    assert np.flatnonzero(np.isnan(mine)).tolist() == [0x80]
    assert mine[0x6F] == np.inf and mine[0xEF] == -np.inf
    assert np.flatnonzero(np.isinf(mine)).tolist() == [0x6F, 0xEF]
    assert mine[0x6E] == hif8.HIF8_MAX == 32768.0 and mine[0xEE] == -32768.0
    assert mine[0x00] == 0 and not np.signbit(mine[0x00])
    assert mine[0x01] == 2.0 ** -22 and mine[0x07] == 2.0 ** -16 and mine[0x7E] == 2.0 ** -15
    assert len(POS_VALUES) == 127 and len(FINITE_CODES) == 253


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_dtypes_exact(dtype):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)
    got = hif8.decode(codes, dtype, backend="torch")
    assert got.dtype == dtype and got.shape == (16, 16)
    np.testing.assert_array_equal(got.float().flatten().numpy(), TABLE)  # every value is exact


# ---------------------------------------------------------------------------------- encode, TA

def test_every_value_encodes_to_its_code():
    codes = np.array(FINITE_CODES, dtype=np.uint8)
    x = TABLE[codes]
    got = enc(x)
    assert_codes_equal(x, got, codes)
    assert_codes_equal(x, got, ref_encode(x))
    assert enc([np.inf, -np.inf]).tolist() == [0x6F, 0xEF]


def _midpoints():
    vals = np.concatenate([POS_VALUES, [49152.0]]).astype(np.float64)  # 1.5 * 2^15: the Inf slot
    mids = ((vals[:-1] + vals[1:]) / 2).astype(np.float32)
    assert np.all(mids.astype(np.float64) == (vals[:-1] + vals[1:]) / 2)  # exact in float32
    return mids


def test_midpoints_and_their_neighbours():
    mids = _midpoints()
    assert 2.0 ** -23 in mids and 1.5 * 2.0 ** -20 in mids and 40960.0 in mids
    x = np.concatenate([mids,
                        np.nextafter(mids, np.float32(0)),
                        np.nextafter(mids, np.float32(np.inf))]).astype(np.float32)
    x = np.concatenate([x, -x])
    assert_codes_equal(x, enc(x), ref_encode(x))
    # ties go away from zero: every positive midpoint encodes to the upper neighbour
    up = np.searchsorted(POS_VALUES, mids.astype(np.float64), side="right")
    want = np.concatenate([POS_VALUES, [np.inf]])[up]
    np.testing.assert_array_equal(ref_decode(enc(mids)), want.astype(np.float32))


EDGES = {
    40960.0: 0x6F, 40959.996: 0x6E, 32768.0: 0x6E, 36000.0: 0x6E, 49152.0: 0x6F, 1e30: 0x6F,
    np.finfo(np.float32).max: 0x6F, math.inf: 0x6F, -math.inf: 0xEF, -40960.0: 0xEF, -32768.0: 0xEE,
    2.0 ** -23: 0x01, float(np.nextafter(np.float32(2.0 ** -23), np.float32(0))): 0x00,
    1.999 * 2.0 ** -23: 0x01, 2.0 ** -22: 0x01, 1.5 * 2.0 ** -22: 0x02, 1.4999 * 2.0 ** -22: 0x01,
    2.0 ** -24: 0x00, 1e-30: 0x00, 1e-40: 0x00, 1e-45: 0x00, -1e-40: 0x00, -2.0 ** -24: 0x00,
    -2.0 ** -23: 0x81, 0.0: 0x00, -0.0: 0x00, 1.5 * 2.0 ** -16: 0x7E, 1.75 * 2.0 ** -15: 0x7C,
    1.0: 0x08, -1.0: 0x88, 15.5: 0x40, 0.96875: 0x08,
}


def test_edges_from_hif8_md():
    x = np.array(list(EDGES), dtype=np.float32)
    want = np.array(list(EDGES.values()), dtype=np.uint8)
    assert_codes_equal(x, enc(x), want)
    assert_codes_equal(x, enc(x), ref_encode(x))
    nan = np.array([np.nan, -np.nan, np.float32(np.nan) * 0], dtype=np.float32)
    nan_bits = np.array([0x7F800001, 0xFFFFFFFF, 0x7FC00000], dtype=np.uint32).view(np.float32)
    assert enc(nan).tolist() == [0x80] * 3 and enc(nan_bits).tolist() == [0x80] * 3
    assert ref_encode(nan_bits).tolist() == [0x80] * 3


def test_float32_subnormal_inputs_give_zero():
    rng = np.random.default_rng(1)
    x = rng.integers(1, 1 << 23, 2000, dtype=np.uint32).view(np.float32)  # all float32 subnormals
    x = np.concatenate([x, -x])
    assert not np.any(enc(x)) and not np.any(ref_encode(x))


@pytest.mark.parametrize("seed", [0, 1])
def test_random_float32_against_en_dtypes(seed):
    x = random_f32(600_000, seed)  # 1.2 M values over 2^-26 .. 2^17, both signs
    assert_codes_equal(x, enc(x), ref_encode(x))


def test_random_near_overflow_and_underflow():
    x = np.concatenate([random_f32(50_000, 2, 14, 16), random_f32(50_000, 3, -24, -21)])
    assert_codes_equal(x, enc(x), ref_encode(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ["ta", "hybrid"])
def test_half_inputs_match_float32_upcast(dtype, rounding):
    lo, hi = (-26, 17) if dtype == torch.bfloat16 else (-24, 15)
    x = torch.from_numpy(random_f32(100_000, 4, lo, hi)).to(dtype)
    x = torch.cat([x, torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0], dtype=dtype)])
    got = hif8.encode(x, rounding, backend="torch")
    assert torch.equal(got, hif8.encode(x.float(), rounding, backend="torch"))
    q = hif8.quantize(x, rounding, backend="torch")
    assert q.dtype == dtype
    torch.testing.assert_close(q.float(), hif8.quantize(x.float(), rounding, backend="torch"),
                               rtol=0, atol=0, equal_nan=True)


def test_saturate_clamps_to_max():
    x = np.array([40960.0, 1e9, np.inf, -40960.0, -np.inf, 32768.0, 36000.0, 100.0, np.nan], dtype=np.float32)
    assert enc(x, saturate=True).tolist() == [0x6E, 0x6E, 0x6E, 0xEE, 0xEE, 0x6E, 0x6E, 0x4A, 0x80]
    assert enc(x).tolist() == [0x6F, 0x6F, 0x6F, 0xEF, 0xEF, 0x6E, 0x6E, 0x4A, 0x80]  # 100 -> 96
    for rounding in ["ta", "hybrid"]:
        q = hif8.quantize(torch.from_numpy(random_f32(20_000, 5, 10, 20)) * 3, rounding, saturate=True)
        assert q.abs().max().item() == 32768.0 and torch.isfinite(q).all()


def test_quantize_shape_dtype_and_no_negative_zero():
    x = torch.tensor([[-0.0, -1e-9, 3.3], [-2.0 ** -24, 7.0, -1e30]])
    q = hif8.quantize(x)
    assert q.shape == x.shape and q.dtype == x.dtype
    assert not torch.signbit(q[0, :2]).any() and not torch.signbit(q[1, 0])
    assert q[0, 2].item() == 3.25 and q[1, 2].item() == -math.inf


def test_errors():
    with pytest.raises(ValueError, match="rounding"):
        hif8.encode(torch.ones(3), rounding="nearest")
    with pytest.raises(ValueError, match="rounding"):
        hif8.quantize_scaled(torch.ones(3), 15.0, rounding="sr")
    with pytest.raises(TypeError, match="float32"):
        hif8.encode(torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="float64"):
        hif8.quantize(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="Tensor"):
        hif8.encode([1.0, 2.0])
    with pytest.raises(TypeError, match="uint8"):
        hif8.decode(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        hif8.encode(torch.ones(3), backend="cuda")


def test_empty_and_noncontiguous():
    assert hif8.encode(torch.empty(0, 3)).shape == (0, 3)
    x = torch.from_numpy(random_f32(4000, 6)).reshape(40, 100)
    assert torch.equal(hif8.encode(x.t()), hif8.encode(x).t())


# ---------------------------------------------------------------------------------- properties

FINITE_VALUES = sorted({float(TABLE[c]) for c in FINITE_CODES})
f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FINITE_VALUES), st.sampled_from(["ta", "hybrid"]))
def test_roundtrip_representable(v, rounding):
    x = torch.tensor([v, -v])
    y = hif8.decode(hif8.encode(x, rounding))
    assert torch.equal(y, x) and not torch.signbit(y[x == 0]).any()  # -0 decodes as +0


@settings(max_examples=300, deadline=None)
@given(f32, f32)
def test_monotone(a, b):
    a, b = min(a, b), max(a, b)
    qa, qb = hif8.quantize(torch.tensor([a, b])).tolist()
    assert qa <= qb


def test_monotone_sorted_sweep():
    x = np.sort(random_f32(300_000, 7))
    q = hif8.quantize(torch.from_numpy(x)).numpy()
    assert np.all(q[1:] >= q[:-1])


@settings(max_examples=300, deadline=None)
@given(f32, st.sampled_from(["ta", "hybrid"]), st.booleans())
def test_quantize_idempotent(a, rounding, saturate):
    q = hif8.quantize(torch.tensor([a]), rounding, saturate)
    assert torch.equal(hif8.quantize(q, rounding, saturate), q)


# ---------------------------------------------------------------------------------- hybrid

def _neighbours(x: np.ndarray):
    """Largest representable <= |x| and smallest representable >= |x| (float64), HiF8 finite values."""
    a = np.abs(x.astype(np.float64))
    grid = POS_VALUES.astype(np.float64)
    lo = grid[np.clip(np.searchsorted(grid, a, side="right") - 1, 0, None)]
    hi = grid[np.clip(np.searchsorted(grid, a, side="left"), None, len(grid) - 1)]
    return lo, hi


def test_hybrid_brackets_and_ta_for_small_exponents():
    x = random_f32(400_000, 8, -26, 15)
    x = x[np.abs(x) < 40960]
    q = hif8.quantize(torch.from_numpy(x), "hybrid").numpy().astype(np.float64)
    lo, hi = _neighbours(x)
    a = np.abs(q)
    assert np.all((a == lo) | (a == hi))
    assert np.all((q == 0) | (np.sign(q) == np.sign(x)))
    e = np.floor(np.log2(np.abs(x.astype(np.float64))))
    small = np.abs(e) < 4
    assert small.any() and (~small).any()
    ta = enc(x)
    assert_codes_equal(x[small], enc(x[small], rounding="hybrid"), ta[small])
    # both directions happen where the rule applies (it is not just truncation or rounding up)
    inexact = (lo != hi) & ~small
    assert (a[inexact] == lo[inexact]).mean() > 0.2 and (a[inexact] == hi[inexact]).mean() > 0.2


def _hybrid_scalar(x: np.float32) -> float:
    """The hybrid rule written independently, with Python ints on one float32 (positive, < 40960)."""
    bits = int(np.array([x], dtype=np.float32).view(np.uint32)[0])
    e = (bits >> 23) - 127
    frac = bits & 0x7FFFFF
    if abs(e) < 4:
        return float(ref_decode(ref_encode([x]))[0])  # TA, from en_dtypes
    if e < -23:
        return 0.0
    if e == -23:  # grid {0, 2^-22}; discarded bits: the hidden 1 then 23 mantissa bits
        top14, low14 = (1 << 13) | (frac >> 10), frac & 0x3FFF
        return 2.0 ** -22 if top14 >= low14 else 0.0
    m = 0 if e < -15 else (3 if abs(e) <= 3 else 2 if abs(e) <= 7 else 1)
    d = 23 - m
    kept, disc = frac >> d, frac & ((1 << d) - 1)
    up = disc != 0 and (disc >> (d - 14)) >= (frac & 0x3FFF)
    return min((1 + (kept + up) / 2 ** m) * 2.0 ** e, 32768.0)


def _f32(bits: int) -> np.float32:
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def test_hybrid_hand_examples():
    cases = [
        # 17 = 16 * (1 + 2^-4): m = 2 kept bits 00, discarded 21 bits 0x080000 -> top14 = 0x1000,
        # low14 = 0 -> up: 20 (TA gives 16).
        (np.float32(17.0), 20.0, 16.0),
        # bits 0x4197FFFF = 16 * (1 + 0x17FFFF / 2^23) ~ 18.99999: discarded 0x17FFFF -> top14 =
        # 0x17FFFF >> 7 = 12287 < low14 = 0x3FFF = 16383 -> down: 16 (TA gives 20).
        (_f32(0x4197FFFF), 16.0, 20.0),
        # bits 0x41801FFF: discarded 0x1FFF -> top14 = 63 < low14 = 8191 -> down: 16.
        (_f32(0x41801FFF), 16.0, 16.0),
        # exactly representable: unchanged (the rule read literally, 0 >= 0, would give 20).
        (np.float32(16.0), 16.0, 16.0),
        # [2^-23, 2^-22) with mantissa 0: top14 = 2^13 >= low14 = 0 -> 2^-22.
        (np.float32(2.0 ** -23), 2.0 ** -22, 2.0 ** -22),
        # bits (104 << 23) | 0x3FFF: top14 = 8192 + 15 = 8207 < low14 = 16383 -> 0 (TA: 2^-22).
        (_f32((104 << 23) | 0x3FFF), 0.0, 2.0 ** -22),
        # 33000 in [2^15, 1.25 * 2^15): stays 32768, never the Inf slot.
        (np.float32(33000.0), 32768.0, 32768.0),
    ]
    for x, want_hr, want_ta in cases:
        assert _hybrid_scalar(x) == want_hr, x
        got = hif8.quantize(torch.tensor([x, -x]), "hybrid").tolist()
        assert got == [want_hr, -want_hr if want_hr else 0.0], (x, got)
        assert hif8.quantize(torch.tensor([x])).item() == want_ta


def test_hybrid_matches_scalar_rule():
    x = np.abs(random_f32(20_000, 9, -25, 15))
    x = x[x < 40960]
    got = hif8.quantize(torch.from_numpy(x), "hybrid").numpy()
    want = np.array([_hybrid_scalar(v) for v in x], dtype=np.float32)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (x[bad[:5]], got[bad[:5]], want[bad[:5]])


def test_hybrid_overflow_edges():
    x = np.array([40960.0, 1e20, np.inf, 32768.0, 40959.996, np.nan], dtype=np.float32)
    assert enc(x, rounding="hybrid").tolist() == [0x6F, 0x6F, 0x6F, 0x6E, 0x6E, 0x80]
    assert enc(-x, rounding="hybrid", saturate=True).tolist() == [0xEE, 0xEE, 0xEE, 0xEE, 0xEE, 0x80]


# ---------------------------------------------------------------------------------- quantize_scaled

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_max", [15.0, 224.0])
def test_quantize_scaled_error_bound(dtype, scale_max):
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(50_000, generator=g) * torch.exp(torch.randn(50_000, generator=g) * 2)).to(dtype)
    q = hif8.quantize_scaled(x, scale_max)
    assert q.dtype == dtype and q.shape == x.shape
    xf, qf = x.double(), q.double()
    amax = xf.abs().max()
    # The largest element maps to scale_max (a HiF8 value) and back.
    i = xf.abs().argmax()
    assert torch.isclose(qf[i], xf[i], rtol=1e-6, atol=0)
    # Elements scaled into HiF8's normal range: relative error <= half a HiF8 ulp of their binade,
    # 2^-(m+1) with m = 3, 2, 1 mantissa bits for |exponent| <= 3, <= 7, <= 15; plus slack for the
    # float32 scale/unscale (and the bfloat16 output rounding).
    y = xf * scale_max / amax
    ay = y.abs()
    ae = torch.floor(torch.log2(ay)).abs()
    bound = torch.where(ae <= 3, 2.0 ** -4, torch.where(ae <= 7, 2.0 ** -3, 2.0 ** -2))
    normal = ay >= 2.0 ** -15
    rel = ((qf - xf).abs() / xf.abs())[normal]
    slack = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6
    assert (rel <= bound[normal] + slack).all()
    # Everything else is tiny: absolute error below the smallest normal, unscaled.
    assert ((qf - xf).abs()[~normal] <= 2.0 ** -15 * amax / scale_max).all()


def test_quantize_scaled_zeros_and_specials():
    z = torch.zeros(5)
    assert torch.equal(hif8.quantize_scaled(z, 15.0), z)
    x = torch.tensor([0.0, 3.0, -1.5, 0.0])
    q = hif8.quantize_scaled(x, 15.0)
    assert q[0] == 0 and q[3] == 0 and q[1] == 3.0 and q[2] == -1.5
    x = torch.tensor([1.0, float("inf"), float("nan"), -2.0])
    q = hif8.quantize_scaled(x, 15.0)  # non-finite max: scale 1, specials pass through
    assert q[0] == 1.0 and q[1] == math.inf and math.isnan(q[2]) and q[3] == -2.0
    x = torch.tensor([1e-30, -3e-31])  # tiny tensors are scaled up, not flushed to zero
    assert torch.allclose(hif8.quantize_scaled(x, 15.0), x, rtol=2.0 ** -4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_max", [15.0, 224.0])
def test_a_subnormal_max_does_not_overflow_the_scale(dtype, scale_max):
    """max|x| below scale_max / FLT_MAX: scale_max / max|x| is inf, and 0 * inf made every element
    NaN. Such a tensor is below HiF8's smallest value everywhere: it quantizes to zeros."""
    x = torch.tensor([1e-39, -5e-40, 0.0]).to(dtype)
    assert torch.equal(hif8.quantize_scaled(x, scale_max), torch.zeros(3, dtype=dtype))
    assert torch.equal(hif8.quantize_scaled(x, scale_max, amax=torch.tensor(1e-39)), torch.zeros(3, dtype=dtype))
    codes, s = hif8.encode_scaled(x, scale_max)
    assert float(s) == 1.0 and torch.equal(codes, torch.zeros(3, dtype=torch.uint8))
    big = torch.tensor([1e-36, 0.0])  # the quotient is finite: scaled as usual
    assert torch.allclose(hif8.quantize_scaled(big, scale_max), big, rtol=2.0 ** -4)


@pytest.mark.parametrize("scale_max", [0.0, -1.0, float("inf"), float("nan"), 50000.0])
def test_scale_max_out_of_range_is_refused(scale_max):
    with pytest.raises(ValueError, match=r"must be in \(0, 32768\]"):
        hif8.quantize_scaled(torch.randn(4), scale_max)
    with pytest.raises(ValueError, match=r"must be in \(0, 32768\]"):
        hif8.encode_scaled(torch.randn(4), scale_max)
