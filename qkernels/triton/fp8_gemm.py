"""FP8 (e4m3) GEMM with rowwise scales: ``y = (a @ w.T) * a_scale[m] * w_scale[n] (+ bias)``.

A is the e4m3 activation from the shared quant op (per token, or per tensor with its row
scale); W the stored row-major [N, K] e4m3 weight read as K-major [BLOCK_K, BLOCK_N] tiles
(the only B layout 8-bit wgmma takes), never copied. fp32 accumulation in registers; on sm90
Triton's default lets wgmma accumulate fp8 products at its reduced internal precision
(max_num_imprecise_acc = 2^30), the same trade as torch._scaled_mm's use_fast_accum; its error
(~2^-13 relative per partial sum) is far under e4m3's own rounding (2^-4).

Bounds at M=8192, K=3072, N=12288: 618 GFLOP -> 0.31 ms at the fp8 dense peak 1979 TFLOP/s;
bytes A 25 MB + W 38 MB + C (bf16) 201 MB = 264 MB -> 0.088 ms at 3.0 TB/s: compute-bound.
Measured on H100: 557 us (1111 TFLOP/s), 602 us with the quant kernel (1.36x bf16's 817 us);
rowwise torch._scaled_mm on the same inputs 550 us. At K=12288, N=3072: 501 us vs 604 us.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..errors import UnsupportedShapeError
from ._common import (
    AUTOTUNE_CACHE, AUTOTUNE_KEY, CONFIGS_8BIT, INTERPRET, _epilogue_pointers, cdiv, check_epilogue, check_gemm,
    check_out_dtype, check_vector, even_k, gemm_tile_setup, grouped_tile, load_k_tiles, make_launcher, prune_by_m,
    scaled_gemm, store_epilogue,
)

__all__ = ["fp8_gemm", "fp8_gemm_tma"]


@triton.autotune(configs=CONFIGS_8BIT, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_by_m},
                  cache_results=AUTOTUNE_CACHE)
@triton.heuristics({"EVEN_K": even_k})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _fp8_gemm_kernel(
    a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr, gate_ptr, grow_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn, stride_gm,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n, rm, rk, a_ptrs, w_ptrs = gemm_tile_setup(
        a_ptr, w_ptr, M, N, stride_am, stride_ak, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a, b = load_k_tiles(a_ptrs, w_ptrs, rk, k, K, BLOCK_K, EVEN_K)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    a_scale = tl.load(a_scale_ptr + rm)
    y = acc * a_scale[:, None]
    store_epilogue(c_ptr, y, w_scale_ptr, bias_ptr, res_ptr, gate_ptr, grow_ptr, offs_m, offs_n, M, N,
                   stride_cm, stride_cn, stride_gm, HAS_BIAS, EPILOGUE)


_fp8_gemm_launch = make_launcher(_fp8_gemm_kernel)


def fp8_gemm(
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
    """``(a [M, K] e4m3 @ w [N, K] e4m3 .T) * a_scale[M] * w_scale[N] (+ bias)`` in fp32, out in
    ``out_dtype`` (any of bf16/fp16/fp32, unlike rowwise torch._scaled_mm's bf16 only), with the
    optional epilogue of ``qkernels.ops.fused.gemm_epilogue_reference``."""
    return scaled_gemm(_fp8_gemm_launch, a, a_scale, w, w_scale, bias, out_dtype, torch.float8_e4m3fn,
                       gelu, residual, gate, gate_rows)


# --------------------------------------------------------------------------------------------
# Experimental: persistent, TMA-fed e4m3 GEMM (Hopper). Not used by any backend until measured
# against fp8_gemm on a GPU (benchmarks.gemm's `raw-triton-fp8-tma` rows); enable with
# FP8Triton.TMA_MIN_M. Compiled for sm90 (benchmarks.kernel_report) its K loop is the same
# wgmma m64n256k32 with one MMA group in flight as fp8_gemm's, fed by TMA bulk copies (6 in the
# PTX, where fp8_gemm has 36 cp.async), 176 KiB of shared memory at 128x256x128 / 3 stages
# (Triton 3.6); one program per SM walks the output tiles in fp8_gemm's grouped order, so the
# epilogue of one tile overlaps the loads of the next (``flatten``).

TMA_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
TMA_MIN_K = 16  # a TMA row stride must be a multiple of 16 bytes: K % 16 == 0 for e4m3 rows


@triton.jit
def _fp8_gemm_tma_kernel(
    a_desc, w_desc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, res_ptr, gate_ptr, grow_ptr,
    M, N, K, stride_cm, stride_cn, stride_gm,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_tiles):
            # Out-of-bounds rows and K columns of a descriptor load read as zero.
            a = a_desc.load([off_m, kk * BLOCK_K])
            b = w_desc.load([off_n, kk * BLOCK_K])  # [BLOCK_N, BLOCK_K], K contiguous: K-major B
            acc = tl.dot(a, b.T, acc)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
        store_epilogue(c_ptr, acc * a_scale[:, None], w_scale_ptr, bias_ptr, res_ptr, gate_ptr, grow_ptr,
                       offs_m, offs_n, M, N, stride_cm, stride_cn, stride_gm, HAS_BIAS, EPILOGUE)


_fp8_gemm_tma_launch = make_launcher(_fp8_gemm_tma_kernel)


@functools.lru_cache(maxsize=None)
def _programs(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def fp8_gemm_tma(
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
    config: dict | None = None,
) -> torch.Tensor:
    """The same product as :func:`fp8_gemm`, by the persistent TMA kernel (Hopper, or the
    interpreter). ``config``: block sizes, ``GROUP_M``, ``num_warps``, ``num_stages`` and
    optionally ``FLATTEN`` (default ``TMA_CONFIG``, flattened)."""
    m, n, k = check_gemm(a, w, w_scale, bias, (torch.float8_e4m3fn,), (torch.float8_e4m3fn,))
    check_vector("a_scale", a_scale, m)
    check_out_dtype(out_dtype)
    if k % TMA_MIN_K or a.stride(1) != 1 or w.stride(1) != 1:
        raise UnsupportedShapeError(f"the TMA GEMM needs K % {TMA_MIN_K} == 0 and K-contiguous operands "
                                    f"(got K={k}, strides {a.stride()} and {w.stride()})")
    epilogue = check_epilogue(m, n, gelu, residual, gate, gate_rows, out_dtype)
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    cfg = dict(TMA_CONFIG, **(config or {}))
    flatten = cfg.pop("FLATTEN", True)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [bm, bk])
    w_desc = TensorDescriptor(w, [n, k], [w.stride(0), 1], [bn, bk])
    tiles = cdiv(m, bm) * cdiv(n, bn)
    programs = min(tiles, 4 if INTERPRET else _programs(a.device.index or 0))
    _fp8_gemm_tma_launch(
        (programs,), (),
        (a_desc, w_desc, c, a_scale, w_scale, *_epilogue_pointers(bias, residual, gate, gate_rows, w_scale), m, n, k,
         c.stride(0), c.stride(1), gate.stride(0) if gate is not None else 0),
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, NUM_PROGRAMS=programs, FLATTEN=flatten, **cfg,
    )
    return c
