"""Triton kernels for the 8-bit formats (imports triton: load lazily, from a backend).

Naming: ``_name_kernel`` is the ``@triton.jit`` function, ``name(...)`` its launcher, which
checks the inputs and picks the grid. Every launcher takes and returns torch tensors and runs on
CUDA, or on CPU under ``TRITON_INTERPRET=1`` (tests).
"""

from .fp8_gemm import fp8_gemm, fp8_gemm_tma
from .fused import gemm_epilogue, layernorm_modulate_quant, qk_norm_rope
from .int8_gemm import int8_gemm, int8_static_gemm
from .quant import quantize_per_tensor, quantize_per_token
from .weight_only_gemm import dequantize_weight, weight_only_gemm

__all__ = ["quantize_per_token", "quantize_per_tensor", "int8_gemm", "int8_static_gemm", "fp8_gemm", "fp8_gemm_tma",
           "weight_only_gemm", "dequantize_weight", "gemm_epilogue", "layernorm_modulate_quant", "qk_norm_rope"]
