"""The int8-fp8 attention declared once as a ``torch.library`` op (``qkernels::int8_fp8_attention``):
schema, fake implementation, the PyTorch reference of the same quantized algorithm (any device),
and the Triton kernel as the "cuda" implementation (and "cpu" under TRITON_INTERPRET=1), imported on
the first call. ``torch.compile(fullgraph=True)`` sees one opaque op.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..capabilities import triton_import_reason
from ..errors import BackendUnavailableError
from ..ops import KernelOp
from .reference import quantized_attention

__all__ = ["int8_fp8_attention"]


def _reference(q0: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, q1: torch.Tensor, k1: torch.Tensor,
               v1: torch.Tensor, bias: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (torch.cat([a, b], dim=1).transpose(1, 2) for a, b in ((q0, q1), (k0, k1), (v0, v1)))
    sk = k.shape[2]
    o = quantized_attention(q, k, v, attn_mask=bias[:, :sk], scale=scale).transpose(1, 2)
    return o[:, :q0.shape[1]].contiguous(), o[:, q0.shape[1]:].contiguous()


def _fake(q0, k0, v0, q1, k1, v1, bias, scale):
    return torch.empty_like(q0, memory_format=torch.contiguous_format), torch.empty_like(
        q1, memory_format=torch.contiguous_format)


int8_fp8_attention = KernelOp("int8_fp8_attention", _reference, _fake)


def _lazy_triton(*args):
    reason = triton_import_reason()
    if reason is not None:  # not the reference: it emulates the kernel's rounding at many times its cost
        raise BackendUnavailableError(f"the int8-fp8 attention kernel cannot run: {reason}")
    from .int8_fp8_attention import attention_8bit

    for device_type in _DEVICES:
        int8_fp8_attention.register(device_type, attention_8bit)
    return attention_8bit(*args)


_DEVICES = ["cuda"] + (["cpu"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
if importlib.util.find_spec("triton") is not None:
    for _device_type in _DEVICES:
        int8_fp8_attention.register(_device_type, _lazy_triton)
