"""Kernel ops, each declared once.

Every op is a ``torch.library`` custom op (schema + fake implementation) whose real
implementation picks, per device type, a registered device kernel or the plain-PyTorch
reference. ``torch.compile(fullgraph=True)`` sees one opaque op; eager mode skips the dispatcher
entirely and calls the chosen function directly, because the custom-op dispatch costs
~10-30 us of Python per call, which across ~850 layers a step is exactly the per-call overhead
that makes other fp8/int8 paths lose to bf16.

Device kernels register with ``OP.register("cuda", fn)`` from their own modules (Triton,
cuBLASLt), which are imported lazily; nothing here imports them.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from .. import formats

__all__ = ["KernelOp", "quantize_per_token", "quantize_per_tensor", "int8_mm_dequant",
           "int8_mm_dequant_reference", "gemm_fake", "dequant_epilogue", "int_mm"]


class KernelOp:
    """One op: a custom-op declaration plus a per-device-type table of implementations.

    The custom op's schema is inferred from ``reference``'s annotations; its implementation and
    eager calls both go through :meth:`impl_for`, so compiled and eager code run the same kernel.
    """

    def __init__(self, name: str, reference: Callable, fake: Callable):
        self.name = name
        self.reference = reference
        self._impls: dict[str, Callable] = {}

        def run(*args):  # the custom op's implementation (torch.compile'd code calls it)
            impl = self.impl_for(args[0].device.type)
            # a kernel with a host-side fast path for eager calls (a replaying wrapper) keeps it
            # out of compiled code: there the call is the plain kernel, as it was traced
            return getattr(impl, "compiled_impl", impl)(*args)

        run.__signature__ = inspect.signature(reference)
        run.__annotations__ = dict(reference.__annotations__)
        run.__name__ = name
        self.torch_op = torch.library.custom_op(f"qkernels::{name}", mutates_args=())(run)
        self.torch_op.register_fake(fake)

    def register(self, device_type: str, fn: Callable) -> None:
        """Use ``fn`` (same signature as the reference) for tensors on ``device_type``."""
        self._impls[device_type] = fn

    def impl_for(self, device_type: str) -> Callable:
        return self._impls.get(device_type, self.reference)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.torch_op(*args)
        return self.impl_for(args[0].device.type)(*args)


# --------------------------------------------------------------------------------------------
# Activation quantization


def _quantize_per_token_ref(
    x: torch.Tensor, smooth: torch.Tensor | None, fp8: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return formats.quantize_per_token(x, "w8a8-fp8" if fp8 else "w8a8-int8", smooth)


def _quantize_per_token_fake(x, smooth, fp8):
    dtype = torch.float8_e4m3fn if fp8 else torch.int8
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _quantize_per_tensor_ref(
    x: torch.Tensor, scale: torch.Tensor, smooth: torch.Tensor | None, fp8: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return formats.quantize_per_tensor(x, scale, "w8a8-fp8" if fp8 else "w8a8-int8", smooth)


def _quantize_per_tensor_fake(x, scale, smooth, fp8):
    return _quantize_per_token_fake(x, smooth, fp8)


quantize_per_token = KernelOp("quantize_per_token", _quantize_per_token_ref, _quantize_per_token_fake)
quantize_per_tensor = KernelOp("quantize_per_tensor", _quantize_per_tensor_ref, _quantize_per_tensor_fake)


# --------------------------------------------------------------------------------------------
# INT8 GEMM with dequantization epilogue, through torch._int_mm


def dequant_epilogue(
    acc: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``acc * a_scale[m] * w_scale[n] (+ bias)`` in fp32, then cast: the order every int8
    kernel's epilogue uses (int32 * scale overflows bf16's precision, so never in bf16)."""
    y = acc.float()  # a fresh tensor: the rest is in place (no [M, N] temporaries)
    y.mul_(a_scale[:, None]).mul_(w_scale[None, :])
    if bias is not None:
        y.add_(bias.float())
    return y.to(out_dtype)


def int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 ``a [M, K] @ w[N, K].T`` through ``torch._int_mm``.

    ``w.t()`` is a column-major view of the stored row-major weight: the TN layout cuBLASLt's
    IMMA kernels want, so no copy. On CUDA ``_int_mm`` needs M > 16 (and K, N % 8 == 0, checked
    when the layer is built): smaller M is zero-padded to 32 rows rather than refused.
    """
    m = a.shape[0]
    if a.is_cuda and m <= 16:
        a = torch.nn.functional.pad(a, (0, 0, 0, 32 - m))
        return torch._int_mm(a, w.t())[:m]
    return torch._int_mm(a, w.t())


def int8_mm_dequant_reference(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return dequant_epilogue(int_mm(a, w), a_scale, w_scale, bias, out_dtype)


def gemm_fake(a, a_scale, w, w_scale, bias, out_dtype):
    """Shape-only implementation shared by every (a, a_scale, w, w_scale, bias, out_dtype) GEMM op."""
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


int8_mm_dequant = KernelOp("int8_mm_dequant", int8_mm_dequant_reference, gemm_fake)
