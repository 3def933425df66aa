"""Backends built from PyTorch's own kernels: they run wherever torch does (CPU and CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import gemms
from ..ops.fused import scaled_fp32
from ..capabilities import scaled_mm_rowwise_reason
from ..registry import Backend, apply_epilogue, register_backend


def quantize_activation(layer, x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (dynamic) or calibrated per-tensor (static) quantization of a layer's input.
    Both return a [M] fp32 row scale, so every GEMM epilogue is the same."""
    if layer.input_scale is not None:
        return ops.quantize_per_tensor(x, layer.input_scale, layer.input_smooth, fp8)
    return ops.quantize_per_token(x, layer.input_smooth, fp8)


def _multiple_of(k: int, n: int, m: int, why: str) -> str | None:
    if k % m or n % m:
        return f"in_features and out_features must be multiples of {m} ({why})"
    return None


@register_backend
class BF16(Backend):
    name = "bf16"
    format = "none"
    devices = ("cpu", "cuda")
    description = "plain F.linear in the input dtype: the reference every comparison is against"

    def forward(self, layer, x):  # only used when a caller asks a QuantLinear-free path
        return F.linear(x, layer.weight, layer.bias)


@register_backend
class Int8Torch(Backend):
    name = "int8-torch"
    format = "w8a8-int8"
    devices = ("cpu", "cuda")
    description = "torch._int_mm (int32 out) + fp32 scale epilogue"

    def unsupported_shape_reason(self, in_features, out_features):
        # _int_mm on CUDA is cuBLASLt IMMA: K and N multiples of 8 (M > 16 is handled by padding).
        return _multiple_of(in_features, out_features, 8, "torch._int_mm / cuBLASLt IMMA")

    def forward(self, layer, x):
        q, s = quantize_activation(layer, x, fp8=False)
        return ops.int8_mm_dequant(q, s, layer.weight, layer.weight_scale, layer.bias, x.dtype)

    def scaled_mm(self, layer, q, s):
        return scaled_fp32(ops.int_mm(q, layer.weight), s, layer.weight_scale, layer.bias)


@register_backend
class FP8ScaledMM(Backend):
    name = "fp8-scaled-mm"
    format = "w8a8-fp8"
    devices = ("cpu", "cuda")
    description = "torch._scaled_mm, e4m3 x e4m3, rowwise fp32 scales, bias in the GEMM"

    def unavailable_reason(self, device):
        return super().unavailable_reason(device) or scaled_mm_rowwise_reason(device)

    def unsupported_shape_reason(self, in_features, out_features):
        return _multiple_of(in_features, out_features, 16, "torch._scaled_mm")

    @staticmethod
    def _mm(layer, q, s, out_dtype):
        """``torch._scaled_mm`` on the column-major view of the stored [N, K] weight (no copy),
        rowwise scales, the bias in ``out_dtype``. CUDA's rowwise kernel writes bf16 only."""
        bias = layer.bias
        if bias is not None and bias.dtype != out_dtype:
            bias = bias.to(out_dtype)
        return torch._scaled_mm(q, layer.weight.t(), scale_a=s[:, None], scale_b=layer.weight_scale[None, :],
                                bias=bias, out_dtype=out_dtype)

    def forward(self, layer, x):
        q, s = quantize_activation(layer, x, fp8=True)
        y = self._mm(layer, q, s, torch.bfloat16 if x.is_cuda else x.dtype)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def scaled_mm(self, layer, q, s):
        # fp32 out where _scaled_mm allows it (CPU); on CUDA bf16, which is the rounding the
        # unfused bf16 layer has anyway.
        return self._mm(layer, q, s, torch.bfloat16 if q.is_cuda else torch.float32).float()

    def gemm(self, layer, q, s, out_dtype, gelu=False, residual=None, gate=None, gate_rows=None):
        if not q.is_cuda:
            return super().gemm(layer, q, s, out_dtype, gelu, residual, gate, gate_rows)
        # the epilogue reads the kernel's bf16 output (the rounding it starts from anyway), not an
        # fp32 copy of it
        return apply_epilogue(self._mm(layer, q, s, torch.bfloat16), out_dtype, gelu, residual, gate, gate_rows)


class _WeightOnly(Backend):
    """Weight stored in 8 bits, computed in the input dtype ("layerwise casting", but with a
    per-channel scale): the weight is upcast per call (it lives only during the call) + F.linear.

    ``gemms.weight_only_gemm`` has a Triton kernel on CUDA that converts weight tiles in registers
    instead; it measured slower on H100 (M=8192, K=3072, N=12288: 1335 us vs 817 us for the bf16
    GEMM alone; M=16: 92 us vs 41 us), so it is used only when TRITON_ON_CUDA is set."""

    devices = ("cpu", "cuda")
    TRITON_ON_CUDA = False

    def forward(self, layer, x):
        if x.is_cuda and self.TRITON_ON_CUDA:
            return gemms.weight_only_gemm(x, layer.weight, layer.weight_scale, layer.bias)
        return gemms.weight_only_gemm.reference(x, layer.weight, layer.weight_scale, layer.bias)


@register_backend
class Int8Layerwise(_WeightOnly):
    name = "int8-layerwise"
    format = "w8-int8"
    description = "int8 weight storage, upcast per layer, compute in the input dtype"


@register_backend
class FP8Layerwise(_WeightOnly):
    name = "fp8-layerwise"
    format = "w8-fp8"
    description = "e4m3 weight storage with per-channel scale, upcast per layer"
