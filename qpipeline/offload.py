"""CPU offload of quantized models, with the 8-bit weights moving too.

``QuantLinear`` keeps its 8-bit tensors as buffers (so that ``model.to(dtype)``, optimizers and
``requires_grad_`` never touch them). accelerate's sequential offload moves parameters and, unless
asked, leaves buffers on the execution device for good; diffusers asks only for models that have
parameters of their own at the top level, so ``pipe.enable_sequential_cpu_offload()`` alone would
keep every 8-bit weight on the GPU. These helpers offload them as well: between calls they are on
the meta device, each layer's are brought to the device for its forward and dropped after, in
their own dtype (accelerate assigns them uncast).

Model CPU offload (``pipe.enable_model_cpu_offload()``) and group offload
(``pipe.enable_group_offload(...)``) need nothing: they move whole modules (``.to``, or each
tensor's ``.data``), the 8-bit dtypes are kept (``QuantLinear._apply``), and each layer's backend
is resolved for the device it lands on, once (on the move, or on its first call there).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qkernels import QuantLinear

__all__ = ["sequential_cpu_offload", "enable_sequential_cpu_offload"]


def _has_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in module.modules())


def sequential_cpu_offload(model: nn.Module, device: torch.device | str = "cuda") -> nn.Module:
    """accelerate's ``cpu_offload`` with the buffers (the 8-bit weights) offloaded too."""
    from accelerate import cpu_offload

    cpu_offload(model, torch.device(device), offload_buffers=True)
    return model


def enable_sequential_cpu_offload(pipe, gpu_id: int | None = None, device: torch.device | str | None = None):
    """``pipe.enable_sequential_cpu_offload(...)``, then the components holding QuantLinear layers
    offloaded again with their buffers (see the module docstring)."""
    from accelerate.hooks import remove_hook_from_module

    pipe.enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
    for name, component in pipe.components.items():
        if isinstance(component, nn.Module) and name not in pipe._exclude_from_cpu_offload \
                and _has_quantized(component):
            remove_hook_from_module(component, recurse=True)
            component.to("cpu")
            sequential_cpu_offload(component, pipe._offload_device)
    return pipe
