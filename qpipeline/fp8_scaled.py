"""Community fp8 "scaled" single-file checkpoints: import without re-quantizing, and export.

The layouts users already download (ComfyUI's ``*_fp8_scaled.safetensors``, LightX2V and
vLLM-style fp8 files) store, per quantized Linear ``<name>``::

    <name>.weight         float8_e4m3fn [N, K]
    <name>.scale_weight   fp32 [] or [1]          (ComfyUI)   or
    <name>.weight_scale   fp32 [], [1], [N], [N, 1]           (LightX2V / vLLM)
    <name>.scale_input    fp32 []  / <name>.input_scale  fp32 []    optional static activation scale

with ``W = weight * scale`` (per row when per-channel) and ``x_q = x / input_scale``: the same
arithmetic as qkernels' ``w8a8-fp8`` / ``w8-fp8``. A per-tensor scale becomes our per-channel
``weight_scale`` [N] by repeating it, which is exact (every row's product is the same number).

    model = load_scaled_fp8("qwen_image_fp8_e4m3fn_scaled.safetensors", skeleton)   # w8a8-fp8
    save_scaled_fp8(model, "out.safetensors", names="comfyui")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from qkernels import QuantLinear
from qkernels.errors import CheckpointError

__all__ = ["convert_scaled_fp8", "load_scaled_fp8", "save_scaled_fp8"]

log = logging.getLogger("qpipeline")

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_MARKERS = ("scaled_fp8",)  # ComfyUI marks its scaled files with an empty tensor of this name
_WEIGHT_SCALES = ("weight_scale", "scale_weight")
_INPUT_SCALES = ("input_scale", "scale_input")


def _scale(t: torch.Tensor, n: int, key: str) -> torch.Tensor:
    if t.numel() not in (1, n) or (t.dim() == 2 and t.shape[1] != 1) or t.dim() > 2:
        raise CheckpointError(f"{key}: shape {list(t.shape)} is neither per-tensor ([] or [1]) nor per-channel "
                              f"([{n}] or [{n}, 1])")
    s = t.to(torch.float32).reshape(-1)
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise CheckpointError(f"{key}: scales must be finite and positive")
    return s.expand(n).contiguous() if s.numel() == 1 else s  # per-tensor -> per-channel, exactly


def convert_scaled_fp8(state_dict: dict[str, torch.Tensor], format: str = "w8a8-fp8"
                       ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A community fp8-scaled state dict -> (our state dict, {layer: {"static": bool}}).

    Keys lose a ``model.diffusion_model.`` / ``diffusion_model.`` prefix; the other tensors pass
    through unchanged. ``format``: ``w8a8-fp8`` keeps a stored input scale as the layer's static
    activation scale (dynamic per-token without one); ``w8-fp8`` is weight-only (an input scale is
    then not used, and said so).
    """
    if format not in ("w8a8-fp8", "w8-fp8"):
        raise CheckpointError(f"fp8-scaled checkpoints import into w8a8-fp8 or w8-fp8, not {format!r}")
    sd = {}
    for k, v in state_dict.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        sd[k] = v
    out, layers, used = {}, {}, set()
    for key, t in sd.items():
        name, _, leaf = key.rpartition(".")
        if leaf in _WEIGHT_SCALES:
            w = sd.get(f"{name}.weight")
            if w is None:
                raise CheckpointError(f"{key} has no {name}.weight beside it")
            if w.dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"{name}.weight is {w.dtype}: an fp8-scaled layer stores float8_e4m3fn "
                                      "(e5m2 and integer weights are other formats)")
            if w.dim() != 2:
                raise CheckpointError(f"{name}.weight has shape {list(w.shape)}, a Linear weight is 2-D")
            if name in layers:
                raise CheckpointError(f"{name} has both weight_scale and scale_weight")
            n = w.shape[0]
            out[f"{name}.weight"] = w
            out[f"{name}.weight_scale"] = _scale(t, n, key)
            used |= {key, f"{name}.weight"}
            static = False
            for leaf_in in _INPUT_SCALES:
                s_in = sd.get(f"{name}.{leaf_in}")
                if s_in is None:
                    continue
                used.add(f"{name}.{leaf_in}")
                if s_in.numel() != 1:
                    raise CheckpointError(f"{name}.{leaf_in}: a static activation scale is one number, "
                                          f"got shape {list(s_in.shape)}")
                if format == "w8-fp8":
                    log.info("%s: %s not used (w8-fp8 is weight-only)", name, leaf_in)
                    continue
                s = _scale(s_in, 1, f"{name}.{leaf_in}").reshape(())
                out[f"{name}.input_scale"] = s
                static = True
            layers[name] = {"static": static}
    stray = sorted(k for k in sd if k.rpartition(".")[2] in _INPUT_SCALES and k not in used)
    if stray:
        raise CheckpointError(f"input scale(s) without a scaled fp8 weight: {', '.join(stray[:5])}")
    for key, t in sd.items():
        if key in used or key in _MARKERS:
            continue
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"{key} is {t.dtype} without a scale: not an fp8-scaled layer this reader "
                                  "can compute exactly")
        out[key] = t
    return out, layers


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from .checkpoint import _refuse_pickle

    _refuse_pickle(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise CheckpointError(f"{path}: expected a .safetensors file")
    return load_file(str(path))


def load_scaled_fp8(source, model: nn.Module, format: str = "w8a8-fp8", device="cpu",
                    strict: bool = True) -> nn.Module:
    """Fill ``model`` (high precision or on the meta device) from an fp8-scaled file or state dict:
    each scaled Linear becomes a ``QuantLinear`` holding the stored e4m3 codes, the rest is assigned
    as stored. Nothing is re-quantized. Returns the model (eval mode)."""
    sd = _read(Path(source)) if isinstance(source, (str, Path)) else dict(source)
    tensors, layers = convert_scaled_fp8(sd, format)
    if not layers:
        raise CheckpointError("no fp8-scaled layers (weight + weight_scale / scale_weight) in this checkpoint")
    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"fp8-scaled layer {name} does not exist in {type(model).__name__}") from None
        w = tensors[f"{name}.weight"]
        if not isinstance(old, (nn.Linear, QuantLinear)) or (old.out_features, old.in_features) != tuple(w.shape):
            raise CheckpointError(f"{name}: the model has {type(old).__name__} there, the checkpoint a "
                                  f"{w.shape[1]}->{w.shape[0]} Linear")
        bias = tensors.get(f"{name}.bias")
        q = QuantLinear(old.in_features, old.out_features, old.bias is not None, format=format,
                        static=spec["static"], bias_dtype=bias.dtype if bias is not None else torch.bfloat16,
                        device="meta")
        parent_name, _, attr = name.rpartition(".")
        (model.get_submodule(parent_name) if parent_name else model)._modules[attr] = q
    device = torch.device(device)
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in tensors.items()},
                                                strict=False, assign=True)
    if strict and (missing or unexpected):
        raise CheckpointError("fp8-scaled checkpoint does not match the model: "
                              + (f"missing {', '.join(missing[:5])}" if missing else "")
                              + (f" unexpected {', '.join(unexpected[:5])}" if unexpected else ""))
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_backend("auto")
    return model.eval()


def save_scaled_fp8(model: nn.Module, path, names: str = "weight_scale") -> Path:
    """Write ``model``'s fp8 layers in the fp8-scaled single-file layout (other tensors as they are).

    ``names="weight_scale"``: ``weight_scale`` [N] per channel + ``input_scale`` (LightX2V / vLLM).
    ``names="comfyui"``: ``scale_weight`` [] + ``scale_input`` + the ``scaled_fp8`` marker; ComfyUI
    stores one scale per tensor, so a layer whose rows have different scales is refused rather
    than re-quantized. int8 layers are refused (the layout is fp8).
    """
    if names not in ("weight_scale", "comfyui"):
        raise CheckpointError(f"names must be 'weight_scale' or 'comfyui', got {names!r}")
    from safetensors.torch import save_file

    out = {}
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in quant.items():
        if m.weight.dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"{name} is {m.format}: the fp8-scaled layout holds e4m3 weights only")
        if m.input_smooth is not None:
            raise CheckpointError(f"{name} is SmoothQuant-smoothed: the fp8-scaled layout has no input_smooth")
    for key, t in model.state_dict().items():
        name, _, leaf = key.rpartition(".")
        m = quant.get(name)
        if m is not None and leaf == "weight_scale":
            if names == "comfyui":
                if not torch.all(t == t[0]):
                    raise CheckpointError(f"{name} has per-channel scales; ComfyUI's scaled_fp8 layout stores one "
                                          "scale per tensor: export with names='weight_scale'")
                out[f"{name}.scale_weight"] = t[:1].reshape(()).clone()
            else:
                out[key] = t.contiguous()
        elif m is not None and leaf == "input_scale":
            out[f"{name}.scale_input" if names == "comfyui" else key] = t.reshape(()).clone()
        else:
            out[key] = t.detach().contiguous()
    if names == "comfyui":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = Path(path)
    save_file({k: v.cpu() for k, v in out.items()}, str(path),
              metadata={"format": "pt", "qkernels": json.dumps({"layout": f"fp8-scaled/{names}"})})
    return path
