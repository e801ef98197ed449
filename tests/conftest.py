import os
import sys

# idle OpenMP threads must not spin: tests share two cores with spawned ranks and each other
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the FP8 GEMMs' timed picks are not kept between tests (nor in the user's cache): each run times anew
os.environ["OSP_FP8_GEMM_CACHE"] = ""

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test captures anew: Dynamo's caches never leak a graph from one test into another."""
    torch._dynamo.reset()
    yield
