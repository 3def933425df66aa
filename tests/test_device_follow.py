"""The backend follows the device: resolved where the tensors are, again when they move, never per
call; the format does not depend on the machine that quantizes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from qkernels import BackendUnavailableError, QuantLinear, capabilities
from qkernels import linear as qlinear
from qkernels.backends.torch_native import quantize_activation
from qkernels.registry import _BACKENDS, AUTO_PREFERENCE, Backend, register_backend
from qpipeline import Recipe, load_quantized, quantize_model, save_quantized
from qpipeline.checkpoint import register_model_class
from qpipeline import quantize as qmod

from .metrics import predicted_error, rel_error

HAS_CUDA = torch.cuda.is_available()
NO_CPU_FP8 = "this torch (2.11.0) has no rowwise-scaled fp8 _scaled_mm on CPU: faked for the test"


def make_linear(k=64, n=48, dtype=torch.bfloat16):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.normal_(0, k**-0.5)
        lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


@register_model_class  # checkpoints build only registered plain modules
class Stack(nn.Module):
    def __init__(self, width: int = 64, depth: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x


def stack(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return Stack().to(dtype).eval().requires_grad_(False)


@pytest.fixture
def cpu_without_fp8(monkeypatch):
    """The CPU as torch 2.11 has it (the H200 machine's): no backend computes w8a8-fp8 there."""
    monkeypatch.setattr(capabilities, "_cpu_rowwise_scaled_mm_reason", lambda: NO_CPU_FP8)


class FlagBackend(Backend):
    """A w8a8-int8 backend that runs only while `available` is set: a device capability that the
    test switches on and off (the CPU stands in for a GPU that has it). Float64 arithmetic on the
    same quantized operands, so its outputs are told apart from int8-torch's only by rounding."""

    name = "test-flag-int8"
    format = "w8a8-int8"
    devices = ("cpu",)
    available = False
    prepared = 0

    def unavailable_reason(self, device):
        return None if FlagBackend.available else "needs the test's accelerator capability"

    def prepare(self, layer):
        FlagBackend.prepared += 1

    def forward(self, layer, x):
        q, s = quantize_activation(layer, x, fp8=False)
        y = (q.double() @ layer.weight.double().T) * s.double()[:, None] * layer.weight_scale.double()[None, :]
        return (y + layer.bias.double()).to(x.dtype)


@pytest.fixture
def flag_backend(monkeypatch):
    register_backend(FlagBackend)
    monkeypatch.setattr(FlagBackend, "available", False)
    monkeypatch.setattr(FlagBackend, "prepared", 0)
    monkeypatch.setitem(AUTO_PREFERENCE, "cpu", (FlagBackend.name, *AUTO_PREFERENCE["cpu"]))
    yield FlagBackend
    del _BACKENDS[FlagBackend.name]


def move_to_meta_and_back(module: nn.Module) -> None:
    """A real device move on a CPU-only machine: every tensor to meta (Module._apply), then the
    same values assigned back onto the CPU (load_state_dict(assign=True), as load_quantized does)."""
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    module.to("meta")
    module.load_state_dict(sd, assign=True)


# ----------------------------------------------------------------------------------------------
# the H200 failure: no w8a8-fp8 checkpoint could be loaded


def test_fp8_checkpoint_loads_where_the_cpu_has_no_fp8(tmp_path, cpu_without_fp8, monkeypatch):
    model = stack()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    # quantized on a CPU box that cannot compute fp8: the format is still the one asked for
    report = quantize_model(model, Recipe(format="w8a8-fp8"))
    assert [l.format for l in report.layers] == ["w8a8-fp8"] * 2
    assert all(l.error is None for l in report.layers)  # nothing here could measure it
    layer = model.layers[0]
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.backend == "auto"
    with pytest.raises(BackendUnavailableError, match="no backend for format 'w8a8-fp8' can run on cpu"):
        model(x)
    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "quantization_config.json").read_text())
    assert {s["format"] for s in cfg["layers"].values()} == {"w8a8-fp8"}

    # Before: QuantLinear built on meta resolved `auto` against the CPU and raised here.
    loaded = load_quantized(tmp_path / "q", device="cpu")
    assert loaded.layers[1].format == "w8a8-fp8" and "can run on cpu" in loaded.layers[1].backend_unavailable_reason
    for key, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key].view(torch.uint8), t.view(torch.uint8)), key

    # the capability appears (the same checkpoint, a torch with CPU fp8): it loads and computes
    monkeypatch.undo()
    assert capabilities.scaled_mm_rowwise_reason(torch.device("cpu")) is None
    loaded = load_quantized(tmp_path / "q", device="cpu")
    assert loaded.layers[0].backend == "fp8-scaled-mm"
    ref = stack()
    with torch.no_grad():
        y, y_ref = loaded(x), ref(x)
    # e4m3 weights and activations: ~2 x 2^-4/sqrt(3) per layer, two layers
    bound = 2 * predicted_error("w8a8-fp8", x, ref.layers[0].weight, torch.bfloat16)
    assert rel_error(y, y_ref) < bound
    loaded.layers[0].weight_scale.mul_(1.25)  # a wrong scale fails the same bound
    with torch.no_grad():
        assert rel_error(loaded(x), y_ref) > bound


def test_meta_layer_resolves_nothing():
    layer = QuantLinear(64, 48, format="w8a8-fp8", device="meta")
    assert layer.backend == "auto" and "meta device" in layer.backend_unavailable_reason
    with pytest.raises(BackendUnavailableError, match="meta device"):
        layer(torch.empty(2, 64, device="meta"))
    # an explicit backend of another format is still refused at once
    with pytest.raises(qlinear.InputError, match="computes format 'w8a8-int8', not 'w8a8-fp8'"):
        QuantLinear(64, 48, format="w8a8-fp8", backend="int8-torch", device="meta")


def test_tensors_assigned_behind_the_module_resolve_on_first_call():
    """accelerate's init_empty_weights + set_module_tensor_to_device: the tensors arrive without
    Module._apply; the first forward resolves for where they are, the next ones do not."""
    from accelerate.utils import set_module_tensor_to_device

    src = QuantLinear.from_linear(make_linear(), "int8-torch")
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    want = src(x)
    layer = QuantLinear(64, 48, format="w8a8-int8", device="meta")
    for name, t in src.state_dict().items():
        set_module_tensor_to_device(layer, name, "cpu", value=t)
    assert layer.weight.dtype == torch.int8  # accelerate kept the format's dtype
    assert torch.equal(layer(x), want) and layer.backend == "int8-torch"


# ----------------------------------------------------------------------------------------------
# re-resolution on a move, never per call


def test_auto_is_resolved_again_when_the_layer_moves(flag_backend, monkeypatch):
    layer = QuantLinear.from_linear(make_linear(), "auto")
    assert layer.backend == "int8-torch"  # the flag backend is first for auto, but unavailable now
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    y = layer(x)

    calls = []
    real = qlinear.resolve_backend
    monkeypatch.setattr(qlinear, "resolve_backend", lambda *a, **k: calls.append(a) or real(*a, **k))
    for _ in range(20):
        layer(x)
    assert calls == []  # never per call

    flag_backend.available = True  # the device the layer goes to has the capability
    layer.to(torch.float16)  # a dtype change is not a move
    assert calls == [] and layer.backend == "int8-torch"
    layer.to(torch.bfloat16)
    move_to_meta_and_back(layer)
    assert layer.backend == flag_backend.name and flag_backend.prepared == 1
    assert [str(a[1]) for a in calls] == ["cpu"]  # once for meta (no lookup) and cpu: one lookup
    # int8-torch (exact int32 accumulation, fp32 epilogue) vs float64: one bf16 rounding apart
    torch.testing.assert_close(layer(x), y, rtol=2**-7, atol=1e-5)
    assert len(calls) == 1


def test_set_backend_on_a_device_that_cannot_run_it_is_recorded(flag_backend):
    layer = QuantLinear.from_linear(make_linear(), "int8-torch")
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    layer.set_backend(flag_backend.name)  # recorded, not refused: this device lacks the capability
    assert layer.backend_requested == flag_backend.name and layer.backend == flag_backend.name
    assert "needs the test's accelerator capability" in layer.backend_unavailable_reason
    assert "(none runs here)" in repr(layer)
    with pytest.raises(BackendUnavailableError, match=r"test-flag-int8.*cannot run on cpu.*Available here: int8-torch"):
        layer(x)
    flag_backend.available = True
    move_to_meta_and_back(layer)  # reaches a device that can run it: applied
    assert layer.backend == flag_backend.name and layer.backend_unavailable_reason is None
    assert layer(x).shape == (4, 48)
    layer.set_backend("auto")
    assert layer.backend == flag_backend.name  # first in the (patched) auto order
    # what does not depend on the device is refused at once
    with pytest.raises(qlinear.InputError, match="computes format"):
        layer.set_backend("fp8-scaled-mm")
    with pytest.raises(qlinear.InputError, match="unknown backend"):
        layer.set_backend("int9")
    assert layer.backend_requested == "auto"


def test_explicit_backend_quantizes_for_a_device_that_can_run_it(flag_backend, tmp_path):
    model = stack()
    report = quantize_model(model, flag_backend.name)  # cannot run here: written in its format
    assert [l.format for l in report.layers] == ["w8a8-int8"] * 2
    # the probe error is measured with a backend of the format that runs here
    assert all(l.error is not None and 0 < l.error < 0.02 for l in report.layers)
    assert model.layers[0].backend_requested == flag_backend.name
    flag_backend.available = True
    move_to_meta_and_back(model)
    assert model.layers[0].backend == flag_backend.name


def test_cli_format_fp8_on_a_machine_without_fp8(tmp_path, cpu_without_fp8, capsys):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "m"
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    assert qmod.main(["--model", str(folder), "--format", "w8a8-fp8", "--out", str(tmp_path / "q"),
                      "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "note: no backend for format 'w8a8-fp8' can run on cpu" in out
    cfg = json.loads((tmp_path / "q" / "quantization_config.json").read_text())
    assert {s["format"] for s in cfg["layers"].values()} == {"w8a8-fp8"}
    q = load_quantized(tmp_path / "q")
    assert q.model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn


# ----------------------------------------------------------------------------------------------
# on a GPU, for real


@pytest.mark.gpu
def test_gpu_fp8_checkpoint_load_and_moves(tmp_path):
    major, minor = torch.cuda.get_device_capability()
    model = stack()
    quantize_model(model, Recipe(format="w8a8-fp8"))  # on the CPU
    save_quantized(model, tmp_path / "q")
    ref = stack().cuda()
    x = torch.randn(33, 64, dtype=torch.bfloat16, device="cuda")
    bound = 2 * predicted_error("w8a8-fp8", x, ref.layers[0].weight, torch.bfloat16)

    loaded = load_quantized(tmp_path / "q", device="cuda")  # raised BackendUnavailableError before
    want = "fp8-triton" if (major, minor) >= (8, 9) else "auto"
    assert loaded.layers[0].backend == want
    if (major, minor) >= (8, 9):
        with torch.no_grad():
            assert rel_error(loaded(x), ref(x)) < bound

    # loaded on the CPU, then moved: re-resolved for the GPU, and back
    cpu = load_quantized(tmp_path / "q", device="cpu")
    cpu_backend = cpu.layers[0].backend
    cpu.cuda()
    assert cpu.layers[0].backend == want and cpu.layers[0].weight.dtype == torch.float8_e4m3fn
    cpu.cpu()
    assert cpu.layers[0].backend == cpu_backend

    # an int8 model quantized on the CPU (int8-torch) moves to int8-triton
    m8 = stack()
    quantize_model(m8, "auto")
    assert m8.layers[0].backend == "int8-torch"
    m8.to("cuda")
    assert m8.layers[0].backend == "int8-triton"

    # set_backend on a CPU layer is applied when it reaches the GPU
    layer = QuantLinear.from_linear(make_linear(), "fp8-scaled-mm")
    layer.set_backend("fp8-triton")
    layer.cuda()
    if (major, minor) >= (8, 9):
        assert layer.backend == "fp8-triton" and layer.backend_unavailable_reason is None
