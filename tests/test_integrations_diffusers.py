"""qkernels as a diffusers quantization backend: from_pretrained(quantization_config=...),
PipelineQuantizationConfig, and save_pretrained folders that reload as the same 8-bit model."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from qkernels import CheckpointError, QuantLinear, capabilities
from qpipeline import QKernelsConfig, quantize_model, save_quantized
from qpipeline.demo import demo_inputs

from .metrics import rel_error
from .tiny_pipeline import build_transformer, save_pipeline

diffusers = pytest.importorskip("diffusers")
from diffusers import DiffusionPipeline, PipelineQuantizationConfig, QwenImageTransformer2DModel  # noqa: E402

QWEN_KEPT = {"img_in", "txt_in", "proj_out", "norm_out.linear",
             "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2"}
# Model-level bound for the tiny transformer in int8 (qwen-image recipe): measured 3.3e-3 against
# the bf16 model on these seeded weights and inputs (each quantized layer adds ~0.5% that the
# residual stream and the bf16 proj_out dilute). A 5% scale error on every quantized layer
# measures 8.9e-3, so 6e-3 tells a correct model from a broken one (checked below). The exact
# claim is the bit equality with quantize_model.
MODEL_BOUND = 6e-3


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def equal_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, t in sa.items():
        assert t.dtype == sb[k].dtype and torch.equal(t.view(torch.uint8) if t.element_size() == 1 else t, 
                                                      sb[k].view(torch.uint8) if t.element_size() == 1 else sb[k]), k


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16") / "transformer"
    build_transformer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def inputs():
    return demo_inputs(build_transformer(), text_tokens=8)


def test_from_pretrained_quantizes_while_loading(bf16_dir, inputs, monkeypatch):
    from qpipeline.integrations import _common

    calls = []
    real = _common.formats.quantize_weight

    def spy(w, fmt, smooth=None):
        calls.append(w.dtype)
        return real(w, fmt, smooth)

    monkeypatch.setattr(_common.formats, "quantize_weight", spy)
    q = QwenImageTransformer2DModel.from_pretrained(bf16_dir, torch_dtype=torch.bfloat16,
                                                    quantization_config=QKernelsConfig())
    monkeypatch.undo()
    layers = quant_layers(q)
    assert len(calls) == len(layers) == 28 and set(calls) == {torch.bfloat16}  # one weight at a time
    assert not QWEN_KEPT & set(layers) and type(q.img_in) is nn.Linear  # the qwen-image recipe
    assert q.transformer_blocks[0].attn.to_q.backend == "int8-torch"

    ref = QwenImageTransformer2DModel.from_pretrained(bf16_dir, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        y_ref = ref(**inputs)[0]
    quantize_model(ref, "qwen-image")
    equal_state(q, ref)  # the same bits as quantize_model on the loaded bf16 model
    with torch.no_grad():
        y = q(**inputs)[0]
        assert torch.equal(y, ref(**inputs)[0])
        assert rel_error(y, y_ref) < MODEL_BOUND
        for m in layers.values():
            m.weight_scale.mul_(1.05)  # a wrong scale fails the bound
        assert rel_error(q(**inputs)[0], y_ref) > MODEL_BOUND


def test_config_options(bf16_dir, monkeypatch):
    # the format is the one asked for even where this CPU could not compute it (as torch 2.11)
    monkeypatch.setattr(capabilities, "_cpu_rowwise_scaled_mm_reason", lambda: "faked: no CPU fp8")
    cfg = QKernelsConfig(format="w8a8-fp8", recipe="generic", modules_to_not_convert=["transformer_blocks.1"])
    q = QwenImageTransformer2DModel.from_pretrained(bf16_dir, torch_dtype=torch.bfloat16, quantization_config=cfg)
    layers = quant_layers(q)
    assert layers and {m.format for m in layers.values()} == {"w8a8-fp8"}
    assert not any(n.startswith("transformer_blocks.1.") for n in layers)
    assert "img_in" in layers  # generic recipe: no qwen-image rules
    assert q.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    with pytest.raises(Exception, match="static scales need calibration"):
        QKernelsConfig(activation="static")
    with pytest.raises(Exception, match="unknown backend"):
        QKernelsConfig(backend="int9")


def test_save_pretrained_round_trip_is_bit_identical(bf16_dir, inputs, tmp_path):
    q = QwenImageTransformer2DModel.from_pretrained(bf16_dir, torch_dtype=torch.bfloat16,
                                                    quantization_config=QKernelsConfig(format="w8a8-fp8"))
    q.save_pretrained(tmp_path / "q", max_shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert "config.json" in files and "diffusion_pytorch_model.safetensors.index.json" in files
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "qkernels" and cfg["torch_dtype"] == "bfloat16"
    assert cfg["layers"]["transformer_blocks.0.attn.to_q"]["format"] == "w8a8-fp8"
    back = QwenImageTransformer2DModel.from_pretrained(tmp_path / "q")  # no extra arguments
    equal_state(q, back)
    assert back.transformer_blocks[0].attn.to_q.weight_scale.dtype == torch.float32  # never cast to bf16
    with torch.no_grad():
        assert torch.equal(back(**inputs)[0], q(**inputs)[0])


def test_folder_saying_qkernels_with_high_precision_tensors_is_refused(bf16_dir, tmp_path):
    q = QwenImageTransformer2DModel.from_pretrained(bf16_dir, torch_dtype=torch.bfloat16,
                                                    quantization_config=QKernelsConfig())
    q.save_pretrained(tmp_path / "q")
    f = tmp_path / "q" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    key = "transformer_blocks.1.img_mlp.net.2.weight"
    sd[key] = sd[key].to(torch.bfloat16)  # the codes as a plain bf16 weight
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layer transformer_blocks\.1\.img_mlp\.net\.2 is w8a8-int8.*bfloat16"):
        QwenImageTransformer2DModel.from_pretrained(tmp_path / "q")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    save_pipeline(d)
    return d


def test_pipeline_save_pretrained_of_a_quantize_model_transformer(pipe_dir, inputs, tmp_path):
    """The silent corruption of the trial: a pipeline whose transformer was quantized by
    quantize_model saved with pipe.save_pretrained reloaded the int8 codes as bf16 weights."""
    pipe = DiffusionPipeline.from_pretrained(pipe_dir, torch_dtype=torch.bfloat16)
    quantize_model(pipe.transformer, "qwen-image")
    pipe.save_pretrained(tmp_path / "p")
    back = DiffusionPipeline.from_pretrained(tmp_path / "p")
    assert isinstance(back.transformer.transformer_blocks[0].attn.to_q, QuantLinear)
    equal_state(pipe.transformer, back.transformer)
    with torch.no_grad():
        assert torch.equal(back.transformer(**inputs)[0], pipe.transformer(**inputs)[0])


def test_pipeline_quantization_config_quant_mapping(pipe_dir):
    cfg = PipelineQuantizationConfig(quant_mapping={"transformer": QKernelsConfig(format="w8a8-int8")})
    pipe = DiffusionPipeline.from_pretrained(pipe_dir, torch_dtype=torch.bfloat16, quantization_config=cfg)
    assert len(quant_layers(pipe.transformer)) == 28
    assert not quant_layers(pipe.text_encoder)  # not in the mapping


def test_pipeline_quantization_config_quant_backend(pipe_dir):
    cfg = PipelineQuantizationConfig(quant_backend="qkernels", quant_kwargs={"format": "w8a8-int8"},
                                     components_to_quantize=["transformer", "text_encoder"])
    pipe = DiffusionPipeline.from_pretrained(pipe_dir, torch_dtype=torch.bfloat16, quantization_config=cfg)
    assert len(quant_layers(pipe.transformer)) == 28
    text = quant_layers(pipe.text_encoder)
    assert text and {m.format for m in text.values()} == {"w8a8-int8"}


def test_registration_waits_for_the_libraries():
    """import qpipeline imports neither library (diffusers' quantizers take seconds); each learns
    "qkernels" when its quantizer registry is imported, whatever the order."""
    import subprocess
    import sys

    code = """
import sys, qpipeline
assert "diffusers" not in sys.modules and "transformers" not in sys.modules and "peft" not in sys.modules
from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING as D
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as T
import peft.tuners.lora.model as lm
assert D["qkernels"].__name__ == "QKernelsQuantizer" and T["qkernels"].__name__ == "QKernelsHfQuantizer"
assert lm.LoraModel._create_new_module.__module__ == "qpipeline.integrations.peft"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_an_integration_that_cannot_import_leaves_the_model_running_and_refuses_save_pretrained(
        inputs, tmp_path, monkeypatch):
    """quantize_model of a diffusers model whose integration cannot be imported (a diffusers it does
    not support; simulated) still quantizes, and the model runs; save_pretrained, which would write
    the 8-bit codes as plain weights, raises with the reason and writes nothing."""
    m = build_transformer()
    with torch.no_grad():
        ref = m(**inputs)[0]
    monkeypatch.setitem(sys.modules, "qpipeline.integrations.diffusers", None)  # its import now raises
    quantize_model(m, "qwen-image")
    assert quant_layers(m) and getattr(m, "hf_quantizer", None) is None
    with torch.no_grad():
        assert rel_error(m(**inputs)[0], ref) < MODEL_BOUND
    with pytest.raises(CheckpointError, match=r"QwenImageTransformer2DModel\.save_pretrained cannot write"):
        m.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    save_quantized(m, tmp_path / "ck")  # with the block the integration would have written
    monkeypatch.undo()
    back = QwenImageTransformer2DModel.from_pretrained(tmp_path / "ck")
    assert quant_layers(back).keys() == quant_layers(m).keys()
    equal_state(m, back)
