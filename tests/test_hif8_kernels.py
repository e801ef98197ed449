"""Triton HiF8 kernels == the torch codec, bit for bit.

On CPU the kernels run under Triton's interpreter, which ``triton_kernels`` builds directly (no
``TRITON_INTERPRET=1`` needed before importing triton); it is slow, so sizes stay at a few
thousand elements.  With a GPU, the compiled kernels are also checked at larger sizes.
Run: ``pytest tests/test_hif8_kernels.py`` (on a CUDA machine the GPU tests run too).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import osp_compile.hif8 as hif8
from osp_compile.hif8 import codec, triton_kernels

pytest.importorskip("triton")

from markers import needs_cuda, needs_interp  # noqa: E402
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPECIALS = [float("nan"), float("inf"), -float("inf"), -0.0, 40960.0, -40959.996, 32768.0,
            2.0 ** -23, -(2.0 ** -23), 1.5 * 2.0 ** -22, 1e-40, 1e30, 17.0, -1.5]


def random_f32(n: int, seed: int, emin: int = -26, emax: int = 17, device="cpu") -> torch.Tensor:
    """Random sign, exponent uniform in [emin, emax], random mantissa bits; specials up front."""
    rng = np.random.default_rng(seed)
    sign = rng.integers(0, 2, n, dtype=np.uint32) << 31
    exp = (rng.integers(emin, emax + 1, n) + 127).astype(np.uint32) << 23
    mant = rng.integers(0, 1 << 23, n, dtype=np.uint32)
    x = torch.from_numpy((sign | exp | mant).view(np.float32).copy())
    x[: len(SPECIALS)] = torch.tensor(SPECIALS)
    return x.to(device)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    """Equal dtype/shape and identical bits, except that any NaN matches any NaN (payloads differ
    between float32 -> bfloat16 conversions of torch and Triton)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.uint8:
        bad = (a != b).nonzero().flatten()
    else:
        ia = a.view(torch.int16 if a.element_size() == 2 else torch.int32)
        ib = b.view(ia.dtype)
        bad = ((ia != ib) & ~(a.isnan() & b.isnan())).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} differ, first at {bad[:5].tolist()}: {a[bad[:5]]} vs {b[bad[:5]]}"


# ---------------------------------------------------------------------------------- interpreter

@needs_interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["ta", "hybrid"])
@pytest.mark.parametrize("saturate", [False, True])
def test_encode_interpreter(dtype, rounding, saturate):
    x = random_f32(3000, 1).to(dtype)
    got = hif8.encode_triton(x, rounding, saturate)
    assert_same_bits(got, codec.encode(x, rounding, saturate))


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["ta", "hybrid"])
def test_quantize_interpreter(dtype, rounding):
    x = random_f32(3000, 2).to(dtype).reshape(30, 100)
    got = hif8.quantize_triton(x, rounding=rounding)
    assert_same_bits(got, codec.quantize(x, rounding))
    assert_same_bits(hif8.quantize_triton(x, rounding=rounding, saturate=True),
                     codec.quantize(x, rounding, saturate=True))


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_interpreter(dtype):
    codes = torch.cat([torch.arange(256, dtype=torch.int32),
                       torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(3))])
    codes = codes.to(torch.uint8)
    assert_same_bits(hif8.decode_triton(codes, dtype), codec.decode(codes, dtype))


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["ta", "hybrid"])
def test_scaled_interpreter(dtype, rounding):
    x = (torch.randn(3000, generator=torch.Generator().manual_seed(4)) * 5).to(dtype)
    want = codec.quantize_scaled(x, 224.0, rounding)
    assert_same_bits(hif8.quantize_scaled(x, 224.0, rounding, backend="triton"), want)
    # an explicit scale, as a float and as a tensor: quantize(x * s) / s in float32
    s = 3.7
    ref = (codec.quantize(x.float() * torch.tensor(s), rounding) / torch.tensor(s)).to(dtype)
    assert_same_bits(hif8.quantize_triton(x, scale=s, rounding=rounding), ref)
    assert_same_bits(hif8.quantize_triton(x, scale=torch.tensor([s]), rounding=rounding), ref)


@needs_interp
def test_interpreter_shapes():
    x = random_f32(2 * 1536, 5).reshape(48, 64).t()  # non-contiguous, and n not a BLOCK multiple
    assert_same_bits(hif8.encode_triton(x), codec.encode(x))
    assert hif8.encode_triton(torch.empty(0, 4)).shape == (0, 4)
    assert hif8.quantize_triton(torch.tensor(2.9)).item() == 3.0  # 0-dim


# ---------------------------------------------------------------------------------- dispatch

def _spy(monkeypatch):
    calls = []
    for name in ["encode_triton", "decode_triton", "quantize_triton"]:
        real = getattr(triton_kernels, name)

        def wrapper(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(triton_kernels, name, wrapper)
    return calls


def test_dispatch_cpu_auto_and_torch_use_torch(monkeypatch):
    calls = _spy(monkeypatch)
    x = random_f32(1000, 6)
    for backend in ["auto", "torch"]:
        c = hif8.encode(x, backend=backend)
        hif8.decode(c, backend=backend)
        hif8.quantize(x, backend=backend)
        hif8.quantize_scaled(x, 15.0, backend=backend)
    assert calls == []


@needs_interp
def test_dispatch_cpu_triton(monkeypatch):
    calls = _spy(monkeypatch)
    x = random_f32(1000, 7)
    c = hif8.encode(x, "hybrid", backend="triton")
    assert_same_bits(c, codec.encode(x, "hybrid"))
    assert_same_bits(hif8.decode(c, torch.float16, backend="triton"), codec.decode(c, torch.float16))
    assert_same_bits(hif8.quantize(x, backend="triton"), codec.quantize(x))
    hif8.quantize_scaled(x, 15.0, backend="triton")
    assert calls == ["encode_triton", "decode_triton", "quantize_triton", "quantize_triton"]


def test_dispatch_errors_and_no_triton(monkeypatch):
    x = torch.ones(4)
    with pytest.raises(ValueError, match="backend"):
        hif8.quantize(x, backend="gpu")
    with pytest.raises(ValueError, match="rounding"):
        hif8.encode_triton(x, rounding="rne")
    with pytest.raises(TypeError, match="uint8"):
        hif8.decode_triton(torch.ones(3))
    monkeypatch.setattr(triton_kernels, "_import_triton", lambda: (None, None))
    assert not hif8.triton_available("cpu") and not hif8.triton_available("cuda")
    assert hif8.quantize(x).tolist() == [1.0] * 4  # auto falls back to torch
    with pytest.raises(RuntimeError, match="Triton"):
        hif8.encode(x, backend="triton")


@needs_interp
def test_an_interpreter_that_fails_the_probe_is_not_used(monkeypatch):
    """A Triton whose interpreter cannot run a kernel's loop (Triton 3.6 under NumPy 2) counts as
    no CPU Triton, with the reason, rather than failing inside a conversion."""
    class Broken:
        def __getitem__(self, grid):
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(triton_kernels, "_loop_probe", lambda interpret: Broken())
    triton_kernels._probe_failure.cache_clear()
    try:
        assert not hif8.triton_available("cpu")
        assert "only 0-dimensional arrays" in triton_kernels.interpreter_unavailable_reason()
        with pytest.raises(RuntimeError, match="Triton cannot run on cpu here .*only 0-dimensional arrays"):
            hif8.encode(torch.ones(4), backend="triton")
    finally:
        monkeypatch.undo()
        triton_kernels._probe_failure.cache_clear()
    assert hif8.triton_available("cpu")  # the real interpreter, probed again


def test_import_does_not_import_triton():
    code = ("import sys, torch, osp_compile.hif8 as h; "
            "h.quantize(torch.ones(3)); assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_interp
def test_env_var_interpreter_path():
    """Under TRITON_INTERPRET=1, triton.jit itself returns the interpreter: that path works too."""
    code = ("import torch; from osp_compile.hif8 import codec, triton_kernels as tk; "
            "x = torch.randn(2000) * 100; "
            "assert torch.equal(tk.encode_triton(x, 'hybrid'), codec.encode(x, 'hybrid')); "
            "assert torch.equal(tk.quantize_triton(x), codec.quantize(x))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


# ---------------------------------------------------------------------------------- CUDA

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["ta", "hybrid"])
def test_cuda_kernels_match_codec(dtype, rounding):
    x = random_f32(1 << 22, 8, device="cuda").to(dtype)
    assert hif8.triton_available("cuda")
    codes = hif8.encode(x, rounding)  # auto -> Triton on CUDA
    assert_same_bits(codes, codec.encode(x, rounding))
    assert_same_bits(codes.cpu(), codec.encode(x.cpu(), rounding))  # the torch codec is device-agnostic
    assert_same_bits(hif8.encode(x, rounding, saturate=True), codec.encode(x, rounding, saturate=True))
    assert_same_bits(hif8.quantize(x, rounding), codec.quantize(x, rounding))
    assert_same_bits(hif8.decode(codes, dtype), codec.decode(codes, dtype))
    assert_same_bits(hif8.quantize_scaled(x[len(SPECIALS):], 15.0, rounding),
                     codec.quantize_scaled(x[len(SPECIALS):], 15.0, rounding))


@needs_cuda
def test_cuda_all_codes_and_odd_sizes():
    codes = torch.arange(256, dtype=torch.int32, device="cuda").to(torch.uint8)
    assert_same_bits(hif8.decode(codes).cpu(), hif8.decode_table())
    for n in [1, 1023, 1025, 100_003]:
        x = random_f32(max(n, len(SPECIALS)), n, device="cuda")[:n]
        assert_same_bits(hif8.encode(x), codec.encode(x))
