"""``int8-cublaslt``: w8a8-int8 through cuBLASLt with a per-shape algorithm search and a CuPy
dequantization epilogue (see qkernels/cublaslt). CUDA only; CuPy and libcublasLt are loaded
when a layer is prepared, never at import."""

from __future__ import annotations

import torch

from .. import cublaslt
from ..capabilities import cublaslt_reason
from ..errors import BackendUnavailableError
from ..registry import Backend, register_backend
from .torch_native import quantize_activation


@register_backend
class Int8CublasLt(Backend):
    name = "int8-cublaslt"
    format = "w8a8-int8"
    devices = ("cuda",)
    description = "cuBLASLt int8 GEMM, algorithm searched per shape, CuPy dequant epilogue"

    def unavailable_reason(self, device):
        return super().unavailable_reason(device) or cublaslt_reason(device)

    def unsupported_shape_reason(self, in_features, out_features):
        from ..cublaslt.plan import linear_shape_reason

        return linear_shape_reason(in_features, out_features)

    def prepare(self, layer) -> None:
        try:
            cublaslt.enable()
        except (ImportError, OSError) as exc:
            raise BackendUnavailableError(f"int8-cublaslt cannot load its libraries: {exc}") from exc
        w = layer.weight
        # The GEMM reads the weight in place as cuBLAS A (TN); it must be row-major with
        # 16-byte aligned rows. Fixed once here, never per call.
        if w.device.type != "meta" and (not w.is_contiguous() or w.data_ptr() % 16):
            layer.weight = w.contiguous() if not w.is_contiguous() else w.clone()

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        if not cublaslt.enabled():  # a layer moved or loaded after prepare
            self.prepare(layer)
        q, s = quantize_activation(layer, x, fp8=False)
        return cublaslt.int8_mm_dequant(q, s, layer.weight, layer.weight_scale, layer.bias, x.dtype)

    def scaled_mm(self, layer, q, s):
        if not cublaslt.enabled():
            self.prepare(layer)
        return cublaslt.int8_mm_dequant(q, s, layer.weight, layer.weight_scale, layer.bias, torch.float32)
