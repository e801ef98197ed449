"""Public HiF8 entry points: pick the Triton kernels or the torch codec per call.

``backend="auto"`` runs Triton for CUDA tensors when Triton is importable, and the torch codec
otherwise (on CPU the only Triton is the interpreter, far slower than torch).  ``"torch"`` and
``"triton"`` force one; ``"triton"`` on CPU runs the interpreter.  Both give identical bits.
"""
from __future__ import annotations

import torch

from . import codec, triton_kernels

BACKENDS = ("auto", "torch", "triton")


def _use_triton(t: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_kernels.triton_available(t.device):
            raise RuntimeError(f"backend='triton' asked for, but Triton cannot run on {t.device} here "
                               f"({triton_kernels.unavailable_reason(t.device)}); "
                               "use backend='auto' or 'torch'")
        return True
    return t.device.type == "cuda" and triton_kernels.triton_available(t.device)


def encode(x: torch.Tensor, rounding: str = "ta", saturate: bool = False, backend: str = "auto") -> torch.Tensor:
    """HiF8 ``uint8`` codes of ``x`` (float32/bfloat16/float16), same shape.

    ``rounding``: ``"ta"`` (nearest, ties away from zero) or ``"hybrid"``; ``saturate``: map
    overflow and +-Inf to +-32768 instead of +-Inf.  Exact semantics, edges and the reading of
    the hybrid rule: ``osp_compile.hif8.codec.encode``."""
    if isinstance(x, torch.Tensor) and _use_triton(x, backend):
        return triton_kernels.encode_triton(x, rounding, saturate)
    return codec.encode(x, rounding, saturate)


def decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """Values of ``uint8`` HiF8 codes as ``dtype`` (0x80 -> NaN, 0x6F/0xEF -> +-Inf)."""
    if isinstance(codes, torch.Tensor) and _use_triton(codes, backend):
        return triton_kernels.decode_triton(codes, dtype)
    return codec.decode(codes, dtype)


def quantize(x: torch.Tensor, rounding: str = "ta", saturate: bool = False, backend: str = "auto") -> torch.Tensor:
    """``decode(encode(x))`` in ``x``'s dtype (one fused pass on the Triton backend). Detached."""
    if isinstance(x, torch.Tensor) and _use_triton(x, backend):
        return triton_kernels.quantize_triton(x, rounding=rounding, saturate=saturate)
    return codec.quantize(x, rounding, saturate)


def quantize_scaled(x: torch.Tensor, scale_max: float, rounding: str = "ta", backend: str = "auto",
                    amax: torch.Tensor | None = None) -> torch.Tensor:
    """Per-tensor scaled fake-quant ``quantize(x * s) / s``, ``s = scale_max / max|x|`` (1 if that
    max is 0 or not finite).  See ``codec.quantize_scaled``; the Triton path fuses scale, round
    and unscale into one pass with the same float32 arithmetic.  ``amax``: ``max|x|`` computed
    elsewhere, when ``x`` is one shard of the tensor the scale is for (``group.group_amax``)."""
    if isinstance(x, torch.Tensor) and _use_triton(x, backend):
        codec._check_input(x)
        codec._check_rounding(rounding)
        scale = codec._per_tensor_scale(x, scale_max, amax)
        return triton_kernels.quantize_triton(x, scale=scale, rounding=rounding)
    return codec.quantize_scaled(x, scale_max, rounding, amax)


def per_tensor_scale(x: torch.Tensor, scale_max: float, amax: torch.Tensor | None = None) -> torch.Tensor:
    """float32 0-dim ``scale_max / max|x|`` (1 where that max is 0 or not finite): the scale of
    ``quantize_scaled``, for kernels that apply it themselves (no host sync); ``amax`` as there."""
    return codec._per_tensor_scale(x, scale_max, amax)


def encode_scaled(x: torch.Tensor, scale_max: float, rounding: str = "ta", backend: str = "auto",
                  amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, s)``: the HiF8 codes of ``x * s`` with ``s = scale_max / max|x|`` (as in
    ``quantize_scaled``, ``amax`` too), and ``s`` as a float32 0-dim tensor.  ``decode(codes) / s``
    is then exactly ``quantize_scaled(x, scale_max)`` in float32: what a stored HiF8 weight, or an
    activation fed to a HiF8 GEMM, carries."""
    codec._check_input(x)
    codec._check_rounding(rounding)
    scale = per_tensor_scale(x, scale_max, amax)
    if _use_triton(x, backend):
        return triton_kernels.encode_triton(x, rounding, scale=scale), scale
    return codec.encode(x.detach().to(torch.float32) * scale, rounding), scale
