"""SmoothQuant smoothing factors (Xiao et al., 2023): migrate activation outliers into the weight.

``y = x @ W.T = (x / s) @ (W * s).T``; with ``s_j = max|X_j|^a / max|W_j|^(1-a)`` both the smoothed
activation and the smoothed weight have flatter per-channel ranges, so per-token / per-channel
8-bit grids lose less. ``a = 0.5`` balances the two; larger ``a`` moves more range into the weight.
"""

from __future__ import annotations

import torch

__all__ = ["smoothing_factors"]

# s is clamped to [1e-5, 1e5]: a dead input channel (amax 0) or an all-zero weight column would
# otherwise give s = 0 or inf, and 1e5 still leaves e4m3/int8 headroom for a 1e-5-scaled weight.
_S_MIN, _S_MAX = 1e-5, 1e5
_EPS = 1e-8


@torch.no_grad()
def smoothing_factors(channel_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-input-channel factors ``s`` [K] fp32 for activation abs-max ``channel_amax`` [K] and a
    ``weight`` [N, K]: the weight is multiplied by ``s``, the activation divided by it."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = channel_amax.detach().float().reshape(-1)
    if weight.dim() != 2 or weight.shape[1] != a.numel():
        raise ValueError(f"channel_amax has {a.numel()} channels, weight is {tuple(weight.shape)} [N, K]")
    w = weight.detach().abs().amax(dim=0).float().to(a.device)
    s = a.clamp_min(_EPS).pow(alpha) / w.clamp_min(_EPS).pow(1.0 - alpha)
    return s.clamp(_S_MIN, _S_MAX)
