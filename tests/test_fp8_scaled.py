"""Community fp8-scaled single-file checkpoints: import without re-quantizing (per-tensor scales
expanded exactly to per channel), compute what dequantizing by hand computes, export back."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from qkernels import CheckpointError, QuantLinear, formats
from qpipeline.fp8_scaled import convert_scaled_fp8, load_scaled_fp8, save_scaled_fp8

from .metrics import rel_error

E4M3 = torch.float8_e4m3fn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 48)
        self.b = nn.Linear(48, 32)
        self.norm = nn.LayerNorm(48)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def community_file(path):
    """Layer a: ComfyUI names, one scale for the tensor and a static input scale; layer b:
    LightX2V names, per-channel scales [N, 1]; the prefix ComfyUI files carry."""
    g = torch.Generator().manual_seed(0)
    wa = torch.randn(48, 64, generator=g) * 0.05
    sa = wa.abs().max() / 448
    wb = torch.randn(32, 48, generator=g) * torch.linspace(0.01, 0.2, 32)[:, None]
    sb = wb.abs().amax(dim=1, keepdim=True) / 448
    sd = {
        "model.diffusion_model.a.weight": (wa / sa).to(E4M3), "model.diffusion_model.a.scale_weight": sa.reshape(()),
        "model.diffusion_model.a.scale_input": torch.tensor(0.02), "model.diffusion_model.a.bias": torch.randn(48, generator=g).to(torch.bfloat16),
        "model.diffusion_model.b.weight": (wb / sb).to(E4M3), "model.diffusion_model.b.weight_scale": sb,
        "model.diffusion_model.b.bias": torch.randn(32, generator=g).to(torch.bfloat16),
        "model.diffusion_model.norm.weight": torch.ones(48, dtype=torch.bfloat16),
        "model.diffusion_model.norm.bias": torch.zeros(48, dtype=torch.bfloat16),
        "scaled_fp8": torch.empty(0, dtype=E4M3),
    }
    save_file(sd, path)
    return sd


def by_hand(sd, x, static_a: bool):
    """float64, from the file: W = codes * scale (per row), the activation quantized as stored."""
    p = "model.diffusion_model."
    wa = sd[p + "a.weight"].double() * sd[p + "a.scale_weight"].double()
    wb = sd[p + "b.weight"].double() * sd[p + "b.weight_scale"].double()
    xa = x.double()
    if static_a:
        s = sd[p + "a.scale_input"].double()
        xa = (x.float() / s.float()).clamp(-448, 448).to(E4M3).double() * s
    h = xa @ wa.T + sd[p + "a.bias"].double()
    h = torch.nn.functional.layer_norm(h, (48,), sd[p + "norm.weight"].double(), sd[p + "norm.bias"].double())
    return h @ wb.T + sd[p + "b.bias"].double()


def test_import_weight_only_equals_dequantizing_by_hand(tmp_path):
    sd = community_file(tmp_path / "c.safetensors")
    model = load_scaled_fp8(tmp_path / "c.safetensors", Net(), format="w8-fp8")
    assert isinstance(model.a, QuantLinear) and model.a.format == "w8-fp8" and model.a.input_scale is None
    # the per-tensor scale, expanded exactly; the codes as stored
    assert torch.equal(model.a.weight_scale, sd["model.diffusion_model.a.scale_weight"].expand(48))
    assert torch.equal(model.a.weight.view(torch.uint8), sd["model.diffusion_model.a.weight"].view(torch.uint8))
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(x)
    ref = by_hand(sd, x, static_a=False)
    # weight-only: the same dequantized weight; what is left is bf16 arithmetic (the upcast weight
    # and two layer outputs rounded to bf16, 2^-8 each): well under 1e-2
    assert rel_error(y, ref) < 1e-2
    # a per-tensor scale not expanded but taken as row 0 of a per-channel one would be wrong:
    model.b.weight_scale.fill_(float(model.b.weight_scale[0]))
    with torch.no_grad():
        assert rel_error(model(x), ref) > 1e-2


def test_import_w8a8_static_input_scale(tmp_path):
    sd = community_file(tmp_path / "c.safetensors")
    model = load_scaled_fp8(tmp_path / "c.safetensors", Net(), format="w8a8-fp8")
    assert model.a.input_scale is not None and float(model.a.input_scale) == pytest.approx(0.02)
    assert model.b.input_scale is None  # dynamic per-token where the file has no input scale
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(x)
    ref = by_hand(sd, x, static_a=True)
    # layer b's activation is quantized dynamically per token (e4m3: relative rms at most
    # 2^-4/sqrt(3) = 3.6%; measured 1.7%), which is the error left against the hand computation
    assert rel_error(y, ref) < 0.04
    # layer a alone: its activation quantized with the stored scale exactly as by hand, so only
    # the bf16 rounding of its output is left (2^-8 at most); without the scale it is ~2%
    p = "model.diffusion_model."
    s_in = sd[p + "a.scale_input"].float()
    xq = (x.float() / s_in).clamp(-448, 448).to(E4M3).double() * s_in.double()
    wa = sd[p + "a.weight"].double() * sd[p + "a.scale_weight"].double()
    ya = xq @ wa.T + sd[p + "a.bias"].double()
    with torch.no_grad():
        assert rel_error(model.a(x), ya) < 2**-8
        assert rel_error(model.a(x), x.double() @ wa.T + sd[p + "a.bias"].double()) > 2**-8


def test_export_round_trips_and_comfyui_names(tmp_path):
    community_file(tmp_path / "c.safetensors")
    model = load_scaled_fp8(tmp_path / "c.safetensors", Net())
    save_scaled_fp8(model, tmp_path / "o.safetensors")
    out = load_file(tmp_path / "o.safetensors")
    assert out["b.weight_scale"].shape == (32,) and out["a.input_scale"].shape == ()
    again = load_scaled_fp8(tmp_path / "o.safetensors", Net())
    for k, t in model.state_dict().items():
        assert torch.equal(t.view(torch.uint8) if t.element_size() == 1 else t,
                           again.state_dict()[k].view(torch.uint8) if t.element_size() == 1 else again.state_dict()[k]), k
    with pytest.raises(CheckpointError, match="b has per-channel scales"):
        save_scaled_fp8(model, tmp_path / "comfy.safetensors", names="comfyui")
    model.b.weight_scale.fill_(0.001)  # one scale per tensor: ComfyUI can hold it
    save_scaled_fp8(model, tmp_path / "comfy.safetensors", names="comfyui")
    comfy = load_file(tmp_path / "comfy.safetensors")
    assert "scaled_fp8" in comfy and comfy["a.scale_weight"].shape == () and "a.scale_input" in comfy


def test_refusals(tmp_path):
    sd = community_file(tmp_path / "c.safetensors")
    bad = dict(sd)
    bad["model.diffusion_model.b.weight"] = sd["model.diffusion_model.b.weight"].float().to(torch.float8_e5m2)
    with pytest.raises(CheckpointError, match="float8_e5m2"):
        convert_scaled_fp8(bad)
    bad = dict(sd)
    bad["model.diffusion_model.b.weight_scale"] = torch.ones(5)
    with pytest.raises(CheckpointError, match="neither per-tensor"):
        convert_scaled_fp8(bad)
    with pytest.raises(CheckpointError, match="w8a8-fp8 or w8-fp8"):
        convert_scaled_fp8(sd, "w8a8-int8")
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match="pickle"):
        load_scaled_fp8(tmp_path / "x.ckpt", Net())
    assert formats.get_format("w8a8-fp8").dtype == E4M3
