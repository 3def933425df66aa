"""The quantized attention algorithm in plain PyTorch: the arithmetic the Triton kernel performs,
step for step, so that tests can compare the two (and both against float64 attention).

SageAttention2's algorithm (Zhang et al., 2024), for one head:

* K is smoothed by its channel mean over the attended tokens, ``K' = K - mean(K)``. Exact for softmax: row i
  of ``Q K'^T`` is row i of ``Q K^T`` minus the constant ``q_i . mean(K)``.
* Q and K' are quantized to int8 per block of ``Q_BLOCK`` / ``K_BLOCK`` tokens (symmetric,
  scale = amax / 127, round half to even; an all-zero block gets scale 1). The blocks are single
  tokens: the kernel applies the scales as row and column scales of S, which costs the same as a
  per-block scale, and a few large Q rows (or K rows) do not coarsen their neighbours' grids. ``sm_scale * log2(e)``
  is folded into Q's scale, so the dequantized score is already in the base-2 domain.
* ``S = (Q8 K8^T)`` in int32 (exact), dequantized as ``float(S) * k_scale[n] + bias[n]``, then
  multiplied by ``q_scale[m]``; the kernel converts S to float as the bits of ``S + 0x4B400000``
  (= 1.5 * 2^23 + S, exact) and folds the 1.5 * 2^23 into the offset ``bias - 1.5 * 2^23 * k_scale``; ``bias`` is 0 for a key that is attended to, -inf for a masked
  (or padding) key.
* online softmax over key blocks of ``BLOCK_N`` in fp32 with exp2: running max ``m``, running sum
  ``l`` of the unquantized ``p``;
* ``P`` (<= 1 after the max subtraction) is quantized to e4m3 with the fixed scale 448 (e4m3's
  largest normal), folded into the exponent: ``p = 2^(t - m + log2 448)``, and ``l`` sums those,
  so the scale cancels in ``acc / l``; V to e4m3 per channel (scale = channel amax / 448 over the attended tokens;
  a masked key's V is 0);
* each block's ``P8 @ V8`` is a fresh fp32 dot added to the fp32 accumulator (rescaled by
  ``alpha``): accumulation across blocks is fp32 (fp16 accumulation is what turns Qwen-Image
  black with Triton SageAttention);
* ``out = acc * v_scale / l``; a row whose keys are all masked has ``l = 0`` and gives 0.

Layouts here are the kernel's: q, k, v are [B, H, S, D] (any strides).
"""

from __future__ import annotations

import math

import torch

__all__ = ["Q_BLOCK", "K_BLOCK", "P_SCALE", "quantize_qkv", "quantized_attention", "attention_fp64",
           "key_bias"]

Q_BLOCK = 1  # tokens per Q scale
K_BLOCK = 1  # tokens per K scale
P_SCALE = 448.0  # e4m3 largest normal: P in [0, 1] -> [0, 448]
E4M3_MAX = 448.0
LOG2E = 1.4426950408889634
# The kernel's key/query padding: S is padded to a multiple of this (>= every BLOCK_M / BLOCK_N of
# qkernels.attention.int8_fp8_attention). Here, not there, so the mask's layout needs no Triton.
PAD = 128
LOG2_P_SCALE = math.log2(P_SCALE)
MAGIC = 12582912.0  # 1.5 * 2^23


def _block_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [BH, S, D] fp32 -> (int8 [BH, S, D], per-token scale [BH, S] fp32: its block's scale)."""
    bh, s, d = x.shape
    nb = -(-s // block)
    xp = torch.zeros(bh, nb * block, d, dtype=torch.float32, device=x.device)
    xp[:, :s] = x
    xb = xp.view(bh, nb, block * d)
    amax = xb.abs().amax(dim=-1)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / 127.0)
    q = torch.round(xb / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(bh, nb * block, d)[:, :s], scale.repeat_interleave(block, dim=1)[:, :s]


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                 bias: torch.Tensor | None = None):
    """(q8, q_scale, k8, k_scale, v8, v_scale) of [B, H, S, D] inputs, flattened to [B*H, ...].
    ``q_scale`` includes ``sm_scale * log2(e)``; ``v_scale`` is per (head, channel). ``bias``: the
    [B, Sk] key bias; K's mean and V's abs-max are taken over the attended keys (bias > -inf)
    only, and a masked key's V is stored as 0."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if bias is None:
        bias = torch.zeros(b, sk, device=q.device)
    attended = (bias > float("-inf")).repeat_interleave(h, dim=0)[:, :, None]  # [BH, Sk, 1]
    qf = q.float().reshape(b * h, sq, d)
    kf = k.float().reshape(b * h, sk, d)
    vf = torch.where(attended, v.float().reshape(b * h, sk, d), 0.0)
    n = attended.sum(dim=1).clamp(min=1).float()  # [BH, 1]
    k_mean = (torch.where(attended, kf, 0.0).sum(dim=1) / n)[:, None, :]
    q8, q_scale = _block_int8(qf, Q_BLOCK)
    k8, k_scale = _block_int8(kf - k_mean, K_BLOCK)
    vmax = vf.abs().amax(dim=1)  # [BH, D]
    v_scale = torch.where(vmax == 0, torch.ones_like(vmax), vmax / E4M3_MAX)
    v8 = (vf / v_scale[:, None, :]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q8, q_scale * (sm_scale * LOG2E), k8, k_scale, v8, v_scale


def key_bias(attn_mask: torch.Tensor | None, b: int, sk: int, device) -> torch.Tensor:
    """[B, Sk] fp32 additive key bias: 0 where a key is attended to, -inf where masked. ``attn_mask``:
    None, bool (True = attend) or additive float, of a shape broadcastable to [B, 1, 1, Sk]."""
    if attn_mask is None:
        return torch.zeros(b, sk, dtype=torch.float32, device=device)
    m = attn_mask.reshape(attn_mask.shape[0], attn_mask.shape[-1]).expand(b, sk)
    if m.dtype == torch.bool:
        return torch.where(m, 0.0, float("-inf")).float()
    return m.float()


def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        scale: float | None = None, block_n: int = 64) -> torch.Tensor:
    """The kernel's algorithm on [B, H, S, D] inputs; out [B, H, Sq, D] in q's dtype.
    ``block_n``: the key block of the online softmax (the kernel's BLOCK_N; P is quantized
    against the running max, so the blocking is part of the arithmetic)."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    bias = key_bias(attn_mask, b, sk, q.device)
    q8, qs, k8, ks, v8, vs = quantize_qkv(q, k, v, sm_scale, bias)
    bias = bias.repeat_interleave(h, dim=0)  # [BH, Sk]
    k_off = bias - MAGIC * ks
    bh = b * h
    m_i = torch.full((bh, sq), float("-inf"), device=q.device)
    l_i = torch.zeros(bh, sq, device=q.device)
    acc = torch.zeros(bh, sq, d, device=q.device)
    qi = q8.to(torch.int32)
    for n0 in range(0, sk, block_n):
        n1 = min(n0 + block_n, sk)
        s = torch.bmm(qi.double(), k8[:, n0:n1].to(torch.int32).double().transpose(1, 2)).to(torch.int32)  # exact
        # the kernel's conversion: float(1.5 * 2^23 + s) (exact) * k_scale + (bias - 1.5 * 2^23 * k_scale)
        sf = (s + 0x4B400000).view(torch.float32)
        t = sf * ks[:, None, n0:n1] + k_off[:, None, n0:n1]
        tq = t * qs[:, :, None]
        m_new = torch.maximum(m_i, tq.amax(dim=-1))
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        p = torch.exp2(tq - (m_safe - LOG2_P_SCALE)[..., None])  # P_SCALE * 2^(t - m), <= 448
        alpha = torch.exp2(m_i - m_safe)
        l_i = l_i * alpha + p.sum(dim=-1)
        p8 = p.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        pv = torch.bmm(p8.float(), v8[:, n0:n1].float())
        acc = acc * alpha[..., None] + pv
        m_i = m_new
    l_safe = torch.where(l_i == 0, 1.0, l_i)
    out = acc * vs[:, None, :] / l_safe[..., None]
    return out.view(b, h, sq, d).to(q.dtype)


def attention_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """Exact attention in float64 ([B, H, S, D]); a row with every key masked gives 0."""
    d = q.shape[-1]
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * sm_scale
    s = s + key_bias(attn_mask, q.shape[0], k.shape[2], q.device).double()[:, None, None, :]
    mx = s.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), 0.0, mx)
    p = torch.exp(s - mx)
    l = p.sum(dim=-1, keepdim=True)
    return torch.matmul(p, v.double()) / torch.where(l == 0, 1.0, l)
