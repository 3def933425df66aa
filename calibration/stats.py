"""Activation statistics of a model's Linear layers: what calibration measured, and the contract
``qpipeline.quantize_model`` reads them through.

File layout (one safetensors file, fp32 tensors, names are the layers' module names):

    <layer>.channel_amax        [K]  max |x_j| over every token seen, per input channel
    <layer>.amax                []   max |x| (= channel_amax.max(), stored for readers that want one)
    <layer>.percentile          []   max over forward calls of the q-th percentile of |x| in that
                                     call (q in the metadata, e.g. 99.9)
    <layer>.amax_by_timestep    [B]  (optional) max |x| per timestep bucket; -1 for a bucket that
                                     saw no input

plus the header metadata key ``calibration`` holding JSON: format version, samples, steps, model
class, percentile q, timestep bucket edges, and per layer ``in_features``, ``calls`` and
``tokens``.
"""

from __future__ import annotations

import json
import os
import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from qkernels import formats
from qkernels.errors import CalibrationError

__all__ = ["STATS_VERSION", "LayerStats", "ActivationStats", "linear_layers"]

STATS_VERSION = 1
_META_KEY = "calibration"
_FIELDS = ("channel_amax", "amax", "percentile")


def linear_layers(model: nn.Module) -> Iterator[tuple[str, int]]:
    """``(name, in_features)`` of every ``nn.Linear`` and ``QuantLinear``, so a half-quantized
    model still validates against the statistics it was calibrated with."""
    from qkernels.linear import QuantLinear

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, QuantLinear)):
            yield name, module.in_features


@dataclass
class LayerStats:
    """Statistics of one layer's input. Tensors are fp32 on the CPU unless moved."""

    name: str
    channel_amax: torch.Tensor  # [K]
    amax: torch.Tensor  # []
    percentile: torch.Tensor  # []
    percentile_q: float = 99.9
    amax_by_timestep: torch.Tensor | None = None  # [B]
    calls: int = 0
    tokens: int = 0
    clip: bool = False  # static_scale's default: from the percentile instead of the abs-max

    @property
    def in_features(self) -> int:
        return self.channel_amax.shape[0]

    def check(self) -> None:
        """Raise CalibrationError if any statistic is non-finite, negative or mis-shaped."""
        if self.channel_amax.dim() != 1 or self.amax.dim() != 0 or self.percentile.dim() != 0:
            raise CalibrationError(
                f"{self.name}: expected channel_amax [K], amax [] and percentile [], got "
                f"{tuple(self.channel_amax.shape)}, {tuple(self.amax.shape)}, {tuple(self.percentile.shape)}")
        for what in _FIELDS:
            t = getattr(self, what)
            if not torch.isfinite(t).all():
                raise CalibrationError(
                    f"{self.name}.{what} holds non-finite values: the calibration inputs produced NaN/Inf "
                    f"in this layer's input; recollect with finite inputs")
            if (t < 0).any():
                raise CalibrationError(f"{self.name}.{what} holds negative values: an abs-max cannot be negative")

    def static_scale(self, fmt: str | formats.Format, *, clip: bool | None = None,
                     smooth: torch.Tensor | None = None) -> torch.Tensor:
        """Per-tensor activation scale (0-d fp32) for a static-activation layer of ``fmt``.

        ``clip=False``: from ``amax`` (no activation seen in calibration saturates).
        ``clip=True``: from ``percentile`` (the top (100 - q)% of |x| saturates; a finer grid for
        the rest). This wins only where the clipped tail carries little of the signal's energy:
        with 0.02% of elements at 40x the rms, clipping at the 99.9th percentile raised an int8
        layer's error from 0.077 to 0.49. ``None``: this layer's ``clip`` attribute
        (:meth:`ActivationStats.with_clipping`).
        ``smooth`` [K]: the layer's SmoothQuant factors; the activation the kernel quantizes is
        ``x / smooth``, whose abs-max is exactly ``max_j channel_amax_j / smooth_j``.
        """
        clip = self.clip if clip is None else clip
        if smooth is None:
            amax = self.percentile if clip else self.amax
        else:
            if clip:
                # The percentile was measured on |x|, not |x / s|; no exact conversion exists.
                raise CalibrationError(
                    f"{self.name}: percentile clipping is measured on unsmoothed activations and cannot "
                    f"be combined with SmoothQuant; use clip=False (abs-max) with smoothing")
            smooth = smooth.to(self.channel_amax.device, torch.float32)
            if smooth.shape != self.channel_amax.shape:
                raise CalibrationError(f"{self.name}: smooth has shape {tuple(smooth.shape)}, "
                                       f"statistics have {tuple(self.channel_amax.shape)}")
            amax = (self.channel_amax / smooth).max()
        return formats.static_scale_from_amax(amax, fmt)

    def to(self, device: torch.device | str) -> "LayerStats":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerStats(self.name, move(self.channel_amax), move(self.amax), move(self.percentile),
                          self.percentile_q, move(self.amax_by_timestep), self.calls, self.tokens, self.clip)


@dataclass
class ActivationStats:
    """Statistics of every Linear layer of one model, by module name."""

    layers: dict[str, LayerStats]
    metadata: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- the quantize_model contract

    def for_layer(self, name: str) -> LayerStats | None:
        return self.layers.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def with_clipping(self, clip: bool = True) -> "ActivationStats":
        """A copy whose layers' static scales come from the percentile (``clip=True``) or the
        abs-max: the switch ``quantize_model``'s static mode reads through ``static_scale``."""
        return ActivationStats({n: dataclasses.replace(s, clip=clip) for n, s in self.layers.items()},
                               dict(self.metadata))

    # ---------------------------------------------------------------- checks

    def check(self) -> None:
        if not self.layers:
            raise CalibrationError("the statistics hold no layers (an empty calibration run?)")
        for stats in self.layers.values():
            stats.check()

    def validate(self, model: nn.Module, *, allow_missing: Iterable[str] = ()) -> None:
        """Raise CalibrationError unless these statistics were collected on ``model``'s layers:
        every Linear layer of ``model`` has statistics of its ``in_features``, and no statistics
        name a layer ``model`` lacks. ``allow_missing``: layer names that may lack statistics
        (besides those the collection recorded as never called: ``layers_without_input``)."""
        model_layers = dict(linear_layers(model))
        allowed = set(allow_missing) | set(self.metadata.get("layers_without_input", ()))
        missing = [n for n in model_layers if n not in self.layers and n not in allowed]
        extra = [n for n in self.layers if n not in model_layers]
        wrong = [f"{n} (model K={k}, statistics K={self.layers[n].in_features})"
                 for n, k in model_layers.items() if n in self.layers and self.layers[n].in_features != k]
        made_for = self.metadata.get("model_class")
        origin = f" (statistics were collected on a {made_for})" if made_for else ""
        if wrong:
            raise CalibrationError(f"statistics do not match the model's layer shapes{origin}: "
                                   + _some(wrong) + "; were they collected on another model?")
        if extra:
            raise CalibrationError(f"statistics name {len(extra)} layer(s) the model does not have{origin}: "
                                   + _some(extra) + "; were they collected on another model?")
        if missing:
            raise CalibrationError(f"no statistics for {len(missing)} Linear layer(s) of the model: "
                                   + _some(missing) + "; recollect on this model")

    # ---------------------------------------------------------------- file I/O

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics as safetensors with JSON metadata (atomically: temp file + rename)."""
        from safetensors.torch import save_file

        self.check()
        tensors, per_layer = {}, {}
        for name, s in self.layers.items():
            for what in _FIELDS:
                tensors[f"{name}.{what}"] = getattr(s, what).detach().to("cpu", torch.float32).contiguous()
            if s.amax_by_timestep is not None:
                tensors[f"{name}.amax_by_timestep"] = s.amax_by_timestep.detach().to("cpu", torch.float32).contiguous()
            per_layer[name] = dict(in_features=s.in_features, calls=s.calls, tokens=s.tokens,
                                   percentile_q=s.percentile_q)
        meta = {**self.metadata, "version": STATS_VERSION, "layers": per_layer}
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "ActivationStats":
        """Read a statistics file; with ``model``, also check it matches the model's layers."""
        from safetensors import safe_open
        from safetensors import SafetensorError

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CalibrationError(f"calibration statistics file not found: {path}")
        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CalibrationError(f"{path} is not a readable safetensors statistics file: {exc}") from None
        if _META_KEY not in header:
            raise CalibrationError(f"{path} has no '{_META_KEY}' metadata: not written by calibration.collect")
        try:
            meta = json.loads(header[_META_KEY])
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}: calibration metadata is not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise CalibrationError(f"{path}: calibration metadata must be a JSON object, not a {type(meta).__name__}")
        version = meta.get("version")
        if version != STATS_VERSION:
            raise CalibrationError(f"{path}: statistics format version {version!r}, this toolkit reads "
                                   f"version {STATS_VERSION}; recollect with `python -m calibration.collect`")
        per_layer = meta.pop("layers", None)
        if not isinstance(per_layer, dict):
            raise CalibrationError(f"{path}: calibration metadata has no 'layers' object (truncated or edited file)")
        layers = {}
        for name, info in per_layer.items():
            _check_layer_meta(path, name, info)
            try:
                got = {what: tensors[f"{name}.{what}"].float() for what in _FIELDS}
            except KeyError as exc:
                raise CalibrationError(f"{path}: tensor {exc.args[0]} is missing (truncated or edited file)") from None
            if got["channel_amax"].shape != (info["in_features"],):
                raise CalibrationError(f"{path}: {name}.channel_amax has shape {tuple(got['channel_amax'].shape)}, "
                                       f"metadata says in_features={info['in_features']}")
            by_t = tensors.get(f"{name}.amax_by_timestep")
            layers[name] = LayerStats(name, got["channel_amax"], got["amax"], got["percentile"],
                                      float(info.get("percentile_q", meta.get("percentile_q", 99.9))),
                                      None if by_t is None else by_t.float(),
                                      int(info.get("calls", 0)), int(info.get("tokens", 0)))
        stray = {k.rsplit(".", 1)[0] for k in tensors} - set(layers)
        if stray:
            raise CalibrationError(f"{path}: tensors for layers absent from the metadata: {_some(sorted(stray))}")
        stats = cls(layers, meta)
        stats.check()
        if model is not None:
            stats.validate(model)
        return stats


def _check_layer_meta(path: str, name: str, info) -> None:
    """The per-layer metadata entry load() reads, with the types it needs, or CalibrationError naming it."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(info, dict):
        raise CalibrationError(f"{path}: metadata of layer {name!r} must be an object, got {type(info).__name__}")
    if not is_int(info.get("in_features")):
        raise CalibrationError(f"{path}: layer {name!r} needs a non-negative integer 'in_features', got "
                               f"{info.get('in_features')!r}")
    for key in ("calls", "tokens"):
        if key in info and not is_int(info[key]):
            raise CalibrationError(f"{path}: layer {name!r}: {key!r} must be a non-negative integer, got {info[key]!r}")
    q = info.get("percentile_q", 99.9)
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 100:
        raise CalibrationError(f"{path}: layer {name!r}: 'percentile_q' must be a number in (0, 100], got {q!r}")


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
