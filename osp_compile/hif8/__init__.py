"""HiFloat8 (HiF8): Huawei's tapered 8-bit float, as a torch codec plus optional Triton kernels.

``encode``/``decode``/``quantize``/``quantize_scaled`` (in ``api.py``) take ``backend="auto"``:
Triton kernels for CUDA tensors when Triton is importable, else the torch reference codec
(``codec.py``); the two are bit-identical.  Importing this package never imports Triton.
"""
from .api import BACKENDS, decode, encode, quantize, quantize_scaled
from .codec import HIF8_MAX, ROUNDINGS, decode_table
from .triton_kernels import decode_triton, encode_triton, quantize_triton, triton_available

__all__ = [
    "HIF8_MAX", "ROUNDINGS", "BACKENDS", "encode", "decode", "quantize", "quantize_scaled", "decode_table",
    "encode_triton", "decode_triton", "quantize_triton", "triton_available",
]
