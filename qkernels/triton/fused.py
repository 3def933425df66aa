"""Fused elementwise kernels of a DiT block: LayerNorm + adaLN modulate + per-token quant, and
q/k RMSNorm + RoPE written straight into the joint attention layout.

Both reproduce the unfused bf16 computation's roundings (``ROUND``: the activation dtype's grid
after each op that rounds in eager PyTorch), so a fused block computes the same numbers as the
unfused one up to the order of a few fp32 reductions: what differs is the memory traffic.

``layernorm_modulate_quant``: one read of x [M, K] (2 bytes/element) and one write of the 8-bit
activation (1 byte) + 4 bytes of scale per row, where the unfused path reads and writes a bf16
[M, K] five times (LayerNorm, 1 + scale, *, +, then the quant kernel's read). At M = 8,400,
K = 3072: 77 MB moved, 22 us at the H200's measured 3.45 TB/s copy rate (run 9: 38.9 us).

``qk_norm_rope``: reads the q/k/v GEMM outputs of both streams once and writes q, k, v as
[B, S_txt + S_img, H, D] (the text tokens first, as Qwen-Image concatenates them): no unflatten,
no RMSNorm temporaries, no complex-number RoPE in fp32 and no torch.cat.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import InputError
from .quant import _nanmax, _store_quantized, row_amax, token_scale
from ._common import (
    EPI_NONE, INTERPRET, INTERPRET_C, _epilogue_pointers, cdiv, check_2d, check_device, check_epilogue, make_launcher,
    next_power_of_2, round_fp32_to_bf16_grid, round_to_dtype, store_epilogue,
)

__all__ = ["gemm_epilogue", "layernorm_modulate_quant", "qk_norm_rope", "row_chunks"]

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _round(v, ROUND: tl.constexpr):
    """``v`` (fp32) rounded to the activation dtype's grid, kept in fp32: 0 fp32 (no rounding),
    1 bf16, 2 fp16."""
    if ROUND == 1:
        v = round_to_dtype(v, tl.bfloat16)
    if ROUND == 2:
        v = round_to_dtype(v, tl.float16)
    return v


_ROUND_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Launch choices benchmarks.fused_kernels measures on a GPU: warps per row of the LayerNorm kernel
# (None: a warp per 1024 elements, 4..16) and whether it holds the row as exact chunks
# (``row_chunks``; False: one power-of-two tile, as before chunking), warps per token of the
# RoPE kernel, and whether it reads contiguous [heads, D] tiles and splits the pairs in registers
# (True) or reads even / odd elements apart. Set from the H200 (benchmarks/results/h200/run5,
# M = 8,400): split pair loads 83 us against 825 us strided (3.7 against 0.36 TB/s); the
# LayerNorm kernel (one 4096-wide tile) 67.8 us at 4 warps, 88.7 at 16; run 9, with the
# reciprocal and max.NaN, loads behind the reductions: one tile 43.9 us at 4 warps, chunks 44.5;
# every load first (run 9, call 2): chunks 38.9 us at 4 warps (58% of the copy rate), one tile
# 67.3 (its 89 registers a thread halve the blocks an SM holds).
TUNING = {"lmq_warps": 4, "lmq_chunked": True, "qk_warps": 4, "qk_split": True}


# --------------------------------------------------------------------------------------------
# LayerNorm (no affine) -> x * (1 + scale[g]) + shift[g] -> per-token 8-bit quantization

_MAX_CHUNKS = 4
_MAX_CHUNK = 4096


def row_chunks(k: int, chunked: bool = True) -> tuple[int, int]:
    """``(NCHUNK, CHUNK)``: a row of ``k`` as NCHUNK <= 4 power-of-two pieces of CHUNK <= 4096
    elements covering it with the fewest padding lanes (then the fewest pieces; K = 3072 is
    3 x 1024, where one 4096-wide tile issues a third more instructions for padding lanes);
    ``(0, 4096)`` for rows too long for that. ``chunked=False``: one power-of-two tile."""
    if not chunked:
        block = next_power_of_2(k)
        return (1, block) if block <= _MAX_CHUNK * _MAX_CHUNKS else (0, _MAX_CHUNK)
    best = None
    for n in range(1, _MAX_CHUNKS + 1):
        c = next_power_of_2(cdiv(k, n))
        if c <= _MAX_CHUNK and (best is None or n * c < best[0] * best[1]):
            best = (n, c)
    return best if best is not None else (0, _MAX_CHUNK)


@triton.jit
def _lmq_piece(row_ptr, cols, K, EVEN_K: tl.constexpr):
    """A CHUNK-wide piece of a row, as loaded (the caller converts)."""
    if EVEN_K:
        return tl.load(row_ptr + cols)
    else:
        return tl.load(row_ptr + cols, mask=cols < K, other=0.0)


@triton.jit
def _lmq_loads(x_row, scale_row, shift_row, cols, K, EVEN_K: tl.constexpr):
    """A piece of the row (fp32) and of its modulation scale and shift rows (as stored)."""
    return (_lmq_piece(x_row, cols, K, EVEN_K).to(tl.float32), _lmq_piece(scale_row, cols, K, EVEN_K),
            _lmq_piece(shift_row, cols, K, EVEN_K))


@triton.jit
def _lmq_deviation(x, mean, cols, K, EVEN_K: tl.constexpr):
    d = x - mean
    if not EVEN_K:
        d = tl.where(cols < K, d, 0.0)
    return d


@triton.jit
def _lmq_modulate(d, rstd, sc, sh, ROUND: tl.constexpr):
    # Qwen-Image's _modulate: x * (1 + scale) + shift, each op rounded in the activation dtype.
    y = _round(d * rstd, ROUND)
    return _round(_round(y * _round(1.0 + sc.to(tl.float32), ROUND), ROUND) + sh.to(tl.float32), ROUND)


@triton.jit
def _layernorm_modulate_quant_kernel(
    x_ptr, shift_ptr, scale_ptr, grow_ptr, q_ptr, s_ptr,
    M, K, stride_xm, stride_mod, stride_qm, eps,
    QMAX: tl.constexpr, FP8: tl.constexpr, SOFT_FP8: tl.constexpr, ROUND: tl.constexpr,
    CHUNK: tl.constexpr, NCHUNK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """One row per program, held in registers as NCHUNK pieces of CHUNK (``row_chunks``),
    written out piece by piece since a loop cannot keep them. Every load (the row and its
    modulation row) is issued before the first reduction, whose barrier would otherwise hold the
    later loads back: one memory round trip a program, not one per reduction (run 9: the
    modulation loads after the variance were exposed latency)."""
    row = tl.program_id(0)
    c0 = tl.arange(0, CHUNK)
    c1 = CHUNK + c0
    c2 = 2 * CHUNK + c0
    c3 = 3 * CHUNK + c0
    xr = x_ptr + row * stride_xm
    g = tl.load(grow_ptr + row).to(tl.int64)
    scr = scale_ptr + g * stride_mod
    shr = shift_ptr + g * stride_mod
    x0, sc0, sh0 = _lmq_loads(xr, scr, shr, c0, K, EVEN_K)
    if NCHUNK > 1:
        x1, sc1, sh1 = _lmq_loads(xr, scr, shr, c1, K, EVEN_K)
    if NCHUNK > 2:
        x2, sc2, sh2 = _lmq_loads(xr, scr, shr, c2, K, EVEN_K)
    if NCHUNK > 3:
        x3, sc3, sh3 = _lmq_loads(xr, scr, shr, c3, K, EVEN_K)
    # torch's LayerNorm: fp32 mean and biased variance, (x - mean) * rsqrt(var + eps), one rounding.
    total = tl.sum(x0, axis=0)
    if NCHUNK > 1:
        total += tl.sum(x1, axis=0)
    if NCHUNK > 2:
        total += tl.sum(x2, axis=0)
    if NCHUNK > 3:
        total += tl.sum(x3, axis=0)
    mean = total / K
    d0 = _lmq_deviation(x0, mean, c0, K, EVEN_K)
    sq = tl.sum(d0 * d0, axis=0)
    if NCHUNK > 1:
        d1 = _lmq_deviation(x1, mean, c1, K, EVEN_K)
        sq += tl.sum(d1 * d1, axis=0)
    if NCHUNK > 2:
        d2 = _lmq_deviation(x2, mean, c2, K, EVEN_K)
        sq += tl.sum(d2 * d2, axis=0)
    if NCHUNK > 3:
        d3 = _lmq_deviation(x3, mean, c3, K, EVEN_K)
        sq += tl.sum(d3 * d3, axis=0)
    rstd = 1.0 / tl.sqrt(sq / K + eps)
    # Per-token quantization, the arithmetic of quant.py (NaN amax propagates; x * (1 / scale)).
    y0 = _lmq_modulate(d0, rstd, sc0, sh0, ROUND)
    amax = row_amax(y0, 0)
    if NCHUNK > 1:
        y1 = _lmq_modulate(d1, rstd, sc1, sh1, ROUND)
        amax = _nanmax(amax, row_amax(y1, 0))
    if NCHUNK > 2:
        y2 = _lmq_modulate(d2, rstd, sc2, sh2, ROUND)
        amax = _nanmax(amax, row_amax(y2, 0))
    if NCHUNK > 3:
        y3 = _lmq_modulate(d3, rstd, sc3, sh3, ROUND)
        amax = _nanmax(amax, row_amax(y3, 0))
    scale = token_scale(amax, QMAX)
    inv = tl.math.div_rn(1.0, scale)
    qr = q_ptr + row * stride_qm
    _store_quantized(qr + c0, c0 < K, y0 * inv, FP8, SOFT_FP8, QMAX)
    if NCHUNK > 1:
        _store_quantized(qr + c1, c1 < K, y1 * inv, FP8, SOFT_FP8, QMAX)
    if NCHUNK > 2:
        _store_quantized(qr + c2, c2 < K, y2 * inv, FP8, SOFT_FP8, QMAX)
    if NCHUNK > 3:
        _store_quantized(qr + c3, c3 < K, y3 * inv, FP8, SOFT_FP8, QMAX)
    tl.store(s_ptr + row, scale)


_launch_lmq = make_launcher(_layernorm_modulate_quant_kernel)


def _check_rows(name: str, t: torch.Tensor, k: int) -> None:
    if t.dim() != 2 or t.shape[1] != k or t.stride(1) != 1:
        raise InputError(f"{name} must be [G, {k}] with unit column stride, got {tuple(t.shape)} {t.stride()}")


def layernorm_modulate_quant(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate_rows: torch.Tensor, eps: float, fp8: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_per_token(LayerNorm(x) * (1 + scale[gate_rows]) + shift[gate_rows])`` in one
    pass: x [M, K] (bf16/fp16/fp32, unit column stride), shift/scale [G, K] (rows of the
    modulation output, any row stride: views into it), gate_rows int32 [M] (each token's
    modulation row). Returns ``(q [M, K] e4m3/int8, scale [M] fp32)``; same results as
    ``qkernels.ops.fused``'s reference."""
    check_2d("x", x)
    m, k = x.shape
    if x.dtype not in _ACT_DTYPES or x.stride(1) != 1:
        raise InputError(f"x must be bf16/fp16/fp32 with unit column stride, got {x.dtype} {x.stride()}")
    _check_rows("shift", shift, k)
    _check_rows("scale", scale, k)
    if shift.stride(0) != scale.stride(0):
        raise InputError("shift and scale must have the same row stride (views of one modulation tensor)")
    if gate_rows.shape != (m,) or gate_rows.dtype != torch.int32:
        raise InputError(f"gate_rows must be int32 [{m}], got {gate_rows.dtype} {tuple(gate_rows.shape)}")
    check_device(x, shift, scale, gate_rows)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    nchunk, chunk = row_chunks(k, TUNING["lmq_chunked"])
    if nchunk == 0:
        raise InputError(f"layernorm_modulate_quant holds a row in registers: K <= 16384, got {k}")
    q_arg = q.view(torch.uint8) if (fp8 and INTERPRET) else q
    _launch_lmq(
        (m,), (),
        (x, shift, scale, gate_rows, q_arg, s, m, k, x.stride(0), shift.stride(0), q.stride(0), float(eps)),
        QMAX=448.0 if fp8 else 127.0, FP8=fp8, SOFT_FP8=fp8 and INTERPRET, ROUND=_ROUND_CODE[x.dtype],
        CHUNK=chunk, NCHUNK=nchunk, EVEN_K=nchunk * chunk == k,
        num_warps=1 if INTERPRET else (TUNING["lmq_warps"] or min(16, max(4, nchunk * chunk // 1024))),
    )
    return q, s


# --------------------------------------------------------------------------------------------
# q/k RMSNorm + RoPE for the joint [text, image] sequence


@triton.jit
def _rms_rope(x_ptr, w_ptr, cs_ptr, out_ptr, heads, eps, D: tl.constexpr, HB: tl.constexpr, ROUND: tl.constexpr,
              HAS_NORM: tl.constexpr):
    """HB heads of one token: RMSNorm over D (fp32, rounded, then * weight, rounded: diffusers'
    RMSNorm in the activation dtype), then the rotation of each (even, odd) pair by (cos, sin)
    in fp32 and one rounding at the store: diffusers' complex RoPE."""
    h = tl.arange(0, HB)
    i = tl.arange(0, D // 2)
    hmask = h < heads
    offs = h[:, None] * D + 2 * i[None, :]
    e = tl.load(x_ptr + offs, mask=hmask[:, None], other=0.0).to(tl.float32)
    o = tl.load(x_ptr + offs + 1, mask=hmask[:, None], other=0.0).to(tl.float32)
    if HAS_NORM:
        ms = (tl.sum(e * e, axis=1) + tl.sum(o * o, axis=1)) / D
        r = 1.0 / tl.sqrt(ms + eps)
        we = tl.load(w_ptr + 2 * i).to(tl.float32)
        wo = tl.load(w_ptr + 2 * i + 1).to(tl.float32)
        e = _round(_round(e * r[:, None], ROUND) * we[None, :], ROUND)
        o = _round(_round(o * r[:, None], ROUND) * wo[None, :], ROUND)
    c = tl.load(cs_ptr + 2 * i)[None, :]
    s = tl.load(cs_ptr + 2 * i + 1)[None, :]
    re = e * c - o * s
    im = e * s + o * c
    if INTERPRET_C and out_ptr.dtype.element_ty == tl.bfloat16:
        re = round_fp32_to_bf16_grid(re)
        im = round_fp32_to_bf16_grid(im)
    tl.store(out_ptr + offs, re.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
    tl.store(out_ptr + offs + 1, im.to(out_ptr.dtype.element_ty), mask=hmask[:, None])


@triton.jit
def _rms_rope_split(x_ptr, w_ptr, cs_ptr, out_ptr, heads, eps, D: tl.constexpr, HB: tl.constexpr,
                    ROUND: tl.constexpr, HAS_NORM: tl.constexpr):
    """:func:`_rms_rope` with contiguous [HB, D] loads and stores, the (even, odd) pairs split and
    joined in registers instead of read and written at a stride of two elements."""
    h = tl.arange(0, HB)
    d = tl.arange(0, D)
    hmask = (h < heads)[:, None]
    offs = h[:, None] * D + d[None, :]
    x = tl.load(x_ptr + offs, mask=hmask, other=0.0).to(tl.float32)
    e, o = tl.split(tl.reshape(x, (HB, D // 2, 2)))
    if HAS_NORM:
        ms = (tl.sum(e * e, axis=1) + tl.sum(o * o, axis=1)) / D
        r = 1.0 / tl.sqrt(ms + eps)
        we, wo = tl.split(tl.reshape(tl.load(w_ptr + d).to(tl.float32), (D // 2, 2)))
        e = _round(_round(e * r[:, None], ROUND) * we[None, :], ROUND)
        o = _round(_round(o * r[:, None], ROUND) * wo[None, :], ROUND)
    c, s = tl.split(tl.reshape(tl.load(cs_ptr + d), (D // 2, 2)))
    re = e * c[None, :] - o * s[None, :]
    im = e * s[None, :] + o * c[None, :]
    y = tl.reshape(tl.join(re, im), (HB, D))
    if INTERPRET_C and out_ptr.dtype.element_ty == tl.bfloat16:
        y = round_fp32_to_bf16_grid(y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _copy_heads(x_ptr, out_ptr, heads, D: tl.constexpr, HB: tl.constexpr):
    h = tl.arange(0, HB)
    d = tl.arange(0, D)
    offs = h[:, None] * D + d[None, :]
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=(h < heads)[:, None]), mask=(h < heads)[:, None])


@triton.jit
def _qk_norm_rope_kernel(
    txt_ptr, img_ptr, wq_t, wk_t, wq_i, wk_i, cs_t, cs_i, q_ptr, k_ptr, v_ptr,
    L_TXT, L_IMG, heads, stride_t, stride_i, eps,
    D: tl.constexpr, HB: tl.constexpr, ROUND: tl.constexpr, HAS_NORM: tl.constexpr, SPLIT: tl.constexpr,
):
    row = tl.program_id(0)  # a row of the joint [B, L_TXT + L_IMG] sequence
    s_tot = L_TXT + L_IMG
    b = row // s_tot
    s = row % s_tot
    hd = heads * D
    out = row.to(tl.int64) * hd
    if s < L_TXT:
        src = txt_ptr + (b * L_TXT + s).to(tl.int64) * stride_t
        cs = cs_t + s * D
        wq = wq_t
        wk = wk_t
    else:
        src = img_ptr + (b * L_IMG + s - L_TXT).to(tl.int64) * stride_i
        cs = cs_i + (s - L_TXT) * D
        wq = wq_i
        wk = wk_i
    if SPLIT:
        _rms_rope_split(src, wq, cs, q_ptr + out, heads, eps, D, HB, ROUND, HAS_NORM)
        _rms_rope_split(src + hd, wk, cs, k_ptr + out, heads, eps, D, HB, ROUND, HAS_NORM)
    else:
        _rms_rope(src, wq, cs, q_ptr + out, heads, eps, D, HB, ROUND, HAS_NORM)
        _rms_rope(src + hd, wk, cs, k_ptr + out, heads, eps, D, HB, ROUND, HAS_NORM)
    _copy_heads(src + 2 * hd, v_ptr + out, heads, D, HB)


_launch_qk = make_launcher(_qk_norm_rope_kernel)


def qk_norm_rope(
    qkv_txt: torch.Tensor, qkv_img: torch.Tensor, batch: int, heads: int,
    norm_txt_q: torch.Tensor | None, norm_txt_k: torch.Tensor | None,
    norm_img_q: torch.Tensor | None, norm_img_k: torch.Tensor | None,
    rope_txt: torch.Tensor, rope_img: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, L_txt + L_img, H, D] of the joint sequence from each stream's fused QKV output
    ``qkv_* [B * L, 3 * H * D]`` (q | k | v, each H heads of D): q and k RMS-normed with the
    stream's q and k weights (all ``None``: no norm) and rotated by ``rope_* [L, D/2, 2]`` fp32
    (cos, sin) — ``torch.view_as_real`` of diffusers' complex frequencies."""
    norms = (norm_txt_q, norm_txt_k, norm_img_q, norm_img_k)
    norm_txt = None if norm_txt_q is None else (norm_txt_q, norm_txt_k)
    norm_img = None if norm_img_q is None else (norm_img_q, norm_img_k)
    if any(w is None for w in norms) and not all(w is None for w in norms):
        raise InputError("give all four RMSNorm weights, or none")
    for name, t in (("qkv_txt", qkv_txt), ("qkv_img", qkv_img)):
        check_2d(name, t)
        if t.dtype not in _ACT_DTYPES or t.stride(1) != 1:
            raise InputError(f"{name} must be bf16/fp16/fp32 with unit column stride")
    hd3 = qkv_img.shape[1]
    if hd3 % (3 * heads) or qkv_txt.shape[1] != hd3 or qkv_txt.dtype != qkv_img.dtype:
        raise InputError(f"qkv outputs must both be [*, 3 * {heads} * D] of one dtype, got "
                         f"{tuple(qkv_txt.shape)} and {tuple(qkv_img.shape)}")
    d = hd3 // (3 * heads)
    if d % 2 or d & (d - 1):
        raise InputError(f"head dim must be an even power of two, got {d}")
    if qkv_txt.shape[0] % batch or qkv_img.shape[0] % batch:
        raise InputError(f"token counts {qkv_txt.shape[0]}, {qkv_img.shape[0]} are not multiples of batch {batch}")
    l_txt, l_img = qkv_txt.shape[0] // batch, qkv_img.shape[0] // batch
    for name, cs, ln in (("rope_txt", rope_txt, l_txt), ("rope_img", rope_img, l_img)):
        if cs.shape != (ln, d // 2, 2) or cs.dtype != torch.float32 or not cs.is_contiguous():
            raise InputError(f"{name} must be contiguous fp32 [{ln}, {d // 2}, 2], got {cs.dtype} {tuple(cs.shape)}")
    weights = []
    for pair in (norm_txt, norm_img):
        for w in (pair or (rope_txt, rope_txt)):
            if pair is not None and (w.shape != (d,) or not w.is_contiguous()):
                raise InputError(f"RMSNorm weights must be contiguous [{d}], got {tuple(w.shape)}")
            weights.append(w)
    check_device(qkv_txt, qkv_img, rope_txt, rope_img, *weights)
    shape = (batch, l_txt + l_img, heads, d)
    q, k, v = (torch.empty(shape, dtype=qkv_img.dtype, device=qkv_img.device) for _ in range(3))
    rows = batch * (l_txt + l_img)
    if rows == 0:
        return q, k, v
    hb = next_power_of_2(heads)
    _launch_qk(
        (rows,), (),
        (qkv_txt, qkv_img, *weights, rope_txt, rope_img, q, k, v, l_txt, l_img, heads,
         qkv_txt.stride(0), qkv_img.stride(0), float(eps)),
        D=d, HB=hb, ROUND=_ROUND_CODE[qkv_img.dtype], HAS_NORM=norm_txt is not None, SPLIT=TUNING["qk_split"],
        num_warps=1 if INTERPRET else TUNING["qk_warps"],
    )
    return q, k, v


# --------------------------------------------------------------------------------------------
# A GEMM's epilogue as its own pass (for GEMMs that are not ours)


@triton.jit
def _epilogue_kernel(y_ptr, ones_ptr, out_ptr, res_ptr, gate_ptr, grow_ptr, M, N, stride_ym, stride_gm,
                     EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``store_epilogue`` (the fused GEMMs' own) on a finished [M, N] output: its scale is a vector
    of ones (``y * 1.0`` is exact), so the arithmetic is the fused GEMMs', op for op."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    store_epilogue(out_ptr, y, ones_ptr, ones_ptr, res_ptr, gate_ptr, grow_ptr, offs_m, offs_n, M, N, N, 1,
                   stride_gm, HAS_BIAS=False, EPILOGUE=EPILOGUE)


_epilogue_launch = make_launcher(_epilogue_kernel)
_ONES: dict[tuple, torch.Tensor] = {}


def _ones(n: int, device: torch.device) -> torch.Tensor:
    key = (n, device)
    t = _ONES.get(key)
    if t is None:
        t = _ONES[key] = torch.ones(n, dtype=torch.float32, device=device)
    return t


def gemm_epilogue(y: torch.Tensor, out_dtype: torch.dtype, gelu: bool, residual: torch.Tensor | None,
                  gate: torch.Tensor | None, gate_rows: torch.Tensor | None) -> torch.Tensor:
    """``qkernels.ops.fused.gemm_epilogue_reference`` in one pass: reads ``y`` [M, N] (fp32, or
    already rounded to a 16-bit dtype; unit column stride), writes ``out_dtype``."""
    check_2d("y", y)
    m, n = y.shape
    if y.dtype not in _ACT_DTYPES or y.stride(1) != 1:
        raise InputError(f"y must be a {_ACT_DTYPES} [M, N] tensor with unit column stride, got {y.dtype} "
                         f"{tuple(y.shape)} strides {y.stride()}")
    code = check_epilogue(m, n, gelu, residual, gate, gate_rows, out_dtype)
    check_device(y, residual, gate, gate_rows)
    out = torch.empty((m, n), dtype=out_dtype, device=y.device)
    if code == EPI_NONE:
        return out.copy_(y)
    if m == 0 or n == 0:
        return out
    _, res_p, gate_p, rows_p = _epilogue_pointers(None, residual, gate, gate_rows, y)
    bm, bn = 32, 128
    _epilogue_launch((cdiv(m, bm), cdiv(n, bn)), (),
                     (y, _ones(n, y.device), out, res_p, gate_p, rows_p, m, n, y.stride(0),
                      gate.stride(0) if gate is not None else 0),
                     EPILOGUE=code, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out
