"""qpipeline: model surgery, recipes, checkpoints and the quantize CLI.

    from qpipeline import quantize_model, save_quantized, load_quantized
    report = quantize_model(model, "qwen-image", device="cuda")
    save_quantized(model, "q/", report)
    model = load_quantized("q/", device="cuda")
"""

import importlib

# Resolved on first use (PEP 562): `python -m qpipeline.quantize` must not find its own module
# already imported by the package (runpy warns, and the CLI would run a second copy of it).
_EXPORTS = {
    "Recipe": "recipe", "RECIPES": "recipe", "get_recipe": "recipe",
    "quantize_model": "quantize", "QuantReport": "quantize", "LayerReport": "quantize",
    "save_quantized": "checkpoint", "load_quantized": "checkpoint",
    "QKernelsConfig": "integrations.diffusers",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])

# diffusers / transformers learn the "qkernels" quantization method when they are imported
from .integrations import install as _install_integrations  # noqa: E402

_install_integrations()
