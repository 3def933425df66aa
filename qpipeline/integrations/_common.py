"""What the diffusers and transformers quantizers share: the config's fields, the layer plan,
and building / filling QuantLinear layers on a model that is still on the meta device."""

from __future__ import annotations

import copy
import enum
import logging

import torch
import torch.nn as nn

import qkernels
from qkernels import QuantLinear, formats
from qkernels.errors import BackendUnavailableError, CheckpointError, RecipeError, UnsupportedShapeError

from ..recipe import SKIP, Recipe, get_recipe

log = logging.getLogger("qpipeline")

QUANT_METHOD = "qkernels"
# The transformers quantizer plugs into transformers 5's weight-conversion API
# (``core_model_loading``); 5.20 (the newest for Python 3.10) and 5.25 are the versions its tests
# ran with. Here, not in ``transformers.py``, so that a test can read it without the import error.
TRANSFORMERS_MIN_VERSION = (5, 20)
CONFIG_FORMAT_VERSION = 1
# QuantLinear buffers whose dtype is the format's: read from the file as stored, never cast
FIXED_BUFFERS = ("weight", "weight_scale", "input_scale", "input_smooth")
_META_KEYS = ("quant_method", "format_version", "qkernels_version")


class QKernelsMethod(str, enum.Enum):
    # diffusers reads `quant_method.value`; a str enum also compares and hashes as "qkernels"
    QKERNELS = QUANT_METHOD


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_named(name) -> torch.dtype | None:
    """The torch dtype called ``name`` ("bfloat16" or "torch.bfloat16"), None if there is none."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


class QKernelsConfigFields:
    """The fields of ``QKernelsConfig`` (the same ``__init__`` for diffusers and transformers,
    which ``PipelineQuantizationConfig(quant_backend="qkernels")`` requires).

    ``backend``: ``auto`` or a backend name (``python -m qkernels`` lists them); ``format``
    narrows ``auto`` (``w8a8-fp8`` ...) and does not depend on the loading machine;
    ``recipe``: a built-in name (``generic``, ``qwen-image``) or a recipe dict (default:
    ``qwen-image`` for a Qwen-Image transformer, else ``generic``); ``rules``: ``[glob,
    backend-or-"skip"]`` pairs tried before the recipe's; ``modules_to_not_convert``: module
    names kept in high precision (with their children); ``activation``: ``dynamic`` only (static
    scales need calibration statistics: use ``quantize_model(..., calibration=)``).
    ``layers`` is written by the quantizer: the per-layer formats of a quantized model, which
    is what a saved folder is rebuilt from, and ``torch_dtype`` the dtype its high-precision
    layers had (``from_pretrained`` of the folder without ``torch_dtype`` restores it, so the
    reloaded model is the saved one).
    """

    def __init__(self, backend: str = "auto", format: str | None = None, recipe: str | dict | None = None,
                 rules: list | None = None, modules_to_not_convert: list[str] | None = None,
                 activation: str = "dynamic", layers: dict | None = None, torch_dtype: str | None = None,
                 **kwargs):
        unknown = sorted(set(kwargs) - set(_META_KEYS))
        if unknown:
            raise RecipeError(f"QKernelsConfig: unknown field(s) {', '.join(unknown)} (written by a newer qkernels?)")
        version = kwargs.get("format_version", CONFIG_FORMAT_VERSION)
        if version != CONFIG_FORMAT_VERSION:
            raise CheckpointError(f"quantization_config has qkernels format_version {version!r}; this qkernels "
                                  f"{qkernels.__version__} reads {CONFIG_FORMAT_VERSION}: re-quantize the model")
        self.quant_method = QKernelsMethod.QKERNELS
        self.backend, self.format, self.recipe = backend, format, recipe
        self.rules = [list(r) for r in rules] if rules else []
        if isinstance(modules_to_not_convert, str):
            modules_to_not_convert = [modules_to_not_convert]
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        if activation != "dynamic":
            raise RecipeError("QKernelsConfig quantizes while loading, with dynamic activation scales; static "
                              "scales need calibration statistics: quantize_model(model, recipe, calibration=...)")
        self.activation = activation
        self.layers = dict(layers) if layers else {}
        if torch_dtype is not None and dtype_named(torch_dtype) is None:
            raise RecipeError(f"QKernelsConfig torch_dtype {torch_dtype!r} is not a torch dtype")
        self.torch_dtype = None if torch_dtype is None else str(torch_dtype).removeprefix("torch.")
        self.format_version = CONFIG_FORMAT_VERSION
        self.qkernels_version = kwargs.get("qkernels_version", qkernels.__version__)
        self.build_recipe(None)  # validates backend, format and rules now

    def to_dict(self) -> dict:
        d = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}
        d["quant_method"] = QUANT_METHOD
        return d

    def to_diff_dict(self) -> dict:  # what the libraries' to_json_string(use_diff=True) calls
        return self.to_dict()

    def build_recipe(self, model_class_name: str | None) -> Recipe:
        if isinstance(self.recipe, Recipe):
            base = self.recipe
        elif isinstance(self.recipe, dict):
            base = Recipe.from_dict(self.recipe)
        elif isinstance(self.recipe, str):
            base = get_recipe(self.recipe)
        elif self.recipe is None:
            base = get_recipe("qwen-image" if model_class_name == "QwenImageTransformer2DModel" else "generic")
        else:
            raise RecipeError(f"QKernelsConfig recipe must be a name or a dict, got {type(self.recipe).__name__}")
        skips = []
        for m in self.modules_to_not_convert:
            skips += [(m, SKIP), (f"{m}.*", SKIP), (f"*.{m}", SKIP), (f"*.{m}.*", SKIP)]
        changes = {"rules": [tuple(r) for r in self.rules] + skips + list(base.rules)}
        if self.backend != "auto" or self.recipe is None:
            changes["backend"] = self.backend
        if self.format is not None:
            changes["format"] = self.format
        return base.replace(**changes)


def model_dtype(model: nn.Module) -> str | None:
    """The dtype of most of a model's floating-point parameters (its high-precision layers)."""
    count: dict[torch.dtype, int] = {}
    for t in model.parameters():
        if t.is_floating_point() and t.element_size() >= 2:
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return dtype_name(max(count, key=count.get)) if count else None


def target_device(device_map) -> torch.device:
    """The device a from_pretrained call loads onto (quantization happens there)."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, (str, torch.device, int)):
        return torch.device("cuda", device_map) if isinstance(device_map, int) else torch.device(device_map)
    if isinstance(device_map, dict):
        devices = {str(d) for d in device_map.values()}
        if len(devices) == 1:
            d = next(iter(devices))
            return torch.device("cuda", int(d)) if d.isdigit() else torch.device(d)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def tied_linears(model: nn.Module) -> dict[str, str]:
    """Linear layers whose weight is shared with another module (transformers' lm_head tied to the
    input embedding): name -> why it stays in high precision. Quantizing one would untie them and
    keep a second, 8-bit copy beside the embedding (0.82x the bytes instead of ~0.5x)."""
    out = {}
    owners = {}
    for mname, m in model.named_modules():
        if type(m) is not nn.Linear:
            for pname, p in m.named_parameters(recurse=False):
                owners.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
    for name, m in model.named_modules():
        if type(m) is nn.Linear and id(m.weight) in owners:
            out[name] = f"its weight is tied to {owners[id(m.weight)]}: quantizing it would untie them and keep a second copy"
    # before loading (meta), transformers has not tied them yet: its config says it will
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        tied = getattr(model, "_tied_weights_keys", None) or {}
        for key in (tied if isinstance(tied, (list, tuple, set)) else list(tied)):
            out.setdefault(key.removesuffix(".weight"), "its weight is tied to the input embedding "
                           "(tie_word_embeddings): quantizing it would untie them and keep a second copy")
    return out


def plan_layers(model: nn.Module, recipe: Recipe, device: torch.device, dtype: torch.dtype) -> dict[str, dict]:
    """Which Linear layers to quantize, in which format: name -> layer spec (the checkpoint's)."""
    keep = tied_linears(model)
    specs = {}
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        backend, _ = recipe.backend_for(name)
        if backend == SKIP or min(m.in_features, m.out_features) < recipe.min_features:
            continue
        if name in keep:
            log.info("keeping %s in high precision: %s", name, keep[name])
            continue
        want = recipe.format if backend == "auto" else None
        try:
            fmt = QuantLinear.format_for(backend, device, format=want, shape=(m.in_features, m.out_features))
        except (UnsupportedShapeError, BackendUnavailableError) as exc:
            log.info("keeping %s in high precision: %s", name, exc)
            continue
        specs[name] = {"format": fmt, "static": False, "smooth": False,
                       "bias_dtype": dtype_name(dtype) if m.bias is not None else None,
                       "in_features": m.in_features, "out_features": m.out_features, "backend": backend}
    return specs


def replace_on_meta(model: nn.Module, layers: dict[str, dict], where: str) -> None:
    """Swap each listed Linear for an empty QuantLinear on the meta device."""
    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: quantized layer {name} does not exist in {type(model).__name__}") from None
        if not isinstance(old, (nn.Linear, QuantLinear)) or (old.in_features, old.out_features) != (
                spec["in_features"], spec["out_features"]):
            raise CheckpointError(f"{where}: {name} is {type(old).__name__} "
                                  f"{getattr(old, 'in_features', '?')}->{getattr(old, 'out_features', '?')} in the "
                                  f"model, a {spec['in_features']}->{spec['out_features']} quantized Linear in the config")
        if spec.get("format") not in formats.FORMATS:
            raise CheckpointError(f"{where}: {name} has an unknown format {spec.get('format')!r}")
        bias = spec.get("bias_dtype")
        bias_dtype = dtype_named(bias) if bias else torch.bfloat16
        if bias_dtype is None:
            raise CheckpointError(f"{where}: {name} has an unknown bias dtype {bias!r}")
        args = (spec["in_features"], spec["out_features"], bias is not None)
        kw = dict(format=spec["format"], static=bool(spec.get("static")), smooth=bool(spec.get("smooth")),
                  bias_dtype=bias_dtype, device="meta")
        try:
            q = QuantLinear(*args, backend=spec.get("backend", "auto"), **kw)
        except qkernels.QKernelsError:  # a backend unknown here: the format decides, auto computes it
            q = QuantLinear(*args, **kw)
        parent, attr = _parent(model, name)
        parent._modules[attr] = q


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """The layer map of an already-quantized model (what save_quantized records too)."""
    return {name: {"format": m.format, "static": m.input_scale is not None, "smooth": m.input_smooth is not None,
                   "bias_dtype": dtype_name(m.bias.dtype) if m.bias is not None else None,
                   "in_features": m.in_features, "out_features": m.out_features, "backend": m.backend_requested}
            for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def fill(module: QuantLinear, name: str, tensor_name: str, stored: torch.Tensor, cast: torch.Tensor,
         device, pre_quantized: bool, where: str) -> None:
    """Put one tensor of a QuantLinear in place: a stored 8-bit tensor exactly as stored, or (while
    quantizing on load) the high-precision weight quantized on ``device``."""
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    expected = module._buffers.get(tensor_name)
    if pre_quantized:
        if expected is None:
            raise CheckpointError(f"{where}: {name}.{tensor_name} is stored, but the config's layer map says "
                                  f"{name} has no {tensor_name}")
        if stored.dtype != expected.dtype or tuple(stored.shape) != tuple(expected.shape):
            raise CheckpointError(
                f"{where}: layer {name} is {module.format} in quantization_config, but {name}.{tensor_name} is "
                f"{dtype_name(stored.dtype)} {list(stored.shape)} (expected {dtype_name(expected.dtype)} "
                f"{list(expected.shape)}): these tensors are not a qkernels {module.format} layer")
        module._buffers[tensor_name] = stored.to(device)
        return
    if tensor_name != "weight":
        raise CheckpointError(f"{where}: {name}.{tensor_name} found while quantizing a high-precision checkpoint; "
                              "this folder looks quantized already but its config has no qkernels quantization_config")
    if not cast.is_floating_point() or cast.element_size() < 2:
        raise CheckpointError(f"{where}: {name}.weight is {dtype_name(stored.dtype)}, not a high-precision weight "
                              "to quantize")
    q, scale = formats.quantize_weight(cast.to(device), module.format)
    module._buffers["weight"], module._buffers["weight_scale"] = q, scale


def finish(model: nn.Module, where: str) -> None:
    """After loading: every quantized tensor is real, and each layer's backend is resolved for
    the device it landed on."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            meta = [b for b, t in m._buffers.items() if t is not None and t.is_meta]
            if meta:
                raise CheckpointError(f"{where}: {name}.{meta[0]} was not loaded (missing from the checkpoint)")
            m.set_backend(m.backend_requested)
