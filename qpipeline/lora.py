"""LoRA for quantized models: merge before quantizing, or attach as a run-time bf16 branch.

An always-on LoRA (e.g. Qwen-Image-Lightning, 2-8 steps) belongs in the weights: ``merge`` adds
``scale * alpha / r * B @ A`` to each high-precision ``nn.Linear`` weight in fp32 and rounds
once, *before* ``quantize_model``, so the quantized model carries it at no run-time cost. A
LoRA on an already-quantized model is attached with ``apply_runtime`` as a low-rank branch
beside each ``QuantLinear`` (kept in bf16, never cast to 8 bits, not in the checkpoint).

Accepted key layouts (diffusers / PEFT / kohya-style, as Lightning files ship them):

    [prefix.]<module>.lora_A[.<adapter>].weight   [r, K]    (or lora_down)
    [prefix.]<module>.lora_B[.<adapter>].weight   [N, r]    (or lora_up)
    [prefix.]<module>.alpha                        []        optional: scale alpha / r

with ``prefix`` one of ``transformer.``, ``diffusion_model.``, ``base_model.model.`` or none.
A key that matches no layer is an error listing every such key: a LoRA silently half-applied
is the failure this module exists to prevent.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
import torch.nn as nn

from qkernels import QuantLinear
from qkernels.errors import CheckpointError, LoRAError

__all__ = ["LoRAWeights", "load_lora", "parse_lora", "merge", "apply_runtime", "remove_runtime"]

_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.", "model.diffusion_model.")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")


@dataclass(frozen=True)
class LoRAWeights:
    """One layer's LoRA: ``delta_W = alpha / r * B @ A``."""

    A: torch.Tensor  # [r, K]
    B: torch.Tensor  # [N, r]
    alpha: float | None  # None: scale 1 (diffusers/PEFT files without alpha keys)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


def load_lora(path: str | PathLike) -> dict[str, torch.Tensor]:
    """Read a LoRA state dict from a ``.safetensors`` file (or a folder holding exactly one).

    Pickle files (``.bin``, ``.pt``, ``.ckpt``...) are refused: unpickling runs arbitrary code.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{path}: expected one .safetensors LoRA file, found {len(files)}")
        path = files[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file")
    pickle_name = path.suffix.lower() in _PICKLE_SUFFIXES
    if not pickle_name:
        # Parsing is the test: safetensors runs no code, and a valid file's first bytes are its
        # header length, which can be any value (1 file in 32 starts with 0x80, a pickle's PROTO).
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            error = e
    with open(path, "rb") as f:
        head = f.read(8)
    # A pickle starts with PROTO (0x80); torch.save's zip format with "PK".
    if pickle_name or head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(
            f"{path}: not safetensors but a pickle checkpoint; refusing to unpickle it (it can run arbitrary code). "
            "Convert it once, in a trusted environment, with safetensors.torch.save_file(torch.load(p), 'lora.safetensors')"
        )
    raise CheckpointError(f"{path}: not a readable safetensors file ({error})")


def _finite_scale(scale, what: str = "scale") -> float:
    """``scale`` as a float; a NaN or infinite one would turn every output (and, merged, every
    weight) into NaN/Inf."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) and not (
            isinstance(scale, torch.Tensor) and scale.numel() == 1):
        raise LoRAError(f"LoRA {what} must be a number, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value):
        raise LoRAError(f"LoRA {what} must be finite, got {value}")
    return value


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def parse_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, LoRAWeights]:
    """Group a LoRA state dict by target module name (prefix stripped). Keys of no known
    layout, and A without B (or the reverse), raise LoRAError listing them."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, t in state_dict.items():
        k = _strip(key)
        if m := _KEY.match(k):
            kind = "A" if m["kind"] in ("lora_A", "lora_down") else "B"
            slot = parts.setdefault(m["module"], {})
            if kind in slot:
                raise LoRAError(f"LoRA has two {kind} matrices for {m['module']!r} (several adapters in one file?)")
            slot[kind] = t
        elif m := _ALPHA.match(k):
            if not isinstance(t, torch.Tensor) or t.numel() != 1:
                raise LoRAError(f"{key}: alpha must hold one number, got "
                                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            alphas[m["module"]] = _finite_scale(t.float(), f"alpha {key}")
        else:
            unknown.append(key)
    if unknown:
        raise LoRAError(f"{len(unknown)} LoRA key(s) of no known layout (lora_A/lora_B/lora_down/lora_up/alpha): "
                        + ", ".join(sorted(unknown)))
    incomplete = [m for m, p in parts.items() if len(p) != 2]
    stray_alpha = [m for m in alphas if m not in parts]
    if incomplete or stray_alpha:
        raise LoRAError("LoRA modules without both A and B: " + ", ".join(sorted(incomplete + stray_alpha)))
    out = {}
    for module, p in parts.items():
        out[module] = _checked(module, LoRAWeights(p["A"], p["B"], alphas.get(module)))
    return out


def _checked(module: str, w: LoRAWeights) -> LoRAWeights:
    A, B = w.A, w.B
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
        raise LoRAError(f"{module}: A and B must be tensors")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise LoRAError(f"{module}: A {tuple(A.shape)} and B {tuple(B.shape)} are not [r, K] and [N, r]")
    if A.shape[0] == 0:
        raise LoRAError(f"{module}: rank 0 (A {tuple(A.shape)}): a LoRA needs rank >= 1")
    if not (A.is_floating_point() and B.is_floating_point()) or min(A.element_size(), B.element_size()) < 2:
        raise LoRAError(f"{module}: A and B must be 16/32-bit floats, got {A.dtype} and {B.dtype} (a LoRA cast "
                        "to 8 bits has lost most of its precision)")
    if w.alpha is not None:
        _finite_scale(w.alpha, f"alpha of {module}")
    # one pass over the (small) LoRA tensors: a NaN would reach every output of the layer
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise LoRAError(f"{module}: A or B holds NaN/Inf values")
    return w


def _as_lora(lora) -> dict[str, LoRAWeights]:
    if isinstance(lora, (str, PathLike)):
        lora = load_lora(lora)
    if isinstance(lora, dict) and lora and all(isinstance(v, LoRAWeights) for v in lora.values()):
        return {name: _checked(name, w) for name, w in lora.items()}
    if not isinstance(lora, dict) or not lora:
        raise LoRAError("a LoRA is a path to a .safetensors file or a non-empty state dict")
    return parse_lora(lora)


def _resolve(model: nn.Module, lora: dict[str, LoRAWeights]) -> dict[str, nn.Module]:
    """Target modules by name; every unmatched or misfitting key is reported at once, before
    anything is changed (a LoRA is applied whole or not at all)."""
    modules = dict(model.named_modules())
    missing = sorted(name for name in lora if name not in modules)
    if missing:
        raise LoRAError(f"{len(missing)} LoRA target(s) match no layer of {type(model).__name__}: "
                        + ", ".join(missing))
    bad = []
    for name, w in lora.items():
        m = modules[name]
        if not isinstance(m, (nn.Linear, QuantLinear)):
            bad.append(f"{name} is a {type(m).__name__}, not a Linear")
        elif w.A.shape[1] != m.in_features or w.B.shape[0] != m.out_features:
            bad.append(f"{name}: LoRA maps {w.A.shape[1]} -> {w.B.shape[0]}, layer is "
                       f"{m.in_features} -> {m.out_features}")
    if bad:
        raise LoRAError("LoRA does not fit the model: " + "; ".join(bad))
    return {name: modules[name] for name in lora}


@torch.no_grad()
def merge(model: nn.Module, lora, scale: float = 1.0) -> list[str]:
    """Add ``scale * alpha/r * B @ A`` into each target ``nn.Linear``'s weight, in place.

    Computed in fp32 and rounded once to the weight's dtype (a bf16 weight changes by at most
    half an ulp more than the exact sum). Call this *before* quantize_model. Returns the merged
    layer names. A target that is already a QuantLinear is refused (use apply_runtime).
    """
    scale = _finite_scale(scale)
    lora = _as_lora(lora)
    targets = _resolve(model, lora)
    quantized = sorted(n for n, m in targets.items() if isinstance(m, QuantLinear))
    if quantized:
        raise LoRAError(
            f"cannot merge into {len(quantized)} quantized layer(s) ({', '.join(quantized[:5])}"
            f"{', ...' if len(quantized) > 5 else ''}): merge before quantize_model, or attach at run "
            "time with qpipeline.lora.apply_runtime (QuantLinear.add_lora)"
        )
    meta = sorted(n for n, m in targets.items() if m.weight.device.type == "meta")
    if meta:
        raise LoRAError(f"cannot merge into layers on the meta device (weights not loaded): {', '.join(meta[:5])}")
    def merged(name, m):
        w = lora[name]
        dev = m.weight.device
        delta = (w.B.to(dev, torch.float32) @ w.A.to(dev, torch.float32)).mul_(scale * w.scale)
        return (m.weight.float() + delta).to(m.weight.dtype)

    # Two passes, so a merge is whole or not at all without holding a second copy of every
    # weight: the first only checks that no sum overflows the weight's dtype (fp16: 65504), the
    # second writes. A LoRA is ~1% of a layer's FLOPs; merging is a one-off.
    overflow = [n for n, m in targets.items() if not torch.isfinite(merged(n, m)).all()]
    if overflow:
        raise LoRAError(f"merging at scale {scale:g} overflows the weights' dtype in {', '.join(overflow[:5])}; "
                        "nothing was merged")
    for name, m in targets.items():
        m.weight.copy_(merged(name, m))
    return sorted(targets)


@torch.no_grad()
def apply_runtime(model: nn.Module, lora, scale: float = 1.0, name: str = "default",
                  dtype: torch.dtype = torch.bfloat16, merge_unquantized: bool = True) -> dict[str, list[str]]:
    """Attach ``lora`` as a run-time branch to each target QuantLinear (``add_lora(name, ...)``).

    A target that is still a plain ``nn.Linear`` (a layer the recipe kept in high precision) is
    merged into its weight when ``merge_unquantized`` (exact up to one rounding, and free at run
    time; not removable), else refused. Returns ``{"runtime": [...], "merged": [...]}``.
    """
    scale = _finite_scale(scale)
    lora = _as_lora(lora)
    targets = _resolve(model, lora)
    plain = {n: m for n, m in targets.items() if not isinstance(m, QuantLinear)}
    if plain and not merge_unquantized:
        raise LoRAError(f"{len(plain)} LoRA target(s) are not quantized ({', '.join(sorted(plain)[:5])}); "
                        "pass merge_unquantized=True to merge into them, or quantize them first")
    taken = sorted(n for n, m in targets.items() if isinstance(m, QuantLinear) and name in m.lora_names)
    if taken:
        raise LoRAError(f"LoRA {name!r} is already attached to {', '.join(taken[:5])}")
    runtime = []
    try:  # all or nothing: a refusal at the third layer detaches the first two
        for n, m in targets.items():
            if isinstance(m, QuantLinear):
                w = lora[n]
                m.add_lora(name, w.A, w.B, scale * w.scale, dtype=dtype)
                runtime.append(n)
        merged = merge(model, {n: lora[n] for n in plain}, scale) if plain else []
    except BaseException:
        for n in runtime:
            targets[n].remove_lora(name)
        raise
    return {"runtime": sorted(runtime), "merged": merged}


def remove_runtime(model: nn.Module, name: str = "default") -> list[str]:
    """Detach the run-time LoRA ``name`` from every QuantLinear that has it."""
    removed = []
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear) and name in m.lora_names:
            m.remove_lora(name)
            removed.append(n)
    return removed
