"""Activation quantization: dynamic per-token and static per-tensor, int8 or e4m3, in one pass.

Arithmetic identical to ``qkernels.formats.quantize_per_token`` / ``quantize_per_tensor`` (the
tests compare bit for bit): fp32; ``x / smooth`` and ``x / scale`` as IEEE divisions
(``div_rn``: Triton's ``/`` on fp32 is the approximate ``div.full.f32``); scale = amax / qmax with
amax == 0 -> 1.0 and a NaN amax propagating; int8 rounds half to even and clamps to +-127;
e4m3 clamps to +-448 and rounds to nearest even in the cast.

Bound: memory. Per element: read 2 bytes (bf16), write 1 byte, plus 4 bytes of scale per row.
At M=8192, K=3072: 75.5 MB moved, 25 us at 3.0 TB/s (H100 measured copy rate); the
~10 fp32 instructions of each IEEE division are ~0.25 GFLOP, far under the CUDA cores' rate.
A row of up to 16384 elements is held in registers, so X is read once (K <= 16384; longer rows
take two passes, the second mostly from L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import formats
from ._common import (
    INTERPRET, cdiv, check_2d, check_device, check_vector, make_launcher, next_power_of_2, rint_clamp_int8,
    soft_e4m3_bits,
)

__all__ = ["quantize_per_token", "quantize_per_tensor"]

_SINGLE_PASS_MAX_K = 16384


@triton.jit
def _store_quantized(q_ptrs, mask, q, FP8: tl.constexpr, SOFT_FP8: tl.constexpr, QMAX: tl.constexpr):
    if FP8:
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
        if SOFT_FP8:
            tl.store(q_ptrs, soft_e4m3_bits(q), mask=mask)
        else:
            tl.store(q_ptrs, q.to(tl.float8e4nv), mask=mask)
    else:
        tl.store(q_ptrs, rint_clamp_int8(q), mask=mask)


@triton.jit
def _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH: tl.constexpr):
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + cols, mask=cols < K, other=1.0)
        x = tl.math.div_rn(x, s[None, :])
    return x, mask


@triton.jit
def _row_amax(x):
    """Row abs-max that is NaN for a row holding NaN (as torch's amax): tl.max may drop NaN on
    CUDA (max.f32), so the NaNs are added back through a sum that is 0 without them. (A NaN-aware
    combine function in tl.reduce does the same, but the interpreter runs it per element.)"""
    return tl.max(tl.abs(x), axis=1) + tl.sum(tl.where(x != x, x, 0.0), axis=1)


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, smooth_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, FP8: tl.constexpr, SOFT_FP8: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    if SINGLE_PASS:
        x, mask = _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH)
        amax = _row_amax(x)
        scale = tl.where(amax == 0, 1.0, tl.math.div_rn(amax, QMAX))
        q = tl.math.div_rn(x, scale[:, None])
        _store_quantized(q_ptr + rows[:, None] * stride_qm + cols[None, :], mask, q, FP8, SOFT_FP8, QMAX)
    else:
        amax = tl.zeros((ROWS,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, mask = _load_smoothed(x_ptr, smooth_ptr, rows, k0 + cols, M, K, stride_xm, HAS_SMOOTH)
            amax = tl.maximum(amax, _row_amax(x), propagate_nan=tl.PropagateNan.ALL)
        scale = tl.where(amax == 0, 1.0, tl.math.div_rn(amax, QMAX))
        for k0 in range(0, K, BLOCK_K):
            x, mask = _load_smoothed(x_ptr, smooth_ptr, rows, k0 + cols, M, K, stride_xm, HAS_SMOOTH)
            q = tl.math.div_rn(x, scale[:, None])
            _store_quantized(q_ptr + rows[:, None] * stride_qm + (k0 + cols)[None, :], mask, q, FP8, SOFT_FP8, QMAX)
    tl.store(scale_ptr + rows, scale, mask=rows < M)


@triton.jit
def _quantize_per_tensor_kernel(
    x_ptr, scale_ptr, smooth_ptr, q_ptr, row_scale_ptr, M, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, FP8: tl.constexpr, SOFT_FP8: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    s = tl.load(scale_ptr).to(tl.float32)
    # sum(x * 0) is 0 for a finite row and NaN for one holding NaN/Inf: the row-scale poison.
    poison = tl.zeros((ROWS,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, mask = _load_smoothed(x_ptr, smooth_ptr, rows, k0 + cols, M, K, stride_xm, HAS_SMOOTH)
        poison += tl.sum(x * 0.0, axis=1)
        q = tl.math.div_rn(x, s)
        _store_quantized(q_ptr + rows[:, None] * stride_qm + (k0 + cols)[None, :], mask, q, FP8, SOFT_FP8, QMAX)
    tl.store(row_scale_ptr + rows, s + poison, mask=rows < M)


_launch_per_token = make_launcher(_quantize_per_token_kernel)
_launch_per_tensor = make_launcher(_quantize_per_tensor_kernel)
_QMAX = {False: formats.get_format("w8a8-int8").qmax, True: formats.get_format("w8a8-fp8").qmax}


def _launch_shape(m: int, k: int, max_block_k: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_K, num_warps): ~16-32 fp32 values per thread on CUDA; under the interpreter
    many rows per program, since each program costs Python overhead, not registers."""
    block_k = min(next_power_of_2(k), max_block_k)
    if INTERPRET:
        return min(next_power_of_2(m), 32), block_k, 4
    rows = max(1, min(next_power_of_2(m), 4096 // block_k))
    warps = min(16, max(4, rows * block_k // 512))
    return rows, block_k, warps


def _outputs(x: torch.Tensor, fp8: bool):
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    # The interpreter's fp32 -> e4m3 cast flushes subnormals: write the bits computed in-kernel.
    q_arg = q.view(torch.uint8) if (fp8 and INTERPRET) else q
    return q, q_arg, scale


def _check(x: torch.Tensor, smooth: torch.Tensor | None) -> None:
    check_2d("x", x)
    check_vector("input_smooth", smooth, x.shape[1])
    check_device(x, smooth)
    if x.stride(1) != 1:
        raise ValueError("x must have unit stride along K")


def quantize_per_token(
    x: torch.Tensor, smooth: torch.Tensor | None, fp8: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization of ``x`` [M, K]: ``(q [M, K] int8/e4m3, scale [M] fp32)``.
    Same signature and results as ``qkernels.ops.quantize_per_token``'s reference."""
    _check(x, smooth)
    m, k = x.shape
    q, q_arg, scale = _outputs(x, fp8)
    if m == 0:
        return q, scale
    single = next_power_of_2(k) <= _SINGLE_PASS_MAX_K
    rows, block_k, warps = _launch_shape(m, k, _SINGLE_PASS_MAX_K if single else 4096)
    _launch_per_token(
        (cdiv(m, rows),), (),
        (x, smooth if smooth is not None else scale, q_arg, scale, m, k, x.stride(0), q.stride(0)),
        QMAX=_QMAX[fp8], HAS_SMOOTH=smooth is not None, FP8=fp8, SOFT_FP8=fp8 and INTERPRET,
        ROWS=rows, BLOCK_K=block_k, SINGLE_PASS=single, num_warps=warps,
    )
    return q, scale


def quantize_per_tensor(
    x: torch.Tensor, scale: torch.Tensor, smooth: torch.Tensor | None, fp8: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static quantization with the calibrated per-tensor ``scale`` (0-d/1-element fp32 tensor):
    ``(q [M, K], row_scale [M] fp32)``, row_scale NaN in rows holding NaN/Inf.
    Same signature and results as ``qkernels.ops.quantize_per_tensor``'s reference."""
    _check(x, smooth)
    if scale.numel() != 1:
        raise ValueError(f"a per-tensor scale has one element, got shape {tuple(scale.shape)}")
    check_device(x, scale)
    m, k = x.shape
    q, q_arg, row_scale = _outputs(x, fp8)
    if m == 0:
        return q, row_scale
    rows, block_k, warps = _launch_shape(m, k, 4096)
    _launch_per_tensor(
        (cdiv(m, rows),), (),
        (x, scale, smooth if smooth is not None else row_scale, q_arg, row_scale, m, k, x.stride(0), q.stride(0)),
        QMAX=_QMAX[fp8], HAS_SMOOTH=smooth is not None, FP8=fp8, SOFT_FP8=fp8 and INTERPRET,
        ROWS=rows, BLOCK_K=block_k, num_warps=warps,
    )
    return q, row_scale
