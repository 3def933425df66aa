"""qpipeline: model surgery, recipes, checkpoints and the quantize CLI.

    from qpipeline import quantize_model, save_quantized, load_quantized
    report = quantize_model(model, "qwen-image", device="cuda")
    save_quantized(model, "q/", report)
    model = load_quantized("q/", device="cuda")
"""

from .checkpoint import load_quantized, save_quantized
from .quantize import LayerReport, QuantReport, quantize_model
from .recipe import RECIPES, Recipe, get_recipe

__all__ = ["Recipe", "RECIPES", "get_recipe", "quantize_model", "QuantReport", "LayerReport",
           "save_quantized", "load_quantized"]
