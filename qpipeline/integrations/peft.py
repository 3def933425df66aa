"""PEFT LoRA on ``QuantLinear``: ``pipe.load_lora_weights``, ``set_adapters``,
``unload_lora_weights`` on a quantized transformer.

PEFT replaces each targeted layer by a LoRA layer of its type and refuses types it does not know.
When PEFT's LoRA model is imported, its layer factory learns ``QuantLinear`` -> :class:`QuantLoraLinear`
(the dispatch PEFT uses for custom modules, for every LoRA config, including the ones diffusers
builds inside ``load_lora_weights``). The LoRA weights stay PEFT's (same state-dict keys, adapter
names, scales and deletion); the forward adds them with the run-time branch ``QuantLinear`` has
(``QuantLinear.lora_branch``: one addmm, in the input dtype). The 8-bit weight is never changed:
merging (``fuse_lora``) into it is refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer

from qkernels import QuantLinear
from qkernels.errors import LoRAError

__all__ = ["QuantLoraLinear", "register"]


class QuantLoraLinear(_PeftLoraLinear):
    """PEFT's LoRA Linear around a QuantLinear base layer."""

    def __init__(self, base_layer, adapter_name, config, **kwargs):
        if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
            raise LoRAError("DoRA and LoRA biases are not supported on 8-bit layers; use a plain LoRA")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_base_layer_device_and_dtype(self, base_layer):
        # The adapter goes to the layer's device in its compute dtype: never the 8-bit weight's
        # (PEFT would cast a LoRA to float8_e4m3fn, which is a floating-point dtype).
        if isinstance(base_layer, BaseTunerLayer):
            base_layer = base_layer.get_base_layer()
        bias = base_layer.bias
        dtype = bias.dtype if bias is not None and bias.element_size() >= 2 else torch.bfloat16
        return base_layer.weight.device, dtype

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise LoRAError("cannot merge a LoRA into an 8-bit QuantLinear (it would be re-quantized): keep it as a "
                        "run-time branch, or merge into the bf16 weights before quantizing (qpipeline.lora.merge)")

    def unmerge(self) -> None:
        pass  # never merged

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise LoRAError("per-sample adapter_names are not supported on 8-bit layers")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return result
        n = result.shape[-1]
        x2, y2 = x.reshape(-1, x.shape[-1]), result.reshape(-1, n)
        for a in active:
            if a in self.lora_variant:
                raise LoRAError(f"adapter {a!r} is a LoRA variant, not supported on 8-bit layers")
            y2 = QuantLinear.lora_branch(self.lora_dropout[a](x2), y2, self.lora_A[a].weight,
                                         self.lora_B[a].weight, self.scaling[a])
        return y2.reshape(result.shape)

    def __repr__(self) -> str:
        return "qkernels." + super().__repr__()


_original_create_new_module = LoraModel._create_new_module


def _create_new_module(lora_config, adapter_name, target, **kwargs):
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, QuantLinear):
        return QuantLoraLinear(target, adapter_name, config=lora_config, **kwargs)
    return _original_create_new_module(lora_config, adapter_name, target, **kwargs)


def register() -> None:
    """PEFT's LoRA layer factory (a staticmethod of LoraModel) learns QuantLinear; idempotent."""
    current = LoraModel.__dict__.get("_create_new_module")
    if getattr(current, "__func__", None) is not _create_new_module:
        LoraModel._create_new_module = staticmethod(_create_new_module)


register()
