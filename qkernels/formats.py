"""Quantized formats: what a layer stores, independent of the kernel that computes with it.

| format       | weight                 | weight scale      | activations                        |
| ------------ | ---------------------- | ----------------- | ---------------------------------- |
| `w8a8-int8`  | int8 [N, K] symmetric  | fp32 [N]          | int8, per token or static          |
| `w8a8-fp8`   | float8_e4m3fn [N, K]   | fp32 [N]          | e4m3, per token or static          |
| `w8-int8`    | int8 [N, K]            | fp32 [N]          | none (weight-only, compute in bf16)|
| `w8-fp8`     | float8_e4m3fn [N, K]   | fp32 [N]          | none                               |

Arithmetic shared by every kernel, so that each one can be checked bit for bit against this file:

* scale = amax / qmax per row (weights: per output channel; activations: per token),
  computed in fp32; an all-zero row gets scale 1.0 (finite, and its values quantize to exact 0);
  a row holding NaN/Inf gets a non-finite scale, so its outputs are non-finite too.
* weights and static activations: q = x / scale (an IEEE division); dynamic per-token
  activations: q = x * (1 / scale), one IEEE division a row and an exact multiply per element
  (the quant pass runs on every call, and on a GPU a division costs ~8 instructions an element
  where the pass should be memory-bound), with the scale at least 2^-126
  (``MIN_ACTIVATION_SCALE``) so that its reciprocal is finite. Then for int8
  round-half-to-even and clamp to [-127, 127]; for e4m3 clamp to [-448, 448] and the cast's
  own round-to-nearest-even.
* SmoothQuant: the weight was multiplied by ``input_smooth`` [K] before quantizing; the
  activation is divided by it (x / smooth, fp32) before its amax is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError

__all__ = [
    "Format",
    "FORMATS",
    "get_format",
    "quantize_weight",
    "dequantize_weight",
    "quantize_per_token",
    "quantize_per_tensor",
    "static_scale_from_amax",
    "MIN_ACTIVATION_SCALE",
]


@dataclass(frozen=True)
class Format:
    name: str
    dtype: torch.dtype  # storage dtype of the weight (and of activations when quantized)
    qmax: float  # largest representable magnitude used for scaling
    quantizes_activations: bool

    @property
    def is_fp8(self) -> bool:
        return self.dtype == torch.float8_e4m3fn


INT8_MAX = 127.0
# e4m3fn's largest finite value; its grid spacing near 448 is 32, so clamping before the cast
# keeps out-of-range values from becoming NaN (e4m3fn has no Inf).
FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("w8a8-int8", torch.int8, INT8_MAX, True),
        Format("w8a8-fp8", torch.float8_e4m3fn, FP8_E4M3_MAX, True),
        Format("w8-int8", torch.int8, INT8_MAX, False),
        Format("w8-fp8", torch.float8_e4m3fn, FP8_E4M3_MAX, False),
    )
}


def get_format(name: str | Format) -> Format:
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None


# The smallest normal fp32: a per-token activation scale is never below it, so its reciprocal is
# finite (a row whose amax is under 448 * 2^-126 would otherwise get an infinite one, and 0 * inf
# is NaN).
MIN_ACTIVATION_SCALE = 2.0 ** -126


def _row_scale(amax: torch.Tensor, qmax: float, floor: float | None = None) -> torch.Tensor:
    """amax / qmax (at least ``floor``), 1.0 where amax is 0, NaN where amax is NaN."""
    # `amax == 0` rather than `amax > 0`: a NaN amax must give a NaN scale, not a finite one.
    # Divide by a tensor, not the Python float: CUDA torch turns `tensor / scalar` into a multiply
    # by the rounded reciprocal (CPU divides), so scales would depend on the device (seen on H100:
    # per-token scales 1 ulp off the CPU ones, and off the kernels' IEEE division).
    s = amax / torch.full_like(amax, qmax)
    if floor is not None:
        s = torch.maximum(s, torch.full_like(s, floor))  # maximum propagates a NaN amax
    return torch.where(amax == 0, torch.ones_like(amax), s)


def _cast(q: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Round/clamp/cast ``q``, a temporary the caller owns: in place, since on CPU every fresh
    [M, K] fp32 allocation costs page faults (measured: 1.5 -> 0.9 ms per token quantization
    at 512 x 3072 on 2 cores)."""
    if not fmt.is_fp8:
        q = q.round_()
    return q.clamp_(-fmt.qmax, fmt.qmax).to(fmt.dtype)


def _abs_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max |x| along ``dim`` without materialising |x|; NaN propagates like amax(abs(x))."""
    return torch.maximum(x.amax(dim=dim), -x.amin(dim=dim))


# Rows quantized at a time: bounds the fp32 temporaries of a weight to CHUNK * K * 4 bytes
# (48 MiB at K = 12288), so quantizing never needs a second full-precision copy of a layer.
_WEIGHT_CHUNK_ROWS = 1024


@torch.no_grad()
def quantize_weight(
    weight: torch.Tensor, fmt: str | Format, input_smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of a [N, K] weight.

    Returns ``(q [N, K] int8/e4m3, scale [N] fp32)`` with ``weight * smooth ~= q * scale[:, None]``.
    """
    fmt = get_format(fmt)
    if weight.dim() != 2:
        raise InputError(f"weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
    n, k = weight.shape
    q = torch.empty((n, k), dtype=fmt.dtype, device=weight.device)
    scale = torch.empty((n,), dtype=torch.float32, device=weight.device)
    smooth = None if input_smooth is None else input_smooth.to(weight.device, torch.float32)
    for start in range(0, n, _WEIGHT_CHUNK_ROWS):
        rows = slice(start, min(start + _WEIGHT_CHUNK_ROWS, n))
        w = weight[rows].float()
        if smooth is not None:
            w = w * smooth
        s = _row_scale(_abs_max(w, 1), fmt.qmax)
        q[rows] = _cast(w / s[:, None], fmt)
        scale[rows] = s
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale[:, None]`` computed in fp32, returned in ``dtype``.

    One pass that writes ``dtype`` (torch computes int8 x fp32 in fp32 and casts on the store), not
    ``q.float() * scale`` then ``.to(dtype)``, whose two fp32 [N, K] temporaries moved ~4x the
    bytes: the int8 text encoder's upcast cost ~45 ms a prompt on an H200 (run 7). On CUDA the
    layerwise backends call ``gemms.dequantize_weight``, a Triton kernel with the same arithmetic,
    since torch's mixed-dtype multiply takes a slow per-element casting path there (run 9).
    e4m3 is widened to bf16 first (exact: every e4m3 value is a bf16 value), as torch does not
    promote float8 types."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    src = q.to(torch.bfloat16) if q.dtype == torch.float8_e4m3fn else q
    return torch.mul(src, scale.float()[:, None], out=out)


def _smoothed(x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth.float()
    return xf


def quantize_per_token(
    x: torch.Tensor, fmt: str | Format, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) quantization of a [M, K] activation.

    Returns ``(q [M, K], scale [M] fp32)``. This is the reference every kernel must equal.
    """
    fmt = get_format(fmt)
    xf = _smoothed(x, smooth)
    scale = _row_scale(_abs_max(xf, -1), fmt.qmax, MIN_ACTIVATION_SCALE)
    inv = torch.ones_like(scale) / scale  # an IEEE division (tensor / tensor, on CPU and CUDA)
    return _cast(xf * inv[..., None], fmt), scale  # a fresh tensor: x.float() may be x itself


def quantize_per_tensor(
    x: torch.Tensor, scale: torch.Tensor, fmt: str | Format, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static quantization with a calibrated per-tensor ``scale`` (a 0-d or 1-element fp32 tensor).

    Returns ``(q [M, K], row_scale [M] fp32)``: ``row_scale`` is ``scale`` in every finite row and
    NaN in a row holding NaN/Inf, so the GEMM epilogue (the same as the dynamic one) makes that
    row's outputs non-finite instead of finite garbage. ``sum(x * 0)`` is 0 for a finite row and
    NaN otherwise, which costs one FMA per element inside a fused kernel.
    """
    fmt = get_format(fmt)
    xf = _smoothed(x, smooth)
    s = scale.float().reshape(())
    row_scale = s + (xf * 0).sum(dim=-1)
    return _cast(xf / s, fmt), row_scale


def static_scale_from_amax(amax: torch.Tensor | float, fmt: str | Format) -> torch.Tensor:
    """The per-tensor activation scale for a calibrated abs-max (0-d fp32 tensor)."""
    fmt = get_format(fmt)
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    if not torch.isfinite(a) or a < 0:
        raise InputError(f"a static activation scale needs a finite, non-negative abs-max, got {a.item()}")
    return _row_scale(a, fmt.qmax)
