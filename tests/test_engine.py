"""Engine: the tiny QwenImageEditPlusPipeline end to end with a quantized transformer, on CPU.

Image tolerance. We compare the decoded float image (``output_type="np"``, [0, 1]) with the
bf16 engine's for the same seed, by PSNR. Not the 8-bit PIL image: its rounding alone puts an
rms error of up to ~1/255 on any two slightly different images, a 48 dB floor that would hide
a broken model. Int8 W8A8 puts a relative error of ~1% on each Linear (the QuantReport's
per-layer errors are <= 0.9% here), which reaches the predicted velocity as ~1% (measured
0.8-1.0% per step); the final latent is noise - velocity (2 Euler steps over sigma 1 -> 0),
so its error is ~1% of |v| ~ 0.55, which the decoder turns into ~51 dB (measured). A velocity
wrong by 5% measures ~47 dB; every weight_scale 25% too large (the broken model below) lower
still. PSNR_MIN = 45 dB (rms error 0.56% of full scale) admits the format's error with ~6 dB
margin and rejects a model that is wrong by several percent. (For scale: SVDQuant W8A8 on
FLUX.1 is 27 dB from bf16 after 50 steps of a real model; 2 steps of a tiny one compound far
less.)
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from qkernels import CheckpointError, InputError, QuantLinear
from qpipeline import quantize_model, save_quantized
from qpipeline.checkpoint import load_pretrained
from qpipeline.engine import Engine

from .tiny_pipeline import reference_images, save_pipeline, small_vae_references

PSNR_MIN = 45.0
GEN = dict(prompt="make it red", num_steps=2, true_cfg_scale=1.0, seed=0, height=32, width=32, output_type="np")


def psnr(a, b) -> float:
    """PSNR of two float images in [0, 1]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape == (32, 32, 3)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module", autouse=True)
def _small_references():
    with small_vae_references():
        yield


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-edit-plus")
    save_pipeline(d)
    return d


@pytest.fixture(scope="module")
def images():
    return reference_images(2)


@pytest.fixture(scope="module")
def bf16_image(pipe_dir, images):
    return Engine(pipe_dir, backend="bf16", device="cpu").generate(images, **GEN)


@pytest.fixture(scope="module")
def lora_file(pipe_dir, tmp_path_factory):
    """A LoRA on every Linear of the transformer blocks, in the Lightning files' layout
    (``diffusion_model.`` prefix, lora_down/lora_up/alpha), strong enough to change the image."""
    model = load_pretrained(pipe_dir)
    g = torch.Generator().manual_seed(7)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("transformer_blocks."):
            r = 4
            # (B @ A)_ij has twice the std of W_ij: the blocks' norms absorb much of any change to
            # their weights, and the test needs the LoRA to move the image well past PSNR_MIN.
            sd[f"diffusion_model.{name}.lora_down.weight"] = (torch.randn(r, m.in_features, generator=g)
                                                              * r**-0.5).bfloat16()
            sd[f"diffusion_model.{name}.lora_up.weight"] = (torch.randn(m.out_features, r, generator=g)
                                                            * 2 * m.weight.float().std()).bfloat16()
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(float(r))
    path = tmp_path_factory.mktemp("lora") / "lightning.safetensors"
    save_file(sd, path)
    return path


@pytest.fixture(scope="module")
def quantized_dir(pipe_dir, tmp_path_factory):
    model = load_pretrained(pipe_dir)
    quantize_model(model, "qwen-image")
    out = tmp_path_factory.mktemp("q") / "ckpt"
    save_quantized(model, out)
    return out


def pipeline_without_transformer_weights(pipe_dir, tmp_path):
    d = tmp_path / "no-bf16-transformer"
    shutil.copytree(pipe_dir, d)
    removed = list((d / "transformer").glob("*.safetensors"))
    assert removed
    for f in removed:
        f.unlink()
    return d


def quant_layers(model):
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quantized_engine_matches_bf16_and_reuses_the_model(pipe_dir, images, bf16_image, capsys):
    engine = Engine(pipe_dir, backend="int8-torch", device="cpu")
    engine.load()
    assert "engine: loaded in" in capsys.readouterr().out
    transformer = engine.transformer
    layers = quant_layers(transformer)
    assert layers and all(m.backend == "int8-torch" for m in layers)
    assert engine.report.quantized and engine.report.max_error < 0.02

    pil = engine.generate(images, **{**GEN, "output_type": "pil"})
    assert pil.size == (32, 32) and pil.mode == "RGB"
    first = engine.generate(images, **GEN)
    assert psnr(first, bf16_image) > PSNR_MIN, psnr(first, bf16_image)

    # Two more calls from two threads: serialized by the lock, no reload, same model object.
    out = [None, None]
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, engine.generate(images, **GEN)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.load_count == 1 and engine.transformer is transformer
    assert all(np.array_equal(np.asarray(o), np.asarray(first)) for o in out)

    # The tolerance rejects a broken model: each layer's per-channel scales off by a factor
    # 1.5 (the norms after most layers absorb part of a uniform error, so it must be large).
    with torch.no_grad():
        for m in layers:
            m.weight_scale.mul_(1.5)
    broken = engine.generate(images, **GEN)
    assert psnr(broken, bf16_image) < PSNR_MIN, psnr(broken, bf16_image)


def test_quantized_checkpoint_loads_without_bf16_transformer_weights(pipe_dir, quantized_dir, images,
                                                                     bf16_image, tmp_path):
    stripped = pipeline_without_transformer_weights(pipe_dir, tmp_path)
    engine = Engine(stripped, quantized=quantized_dir, device="cpu").load()
    assert quant_layers(engine.transformer)
    image = engine.generate(images, **GEN)
    assert psnr(image, bf16_image) > PSNR_MIN, psnr(image, bf16_image)
    # Without the checkpoint, the same folder cannot give a transformer: nothing else was read.
    with pytest.raises(CheckpointError, match="no .safetensors"):
        Engine(stripped, backend="int8-torch", device="cpu").load()


@pytest.mark.slow
def test_lora_merged_at_load_and_runtime_on_checkpoint_agree(pipe_dir, quantized_dir, lora_file, images,
                                                             bf16_image, tmp_path):
    ref = Engine(pipe_dir, backend="bf16", lora=lora_file, device="cpu").generate(images, **GEN)
    # The LoRA moves the image beyond the tolerance, so "applied" is tested, not assumed.
    assert psnr(ref, bf16_image) < PSNR_MIN - 3, psnr(ref, bf16_image)

    merged = Engine(pipe_dir, backend="int8-torch", lora=lora_file, device="cpu")
    image = merged.generate(images, **GEN)
    assert merged.lora_layers["merged"] and not merged.lora_layers["runtime"]
    assert psnr(image, ref) > PSNR_MIN, psnr(image, ref)

    stripped = pipeline_without_transformer_weights(pipe_dir, tmp_path)
    runtime = Engine(stripped, quantized=quantized_dir, lora=lora_file, device="cpu")
    image = runtime.generate(images, **GEN)
    assert runtime.lora_layers["runtime"]
    assert all(m.lora_names == ("engine",) for n, m in runtime.transformer.named_modules()
               if n in runtime.lora_layers["runtime"])
    assert psnr(image, ref) > PSNR_MIN, psnr(image, ref)


def test_quantized_text_encoder(pipe_dir, images, bf16_image):
    engine = Engine(pipe_dir, backend="int8-torch", quantize_text_encoder=True, device="cpu")
    image = engine.generate(images, **GEN)
    te = engine.pipeline.text_encoder
    assert quant_layers(te) and all(m.format == "w8-int8" for m in quant_layers(te))
    assert engine.text_encoder_report.bytes_after < engine.text_encoder_report.bytes_before
    assert psnr(image, bf16_image) > PSNR_MIN, psnr(image, bf16_image)


def test_w8a8_text_encoder(pipe_dir, images, bf16_image):
    """A W8A8 backend for the text encoder: its Linears compute in int8, the image stays close."""
    engine = Engine(pipe_dir, backend="int8-torch", quantize_text_encoder="int8-torch", device="cpu")
    image = engine.generate(images, **GEN)
    te = quant_layers(engine.pipeline.text_encoder)
    assert te and all(m.format == "w8a8-int8" and m.backend == "int8-torch" for m in te)
    assert psnr(image, bf16_image) > PSNR_MIN, psnr(image, bf16_image)
    with pytest.raises(InputError, match="offload=True quantizes the text encoder on the CPU"):
        Engine(pipe_dir, backend="int8-torch", quantize_text_encoder="int8-torch", device="cpu", offload=True)


def test_unload_then_generate_reloads(pipe_dir, images):
    engine = Engine(pipe_dir, backend="int8-layerwise", device="cpu")
    first = engine.generate(images, **GEN)  # loads on first use
    engine.unload()
    assert not engine.loaded and engine.transformer is None
    again = engine.generate(images, **GEN)
    assert engine.load_count == 2 and np.array_equal(np.asarray(first), np.asarray(again))


def test_bad_input(pipe_dir, tmp_path, lora_file):
    with pytest.raises(CheckpointError, match="model_index.json"):
        Engine(tmp_path)
    with pytest.raises(InputError, match="quantize_text_encoder"):
        Engine(pipe_dir, quantize_text_encoder="int4")
    engine = Engine(pipe_dir, backend="int8-torch", device="cpu")
    with pytest.raises(InputError, match="PIL"):
        engine.generate([], **GEN)
    with pytest.raises(InputError, match="num_steps"):
        engine.generate(reference_images(1), **{**GEN, "num_steps": 0})
    assert not engine.loaded  # bad input is refused before anything is loaded
