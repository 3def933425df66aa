import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Run the Triton kernels on CPU through the interpreter. Set before anything imports triton:
    # triton.jit reads it when a kernel is decorated. It also makes int8-triton / fp8-triton
    # available on CPU, so the generic backend matrix covers them.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/run_gpu_suite.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different, reproducible seed per test: fresh inputs each case, never shared zeros.
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
