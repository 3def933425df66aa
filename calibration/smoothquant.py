"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weight, per input channel.

    s_j = max|X_j|^alpha / max_n |W_nj|^(1 - alpha)
    y = (x / s) @ (W * s).T          # the same y, but x / s has no outlier channels

After smoothing, channel j's activation range is max|X_j|^(1-a) max|W_j|^a and its weight range
is the same number, so at alpha = 0.5 the difficulty is split evenly. The factors are folded
into the weight before it is quantized (``QuantLinear.from_linear(input_smooth=s)`` multiplies W
by s); the division of x by s happens inside the activation-quant kernel, on the fp32 value
before its amax is taken. In the paper the division is folded into the preceding LayerNorm's
gain instead; in a DiT most Linear inputs come out of adaLN modulation,
``norm(x) * (1 + scale(t)) + shift(t)``, whose scale and shift depend on the timestep and on
the sample, so there is no constant to fold s into: that is why the division lives in the
quant kernel (one extra multiply per element, free in a memory-bound kernel).
"""

from __future__ import annotations

import torch

from qkernels.errors import CalibrationError

__all__ = ["smoothing_factors", "SMOOTH_MIN", "SMOOTH_MAX"]

# s is clamped to [1e-5, 1e5]. Within that range x / s and W * s stay far inside fp32 (and bf16)
# range for any activation below 1e30; real factors stay well inside it (an outlier channel of
# 1e4 against a weight column of 1e-3 gives s = sqrt(1e7) ~ 3e3 at alpha = 0.5). Beyond it a
# factor only comes from a statistic that is nearly zero on one side, where smoothing has
# nothing to balance.
SMOOTH_MIN = 1e-5
SMOOTH_MAX = 1e5

# Rows of the weight reduced at a time: bounds the fp32 temporary to 1024 * K * 4 bytes
# (48 MiB at K = 12288), never a full fp32 copy of the layer.
_CHUNK_ROWS = 1024


@torch.no_grad()
def weight_channel_amax(weight: torch.Tensor) -> torch.Tensor:
    """max_n |W_nj| per input channel j of a [N, K] weight, fp32 [K], reduced in row chunks."""
    out = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        w = weight[start:start + _CHUNK_ROWS]
        out = torch.maximum(out, torch.maximum(w.amax(dim=0), w.amin(dim=0).neg()).float())
    return out


@torch.no_grad()
def smoothing_factors(channel_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant factors ``s`` [K] fp32 for a layer with ``weight`` [N, K] whose input has
    per-channel abs-max ``channel_amax`` [K] (``LayerStats.channel_amax``).

    ``alpha`` in [0, 1]: 0 leaves the activation's range alone (s_j = 1 / max|W_j|: the weight
    columns are equalized instead), 1 moves it all into the weight (s_j = max|X_j|). A channel
    with a zero or non-finite statistic on either side gets s = 1 (nothing to balance, and no
    0 / 0 or inf); the rest is clamped to [SMOOTH_MIN, SMOOTH_MAX].
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise CalibrationError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    if weight.dim() != 2:
        raise CalibrationError(f"weight must be [out_features, in_features], got {tuple(weight.shape)}")
    k = weight.shape[1]
    if tuple(channel_amax.shape) != (k,):
        raise CalibrationError(f"channel_amax has shape {tuple(channel_amax.shape)} ({channel_amax.numel()} channels), "
                               f"the weight {tuple(weight.shape)} has {k}: statistics of another layer or model?")
    a = channel_amax.to(weight.device, torch.float32)
    w = weight_channel_amax(weight)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w) & torch.isfinite(s)
    return torch.where(ok, s.clamp(SMOOTH_MIN, SMOOTH_MAX), torch.ones_like(s))
