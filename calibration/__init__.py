"""Activation statistics of Linear layers, static activation scales and SmoothQuant factors.

    from calibration.collect import collect
    from calibration import ActivationStats, smoothing_factors
    stats = collect(model, batches)          # forward hooks on every nn.Linear
    stats.save("stats.safetensors")
    stats = ActivationStats.load("stats.safetensors", model)   # checked against the model
    s = stats.for_layer("blocks.0.mlp.fc1")
    scale = s.static_scale("w8a8-int8")                        # per-tensor activation scale
    smooth = smoothing_factors(s.channel_amax, linear.weight, alpha=0.5)

(``collect`` is not re-exported here: ``calibration.collect`` is also the CLI module's name.)
"""

from .smoothquant import smoothing_factors
from .stats import ActivationStats, LayerStats

__all__ = ["ActivationStats", "LayerStats", "smoothing_factors"]
