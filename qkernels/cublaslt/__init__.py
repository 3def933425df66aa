"""cuBLASLt int8 GEMM with a per-shape algorithm search and a CuPy dequantization epilogue.

    _lib.py      ctypes binding to the libcublasLt torch already loaded (why: see there)
    plan.py      pure layout planning: row-major torch tensors -> column-major cuBLASLt operands
    matmul.py    int8 x int8 -> int32 GEMM, algorithm search and cache, workspace
    epilogue.py  acc * a_scale * w_scale + bias -> bf16/fp16/fp32, a CuPy RawKernel

Importing this package imports torch and ctypes only. CuPy and libcublasLt are loaded by
:func:`enable`, which the ``int8-cublaslt`` backend calls when a layer is prepared.

The GEMM + epilogue is one op, :data:`int8_mm_dequant`, declared with a plain-PyTorch reference
(``torch._int_mm`` + the fp32 epilogue), so ``torch.compile(fullgraph=True)`` sees one opaque op.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops import KernelOp

__all__ = ["int8_mm_dequant", "enable", "enabled"]


int8_mm_dequant = KernelOp("cublaslt_int8_mm_dequant", ops.int8_mm_dequant_reference, ops.gemm_fake)


def _cuda(a, a_scale, w, w_scale, bias, out_dtype):
    from . import epilogue, matmul

    if a.device.index != torch.cuda.current_device():
        with torch.cuda.device(a.device):  # CuPy and cuBLASLt launch on the current device
            return _cuda(a, a_scale, w, w_scale, bias, out_dtype)
    acc = matmul.int8_gemm(a, w)
    return epilogue.dequant_epilogue(acc, a_scale, w_scale, bias, out_dtype)


_enabled = False


def enable() -> None:
    """Load CuPy and libcublasLt and route :data:`int8_mm_dequant` on CUDA through them.
    Raises ImportError / OSError with the cause if either is missing."""
    global _enabled
    if _enabled:
        return
    import cupy  # noqa: F401

    from . import _lib

    _lib.lib()
    int8_mm_dequant.register("cuda", _cuda)
    _enabled = True


def enabled() -> bool:
    return _enabled
