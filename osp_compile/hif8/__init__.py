"""HiFloat8 (HiF8): Huawei's tapered 8-bit float, as a torch codec plus optional Triton kernels.

``encode``/``decode``/``quantize``/``quantize_scaled`` (in ``api.py``) take ``backend="auto"``:
Triton kernels for CUDA tensors when Triton is importable, else the torch reference codec
(``codec.py``); the two are bit-identical.  Importing this package never imports Triton.

Linears (issue 4): ``qat.py`` (``osp::hif8_qat_linear``, OSP-Next's QAT recipe), ``inference.py``
(``osp::hif8_linear`` on stored codes, the weight store and its state dict), ``release.py``
(dropping the float weights of a converted inference model), ``group.py`` (one scale over a
sequence-parallel group), ``fp8.py`` (exact transcode to E4M3 for FP8 tensor cores),
``triton_gemm.py`` / ``triton_fp8.py`` (CUDA kernels).
"""
from .api import BACKENDS, decode, encode, encode_scaled, quantize, quantize_scaled
from .codec import HIF8_MAX, ROUNDINGS, decode_table
from .triton_kernels import decode_triton, encode_triton, quantize_triton, triton_available
from .qat import hif8_qat_linear  # defines osp::hif8_fake_quant and osp::hif8_qat_linear
from .inference import HiF8WeightStore, hif8_linear, hif8_state_dict, load_hif8_state_dict
from .release import HiF8Linear, release_float_weights

__all__ = [
    "HIF8_MAX", "ROUNDINGS", "BACKENDS", "encode", "encode_scaled", "decode", "quantize", "quantize_scaled",
    "decode_table",
    "encode_triton", "decode_triton", "quantize_triton", "triton_available",
    "hif8_qat_linear", "hif8_linear", "HiF8WeightStore", "hif8_state_dict", "load_hif8_state_dict",
    "HiF8Linear", "release_float_weights",
]
