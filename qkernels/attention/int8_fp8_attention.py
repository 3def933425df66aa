"""INT8 Q K^T / FP8 P.V attention (SageAttention2's algorithm) in Triton: a quantization pass over
Q, K and V, then a flash-attention kernel on the 8-bit operands.

The arithmetic is that of ``qkernels.attention.reference.quantized_attention`` (see its module
doc); the CPU tests compare the two under TRITON_INTERPRET=1.

Work at the model's shape ([1, 24, 8400, 128]): 4 * 24 * 8400^2 * 128 = 867 GFLOP, 0.44 ms at the
8-bit dense peak (1979 TOP/s), 0.88 ms at bf16's; cuDNN bf16 took 1.35-1.44 ms on the H200
(600-643 TFLOP/s). The quantization pass moves Q, K, V (3 x 51.6 MB bf16 read, 3 x 25.8 MB 8-bit
written, plus a statistics kernel reading K and V once more): ~340 MB, ~85 us at 4 TB/s.

Layouts written by the quantization pass, all padded with zeros to ``S_pad`` (a multiple of 128,
the largest BLOCK_N / BLOCK_M), so the attention kernel's loads need no masks:

* ``q8``, ``k8``: int8 [B*H, S_pad, D], D contiguous: K-major operands of the int8 dot;
* ``v8t``: e4m3 [B*H, D, S_pad], tokens contiguous: the K-major B operand 8-bit wgmma needs for
  ``P [BLOCK_M, BLOCK_N] @ V [BLOCK_N, D]``;
* ``q_scale`` fp32 [B*H, S_pad], ``k_scale`` fp32 [B*H, 2, S_pad] (scale; offset = bias - 1.5 * 2^23
  * scale, see the kernel's int32 -> fp32 conversion), one scale per token (a block of one token: the
  attention kernel applies them as row / column scales of S at no extra cost, and an outlier
  token costs its block nothing);
* ``v_scale``: fp32 [B*H, D]; ``bias``: fp32 [B, S_pad], 0 / -inf per key (mask and padding).

Inputs come in two token segments (``x0`` rows [0, S0), ``x1`` rows [S0, S)), each [B, S_i, H, D]
or any strided view: Qwen-Image's text and image streams are read where they are, with no
concatenation, and the output is written straight into the two streams' [B, S_i, H, D] outputs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..triton._launch import next_power_of_2
from ..triton._common import (
    AUTOTUNE_CACHE, INTERPRET, INTERPRET_C, make_launcher, round_fp32_to_bf16_grid, soft_e4m3_bits,
)
from .reference import E4M3_MAX, LOG2E, P_SCALE, PAD

__all__ = ["quantize_segments", "attention_core", "attention_8bit", "CONFIGS", "PAD"]

LOG2_P_SCALE = tl.constexpr(math.log2(P_SCALE))  # P = 448 * 2^(s - m): e4m3's largest normal at the row max


@triton.jit
def _load_segments(x0_ptr, x1_ptr, b, h, rows, offs_d, S0, S,
                   s0_b, s0_s, s0_h, s1_b, s1_s, s1_h):
    """Rows ``rows`` (joint token index) of head ``h``, batch ``b``: from segment 0 below S0, from
    segment 1 in [S0, S), zero past S. fp32 [ROWS, D]."""
    in0 = rows < S0
    in1 = (rows >= S0) & (rows < S)
    p0 = x0_ptr + b * s0_b + h * s0_h + rows[:, None] * s0_s + offs_d[None, :]
    p1 = x1_ptr + b * s1_b + h * s1_h + (rows - S0)[:, None] * s1_s + offs_d[None, :]
    x0 = tl.load(p0, mask=in0[:, None], other=0.0).to(tl.float32)
    x1 = tl.load(p1, mask=in1[:, None], other=0.0).to(tl.float32)
    return x0 + x1


@triton.jit
def _stats_kernel(
    k0_ptr, k1_ptr, v0_ptr, v1_ptr, bias_ptr, ksum_ptr, vmax_ptr, count_ptr,
    S0, S, H, S_PAD,
    sk0_b, sk0_s, sk0_h, sk1_b, sk1_s, sk1_h, sv0_b, sv0_s, sv0_h, sv1_b, sv1_s, sv1_h,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per (batch, head): the sum of K and the abs-max of V over the attended keys (bias > -inf), and
    their count, accumulated over BLOCK-token slices with atomics into zeroed [B*H, D] / [B*H]."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = tl.load(bias_ptr + b * S_PAD + rows, mask=rows < S_PAD, other=float("-inf")) > float("-inf")
    k = _load_segments(k0_ptr, k1_ptr, b, h, rows, offs_d, S0, S, sk0_b, sk0_s, sk0_h, sk1_b, sk1_s, sk1_h)
    v = _load_segments(v0_ptr, v1_ptr, b, h, rows, offs_d, S0, S, sv0_b, sv0_s, sv0_h, sv1_b, sv1_s, sv1_h)
    k = tl.where(valid[:, None], k, 0.0)
    v = tl.where(valid[:, None], tl.abs(v), 0.0)
    tl.atomic_add(ksum_ptr + bh * HEAD_DIM + offs_d, tl.sum(k, axis=0))
    tl.atomic_max(vmax_ptr + bh * HEAD_DIM + offs_d, tl.max(v, axis=0))
    tl.atomic_add(count_ptr + bh, tl.sum(valid.to(tl.float32), axis=0))


@triton.jit
def _quantize_kernel(
    x0_ptr, x1_ptr, stat_ptr, count_ptr, bias_ptr, out_ptr, scale_ptr,
    S0, S, H, S_PAD,
    s0_b, s0_s, s0_h, s1_b, s1_s, s1_h,
    KIND: tl.constexpr, SCALE_MUL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    SOFT_FP8: tl.constexpr,
):
    """BLOCK tokens of one head. KIND 0: Q (int8 per token, scale * SCALE_MUL); 1: K (minus its channel
    mean ``stat / count``, int8 per token); 2: V (divided by its per-channel scale ``stat``, e4m3,
    stored transposed; a masked key's V is stored as 0, so whatever it holds, inf or NaN included,
    meets only P = 0)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    x = _load_segments(x0_ptr, x1_ptr, b, h, rows, offs_d, S0, S, s0_b, s0_s, s0_h, s1_b, s1_s, s1_h)
    valid = (rows < S)[:, None]
    if KIND == 2:
        vs = tl.load(stat_ptr + bh * HEAD_DIM + offs_d)
        attended = tl.load(bias_ptr + b * S_PAD + rows) > float("-inf")
        v = tl.where(attended[:, None], tl.math.div_rn(x, vs[None, :]), 0.0)
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        dst = out_ptr + bh * HEAD_DIM * S_PAD + offs_d[None, :] * S_PAD + rows[:, None]
        if SOFT_FP8:
            tl.store(dst, soft_e4m3_bits(v))
        else:
            tl.store(dst, v.to(tl.float8e4nv))
    else:
        if KIND == 1:
            n = tl.maximum(tl.load(count_ptr + bh), 1.0)
            mean = tl.math.div_rn(tl.load(stat_ptr + bh * HEAD_DIM + offs_d), n)
            x = tl.where(valid, x - mean[None, :], 0.0)
        amax = tl.max(tl.abs(x), axis=1)  # per token
        scale = tl.where(amax == 0, 1.0, tl.math.div_rn(amax, 127.0))
        qv = tl.math.div_rn(x, scale[:, None])
        qv = tl.minimum(tl.maximum(qv, -127.0), 127.0)
        qv = (qv + 12582912.0) - 12582912.0  # round half to even (see _common.RINT_MAGIC)
        tl.store(out_ptr + bh * S_PAD * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], qv.to(tl.int8))
        if KIND == 1:
            # [2, S_PAD] per head: the scale, and the offset that turns the int32 score's magic-number
            # float (see _attention_kernel) into scale * s + bias with one multiply-add
            kb = tl.load(bias_ptr + b * S_PAD + rows)
            tl.store(scale_ptr + bh * 2 * S_PAD + rows, scale)
            tl.store(scale_ptr + bh * 2 * S_PAD + S_PAD + rows, kb - 12582912.0 * scale)
        else:
            tl.store(scale_ptr + bh * S_PAD + rows, scale * SCALE_MUL)


def _cfg(bm, bn, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)


# Hopper (sm90): wgmma needs num_warps % 4 == 0 and BLOCK_M % 64 == 0; with 8 warps each of the two
# warp groups owns 64 query rows. int8 Q K^T is m64nBNk32, e4m3 P V m64n128k32. See
# benchmarks.kernel_report --only attention for each config's registers, spills and shared memory.
# H200, S = 8,400 (results/h200 run 10): 64 x 128, 3 stages, 4 warps wins (611-634 TFLOP/s; two CTAs
# an SM at 255 registers); 128 x 128 at 8 warps fits one CTA an SM and runs at 400. Triton 3.6 waits
# for each wgmma right after issuing it, so only a second CTA overlaps the tensor cores with the
# softmax. TMA descriptor loads (+-5%), warp_specialize=True (half the rate) and P.V accumulated in
# the wgmma (8.9% error) were measured and left out.
CONFIGS = [_cfg(64, 64, 1, 4)] if INTERPRET else [
    _cfg(128, 128, 2, 8),
    _cfg(128, 128, 3, 8),
    _cfg(128, 64, 2, 8),
    _cfg(128, 64, 3, 8),
    _cfg(64, 128, 2, 4),
    _cfg(64, 128, 3, 4),
    _cfg(64, 64, 3, 4),
]


@triton.autotune(configs=CONFIGS, key=["S_BUCKET", "HEAD_DIM"], cache_results=AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=["S_BUCKET"])
def _attention_kernel(
    q8_ptr, k8_ptr, v8t_ptr, qs_ptr, ks_ptr, vs_ptr, o0_ptr, o1_ptr,
    S0, SQ, H, SQ_PAD, SK_PAD, S_BUCKET,
    o0_b, o0_s, o0_h, o1_b, o1_s, o1_h,
    HEAD_DIM: tl.constexpr, SOFT_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q8_ptr + bh * SQ_PAD * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    qs = tl.load(qs_ptr + bh * SQ_PAD + offs_m)
    k_ptrs = k8_ptr + bh * SK_PAD * HEAD_DIM + offs_n[None, :] * HEAD_DIM + offs_d[:, None]  # [D, BN]
    v_ptrs = v8t_ptr + bh * HEAD_DIM * SK_PAD + offs_d[None, :] * SK_PAD + offs_n[:, None]  # [BN, D]
    ks_ptrs = ks_ptr + bh * 2 * SK_PAD + offs_n  # K's scale; SK_PAD further: its offset (bias included)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for _ in range(0, SK_PAD, BLOCK_N):
        k = tl.load(k_ptrs)
        s = tl.dot(q, k)  # int32, exact: |s| <= 127^2 * D = 2,064,512 < 2^22
        # int32 -> fp32 without I2F (a quarter-rate conversion on sm90, as slow as the exp2s): for
        # |s| < 2^22, the bits of s + 0x4B400000 are the float 1.5 * 2^23 + s, exactly; the
        # 1.5 * 2^23 * k_scale it adds is taken back by K's offset in the same multiply-add, so
        # t = s * k_scale + bias (one rounding of the offset: ~2^-24 * 1.5 * 2^23 = 0.75 units of
        # the integer score, under its int8 quantization error of ~sqrt(D) units).
        sf = (s + 0x4B400000).to(tl.float32, bitcast=True)
        t = sf * tl.load(ks_ptrs)[None, :] + tl.load(ks_ptrs + SK_PAD)[None, :]
        m_new = tl.maximum(m_i, tl.max(t, 1) * qs)  # qs > 0: max(t) * qs == max(t * qs)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far masked: p = 0, not NaN
        # p = 448 * 2^(t qs - m): P's fixed e4m3 scale folded into the exponent (one multiply less
        # per score; l carries the same factor, so out = acc * v_scale / l needs no 1/448). p <= 448
        # up to exp2's rounding, which the saturating cast (and the rounding to 448) absorbs.
        p = tl.math.exp2(t * qs[:, None] - (m_safe - LOG2_P_SCALE)[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if SOFT_FP8:
            p8 = soft_e4m3_bits(p).to(tl.float8e4nv, bitcast=True)
        else:
            p8 = p.to(tl.float8e4nv)
        v = tl.load(v_ptrs)
        if SOFT_FP8:  # stored as raw e4m3 bits (uint8) under the interpreter
            v = v.to(tl.float8e4nv, bitcast=True)
        # A fresh fp32 dot per block added to the fp32 accumulator: accumulation across key blocks
        # is fp32 whatever precision wgmma keeps inside one BLOCK_N-long e4m3 dot.
        acc = acc * alpha[:, None] + tl.dot(p8, v)
        m_i = m_new
        k_ptrs += BLOCK_N * HEAD_DIM
        v_ptrs += BLOCK_N
        ks_ptrs += BLOCK_N
    vs = tl.load(vs_ptr + bh * HEAD_DIM + offs_d)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a fully masked row: acc = 0, out = 0
    out = acc * vs[None, :] / l_safe[:, None]
    if INTERPRET_C and o1_ptr.dtype.element_ty == tl.bfloat16:
        out = round_fp32_to_bf16_grid(out)
    in0 = offs_m < S0
    in1 = (offs_m >= S0) & (offs_m < SQ)
    p0 = o0_ptr + b * o0_b + h * o0_h + offs_m[:, None] * o0_s + offs_d[None, :]
    p1 = o1_ptr + b * o1_b + h * o1_h + (offs_m - S0)[:, None] * o1_s + offs_d[None, :]
    tl.store(p0, out.to(o0_ptr.dtype.element_ty), mask=in0[:, None])
    tl.store(p1, out.to(o1_ptr.dtype.element_ty), mask=in1[:, None])


# With FMA contraction, as measured (run 10): the softmax's exp2 argument ``s * scale - m`` is one
# FFMA in the inner loop, as in FlashAttention; these kernels are held to stated tolerances
# against their reference, not to bit equality.
_launch_stats = make_launcher(_stats_kernel, fp_fusion=True)
_launch_quantize = make_launcher(_quantize_kernel, fp_fusion=True)
_launch_attention = make_launcher(_attention_kernel, fp_fusion=True)


def _pad(s: int) -> int:
    return -(-s // PAD) * PAD


def _bhsd_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, S, H, D] tensor (D contiguous)."""
    return x.stride(0), x.stride(1), x.stride(2)


def _quantize(kind: int, x0, x1, stat, count, bias, b: int, h: int, s0: int, s: int, d: int, scale_mul: float):
    s_pad = _pad(s)
    dev = x0.device
    if kind == 2:
        out = torch.empty(b * h, d, s_pad, dtype=torch.float8_e4m3fn, device=dev)
        out_arg = out.view(torch.uint8) if INTERPRET else out
        scale = stat  # unused by the V kind
    else:
        out = torch.empty(b * h, s_pad, d, dtype=torch.int8, device=dev)
        out_arg = out
        # K: [B*H, 2, S_pad] (scale, offset); Q: [B*H, S_pad]
        scale = torch.empty((b * h, 2, s_pad) if kind == 1 else (b * h, s_pad), dtype=torch.float32, device=dev)
    _launch_quantize(
        (s_pad // _QUANT_BLOCK, b * h), (),
        (x0, x1, stat, count, bias, out_arg, scale, s0, s, h, s_pad, *_bhsd_strides(x0), *_bhsd_strides(x1)),
        KIND=kind, SCALE_MUL=scale_mul, HEAD_DIM=d, BLOCK=_QUANT_BLOCK, SOFT_FP8=INTERPRET,
    )
    return out, scale


_QUANT_BLOCK = 64  # tokens per program of the quantization kernels
_STATS_BLOCK = 64  # tokens per program of the statistics kernel (128 spills at 4 warps: 2 x 128 x 128 fp32)


def quantize_segments(q0, q1, k0, k1, v0, v1, bias: torch.Tensor, sm_scale: float):
    """The quantization pass. Inputs [B, S_i, H, D] (D contiguous; segment 0 may have 0 tokens).
    ``bias``: the [B, SK_pad] key bias (statistics over attended keys
    only: a masked key's values, however large, do not coarsen the grids). Returns the kernel
    operands (see the module doc)."""
    b, sq1, h, d = q1.shape
    sq0, sk0 = q0.shape[1], k0.shape[1]
    sq, sk = sq0 + sq1, sk0 + k1.shape[1]
    sk_pad = bias.shape[1]
    dev = q1.device
    # Per (batch, head) channel statistics over the attended keys: K's sum (its mean, for the
    # smoothing: any vector would keep the result exact, the mean makes K's int8 grid finest) and
    # V's abs-max, in one read of K and V.
    ksum = torch.zeros(b * h, d, dtype=torch.float32, device=dev)
    vmax = torch.zeros(b * h, d, dtype=torch.float32, device=dev)
    count = torch.zeros(b * h, dtype=torch.float32, device=dev)
    _launch_stats(
        (sk_pad // _STATS_BLOCK, b * h), (),
        (k0, k1, v0, v1, bias, ksum, vmax, count, sk0, sk, h, sk_pad, *_bhsd_strides(k0), *_bhsd_strides(k1),
         *_bhsd_strides(v0), *_bhsd_strides(v1)),
        HEAD_DIM=d, BLOCK=_STATS_BLOCK,
    )
    v_scale = torch.where(vmax == 0, 1.0, vmax / E4M3_MAX)
    q8, qs = _quantize(0, q0, q1, ksum, count, bias, b, h, sq0, sq, d, sm_scale * LOG2E)
    k8, ks = _quantize(1, k0, k1, ksum, count, bias, b, h, sk0, sk, d, 1.0)
    v8t, _ = _quantize(2, v0, v1, v_scale, count, bias, b, h, sk0, sk, d, 1.0)
    return q8, qs, k8, ks, v8t, v_scale


def attention_core(q8, qs, k8, ks, v8t, vs, o0, o1, sq0: int, sq: int) -> None:
    """The attention kernel on operands from :func:`quantize_segments` (the key bias is in K's
    offsets): queries [0, sq0) into ``o0``, [sq0, sq) into ``o1`` ([B, S_i, H, D] views)."""
    bh, sq_pad, d = q8.shape
    h = o1.shape[2]
    sk_pad = k8.shape[1]
    s_bucket = min(next_power_of_2(sk_pad), 32768)
    _launch_attention(
        lambda meta: (sq_pad // meta["BLOCK_M"], bh), (s_bucket, d),
        (q8, k8, v8t.view(torch.uint8) if INTERPRET else v8t, qs, ks, vs, o0, o1,
         sq0, sq, h, sq_pad, sk_pad, s_bucket, *_bhsd_strides(o0), *_bhsd_strides(o1)),
        HEAD_DIM=d, SOFT_FP8=INTERPRET,
    )


def attention_8bit(q0, k0, v0, q1, k1, v1, bias: torch.Tensor, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the joint sequence (segment 0 then segment 1; [B, S_i, H, D] views, segment 0
    possibly empty): (o0, o1), new [B, S_i, H, D] tensors. ``bias``: fp32 [B, SK_pad] (0 / -inf;
    -inf past Sk). The "cuda" implementation of ``qkernels.attention.ops.int8_fp8_attention``."""
    o0 = torch.empty(q0.shape, dtype=q0.dtype, device=q0.device)
    o1 = torch.empty(q1.shape, dtype=q1.dtype, device=q1.device)
    ops = quantize_segments(q0, q1, k0, k1, v0, v1, bias, sm_scale)
    sq0 = q0.shape[1]
    attention_core(*ops, o0, o1, sq0, sq0 + q1.shape[1])
    return o0, o1
