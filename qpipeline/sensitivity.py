"""Error budget: keep the layers whose quantization hurts the model's output most in high
precision, until the whole model's output is within ``max_error`` of the unquantized model.

    report = quantize_model(model, recipe.replace(max_error=0.02), calibration=stats, inputs=batches)

Error is the relative Frobenius error of the model's output against the high-precision model's
output on the same inputs, pooled over all inputs: ``sqrt(sum ||y - y_ref||^2 / sum ||y_ref||^2)``.

1. Sensitivity: each layer is quantized alone, swapped in, the model is run on the inputs, and the
   original layer is swapped back: its *cost* is the model's output error with only it quantized.
2. Budget: layers are then quantized for good in order of increasing cost. Each one is swapped in
   and the model's output error measured; within the budget it stays (and its high-precision
   weights are freed), over it the original is put back and the layer is kept, with the error it
   would have caused. The model's final error is the last measured one, so it is within the budget
   on these inputs by construction.

Memory: the high-precision model plus one quantized layer during step 1, and the result plus one
high-precision layer under test during step 2 (the model must fit on its device in high precision,
as it must to be run at all). Time: 2 forward passes per layer per input plus one reference pass.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from calibration.collect import call_model
from qkernels.errors import RecipeError

__all__ = ["apply_error_budget", "default_inputs", "output_error", "run_outputs"]


def _output_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a tuple/list, or a ModelOutput)."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = tuple(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if torch.is_tensor(o):
                return o
    raise RecipeError(f"the model's output ({type(out).__name__}) holds no tensor to measure the error on")


@torch.no_grad()
def run_outputs(model: nn.Module, inputs: list) -> list[torch.Tensor]:
    return [_output_tensor(call_model(model, b)).detach() for b in inputs]


@torch.no_grad()
def output_error(model: nn.Module, inputs: list, refs: list[torch.Tensor]) -> float:
    """Pooled relative Frobenius error of ``model``'s outputs against ``refs``, in float64. One
    host read per call (the budget decision needs the number)."""
    num = den = 0.0
    for b, ref in zip(inputs, refs):
        y = _output_tensor(call_model(model, b))
        d = (y.double() - ref.double()).pow(2).sum()
        num, den = num + d, den + ref.double().pow(2).sum()
    return math.sqrt(float(num / den)) if float(den) > 0 else math.sqrt(float(num))


def default_inputs(model: nn.Module, samples: int = 1, steps: int = 2, image_hw=(16, 16), text_tokens=32) -> list:
    """Generated inputs for a Qwen-Image-style transformer (``samples * steps`` flow-matching
    batches, as ``calibration.collect`` generates them); other models must be given inputs."""
    if type(model).__name__ != "QwenImageTransformer2DModel":
        raise RecipeError(f"an error budget (max_error) needs example inputs to measure the model's output on: "
                          f"pass inputs=[...] to quantize_model for a {type(model).__name__}")
    from calibration.collect import flow_matching_batches

    return list(flow_matching_batches(model, samples=samples, steps=steps, image_hw=image_hw,
                                      text_tokens=text_tokens, seed=10_000))


def _swap(places, module) -> None:
    for parent, attr in places:
        setattr(parent, attr, module)


def apply_error_budget(model: nn.Module, recipe, sites, calibration, device, inputs: Iterable | None,
                       quantize_one: Callable, report) -> dict:
    """Quantize ``model``'s layers (``sites`` from quantize_model) within ``recipe.max_error``.

    ``quantize_one(name, linear, recipe, backend_name, calibration, device) -> (QuantLinear | None,
    LayerReport)`` is quantize_model's own per-layer step. Returns ``{name: LayerReport}`` for every
    site, and sets ``report.model_error`` and ``report.error_budget``.
    """
    from tqdm.auto import tqdm

    budget = recipe.max_error
    if device is not None:
        model.to(device)  # every layer must be in place to run the model; see the module docstring
    inputs = default_inputs(model) if inputs is None else list(inputs)
    if not inputs:
        raise RecipeError("an error budget needs at least one input batch to measure the model's output on")
    refs = run_outputs(model, inputs)
    if not all(torch.isfinite(r).all() for r in refs):
        raise RecipeError("the high-precision model gives non-finite outputs on these inputs: no error to budget")

    rows: dict[str, Any] = {}
    cost: dict[str, float] = {}
    by_name = {name: places for name, places in sites}

    def quantize(name):
        places = by_name[name]
        backend_name, rule = recipe.backend_for(name)
        linear = places[0][0]._modules[places[0][1]]
        q, row = quantize_one(name, linear, recipe, backend_name, calibration, device)
        if row.reason == "recipe rule":
            row.reason = f"recipe rule {recipe.rules[rule][0]!r}"
        return linear, q, row

    # 1. each layer alone
    for name, places in tqdm(sites, desc="sensitivity", unit="layer", disable=None, leave=False):
        linear, q, row = quantize(name)
        if q is None:  # the recipe or the backend keeps it: not a candidate
            rows[name] = row
            continue
        _swap(places, q)
        try:
            cost[name] = output_error(model, inputs, refs)
        finally:
            _swap(places, linear)
        del q

    # 2. cheapest first, each kept only if the model stays within the budget
    current = 0.0
    for name in tqdm(sorted(cost, key=cost.get), desc="error budget", unit="layer", disable=None, leave=False):
        places = by_name[name]
        linear, q, row = quantize(name)
        _swap(places, q)
        err = output_error(model, inputs, refs)
        row.model_error = cost[name]
        if err <= budget:
            current = err
        else:
            _swap(places, linear)
            row = _kept_row(row, f"error budget: alone {cost[name]:.2e}; with it the model's error would be "
                                 f"{err:.2e} > max_error {budget:g}")
        rows[name] = row
        del linear, q

    report.model_error = current
    report.error_budget = budget
    return rows


def _kept_row(row, reason: str):
    """A quantized layer's report row turned into a kept (high-precision) one."""
    row.format = row.backend = row.activation = None
    row.smoothed = False
    row.bytes_after = row.bytes_before
    row.error = None
    row.reason = reason
    return row
