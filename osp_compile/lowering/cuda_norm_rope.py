"""CUDA: ``osp::rms_norm_rope`` as one Triton pass over the activation (``passes/norm_rope.py``).

One program per token: it reads the token's row ``GROUP`` heads at a time (``[GROUP, head_dim]``,
contiguous, vectorized) for the RMSNorm's sum of squares, then again (from cache) to normalize,
split each head's interleaved pairs in registers (``tl.split``), rotate them with the token's
row of the tables and store. The activation is read from memory once and written once, where
Inductor's fused kernel reads each element's partner again with a gather per element (H100,
Wan-14B q at 720P: 0.64 ms, 2.4 TB/s; Inductor's q and k kernel 1.70 ms for both). Each step is
rounded to ``x``'s dtype where the op's calls round (the norm's ``type_as``, the product with the
weight, the rotated output); the float32 arithmetic between may contract into FMAs, so a bfloat16
element can land on the neighbouring value (1.4e-5 of them there; tested).

Chosen for float16/bfloat16/float32 inputs with a power-of-two head_dim, without autograd (no
backward here; a training graph keeps the op's calls, which Inductor fuses as before). Triton's
CPU interpreter runs the same kernel in the tests (its casts truncate, so those use float32).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from osp_compile.hif8 import triton_kernels
from osp_compile.ops import _rms_norm_rope
from passes.fx_utils import call_args, differentiated, meta_value
from passes.norm_rope import table_fits

from .registry import register_kernel

tl = None  # triton.language, set by _kernel() (see hif8/triton_kernels' module docstring)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rms_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, tokens, heads, table_stride, eps,
                          GROUP: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, GROUP)[:, None]
    d = tl.arange(0, D)[None, :]
    dtype = x_ptr.dtype.element_ty
    x_row, out_row = x_ptr + row * heads * D, out_ptr + row * heads * D
    total = 0.0
    for h0 in range(0, heads, GROUP):  # the row's sum of squares, GROUP heads at a time
        x = tl.load(x_row + (h0 + h) * D + d, mask=h0 + h < heads, other=0.0).to(tl.float32)
        squares = tl.reshape(x * x, [GROUP * D])
        total += tl.reduce(squares, 0, tl.standard._sum_combine)  # tl.sum, in a form the interpreter runs too
    rstd = tl.math.rsqrt(total / (heads * D) + eps)
    table = (row % tokens) * table_stride + tl.arange(0, D)
    cos_e, cos_o = tl.split(tl.reshape(tl.load(cos_ptr + table).to(tl.float32), [D // 2, 2]))
    sin_e, sin_o = tl.split(tl.reshape(tl.load(sin_ptr + table).to(tl.float32), [D // 2, 2]))
    for h0 in range(0, heads, GROUP):  # normalize, rotate, store (the row is in cache from the first loop)
        inb = h0 + h < heads
        offs = (h0 + h) * D + d
        x = tl.load(x_row + offs, mask=inb, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        y = ((x * rstd).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)  # type_as(x), then * weight
        even, odd = tl.split(tl.reshape(y, [GROUP, D // 2, 2]))
        out = tl.join(even * cos_e[None, :] - odd * sin_e[None, :], odd * cos_o[None, :] + even * sin_o[None, :])
        tl.store(out_row + offs, tl.reshape(out, [GROUP, D]).to(dtype), mask=inb)


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The kernel, autotuned over GROUP and warps for CUDA, or for the interpreter (whose launches
    pass GROUP). Its sum is ``tl.reduce`` over ``tl.standard``'s combine function, as in
    ``hif8/triton_fp8.py``: an interpreter entered without ``TRITON_INTERPRET`` cannot call
    ``tl.sum``, a compiled ``@jit`` function."""
    global tl
    triton, tl, wrap = triton_kernels.jit_wrapper(interpret)
    kernel = wrap(_rms_norm_rope_kernel)
    if interpret:
        return kernel
    configs = [triton.Config({"GROUP": g}, num_warps=w) for g in (4, 8, 16) for w in (2, 4, 8)]
    return triton.autotune(configs, key=["heads", "D"])(kernel)


def _launch(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    width = x.shape[-1]
    head_dim = width // heads
    out_shape = (*x.shape[:-1], heads, head_dim)
    if not (table_fits(cos.shape, out_shape) and table_fits(sin.shape, out_shape) and x.dtype in DTYPES):
        return _rms_norm_rope(x, weight, eps, cos, sin, heads)  # the op's calls (documented fallback)
    xc = x.contiguous()
    tokens = cos.shape[-3]
    rows = xc.numel() // width
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    tables = [t.reshape(-1, head_dim).contiguous() for t in (cos, sin)]
    args = (xc, weight.contiguous(), *tables, out, tokens, heads, head_dim if tokens > 1 else 0, float(eps))
    interpret = x.device.type == "cpu"
    with triton_kernels._on(x.device):
        _kernel(interpret)[(rows,)](*args, D=head_dim, **({"GROUP": 4} if interpret else {}))
    return out


@torch.library.custom_op("osp_cuda::rms_norm_rope", mutates_args=())
def rms_norm_rope_triton(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    """``osp::rms_norm_rope`` in one Triton kernel (CUDA, or Triton's CPU interpreter), as an opaque
    op; tables that are not one row per token shared by every head (`table_fits`) take the op's
    calls instead."""
    return _launch(x, weight, eps, cos, sin, heads)


@rms_norm_rope_triton.register_fake
def _(x, weight, eps, cos, sin, heads):
    return x.new_empty((*x.shape[:-1], heads, x.shape[-1] // heads))


def refusal(node) -> str | None:
    """Why the Triton kernel cannot run this ``osp::rms_norm_rope`` node (None: it can)."""
    a = call_args(node, ["x", "weight", "eps", "cos", "sin", "heads"])
    x, w = meta_value(a["x"]), meta_value(a["weight"])
    if not all(isinstance(t, torch.Tensor) for t in (x, w)):
        return "no example values for the inputs"
    unavailable = triton_kernels.cuda_unavailable_reason()
    if unavailable:
        return unavailable
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype}: the kernel takes float16, bfloat16 or float32"
    head_dim = x.shape[-1] // a["heads"]
    if head_dim < 2 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two (Triton's tiles)"
    if differentiated(x, w, a["cos"], a["sin"]):
        return "autograd: the kernel has no backward (training keeps the op's calls)"
    return None


register_kernel("rms_norm_rope", "cuda", name="Triton RMSNorm + RoPE (one pass, pairs split in registers)",
                check=refusal)(torch.ops.osp_cuda.rms_norm_rope.default)
