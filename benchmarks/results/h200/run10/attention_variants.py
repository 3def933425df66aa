"""Run 10's variants of qkernels' int8-fp8 attention kernel (the probe beside this file times them).

Same arithmetic as ``qkernels.attention.int8_fp8_attention._attention_kernel``; only how the loop is
fed and scheduled differs:

* ``_attention_kernel_tma``: Q, K, V and K's scale/offset rows through TMA tensor descriptors;
  ``WS``: ``tl.range(..., warp_specialize=True)`` (Triton's automatic warp specialization; on sm90 it
  compiles only when every loop load is a descriptor load); ``ACC_MMA``: P.V accumulated by the
  wgmma into the running accumulator instead of a fresh dot added to it.
* ``_attention_kernel_sp``: software-pipelined by hand (block j+1's Q K^T issued before block j's
  softmax; ``FORM`` 1/2 spell the next block's dot as an accumulator-carrying one). Compiled with
  Triton 3.6 for sm90, every form still waits for each wgmma right after issuing it
  (``wgmma.wait_group 0``), so it was not timed.

Kept here, not in the package: none beat the shipped kernel (see NOTES.md, run 10).
"""

import triton
import triton.language as tl

from qkernels.attention.int8_fp8_attention import LOG2_P_SCALE


@triton.jit
def _attention_kernel_tma(
    q_desc, k_desc, v_desc, qs_ptr, ks_desc, vs_ptr, o0_ptr, o1_ptr,
    S0, SQ, H, SQ_PAD, SK_PAD, S_BUCKET,
    o0_b, o0_s, o0_h, o1_b, o1_s, o1_h,
    HEAD_DIM: tl.constexpr, SOFT_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr, ACC_MMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = q_desc.load([bh * SQ_PAD + pid_m * BLOCK_M, 0])
    qs = tl.load(qs_ptr + bh * SQ_PAD + offs_m)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    krow = bh * SK_PAD
    for start in tl.range(0, SK_PAD, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([krow + start, 0]).T
        s = tl.dot(q, k)
        sf = (s + 0x4B400000).to(tl.float32, bitcast=True)
        ksc = ks_desc.load([2 * bh, start]).reshape(BLOCK_N)
        kof = ks_desc.load([2 * bh + 1, start]).reshape(BLOCK_N)
        t = sf * ksc[None, :] + kof[None, :]
        m_new = tl.maximum(m_i, tl.max(t, 1) * qs)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(t * qs[:, None] - (m_safe - LOG2_P_SCALE)[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        p8 = p.to(tl.float8e4nv)
        v = v_desc.load([bh * HEAD_DIM, start]).T
        if ACC_MMA:
            acc = tl.dot(p8, v, acc * alpha[:, None])
        else:
            acc = acc * alpha[:, None] + tl.dot(p8, v)
        m_i = m_new
    vs = tl.load(vs_ptr + bh * HEAD_DIM + offs_d)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * vs[None, :] / l_safe[:, None]
    in0 = offs_m < S0
    in1 = (offs_m >= S0) & (offs_m < SQ)
    p0 = o0_ptr + b * o0_b + h * o0_h + offs_m[:, None] * o0_s + offs_d[None, :]
    p1 = o1_ptr + b * o1_b + h * o1_h + (offs_m - S0)[:, None] * o1_s + offs_d[None, :]
    tl.store(p0, out.to(o0_ptr.dtype.element_ty), mask=in0[:, None])
    tl.store(p1, out.to(o1_ptr.dtype.element_ty), mask=in1[:, None])



@triton.jit
def _attention_kernel_sp(
    q8_ptr, k8_ptr, v8t_ptr, qs_ptr, ks_ptr, vs_ptr, o0_ptr, o1_ptr,
    S0, SQ, H, SQ_PAD, SK_PAD, S_BUCKET,
    o0_b, o0_s, o0_h, o1_b, o1_s, o1_h,
    HEAD_DIM: tl.constexpr, SOFT_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FORM: tl.constexpr = 0,
):
    """Software-pipelined by hand: block j+1's Q K^T is issued before block j's softmax, so the
    wgmma of one overlaps the ALU work of the other (if the compiler keeps it in flight)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q8_ptr + bh * SQ_PAD * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    qs = tl.load(qs_ptr + bh * SQ_PAD + offs_m)
    k_ptrs = k8_ptr + bh * SK_PAD * HEAD_DIM + offs_n[None, :] * HEAD_DIM + offs_d[:, None]
    v_ptrs = v8t_ptr + bh * HEAD_DIM * SK_PAD + offs_d[None, :] * SK_PAD + offs_n[:, None]
    ks_ptrs = ks_ptr + bh * 2 * SK_PAD + offs_n
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    s = tl.dot(q, tl.load(k_ptrs))
    k_ptrs += BLOCK_N * HEAD_DIM
    for j in range(0, SK_PAD, BLOCK_N):
        kn = tl.load(k_ptrs, mask=(j + BLOCK_N + offs_n[None, :]) < SK_PAD, other=0)
        if FORM == 0:
            s_next = tl.dot(q, kn)
        elif FORM == 1:
            s_next = tl.dot(q, kn, tl.where(j >= 0, tl.zeros_like(s), s), out_dtype=tl.int32)
        else:
            s_next = s
        sf = (s + 0x4B400000).to(tl.float32, bitcast=True)
        t = sf * tl.load(ks_ptrs)[None, :] + tl.load(ks_ptrs + SK_PAD)[None, :]
        m_new = tl.maximum(m_i, tl.max(t, 1) * qs)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(t * qs[:, None] - (m_safe - LOG2_P_SCALE)[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        p8 = p.to(tl.float8e4nv)
        v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + tl.dot(p8, v)
        m_i = m_new
        if FORM == 2:
            s = tl.dot(q, kn, tl.where(j >= 0, tl.zeros_like(s), s), out_dtype=tl.int32)
        else:
            s = s_next
        k_ptrs += BLOCK_N * HEAD_DIM
        v_ptrs += BLOCK_N
        ks_ptrs += BLOCK_N
    vs = tl.load(vs_ptr + bh * HEAD_DIM + offs_d)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * vs[None, :] / l_safe[:, None]
    in0 = offs_m < S0
    in1 = (offs_m >= S0) & (offs_m < SQ)
    p0 = o0_ptr + b * o0_b + h * o0_h + offs_m[:, None] * o0_s + offs_d[None, :]
    p1 = o1_ptr + b * o1_b + h * o1_h + (offs_m - S0)[:, None] * o1_s + offs_d[None, :]
    tl.store(p0, out.to(o0_ptr.dtype.element_ty), mask=in0[:, None])
    tl.store(p1, out.to(o1_ptr.dtype.element_ty), mask=in1[:, None])
