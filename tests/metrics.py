"""Accuracy metrics and error bounds derived from the formats' arithmetic."""

from __future__ import annotations

import math

import torch

from qkernels import formats

# One rounding to bf16 / fp16 (unit roundoff 2^-8 / 2^-11): uniform relative error of rms
# u / sqrt(3) at most.
ROUNDING_RMS = {torch.bfloat16: 2**-8 / math.sqrt(3), torch.float16: 2**-11 / math.sqrt(3), torch.float32: 0.0}
# e4m3 keeps 3 mantissa bits: a normal value rounds with relative error <= 2^-4, rms <= 2^-4/sqrt(3).
E4M3_RMS = 2**-4 / math.sqrt(3)
# Measured error must stay under MARGIN x the predicted rms: the prediction is an expectation
# over many independent rounding errors, so its sampling spread is far smaller than this.
MARGIN = 1.5


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||y - ref|| / ||ref||, in float64."""
    y, ref = y.double(), ref.to(y.device).double()
    return ((y - ref).norm() / ref.norm()).item()


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    return -20 * math.log10(max(rel_error(y, ref), 1e-30))


def int8_rel_rms(t: torch.Tensor) -> float:
    """Predicted relative rms error of symmetric per-row int8 quantization of ``t``: each element
    rounds to a grid of step amax_row / 127, a uniform error of variance step^2 / 12."""
    t = t.double()
    step = t.abs().amax(dim=-1) / formats.INT8_MAX
    return math.sqrt((step**2).mean().item() / 12) / t.pow(2).mean().sqrt().item()


def predicted_error(fmt: str, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> float:
    """Bound on the relative Frobenius error of ``x @ w.T`` computed in ``fmt``: activation and
    weight quantization errors are independent, so they add in quadrature, plus the output's
    rounding (and, weight-only, the upcast weight's rounding) in ``out_dtype``."""
    f = formats.get_format(fmt)
    ew = E4M3_RMS if f.is_fp8 else int8_rel_rms(w)
    ex = 0.0
    if f.quantizes_activations:
        ex = E4M3_RMS if f.is_fp8 else int8_rel_rms(x)
    eo = ROUNDING_RMS[out_dtype]
    return MARGIN * math.sqrt(ew**2 + ex**2 + 2 * eo**2)
