"""Activation quantization: dynamic per-token and static per-tensor, int8 or e4m3, in one pass.

Arithmetic identical to ``qkernels.formats.quantize_per_token`` / ``quantize_per_tensor`` (the
tests compare bit for bit): fp32; ``x / smooth``, ``amax / qmax`` and the static ``x / scale`` as
IEEE divisions (``div_rn``: Triton's ``/`` on fp32 is the approximate ``div.full.f32``); the
per-token ``x * (1 / scale)``, one IEEE division a row and an exact multiply per element; scale =
amax / qmax (at least 2^-126) with amax == 0 -> 1.0 and a NaN amax propagating; int8 rounds half
to even and clamps to +-127; e4m3 clamps to +-448 and rounds to nearest even in the cast.

Bound: memory, once the instructions are few. Per element: read 2 bytes (bf16), write 1 byte,
plus 4 bytes of scale per row: at M = 8,400, K = 3072, 77 MB, 22 us at the H200's 3.45 TB/s copy
rate. A row kernel this cheap is issue-bound as soon as it spends ~20 instructions an element
(the H200 issues ~33 T lane-instructions/s: 25.8 M elements x 20 = 15 us), which is why

* the amax is one NaN-propagating max reduction (``max.NaN``), not a max plus a NaN-detecting sum;
* the per-element division is a multiply by the row's reciprocal (an IEEE division costs ~8
  instructions and a slow-path check on CUDA).

With those (~10 instructions an element) the pass runs at 85-98% of the copy rate (H200, run 9:
24.7 us at K = 3072, 77.6 us at K = 12288), a row held as one power-of-two tile: its padding
lanes cost nothing once the pass is memory-bound. (Holding the row as exact chunks, as the
LayerNorm kernel of ``fused.py`` does at ~3x the instructions, measured slower here: 29.7-39 us
at K = 3072.)

Rows longer than 16384 take two passes over K in 4096-wide blocks, the second mostly from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import formats
from ._common import (
    INTERPRET, INTERPRET_C, cdiv, check_2d, check_device, check_vector, make_launcher, next_power_of_2,
    rint_clamp_int8, soft_e4m3_bits,
)

__all__ = ["quantize_per_token", "quantize_per_tensor"]

_SINGLE_PASS_MAX_K = 16384
_BLOCK_K = 4096  # two-pass rows, and the per-tensor kernel
# formats.MIN_ACTIVATION_SCALE, as a constant the kernels can read
_MIN_SCALE = tl.constexpr(formats.MIN_ACTIVATION_SCALE)

# Launch choices benchmarks.fused_kernels measures on a GPU (None: the rule in _launch_shape):
# rows and warps per program of the per-token kernel. H200, run 9 (M = 8,400): one row at 4
# warps 24.7 us at K = 3072 (90% of the copy rate), 8 warps 77.6-78.3 us at K = 12288 (98%).
TUNING = {"quant_rows": None, "quant_warps": None}


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
def _nanmax(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_amax(x, AXIS: tl.constexpr):
    """Abs-max along ``AXIS`` that is NaN where a row holds NaN (as torch's amax). On CUDA one
    reduction whose combine is ``max.NaN``; the interpreter would run that combine per element,
    so there tl.max (which may drop NaN) plus a sum that is 0 without NaNs adds them back."""
    if INTERPRET_C:
        return tl.max(tl.abs(x), axis=AXIS) + tl.sum(tl.where(x != x, x, 0.0), axis=AXIS)
    else:
        return tl.reduce(tl.abs(x), AXIS, _nanmax)


@triton.jit
def token_scale(amax, QMAX: tl.constexpr):
    """``formats.quantize_per_token``'s scale: amax / qmax, at least 2^-126
    (``formats.MIN_ACTIVATION_SCALE``: its reciprocal is finite), 1.0 for an all-zero row, NaN for a NaN amax."""
    s = tl.maximum(tl.math.div_rn(amax, QMAX), _MIN_SCALE, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(amax == 0, 1.0, s)


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, smooth_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, FP8: tl.constexpr, SOFT_FP8: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    q_ptrs = q_ptr + rows[:, None] * stride_qm + cols[None, :]
    if SINGLE_PASS:  # the row in registers
        x, mask = _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH)
        scale = token_scale(row_amax(x, 1), QMAX)
        _store_quantized(q_ptrs, mask, x * tl.math.div_rn(1.0, scale)[:, None], FP8, SOFT_FP8, QMAX)
    else:  # long rows: the amax over K, then K again (mostly from L2)
        amax = tl.zeros((ROWS,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, mask = _load_smoothed(x_ptr, smooth_ptr, rows, k0 + cols, M, K, stride_xm, HAS_SMOOTH)
            amax = _nanmax(amax, row_amax(x, 1))
        scale = token_scale(amax, QMAX)
        inv = tl.math.div_rn(1.0, scale)[:, None]
        for k0 in range(0, K, BLOCK_K):
            x, mask = _load_smoothed(x_ptr, smooth_ptr, rows, k0 + cols, M, K, stride_xm, HAS_SMOOTH)
            _store_quantized(q_ptrs + k0, mask, x * inv, FP8, SOFT_FP8, QMAX)
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


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _launch_shape(m: int, k: int, max_block_k: int, tuning: dict | None = None,
                  elements_per_warp: int = 2048) -> tuple[int, int, int]:
    """(ROWS, BLOCK_K, num_warps): ~4096 elements a program and a warp per ``elements_per_warp``
    of them (4..16) on CUDA (``tuning``, e.g. ``TUNING``, overrides the rows and warps); under the
    interpreter many rows per program, since each program costs Python overhead, not registers."""
    block_k = min(next_power_of_2(k), max_block_k)
    if INTERPRET:
        return min(next_power_of_2(m), 32), block_k, 4
    tuning = tuning or {}
    rows = tuning.get("quant_rows") or max(1, min(next_power_of_2(m), 4096 // block_k))
    warps = tuning.get("quant_warps") or min(16, max(4, _prev_power_of_2(rows * block_k // elements_per_warp)))
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
    rows, block_k, warps = _launch_shape(m, k, _SINGLE_PASS_MAX_K if single else _BLOCK_K, TUNING)
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
    # not measured on a GPU since the per-token kernel's warps were: the rule before that, a warp
    # per 512 elements, and not the per-token TUNING
    rows, block_k, warps = _launch_shape(m, k, _BLOCK_K, elements_per_warp=512)
    _launch_per_tensor(
        (cdiv(m, rows),), (),
        (x, scale, smooth if smooth is not None else row_scale, q_arg, row_scale, m, k, x.stride(0), q.stride(0)),
        QMAX=_QMAX[fp8], HAS_SMOOTH=smooth is not None, FP8=fp8, SOFT_FP8=fp8 and INTERPRET,
        ROWS=rows, BLOCK_K=block_k, num_warps=warps,
    )
    return q, row_scale
