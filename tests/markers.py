"""Skip markers shared by the test modules: kernels that need Triton's CPU interpreter or a GPU."""
import pytest
import torch

from osp_compile.hif8 import triton_kernels

needs_interp = pytest.mark.skipif(not triton_kernels.triton_available("cpu"), reason="no Triton interpreter")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
