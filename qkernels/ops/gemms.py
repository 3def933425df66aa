"""GEMM ops of the Triton backends, each a :class:`KernelOp` whose reference is plain PyTorch.

The "cuda" implementations are the launchers in ``qkernels.triton``, registered lazily by
``qkernels.backends.triton_backends`` (nothing here imports triton). The references define the
arithmetic the kernels must reproduce, and run wherever no kernel is registered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import formats
from . import KernelOp, dequant_epilogue, gemm_fake, int8_mm_dequant_reference, int_mm

__all__ = ["int8_gemm", "int8_static_gemm", "fp8_gemm", "fp8_gemm_tma", "weight_only_gemm", "dequantize_weight"]


def _int8_static_gemm_ref(
    x: torch.Tensor,
    scale: torch.Tensor,
    smooth: torch.Tensor | None,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    q, row_scale = formats.quantize_per_tensor(x, scale, "w8a8-int8", smooth)
    return dequant_epilogue(int_mm(q, w), row_scale, w_scale, bias, x.dtype)


def _int8_static_gemm_fake(x, scale, smooth, w, w_scale, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


def _fp8_gemm_ref(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    # e4m3 x e4m3 products are exact in fp32 (4-bit significands); only the sum rounds.
    return dequant_epilogue(a.float() @ w.float().t(), a_scale, w_scale, bias, out_dtype)


def _dequantize_weight_ref(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return formats.dequantize_weight(q, scale, dtype)


def _dequantize_weight_fake(q, scale, dtype):
    return q.new_empty(q.shape, dtype=dtype)


# The layerwise backends' per-call upcast (a Triton kernel on CUDA).
dequantize_weight = KernelOp("dequantize_weight", _dequantize_weight_ref, _dequantize_weight_fake)


def _weight_only_gemm_ref(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    wd = dequantize_weight(w, w_scale, x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, wd, bias)


def _weight_only_gemm_fake(x, w, w_scale, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


int8_gemm = KernelOp("int8_gemm", int8_mm_dequant_reference, gemm_fake)
int8_static_gemm = KernelOp("int8_static_gemm", _int8_static_gemm_ref, _int8_static_gemm_fake)
fp8_gemm = KernelOp("fp8_gemm", _fp8_gemm_ref, gemm_fake)
# The experimental persistent TMA kernel (qkernels.triton.fp8_gemm_tma): the same product.
fp8_gemm_tma = KernelOp("fp8_gemm_tma", _fp8_gemm_ref, gemm_fake)
weight_only_gemm = KernelOp("weight_only_gemm", _weight_only_gemm_ref, _weight_only_gemm_fake)
