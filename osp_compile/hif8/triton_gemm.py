"""Triton GEMM on HiF8 codes: both operands are decoded inside the kernel.

    out = (decode(x_codes) @ decode(w_codes)^T) / (s_x * s_w) + bias

The portable CUDA path of ``osp::hif8_linear`` (any GPU Triton supports; the FP8 path needs
capability 8.9).  The activation is encoded first (``api.encode_scaled``: per-tensor scale 15,
one fused Triton pass), so the GEMM reads one byte per element of both operands.  Inside, each
tile of codes goes through the 256-entry value table as float16 -- which holds every HiF8 value
exactly (2^-22 .. 2^15) -- and ``tl.dot`` accumulates the exact products in float32.
Built from one body for CUDA and for Triton's CPU interpreter (see ``triton_kernels``).
"""
from __future__ import annotations

import functools

import torch

from . import api, codec, triton_kernels
from .group import group_amax
from .qat import X_SCALE_MAX

tl = None  # triton.language, set by _kernel()

_CUDA_BLOCKS = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
_INTERPRET_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)


def _decode_gemm_kernel(a_ptr, b_ptr, table_ptr, dequant_ptr, bias_ptr, out_ptr, M, N, K,
                        stride_am, stride_bn, stride_om, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    # grouped program order: GROUP_M row blocks share the column blocks they read (L2 reuse)
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rm[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a_codes = tl.load(a_rows + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        b_codes = tl.load(b_cols + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        a = tl.load(table_ptr + a_codes.to(tl.int32))  # code 0 (the padding) decodes to 0
        b = tl.load(table_ptr + b_codes.to(tl.int32))
        acc += tl.dot(a, b)
    acc = acc * tl.load(dequant_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    global tl
    _, tl, wrap = triton_kernels.jit_wrapper(interpret)
    return wrap(_decode_gemm_kernel)


@functools.lru_cache(maxsize=None)
def _table_f16(device: torch.device) -> torch.Tensor:
    return codec.decode_table().to(torch.float16).to(device)


def hif8_gemm(a_codes: torch.Tensor, b_codes: torch.Tensor, dequant: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``(decode(a_codes) @ decode(b_codes)^T) * dequant + bias`` for uint8 codes [M, K] and [N, K]."""
    if a_codes.dtype != torch.uint8 or b_codes.dtype != torch.uint8:
        raise TypeError("hif8_gemm takes uint8 HiF8 codes")
    a, b = a_codes.contiguous(), b_codes.contiguous()
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}^T")
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    interpret = a.device.type == "cpu"
    blocks = _INTERPRET_BLOCKS if interpret else _CUDA_BLOCKS
    grid = (max(1, -(-m // blocks["BLOCK_M"]) * -(-n // blocks["BLOCK_N"])),)
    dequant = dequant.to(torch.float32).reshape(1)
    if m and n:
        with triton_kernels._on(a.device):
            _kernel(interpret)[grid](a, b, _table_f16(a.device), dequant, bias if bias is not None else dequant, out,
                                     m, n, k, a.stride(0), b.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                                     **blocks)
    return out


def hif8_linear_triton(x: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None,
                       scale: torch.Tensor, group: str = "", amax: torch.Tensor | None = None) -> torch.Tensor:
    """``osp::hif8_linear`` on the decode GEMM: encode ``x`` (scale 15, over the SP ``group``'s
    absmax where ``x`` is a shard: ``group.py``; ``amax`` as there), then `hif8_gemm`."""
    k = x.shape[-1]
    x_codes, x_scale = api.encode_scaled(x.reshape(-1, k), X_SCALE_MAX, backend="triton",
                                         amax=group_amax(x, group, amax))
    out = hif8_gemm(x_codes, codes, 1.0 / (x_scale * scale.to(torch.float32)), bias, x.dtype)
    return out.reshape(*x.shape[:-1], codes.shape[0])
