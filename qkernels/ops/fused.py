"""Fused block ops: GEMMs with an elementwise epilogue, LayerNorm + modulate + quant, and q/k
RMSNorm + RoPE into the joint attention layout. Each is a :class:`KernelOp` whose reference is
plain PyTorch and defines the arithmetic: that of the unfused bf16 block (diffusers'
Qwen-Image), rounding to the activation dtype after every op that rounds there.

The "cuda" implementations are Triton launchers (``qkernels.triton``), registered lazily by
``qkernels.backends.triton_backends``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import formats
from . import KernelOp, int_mm

__all__ = ["int8_gemm_fused", "fp8_gemm_fused", "fp8_gemm_tma_fused", "gemm_epilogue", "layernorm_modulate_quant",
           "qk_norm_rope", "gemm_epilogue_reference", "scaled_fp32"]


def scaled_fp32(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``acc * a_scale[m] * w_scale[n] (+ bias)`` in fp32, the order of ``dequant_epilogue``."""
    y = acc.float()
    y.mul_(a_scale[:, None]).mul_(w_scale[None, :])
    if bias is not None:
        y.add_(bias.float())
    return y


def _round(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return y.to(dtype).float() if dtype != torch.float32 else y


def gemm_epilogue_reference(y: torch.Tensor, out_dtype: torch.dtype, gelu: bool, residual: torch.Tensor | None,
                            gate: torch.Tensor | None, gate_rows: torch.Tensor | None) -> torch.Tensor:
    """The epilogue of a fused GEMM on its fp32 result ``y`` [M, N], out in ``out_dtype``.

    As the unfused block computes it: the Linear's output rounds to ``out_dtype``; GELU-tanh
    (``v * sigmoid(2u)``, ``u = sqrt(2/pi) (v + 0.044715 v^3)``, which is
    ``0.5 v (1 + tanh u)``) in fp32 from it, one rounding; the gated residual
    ``residual + round(gate[gate_rows] * y)``, one rounding at the end.
    """
    y = _round(y, out_dtype)
    if gelu:
        u = 0.7978845608028654 * (y + 0.044715 * (y * y * y))
        y = y / (1.0 + torch.exp(-2.0 * u))
    if residual is not None:
        y = residual.float() + _round(gate[gate_rows.long()].float() * y, out_dtype)
    return y.to(out_dtype)


def _int8_fused_ref(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, gelu: bool, residual: torch.Tensor | None,
                    gate: torch.Tensor | None, gate_rows: torch.Tensor | None) -> torch.Tensor:
    return gemm_epilogue_reference(scaled_fp32(int_mm(a, w), a_scale, w_scale, bias), out_dtype, gelu, residual,
                                   gate, gate_rows)


def _fp8_fused_ref(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype, gelu: bool, residual: torch.Tensor | None,
                   gate: torch.Tensor | None, gate_rows: torch.Tensor | None) -> torch.Tensor:
    # e4m3 x e4m3 products are exact in fp32 (4-bit significands); only the sum rounds.
    return gemm_epilogue_reference(scaled_fp32(a.float() @ w.float().t(), a_scale, w_scale, bias), out_dtype, gelu,
                                   residual, gate, gate_rows)


def _gemm_fused_fake(a, a_scale, w, w_scale, bias, out_dtype, gelu, residual, gate, gate_rows):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


def _epilogue_fake(y, out_dtype, gelu, residual, gate, gate_rows):
    return y.new_empty(y.shape, dtype=out_dtype)


# The epilogue alone, on a GEMM's output [M, N] (fp32, or already rounded to out_dtype): for the
# backends whose GEMM is not ours (torch._scaled_mm, torch._int_mm, cuBLASLt). On CUDA one Triton
# pass instead of the reference's ~8 fp32 elementwise ones over [M, N].
gemm_epilogue = KernelOp("gemm_epilogue", gemm_epilogue_reference, _epilogue_fake)
int8_gemm_fused = KernelOp("int8_gemm_fused", _int8_fused_ref, _gemm_fused_fake)
fp8_gemm_fused = KernelOp("fp8_gemm_fused", _fp8_fused_ref, _gemm_fused_fake)
fp8_gemm_tma_fused = KernelOp("fp8_gemm_tma_fused", _fp8_fused_ref, _gemm_fused_fake)


# --------------------------------------------------------------------------------------------
# LayerNorm + modulate + per-token quant


def modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate_rows: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[g]) + shift[g]`` in x's dtype, as Qwen-Image's block does it
    (LayerNorm with no affine, then each op rounding in the activation dtype)."""
    g = gate_rows.long()
    y = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return y * (1 + scale[g]) + shift[g]


def _lmq_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate_rows: torch.Tensor, eps: float,
             fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return formats.quantize_per_token(modulate_reference(x, shift, scale, gate_rows, eps),
                                      "w8a8-fp8" if fp8 else "w8a8-int8")


def _lmq_fake(x, shift, scale, gate_rows, eps, fp8):
    dtype = torch.float8_e4m3fn if fp8 else torch.int8
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


layernorm_modulate_quant = KernelOp("layernorm_modulate_quant", _lmq_ref, _lmq_fake)


# --------------------------------------------------------------------------------------------
# q/k RMSNorm + RoPE, joint [text, image] layout


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers' RMSNorm: fp32 mean of squares, x * rsqrt, cast to the weight's dtype, * weight."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(var + eps)
    return y.to(w.dtype) * w if w.dtype in (torch.float16, torch.bfloat16) else (y * w).to(x.dtype)


def _rope(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """diffusers' complex RoPE (use_real=False): (even, odd) pairs times cos + i sin, in fp32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    f = torch.view_as_complex(cs.contiguous())[:, None, :]  # [L, 1, D/2] over heads
    return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)


def _qk_ref(qkv_txt: torch.Tensor, qkv_img: torch.Tensor, batch: int, heads: int,
            norm_txt_q: torch.Tensor | None, norm_txt_k: torch.Tensor | None, norm_img_q: torch.Tensor | None,
            norm_img_k: torch.Tensor | None, rope_txt: torch.Tensor, rope_img: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = []
    for qkv, nq, nk, cs in ((qkv_txt, norm_txt_q, norm_txt_k, rope_txt), (qkv_img, norm_img_q, norm_img_k, rope_img)):
        q, k, v = qkv.reshape(batch, qkv.shape[0] // batch, 3, heads, -1).unbind(2)
        if nq is not None:
            q, k = _rms(q, nq, eps), _rms(k, nk, eps)
        outs.append((_rope(q, cs), _rope(k, cs), v))
    return tuple(torch.cat([t, i], dim=1).contiguous() for t, i in zip(*outs))


def _qk_fake(qkv_txt, qkv_img, batch, heads, norm_txt_q, norm_txt_k, norm_img_q, norm_img_k, rope_txt, rope_img, eps):
    d = qkv_img.shape[1] // (3 * heads)
    shape = (batch, (qkv_txt.shape[0] + qkv_img.shape[0]) // batch, heads, d)
    return tuple(qkv_img.new_empty(shape) for _ in range(3))


qk_norm_rope = KernelOp("qk_norm_rope", _qk_ref, _qk_fake)
