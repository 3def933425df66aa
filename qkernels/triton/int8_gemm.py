"""INT8 GEMMs: ``y = (a @ w.T) * a_scale[m] * w_scale[n] (+ bias)``, int32 accumulation in
registers, the dequantization in the epilogue (no int32 tensor ever written).

``int8_gemm``: A already quantized (per-token kernel, or per-tensor with its row scale).
``int8_static_gemm``: one launch for a static-scale layer: reads the bf16/fp16/fp32 activation,
divides by ``input_smooth`` and the calibrated scale while loading the A tile, rounds half to
even and clamps to int8, then the same dot and epilogue; a row holding NaN/Inf gets a NaN row
scale (sum(x * 0) folded in the A loads), so only its outputs are non-finite.

W is the stored row-major [N, K] int8 weight, read as [BLOCK_K, BLOCK_N] tiles through its
strides (K-major: the layout 8-bit wgmma takes for B), never transposed or copied.

Bounds at M=8192, K=3072, N=12288 (Qwen-Image MLP up-projection):
  2*M*N*K = 618 GOP -> 0.31 ms at the int8 dense peak 1979 TOP/s (0.78 ms at bf16's 790 measured).
  bytes: A 25 MB + W 38 MB + C (bf16) 201 MB = 264 MB -> 0.088 ms at 3.0 TB/s.
  Compute-bound: the target is the tensor-core rate. The fused static kernel re-quantizes each
  A tile once per N tile (N / BLOCK_N = 48 times at BLOCK_N 256): 1.2 G IEEE divisions, ~12
  GFLOP of CUDA-core work, ~0.2 ms at ~60 TFLOP/s fp32, if it overlapped with the dot.
Measured on H100 (triton 3.6, torch 2.11, median of do_bench), this shape: bf16 cuBLAS 817 us;
int8_gemm 635 us (973 TOP/s), + per-token quant kernel 665 us in all (1.23x bf16; torch._int_mm
+ torch quant 2846 us); fused static 2524 us, i.e. it does NOT overlap: the register-staged,
re-quantized A tile stalls the wgmma pipeline, so backends use quant kernel + int8_gemm (656 us)
except at tiny M (M=16: fused 103 us vs 193 us).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    AUTOTUNE_CACHE, AUTOTUNE_KEY, CONFIGS_8BIT, CONFIGS_16BIT_A, check_gemm, check_vector, even_k, gemm_tile_setup,
    launch_gemm, load_k_tiles, make_launcher, prune_by_m, rint_clamp_int8, scaled_gemm, store_epilogue, store_scaled,
)

__all__ = ["int8_gemm", "int8_static_gemm"]


@triton.autotune(configs=CONFIGS_8BIT, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_by_m},
                  cache_results=AUTOTUNE_CACHE)
@triton.heuristics({"EVEN_K": even_k})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _int8_gemm_kernel(
    a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr, gate_ptr, grow_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn, stride_gm,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n, rm, rk, a_ptrs, w_ptrs = gemm_tile_setup(
        a_ptr, w_ptr, M, N, stride_am, stride_ak, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a, b = load_k_tiles(a_ptrs, w_ptrs, rk, k, K, BLOCK_K, EVEN_K)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    a_scale = tl.load(a_scale_ptr + rm)
    # int32 -> fp32 first: scaling in bf16 would lose the accumulator's precision.
    y = acc.to(tl.float32) * a_scale[:, None]
    store_epilogue(c_ptr, y, w_scale_ptr, bias_ptr, res_ptr, gate_ptr, grow_ptr, offs_m, offs_n, M, N,
                   stride_cm, stride_cn, stride_gm, HAS_BIAS, EPILOGUE)


@triton.autotune(configs=CONFIGS_16BIT_A, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_by_m},
                  cache_results=AUTOTUNE_CACHE)
@triton.heuristics({"EVEN_K": even_k})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _int8_static_gemm_kernel(
    x_ptr, scale_ptr, smooth_ptr, w_ptr, c_ptr, w_scale_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_cm, stride_cn,
    HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n, rm, rk, x_ptrs, w_ptrs = gemm_tile_setup(
        x_ptr, w_ptr, M, N, stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    s = tl.load(scale_ptr).to(tl.float32)
    poison = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x, b = load_k_tiles(x_ptrs, w_ptrs, rk, k, K, BLOCK_K, EVEN_K)
        x = x.to(tl.float32)
        if HAS_SMOOTH:
            sm = tl.load(smooth_ptr + k * BLOCK_K + rk, mask=rk < K - k * BLOCK_K, other=1.0)
            x = tl.math.div_rn(x, sm[None, :])
        # 0 for finite rows, NaN for a row holding NaN/Inf (formats.quantize_per_tensor's poison).
        poison += tl.sum(x * 0.0, axis=1)
        a = rint_clamp_int8(tl.math.div_rn(x, s))
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    y = acc.to(tl.float32) * (s + poison)[:, None]
    store_scaled(c_ptr, y, w_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS)


_int8_gemm_launch = make_launcher(_int8_gemm_kernel)
_int8_static_gemm_launch = make_launcher(_int8_static_gemm_kernel)


def int8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    gate_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(a [M, K] int8 @ w [N, K] int8 .T) * a_scale[M] * w_scale[N] (+ bias [N])`` in fp32, out
    in ``out_dtype``. Same signature and epilogue order as ``qkernels.ops.int8_mm_dequant``; the
    optional epilogue (GELU-tanh, or ``residual + gate[gate_rows] * y``) is
    ``qkernels.ops.fused.gemm_epilogue_reference``'s."""
    return scaled_gemm(_int8_gemm_launch, a, a_scale, w, w_scale, bias, out_dtype, torch.int8,
                       gelu, residual, gate, gate_rows)


def int8_static_gemm(
    x: torch.Tensor,
    scale: torch.Tensor,
    smooth: torch.Tensor | None,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """One launch for a static-scale int8 layer: ``x [M, K]`` (bf16/fp16/fp32) is divided by
    ``smooth`` (optional) and the per-tensor ``scale`` and quantized to int8 inside the A-tile
    load; out in ``x.dtype``. Equal to ``formats.quantize_per_tensor`` + int8 GEMM + epilogue."""
    m, n, k = check_gemm(x, w, w_scale, bias, (torch.bfloat16, torch.float16, torch.float32), (torch.int8,))
    check_vector("input_smooth", smooth, k)
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"the static scale is one fp32 value, got {scale.dtype} {tuple(scale.shape)}")
    c = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return c
    launch_gemm(_int8_static_gemm_launch,
                (x, scale, smooth if smooth is not None else w_scale, w, c, w_scale,
                 bias if bias is not None else w_scale), x, w, c,
                HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None)
    return c
