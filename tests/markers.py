"""Skip markers shared by the test modules: kernels that need Triton's CPU interpreter or a GPU; and
a stand-in for a GPU machine's Triton, for lowering decisions taken on this CPU."""
import pytest
import torch

from osp_compile.hif8 import triton_kernels

_INTERP_UNAVAILABLE = triton_kernels.unavailable_reason("cpu")
needs_interp = pytest.mark.skipif(_INTERP_UNAVAILABLE is not None,
                                  reason=f"Triton's interpreter cannot run here: {_INTERP_UNAVAILABLE}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
needs_sm89 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                                reason="FP8 tensor cores need CUDA capability >= 8.9")


def as_if_triton_on_cuda(monkeypatch) -> None:
    """Lowering and the kernels see Triton usable on CUDA, as on a GPU machine (the kernels then run
    interpreted, or emulated, on the CPU tensors of the test)."""
    monkeypatch.setattr(triton_kernels, "triton_available", lambda device="cuda": True)
    monkeypatch.setattr(triton_kernels, "cuda_unavailable_reason", lambda: None)
