"""Offload of quantized models: the 8-bit weights move (sequential offload keeps one layer's on the
execution device), their dtype is never cast, the backend follows them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from qkernels import QuantLinear
from qkernels.backends import torch_native
from qpipeline import Recipe, quantize_model
from qpipeline.offload import sequential_cpu_offload

pytest.importorskip("accelerate")


class Stack(nn.Module):
    """Linears and a norm: a quantized model keeps some parameters (every diffusers transformer
    does), and accelerate's model offload finds the execution device from the first one."""

    def __init__(self, width=64, depth=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return self.norm(x)


def quantized(fmt="w8a8-int8"):
    torch.manual_seed(0)
    model = Stack().to(torch.bfloat16).eval()
    quantize_model(model, Recipe(format=fmt))
    return model


def materialized(model):
    return sum(not m.weight.is_meta for m in model.modules() if isinstance(m, QuantLinear))


def test_sequential_offload_moves_the_8bit_weights(monkeypatch):
    """On the CPU as execution device: between calls every 8-bit weight is on meta (offloaded);
    during a layer's forward only that layer's is materialized, in its own dtype."""
    from accelerate import cpu_offload

    model = quantized()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
    ref = copy.deepcopy(model)

    seen = []
    real = torch_native.Int8Torch.forward

    def spy(self, layer, x):
        seen.append((materialized(model), layer.weight.dtype, layer.weight.device.type))
        return real(self, layer, x)

    monkeypatch.setattr(torch_native.Int8Torch, "forward", spy)
    sequential_cpu_offload(model, "cpu")
    assert materialized(model) == 0
    with torch.no_grad():
        assert torch.equal(model(x), want)
    assert seen == [(1, torch.int8, "cpu")] * 4  # one layer's 8-bit weights at a time
    assert materialized(model) == 0

    # what diffusers' enable_sequential_cpu_offload asks of accelerate for such a model
    # (offload_buffers=False): the 8-bit weights stay on the execution device for good
    cpu_offload(ref, torch.device("cpu"), offload_buffers=False)
    assert materialized(ref) == 4


@pytest.mark.gpu
def test_gpu_offload_modes():
    from accelerate import cpu_offload_with_hook

    model = quantized("w8a8-fp8")
    x = torch.randn(33, 64, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        want = copy.deepcopy(model).cuda()(x)

    # model CPU offload: the whole model moves on the call, the backend follows
    m = copy.deepcopy(model)
    m, hook = cpu_offload_with_hook(m, torch.device("cuda"))
    with torch.no_grad():
        y = m(x)
    assert m.layers[0].weight.device.type == "cuda" and m.layers[0].weight.dtype == torch.float8_e4m3fn
    assert m.layers[0].backend != "auto"
    hook.offload()
    assert m.layers[0].weight.device.type == "cpu"
    torch.testing.assert_close(y, want, rtol=2**-7, atol=2**-7)

    # sequential: the 8-bit weights are on the GPU only during their layer's forward
    m = copy.deepcopy(model)
    sequential_cpu_offload(m, "cuda")
    with torch.no_grad():
        y = m(x)
    assert materialized(m) == 0  # offloaded again after the call
    torch.testing.assert_close(y, want, rtol=2**-7, atol=2**-7)
    # accelerate's default for such a model (what pipe.enable_sequential_cpu_offload asks): they stay
    from accelerate import cpu_offload

    d = copy.deepcopy(model)
    cpu_offload(d, torch.device("cuda"), offload_buffers=False)
    assert materialized(d) == 4 and d.layers[0].weight.device.type == "cuda"

    # group offload (diffusers): `.data` moves
    from diffusers.hooks import apply_group_offloading

    m = copy.deepcopy(model)
    apply_group_offloading(m, onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                           offload_type="leaf_level")
    with torch.no_grad():
        y = m(x)
    assert m.layers[0].weight.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(y, want, rtol=2**-7, atol=2**-7)
