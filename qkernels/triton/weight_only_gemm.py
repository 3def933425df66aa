"""Weight-only GEMM: ``y = (x @ dequant(w).T)`` with w int8 or e4m3 [N, K] converted to x's dtype
in registers (exact: |int8| <= 127 and e4m3's 3 mantissa bits fit bf16 and fp16), fp32
accumulation, the per-output-channel scale applied once in the epilogue: ``acc * w_scale[n]
(+ bias)``. The weight is never upcast in memory.

Bounds at M=8192, K=3072, N=12288: 618 GFLOP -> 0.78 ms at bf16's measured 790 TFLOP/s; bytes
X 50 MB + W 38 MB + Y 201 MB = 289 MB -> 0.096 ms: compute-bound, a bf16 GEMM's speed at best.
At M=16 the same layer is 1.2 GFLOP but 38 MB of weight: 12.6 us at 3.0 TB/s, half of bf16's
75 MB; that is where weight-only wins.
Measured on H100 at that shape: 1335 us (int8) / 1468 us (e4m3) vs cuBLAS bf16 817 us; at M=16
92 us vs 41 us: the in-loop conversion and register-staged B tile cost more than they save, so
the layerwise backends keep the upcast + cuBLAS path by default (see torch_native._WeightOnly).
fp32 inputs use input_precision="ieee" (torch's default fp32 matmul, no TF32), much slower.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError
from ._common import (
    AUTOTUNE_CACHE, AUTOTUNE_KEY, CONFIGS_16BIT_A, INTERPRET_C, cdiv, check_2d, check_device, check_gemm,
    check_vector, even_k, gemm_tile_setup, launch_gemm, load_k_tiles, make_launcher, next_power_of_2, prune_by_m,
    round_fp32_to_bf16_grid, store_scaled,
)

__all__ = ["weight_only_gemm", "dequantize_weight"]


@triton.autotune(configs=CONFIGS_16BIT_A, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_by_m},
                  cache_results=AUTOTUNE_CACHE)
@triton.heuristics({"EVEN_K": even_k})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _weight_only_gemm_kernel(
    x_ptr, w_ptr, c_ptr, w_scale_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n, rm, rk, x_ptrs, w_ptrs = gemm_tile_setup(
        x_ptr, w_ptr, M, N, stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x, b = load_k_tiles(x_ptrs, w_ptrs, rk, k, K, BLOCK_K, EVEN_K)
        if INTERPRET_C:
            # Triton 3.6's interpreter gets bf16 dots and int8 -> bf16 casts wrong; bf16 x bf16
            # products are exact in fp32, so an fp32 dot computes the same sums.
            acc = tl.dot(x.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, b.to(x.dtype), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    store_scaled(c_ptr, acc, w_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS)


_weight_only_gemm_launch = make_launcher(_weight_only_gemm_kernel)


def weight_only_gemm(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x [M, K] @ (w [N, K] * w_scale[:, None]).T (+ bias)``, out in ``x.dtype``; ``w`` int8 or
    float8_e4m3fn, converted tile by tile in registers."""
    m, n, k = check_gemm(x, w, w_scale, bias, (torch.bfloat16, torch.float16, torch.float32),
                         (torch.int8, torch.float8_e4m3fn))
    c = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return c
    launch_gemm(_weight_only_gemm_launch, (x, w, c, w_scale, bias if bias is not None else w_scale), x, w, c,
                HAS_BIAS=bias is not None, INPUT_PRECISION="ieee" if x.dtype == torch.float32 else None)
    return c


# --------------------------------------------------------------------------------------------
# The upcast the layerwise backends use on CUDA (their default path, see torch_native._WeightOnly)


@triton.jit
def _dequantize_weight_kernel(q_ptr, scale_ptr, out_ptr, N, K, stride_qn, stride_on, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    s = tl.load(scale_ptr + row)
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qn + cols, mask=mask).to(tl.float32)  # masked lanes: never stored
    y = q * s  # fp32, one rounding to out's dtype at the store: formats.dequantize_weight
    if INTERPRET_C and out_ptr.dtype.element_ty == tl.bfloat16:
        y = round_fp32_to_bf16_grid(y)
    tl.store(out_ptr + row.to(tl.int64) * stride_on + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


_dequantize_weight_launch = make_launcher(_dequantize_weight_kernel)
_DEQUANT_BLOCK = 2048


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``formats.dequantize_weight`` in one kernel: reads 1 byte and writes ``dtype`` per element
    (torch's own mixed-dtype multiply takes its slow per-element casting path on CUDA: a 7B text
    encoder's upcast measured ~60 ms a prompt that way on the H200)."""
    check_2d("q", q)
    n, k = q.shape
    if q.dtype not in (torch.int8, torch.float8_e4m3fn) or q.stride(1) != 1:
        raise InputError(f"q must be int8/e4m3 with unit column stride, got {q.dtype} {q.stride()}")
    check_vector("scale", scale, n)
    check_device(q, scale)
    out = torch.empty((n, k), dtype=dtype, device=q.device)
    if n == 0 or k == 0:
        return out
    block = min(_DEQUANT_BLOCK, next_power_of_2(k))
    _dequantize_weight_launch((n, cdiv(k, block)), (), (q, scale, out, n, k, q.stride(0), out.stride(0)),
                              BLOCK=block, num_warps=4)
    return out
