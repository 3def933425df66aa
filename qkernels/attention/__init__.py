"""Attention: INT8 Q K^T / FP8 P.V (SageAttention2's algorithm, Triton) and the fastest bf16 SDPA.

    >>> from qkernels.attention import sdpa
    >>> out = sdpa(q, k, v)                       # [B, H, S, D] bf16/fp16, quantized kernel
    >>> out = sdpa(q, k, v, mode="bf16")          # torch SDPA, cuDNN first on Hopper

``joint_attention`` is the same computation on a sequence held in two pieces (Qwen-Image's text
and image streams, [B, S_i, H, D] each) without concatenating them; ``qkernels.attention.diffusers``
plugs both modes into a diffusers transformer.

Importing this package imports torch only; Triton is imported on the first quantized call.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..errors import InputError, UnsupportedShapeError

__all__ = ["MODES", "HEAD_DIMS", "sdpa", "joint_attention"]

MODES = ("int8-fp8", "bf16")
HEAD_DIMS = (64, 128)  # the quantized kernel's head dims: one wgmma K-tile multiple (32), <= 128 registers-wise
_DTYPES = (torch.bfloat16, torch.float16)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"unknown attention mode {mode!r}; use one of {', '.join(MODES)}")


def _check_qkv(q, k, v, layout: str) -> None:
    """q, k, v in ``layout`` ('bhsd' or 'bshd'); same batch, heads, head dim; k and v same length."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != 4:
            raise InputError(f"{name} must be 4-D [{'B, H, S, D' if layout == 'bhsd' else 'B, S, H, D'}], "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise InputError(f"{name} dtype {t.dtype} not supported by the int8-fp8 attention; use bfloat16 or "
                             "float16")
        if t.stride(-1) != 1:
            raise InputError(f"{name} must be contiguous along the head dim (stride(-1) == 1), got strides "
                             f"{t.stride()}")
    hd = (1, 3) if layout == "bhsd" else (2, 3)
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or any(
            not (q.shape[i] == k.shape[i] == v.shape[i]) for i in hd):
        raise InputError(f"query/key/value batch, heads and head dim differ: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)} (grouped-query attention is not supported)")
    seq = 2 if layout == "bhsd" else 1
    if k.shape[seq] != v.shape[seq]:
        raise InputError(f"key has {k.shape[seq]} tokens, value {v.shape[seq]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise InputError(f"query/key/value dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise UnsupportedShapeError(f"head dim {q.shape[-1]} not supported by the int8-fp8 attention kernel; "
                                    f"supported: {HEAD_DIMS} (use mode='bf16')")
    if q.device != k.device or q.device != v.device:
        raise InputError("query, key and value are on different devices")


@functools.lru_cache(maxsize=64)
def _unmasked_bias(b: int, sk: int, sk_pad: int, device: torch.device) -> torch.Tensor:
    """The key bias without a mask (0, then -inf on the padding), built once per shape: the kernel only
    reads it."""
    bias = torch.full((b, sk_pad), float("-inf"), dtype=torch.float32, device=device)
    bias[:, :sk] = 0.0
    return bias


def _key_bias(attn_mask: torch.Tensor | None, b: int, sk: int, sk_pad: int, device) -> torch.Tensor:
    """The kernel's [B, SK_pad] fp32 key bias: 0 attend, -inf masked and past Sk. ``attn_mask``: bool
    (True = attend) or additive float, [B, Sk] or broadcastable to [B, 1, 1, Sk]."""
    if attn_mask is None:
        return _unmasked_bias(b, sk, sk_pad, device)
    bias = torch.full((b, sk_pad), float("-inf"), dtype=torch.float32, device=device)
    m = attn_mask
    if m.dim() == 4:
        if m.shape[1] != 1 or m.shape[2] != 1:
            raise UnsupportedShapeError(
                f"attention mask of shape {tuple(m.shape)}: the int8-fp8 kernel takes key-padding masks only "
                "([B, Sk] or [B, 1, 1, Sk]); use mode='bf16' for per-query or per-head masks")
        m = m[:, 0, 0]
    if m.dim() != 2 or m.shape[-1] != sk or m.shape[0] not in (1, b):
        raise UnsupportedShapeError(f"attention mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                                    f"[{b}, 1, 1, {sk}]")
    if m.dtype == torch.bool:
        bias[:, :sk] = torch.where(m, 0.0, float("-inf"))
    elif m.is_floating_point():
        bias[:, :sk] = m.float()
    else:
        raise InputError(f"attention mask dtype {m.dtype}: use bool (True = attend) or an additive float mask")
    return bias


def joint_attention(q0: torch.Tensor | None, k0: torch.Tensor | None, v0: torch.Tensor | None,
                    q1: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor,
                    attn_mask: torch.Tensor | None = None, scale: float | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """int8-fp8 attention over the joint sequence [segment 0; segment 1], inputs [B, S_i, H, D]
    (any strides with D contiguous; segment 0 may be None). Returns (o0, o1), [B, S_i, H, D] each,
    written by the kernel with no concatenation or split copy. ``attn_mask``: a key-padding mask over
    the joint keys ([B, S0 + S1] or [B, 1, 1, S0 + S1], bool or additive).

    CUDA: the Triton kernel; elsewhere the PyTorch reference of the same arithmetic (slow; the kernel
    under TRITON_INTERPRET=1)."""
    from .ops import int8_fp8_attention
    from .reference import PAD

    _check_qkv(q1, k1, v1, "bshd")
    single = q0 is None
    if single:
        q0, k0, v0 = q1[:, :0], k1[:, :0], v1[:, :0]  # an empty segment 0: same strides, no tokens
    else:
        _check_qkv(q0, k0, v0, "bshd")
        if q0.shape[0] != q1.shape[0] or q0.shape[2:] != q1.shape[2:] or q0.dtype != q1.dtype:
            raise InputError(f"the two segments differ in batch, heads, head dim or dtype: {tuple(q0.shape)} "
                             f"{q0.dtype} vs {tuple(q1.shape)} {q1.dtype}")
    b, _, h, d = q1.shape
    sk = k0.shape[1] + k1.shape[1]
    bias = _key_bias(attn_mask, b, sk, -(-sk // PAD) * PAD, q1.device)
    o0, o1 = int8_fp8_attention(q0, k0, v0, q1, k1, v1, bias, scale if scale is not None else 1.0 / math.sqrt(d))
    return (None if single else o0), o1


def _bf16_sdpa(q, k, v, attn_mask, scale):
    """torch SDPA on the tensors as given (no contiguous copies; SDPA takes strided [B, H, S, D]).
    cuDNN first on Hopper: 601-643 TFLOP/s at [1, 24, 8400, 128] on the H200 against flash's
    327-357 (benchmarks/results/h200/probe-attention-peers.json)."""
    if q.is_cuda and _cudnn_first(q.device):
        if attn_mask is None and q.dtype in _DTYPES:
            # cuDNN's op directly: no SDPA backend selection or context manager on the host path
            try:
                return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False,
                                                                           scale=scale)[0]
            except RuntimeError:  # a shape or layout cuDNN refuses: SDPA's own choice below
                pass
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_CUDNN_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


_CUDNN_FIRST: dict = {}
_CUDNN_ORDER: list = []


def _cudnn_first(device: torch.device) -> bool:
    """Whether to put cuDNN first: on sm90+ with cuDNN SDPA compiled in (decided once per device)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    hit = _CUDNN_FIRST.get(key)
    if hit is None:
        from torch.nn.attention import SDPBackend

        _CUDNN_ORDER[:] = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                           SDPBackend.MATH]
        hit = torch.cuda.get_device_capability(key) >= (9, 0) and torch.backends.cudnn.is_available()
        _CUDNN_FIRST[key] = hit
    return hit


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         scale: float | None = None, mode: str = "int8-fp8", is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention on [B, H, S, D] tensors, shaped like
    ``torch.nn.functional.scaled_dot_product_attention``; out [B, H, Sq, D] in q's dtype.

    ``mode="int8-fp8"``: the quantized Triton kernel (bf16/fp16 inputs, head dim 64 or 128, a
    key-padding mask, no causal mask); ``mode="bf16"``: torch SDPA, cuDNN first on Hopper.
    A row whose keys are all masked gives zeros (torch SDPA gives NaN there in bf16 mode). The
    int8-fp8 result is a [B, H, S, D] view of a [B, S, H, D]-contiguous tensor."""
    _check_mode(mode)
    if is_causal:
        raise UnsupportedShapeError("causal attention is not supported: the kernels are for diffusion transformers "
                                    "(non-causal); use torch.nn.functional.scaled_dot_product_attention")
    if mode == "bf16":
        return _bf16_sdpa(q, k, v, attn_mask, scale)
    _check_qkv(q, k, v, "bhsd")
    # [B, H, S, D] -> the kernel's [B, S, H, D] view: a transpose, no copy. The result is a
    # [B, H, S, D] view of the kernel's [B, S, H, D] output (the layout an out-projection reads).
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return joint_attention(None, None, None, qt, kt, vt, attn_mask, scale)[1].transpose(1, 2)
