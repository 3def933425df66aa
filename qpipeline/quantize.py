"""Model surgery: replace a model's ``nn.Linear`` layers by ``QuantLinear``, one at a time.

    report = quantize_model(model, "qwen-image", device="cuda")   # a recipe name, a Recipe, or a backend
    print(report.format_table())

``python -m qpipeline.quantize`` is the command-line job built on it (see :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from qkernels import QuantLinear, formats
from qkernels.capabilities import device_reason
from qkernels.errors import (
    BackendUnavailableError,
    CheckpointError,
    QKernelsError,
    RecipeError,
    UnsupportedShapeError,
)
from qkernels.registry import resolve_backend

from .recipe import RECIPES, SKIP, Recipe, get_recipe

__all__ = ["quantize_model", "QuantReport", "LayerReport", "main"]

# Probe: this many seeded random rows per layer; the relative error of the layer's output is
# measured on them against the high-precision layer. 64 rows put the sampling spread of a
# relative Frobenius error (~1/sqrt(64 * N)) far below the int8/fp8 errors it measures (~1e-2).
PROBE_TOKENS = 64
PROBE_SEED = 1234
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    format: str | None  # None: kept in high precision
    backend: str | None
    reason: str | None  # why the layer was kept (None when quantized)
    bytes_before: int
    bytes_after: int
    error: float | None  # relative Frobenius error of the output on the probe rows
    activation: str | None = None  # "dynamic" / "static" / "weight-only"
    smoothed: bool = False
    model_error: float | None = None  # error budget only: the model's output error with this layer alone quantized


@dataclass
class QuantReport:
    layers: list[LayerReport] = field(default_factory=list)
    recipe: dict | None = None
    device: str = "cpu"
    seconds: float = 0.0
    model_bytes_before: int = 0  # every parameter and persistent buffer, shared tensors once
    model_bytes_after: int = 0
    model_error: float | None = None  # error budget only: the model's output error vs high precision
    error_budget: float | None = None  # the recipe's max_error it was held to
    fuse: dict | None = None  # recipe.fuse: which blocks were fused, and why others were not (FuseReport)

    @property
    def quantized(self) -> list[LayerReport]:
        return [l for l in self.layers if l.format is not None]

    @property
    def kept(self) -> list[LayerReport]:
        return [l for l in self.layers if l.format is None]

    @property
    def bytes_before(self) -> int:
        return self.model_bytes_before

    @property
    def bytes_after(self) -> int:
        return self.model_bytes_after

    @property
    def ratio(self) -> float:
        return self.model_bytes_after / self.model_bytes_before if self.model_bytes_before else float("nan")

    @property
    def max_error(self) -> float | None:
        errs = [l.error for l in self.quantized if l.error is not None]
        if any(math.isnan(e) for e in errs):
            return float("nan")  # max() skips a NaN unless it comes first: a NaN layer must show
        return max(errs) if errs else None

    @property
    def mean_error(self) -> float | None:
        errs = [l.error for l in self.quantized if l.error is not None]
        return sum(errs) / len(errs) if errs else None

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "recipe": self.recipe,
            "totals": {
                "layers": len(self.layers),
                "quantized": len(self.quantized),
                "kept": len(self.kept),
                "bytes_before": self.model_bytes_before,
                "bytes_after": self.model_bytes_after,
                "ratio": self.ratio,
                "max_error": self.max_error,
                "mean_error": self.mean_error,
                "seconds": self.seconds,
                "model_error": self.model_error,
                "error_budget": self.error_budget,
            },
            "layers": [asdict(l) for l in self.layers],
            **({"fuse": self.fuse} if self.fuse is not None else {}),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "QuantReport":
        t = d.get("totals", {})
        return cls(layers=[LayerReport(**l) for l in d.get("layers", [])], recipe=d.get("recipe"),
                   device=d.get("device", "cpu"), seconds=t.get("seconds", 0.0),
                   model_bytes_before=t.get("bytes_before", 0), model_bytes_after=t.get("bytes_after", 0),
                   model_error=t.get("model_error"), error_budget=t.get("error_budget"), fuse=d.get("fuse"))

    def totals_line(self) -> str:
        err = ("n/a" if self.max_error is None
               else f"max {self.max_error:.2e}, mean {self.mean_error:.2e}")
        nan = [l.name for l in self.quantized if l.error is not None and math.isnan(l.error)]
        if nan:
            err += f" (NaN in {len(nan)} layer(s): {', '.join(nan[:5])}{', ...' if len(nan) > 5 else ''})"
        budget = ("" if self.error_budget is None else
                  f"; model output error {self.model_error:.2e} (max_error {self.error_budget:g})")
        return (f"{len(self.quantized)} of {len(self.layers)} Linear layers quantized; "
                f"{_mb(self.model_bytes_before)} -> {_mb(self.model_bytes_after)} "
                f"({self.ratio:.3f}x); layer error vs high precision: {err}{budget}; {self.seconds:.1f} s")

    def format_table(self) -> str:
        head = ("layer", "in", "out", "format", "backend / kept because", "MB before", "MB after", "rel err")
        budget = self.error_budget is not None
        if budget:
            head += ("model err alone",)
        rows = []
        for l in self.layers:
            what = l.backend + ("" if l.activation in (None, "dynamic", "weight-only") else f" ({l.activation})") \
                + (" +smooth" if l.smoothed else "") if l.format else f"kept: {l.reason}"
            rows.append((l.name, str(l.in_features), str(l.out_features), l.format or "-", what,
                         f"{l.bytes_before / 2**20:.2f}", f"{l.bytes_after / 2**20:.2f}",
                         "-" if l.error is None else f"{l.error:.2e}")
                        + (("-" if l.model_error is None else f"{l.model_error:.2e}",) if budget else ()))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        right = {1, 2, 5, 6, 7, 8}

        def fmt(r):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

        lines = [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows), "", self.totals_line()]
        if self.fuse is not None:
            from .blocks import FuseReport

            lines.append(FuseReport(self.fuse["fused"], [tuple(k) for k in self.fuse["kept"]]).format())
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer, a tensor shared by two modules once."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def as_recipe(recipe_or_backend: Recipe | str | dict) -> Recipe:
    """A Recipe from a Recipe, a dict, a built-in recipe name, or a backend name (generic rules)."""
    if isinstance(recipe_or_backend, Recipe):
        return recipe_or_backend
    if isinstance(recipe_or_backend, dict):
        return Recipe.from_dict(recipe_or_backend)
    if isinstance(recipe_or_backend, str):
        if recipe_or_backend in RECIPES:
            return get_recipe(recipe_or_backend)
        return get_recipe("generic").replace(backend=recipe_or_backend, name=None)
    raise RecipeError(f"expected a Recipe, a recipe name or a backend name, got {type(recipe_or_backend).__name__}")


def _linear_sites(model: nn.Module) -> list[tuple[str, list[tuple[nn.Module, str]]]]:
    """``(qualified name, [(parent, attribute), ...])`` for each distinct nn.Linear; a Linear
    reachable under two names is quantized once and replaced at every site. Modules themselves
    are not held, so each high-precision layer is freed as soon as it is replaced."""
    sites: dict[int, tuple[str, list]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if isinstance(child, nn.Linear):
                name = f"{parent_name}.{attr}" if parent_name else attr
                sites.setdefault(id(child), (name, []))[1].append((parent, attr))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(sites.values(), key=lambda s: order.get(s[0], len(order)))


def _probe(k: int, dtype: torch.dtype, device: torch.device, stats) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(PROBE_SEED)
    x = torch.randn(PROBE_TOKENS, k, generator=g)
    if stats is not None:
        # Rows matched to the calibrated per-channel range, so a static scale sees inputs like its
        # own; plus the unit-normal rows, which do not come from the statistics: statistics that
        # are wrong (amax 1e-30: a scale that clips every real input, error 0.99) must not
        # certify their own layer. One relative error over both sets: a range wider than unit
        # scale dominates it, a collapsed one shows as the clipping of the unit rows.
        amax = stats.channel_amax.detach().float().cpu().clamp_min(1e-6)
        shaped = (torch.randn(PROBE_TOKENS, k, generator=g) * amax / 3).clamp(-amax, amax)
        x = torch.cat([shaped, x])
    return x.to(device=device, dtype=dtype)


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    den = ref.norm()
    return float((y - ref).norm() / den) if den > 0 else float((y - ref).norm())


def _smoothing_factors(channel_amax, weight, alpha):
    from calibration.smoothquant import smoothing_factors  # lazy: qpipeline works without calibration

    return smoothing_factors(channel_amax, weight, alpha)


@torch.no_grad()
def _quantize_one(name, linear: nn.Linear, recipe: Recipe, backend_name: str, calibration, device):
    """Returns (QuantLinear or None, LayerReport). Holds no reference to ``linear`` afterwards."""
    n, k = linear.out_features, linear.in_features
    before = sum(t.numel() * t.element_size() for t in (linear.weight, linear.bias) if t is not None)

    def kept(reason):
        return None, LayerReport(name, k, n, None, None, reason, before, before, None)

    if backend_name == SKIP:
        return kept("recipe rule")
    if k < recipe.min_features or n < recipe.min_features:
        return kept(f"in/out features below min_features={recipe.min_features}")
    if linear.weight.dtype not in _FLOAT_DTYPES:
        return kept(f"weight dtype {linear.weight.dtype} is not bf16/fp16/fp32")
    dev = linear.weight.device
    # the recipe's format narrows "auto"; a rule's explicit backend brings its own format. The
    # format does not depend on this machine (an fp8 checkpoint can be written on a CPU box); a
    # shape no backend of it takes keeps just this layer in high precision.
    want = recipe.format if backend_name == "auto" else None
    try:
        fmt = formats.get_format(QuantLinear.format_for(backend_name, dev, format=want, shape=(k, n)))
    except (UnsupportedShapeError, BackendUnavailableError) as exc:
        return kept(str(exc))

    stats = calibration.for_layer(name) if calibration is not None else None
    activation, input_scale, smooth = "dynamic", None, None
    if not fmt.quantizes_activations:
        activation = "weight-only"
    else:
        if stats is not None and recipe.smoothquant_alpha is not None:
            smooth = _smoothing_factors(stats.channel_amax.to(dev), linear.weight, recipe.smoothquant_alpha)
        if recipe.activation == "static":
            if stats is None:
                warnings.warn(f"{name}: no calibration statistics for this layer; its activations stay dynamic",
                              stacklevel=3)
            else:
                if callable(getattr(stats, "static_scale", None)):  # calibration.LayerStats
                    input_scale = stats.static_scale(fmt, smooth=smooth).to(dev)
                else:
                    amax = stats.amax.to(dev, torch.float32)
                    if smooth is not None:
                        # the kernel scales x / smooth: its abs-max is that of the smoothed channels
                        amax = (stats.channel_amax.to(dev, torch.float32) / smooth).max()
                    input_scale = formats.static_scale_from_amax(amax, fmt)
                activation = "static"

    x = _probe(k, linear.weight.dtype, dev, stats)
    ref = linear(x)
    q = QuantLinear.from_linear(linear, backend_name, format=fmt.name,
                                activation="static" if input_scale is not None else "dynamic",
                                input_scale=input_scale, input_smooth=smooth)
    return q, LayerReport(name, k, n, fmt.name, q.backend, None, before, q.nbytes(), _probe_error(q, x, ref),
                          activation, smooth is not None)


def _probe_error(q: QuantLinear, x: torch.Tensor, ref: torch.Tensor) -> float | None:
    """The layer's error on the probe; where its backend cannot run here (a checkpoint made for
    another device), measured with a backend of the same format that can (same stored tensors,
    same quantization error), or None when none can."""
    if q.backend_unavailable_reason is None:
        return _rel_error(q(x), ref)
    try:
        other = resolve_backend("auto", x.device, format=q.format, shape=(q.in_features, q.out_features))
    except BackendUnavailableError:
        return None
    return _rel_error(other.forward(q, x.contiguous()), ref)


def _move_non_linear(model: nn.Module, device: torch.device) -> None:
    for m in model.modules():
        if not isinstance(m, nn.Linear):
            m._apply(lambda t: t.to(device), recurse=False)


def quantize_model(model: nn.Module, recipe_or_backend_name: Recipe | str = "generic", calibration=None,
                   device: torch.device | str | None = None, *, inputs=None, fuse: bool | None = None) -> QuantReport:
    """Replace ``model``'s ``nn.Linear`` layers by ``QuantLinear`` in place, one at a time.

    ``recipe_or_backend_name``: a :class:`Recipe`, a built-in recipe name (``generic``,
    ``qwen-image``) or a backend name (``auto``, ``int8-torch``, ...; generic rules).
    ``calibration``: an object with ``for_layer(name) -> stats | None``, stats having
    ``channel_amax`` [K] and ``amax`` [] (``calibration.ActivationStats``); needed for static
    activations, and for SmoothQuant when the recipe sets ``smoothquant_alpha``.
    ``device``: if given, each Linear is moved there just before it is quantized, and the rest of
    the model is moved too; peak memory on the device is the result plus one high-precision
    layer. Without it each layer is quantized where it lies.

    A layer the backend cannot take (shape) stays high precision with its reason in the report.

    ``recipe.max_error``: an error budget on the model's output (relative error vs the
    high-precision model, on ``inputs``: a list of kwargs dicts / arg tuples / tensors; generated
    for a Qwen-Image transformer when omitted). The layers whose quantization costs most are kept
    in high precision until the output is within the budget; see :mod:`qpipeline.sensitivity`.

    ``fuse`` (default: the recipe's ``fuse``): afterwards rewire the blocks an adapter knows to
    the fused kernels (:func:`qpipeline.blocks.fuse_model`); ``report.fuse`` says which were
    fused and why the others were not.
    ``recipe.attention``: "int8-fp8" or "bf16" gives the model's Qwen-Image joint attention
    qkernels' processor (``qkernels.attention.diffusers_plugin.set_attention``); a model without
    that attention raises InputError.
    """
    t0 = time.perf_counter()
    recipe = as_recipe(recipe_or_backend_name)
    if fuse is not None:
        recipe = recipe.replace(fuse=bool(fuse))
    if recipe.activation == "static" and calibration is None:
        raise RecipeError("activation 'static' needs calibration statistics (calibration=..., or --calibration); "
                          "use activation 'dynamic' without them")
    if calibration is not None and not callable(getattr(calibration, "for_layer", None)):
        raise RecipeError(f"calibration must have a for_layer(name) method, got {type(calibration).__name__}")
    device = torch.device(device) if device is not None else None
    if device is not None and (reason := device_reason(device)):
        raise BackendUnavailableError(f"cannot quantize on {device}: {reason}")
    sites = _linear_sites(model)
    report = QuantReport(recipe=recipe.to_dict(), model_bytes_before=model_bytes(model))
    if device is not None:
        _move_non_linear(model, device)
    if device is not None:
        report.device = str(device)
    elif sites:
        report.device = str(sites[0][1][0][0]._modules[sites[0][1][0][1]].weight.device)

    used_rules = set()
    from tqdm.auto import tqdm

    decided = {}
    if recipe.max_error is not None:  # measures every layer's cost and quantizes within the budget itself
        from .sensitivity import apply_error_budget

        decided = apply_error_budget(model, recipe, sites, calibration, device, inputs, _quantize_one, report)
    from .integrations._common import tied_linears

    tied = tied_linears(model)
    for name, places in tqdm(sites, desc="quantizing", unit="layer", disable=None, leave=False):
        parent, attr = places[0]
        backend_name, rule = recipe.backend_for(name)
        if rule is not None:
            used_rules.add(rule)
        if name in decided:
            report.layers.append(decided[name])
            continue
        if name in tied and backend_name != SKIP:
            lin = parent._modules[attr]
            before = sum(t.numel() * t.element_size() for t in (lin.weight, lin.bias) if t is not None)
            report.layers.append(LayerReport(name, lin.in_features, lin.out_features, None, None, tied[name],
                                             before, before, None))
            continue
        linear = parent._modules[attr]
        if device is not None:
            linear.to(device)
        q, row = _quantize_one(name, linear, recipe, backend_name, calibration, device)
        if row.reason == "recipe rule":
            row.reason = f"recipe rule {recipe.rules[rule][0]!r}"
        del linear
        if q is not None:
            for p, a in places:
                setattr(p, a, q)
        del q
        report.layers.append(row)
    for i, (pattern, backend) in enumerate(recipe.rules):
        if i not in used_rules:
            warnings.warn(f"recipe rule {i} ({pattern!r} -> {backend}) matched no Linear layer", stacklevel=2)
    if recipe.attention is not None:  # the joint attention's kernel (qkernels.attention); no weights change
        from qkernels.attention.diffusers_plugin import set_attention

        set_attention(model, recipe.attention)
    report.model_bytes_after = model_bytes(model)
    if recipe.fuse:
        from .blocks import fuse_model

        report.fuse = fuse_model(model).to_dict()
    report.seconds = time.perf_counter() - t0
    from .integrations import mark_quantized

    mark_quantized(model)  # a diffusers/transformers save_pretrained then writes a quantized folder
    return report


# ==============================================================================================
# command line


class _CLIError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise _CLIError(message)


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m qpipeline.quantize",
                description="Quantize a model's Linear layers to int8/fp8 and write a safetensors checkpoint.")
    p.add_argument("--model", help="a diffusers model folder (its transformer/ subfolder is used), a folder with "
                   "config.json + *.safetensors, or one .safetensors file with --config. Default: the built-in "
                   "demo transformer of the Qwen-Image architecture, with random weights")
    p.add_argument("--config", help="config.json for a single .safetensors --model")
    p.add_argument("--backend", default="auto", help="backend name, or auto (default); see python -m qkernels")
    p.add_argument("--format", help="narrow auto to one format: w8a8-int8, w8a8-fp8, w8-int8, w8-fp8")
    p.add_argument("--recipe", help="built-in recipe name (generic, qwen-image) or a recipe JSON file; "
                   "default qwen-image for Qwen-Image models, else generic")
    p.add_argument("--calibration", help="activation statistics file (from python -m calibration.collect)")
    p.add_argument("--activation", choices=["dynamic", "static"], help="override the recipe's activation mode")
    p.add_argument("--max-error", type=float, help="error budget: keep the most sensitive layers in high precision "
                   "until the model's output is within this relative error of the unquantized model's (e.g. 0.02), "
                   "measured on generated inputs (Qwen-Image models)")
    p.add_argument("--fuse", action="store_true", help="record in the checkpoint that its blocks run fused "
                   "(norm + modulate + quant, q|k|v as one GEMM, epilogues; qpipeline.blocks): load_quantized "
                   "then fuses them, and the report says which blocks can be")
    p.add_argument("--attention", choices=["int8-fp8", "bf16"],
                   help="the joint attention's kernel (Qwen-Image): int8-fp8 (qkernels.attention) or bf16 SDPA; "
                        "recorded in the recipe")
    p.add_argument("--out", default="out/quantized", help="output folder (default out/quantized)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--report", help="also write the per-layer report as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to quantize (default cuda if available, else cpu)")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES), help="high-precision dtype (default bf16)")
    return p


def _is_qwen_image(model) -> bool:
    return type(model).__name__ in ("QwenImageTransformer2DModel",)


def _load_cli_model(args, dtype):
    from .checkpoint import load_pretrained

    if args.model is None:
        from .demo import build_demo_transformer

        print("model: built-in demo transformer (Qwen-Image architecture, size 'small'); its weights are "
              "RANDOM (seeded), so its errors say nothing about image quality", flush=True)
        return build_demo_transformer("small", dtype=dtype)
    path = Path(args.model)
    if not path.exists():
        raise _CLIError(f"--model {args.model}: no such file or folder")
    model = load_pretrained(path, config=args.config, dtype=dtype)
    print(f"model: {type(model).__name__} from {path}", flush=True)
    return model


def _inside(path: Path, root: Path | None) -> bool:
    return path is not None and root is not None and (path == root or path.is_relative_to(root))


def _check_destinations(args) -> None:
    """Everything the job will write, checked before a model is loaded or quantized: nothing
    the user owns is overwritten, and a path that cannot be written fails now, not after an
    hour of quantizing."""
    from .checkpoint import check_destination, check_writable

    out = Path(args.out).resolve()
    model = Path(args.model).resolve() if args.model else None
    config = Path(args.config).resolve() if args.config else None
    if _inside(model, out):
        raise _CLIError(f"--out {args.out} is or contains --model {args.model}: writing the checkpoint would "
                        "replace the model")
    try:
        check_destination(args.out, args.overwrite)
    except CheckpointError as exc:
        raise _CLIError(f"--out: {exc}".replace("overwrite=True (--overwrite)", "--overwrite")) from None
    if not args.report:
        return
    report = Path(args.report)
    r = report.resolve()
    for flag, root in (("--out", out), ("--model", model), ("--config", config)):
        if _inside(r, root):
            raise _CLIError(f"--report {args.report} lies inside {flag} {getattr(args, flag[2:])}: the report "
                            "must not overwrite or add to it")
    if report.is_dir():
        raise _CLIError(f"--report {args.report} is a folder; give a file name such as report.json")
    if report.exists() or report.is_symlink():
        if not args.overwrite:
            raise _CLIError(f"--report {args.report} already exists; pass --overwrite to replace it")
        if report.is_symlink() or not report.is_file():
            raise _CLIError(f"--report {args.report} is not a regular file")
    try:
        check_writable(report)
    except CheckpointError as exc:
        raise _CLIError(f"--report: {exc}") from None


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    dtype = _DTYPES[args.dtype]
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise _CLIError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1)") from None
    if reason := device_reason(device):
        raise _CLIError(f"--device {args.device}: {reason}")
    out = Path(args.out)
    if args.config and not args.model:
        raise _CLIError("--config is for a single .safetensors --model")
    _check_destinations(args)

    # Recipe first: a bad recipe or backend should fail before a large model is loaded.
    if args.recipe and args.recipe not in RECIPES:
        if not Path(args.recipe).is_file():
            raise _CLIError(f"--recipe {args.recipe!r} is neither a built-in recipe ({', '.join(RECIPES)}) nor a file")
        recipe = Recipe.from_json(Path(args.recipe))
    else:
        recipe = get_recipe(args.recipe or "generic")
    changes = {}
    if args.backend != "auto" or args.recipe is None:
        changes["backend"] = args.backend
    if args.format:
        changes["format"] = args.format
    if args.activation:
        changes["activation"] = args.activation
    if args.max_error is not None:
        changes["max_error"] = args.max_error
    if args.fuse:
        changes["fuse"] = True
    if args.attention:
        changes["attention"] = args.attention
    recipe = recipe.replace(**changes)  # validates
    try:  # can it run here? If not, the checkpoint is still written, for a device that can
        resolve_backend(recipe.backend, device, format=recipe.format)
    except BackendUnavailableError as exc:
        print(f"note: {exc}. The checkpoint is written in its format; it computes once loaded on a "
              "device that can run it", flush=True)

    calibration_path = args.calibration
    if recipe.activation == "static" and not calibration_path:
        raise _CLIError("--activation static needs --calibration (statistics from python -m calibration.collect)")

    model = _load_cli_model(args, dtype)
    if args.recipe is None and _is_qwen_image(model):
        recipe = get_recipe("qwen-image").replace(**{"backend": args.backend, **changes})
    print(f"recipe: {recipe.name or 'custom'} (backend {recipe.backend}"
          + (f", format {recipe.format}" if recipe.format else "") + f", activation {recipe.activation}); "
          f"device {device}", flush=True)

    calibration = None
    if calibration_path:
        try:
            from calibration import ActivationStats
        except ImportError:
            raise _CLIError("--calibration needs calibration.ActivationStats, which this installation does not "
                            "have yet") from None
        calibration = ActivationStats.load(calibration_path, model)

    report = quantize_model(model, recipe, calibration=calibration, device=device)
    print(report.format_table(), flush=True)

    from .checkpoint import save_quantized

    t = time.perf_counter()
    written = save_quantized(model, out, report, overwrite=args.overwrite)
    print(f"wrote {written} in {time.perf_counter() - t:.1f} s; load it with "
          f"qpipeline.load_quantized({str(written)!r}, device=...)", flush=True)
    if args.report:
        report.to_json(args.report)
        print(f"report: {args.report}")
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a save in progress rolls back like on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m qpipeline.quantize``; returns the exit status."""
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(argv)
    except _CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except QKernelsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path of the user's (permissions, a full disk): one line, not a traceback
        print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the output folder holds its previous content (or the finished checkpoint), "
              "never a partial one", file=sys.stderr)
        return 130
    except _Terminated:
        print("error: terminated (SIGTERM); the output folder holds its previous content (or the finished "
              "checkpoint), never a partial one", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
