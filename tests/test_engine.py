"""Engine: the tiny QwenImageEditPlusPipeline end to end with a quantized transformer, on CPU.

Tolerances. The accuracy checks compare the transformer's output (the predicted velocity, each
of the 2 steps, captured by a forward hook) with the bf16 engine's for the same seed and inputs,
by relative error. Int8 W8A8 puts a relative error of <= 2% on each Linear (the QuantReport's
bound, asserted; <= 0.9% measured here), and the velocity is a mix of the layers' outputs through
the blocks' norms, so its error stays near one layer's: measured 0.4-0.6% (torch 2.13 and 2.8),
1.1-2.2% with a LoRA merged into the weights before quantizing (its larger weight range makes
coarser int8 steps). VELOCITY_REL_MAX = 3% is MARGIN (1.5) x the 2% per-layer bound. A model with
every weight_scale 1.5x too large measures 19-25% and is rejected; one 10% too large 3.2-4.1%.

The decoded image (``output_type="np"``, [0, 1]) is checked too, by PSNR against the bf16
engine's, as the end-to-end sanity of the pipeline around the transformer. It is a weak
accuracy check on its own: this tiny random VAE decodes to a narrow band of grey (~0.42-0.55), so
a correct model measures 50-52 dB and the 1.5x-scales model still 43.6 dB (torch 2.13) to 48.7 dB
(torch 2.8). PSNR_MIN = 45 dB is kept for the image; the velocity check is what rejects a broken
model. Not the 8-bit PIL image: its rounding alone puts an rms error of up to ~1/255 on any two
slightly different images, a 48 dB floor.
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

from .metrics import MARGIN, rel_error
from .tiny_pipeline import reference_images, save_pipeline, small_vae_references

PSNR_MIN = 45.0
LAYER_REL_MAX = 0.02  # the QuantReport's per-layer bound for int8 W8A8 here (asserted below)
VELOCITY_REL_MAX = MARGIN * LAYER_REL_MAX
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
def bf16_run(pipe_dir, images):
    return generate_and_velocities(Engine(pipe_dir, backend="bf16", device="cpu"), images)


@pytest.fixture(scope="module")
def bf16_image(bf16_run):
    return bf16_run[0]


@pytest.fixture(scope="module")
def bf16_velocity(bf16_run):
    return bf16_run[1]


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


def generate_and_velocities(engine, images, **kw):
    """(image, [the transformer's output of each step]) of one ``engine.generate``."""
    engine.load()
    got = []

    def keep(module, args, out):
        got.append((out[0] if isinstance(out, tuple) else out.sample).detach().float().clone())

    hook = engine.transformer.register_forward_hook(keep)
    try:
        image = engine.generate(images, **{**GEN, **kw})
    finally:
        hook.remove()
    assert len(got) == GEN["num_steps"]
    return image, got


def velocity_error(v, ref) -> float:
    """The largest relative error of any step's velocity against the reference run's."""
    assert len(v) == len(ref)
    return max(rel_error(a, b) for a, b in zip(v, ref))


def quant_layers(model):
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quantized_engine_matches_bf16_and_reuses_the_model(pipe_dir, images, bf16_image, bf16_velocity, capsys):
    engine = Engine(pipe_dir, backend="int8-torch", device="cpu")
    engine.load()
    assert "engine: loaded in" in capsys.readouterr().out
    transformer = engine.transformer
    layers = quant_layers(transformer)
    assert layers and all(m.backend == "int8-torch" for m in layers)
    assert engine.report.quantized and engine.report.max_error < LAYER_REL_MAX

    pil = engine.generate(images, **{**GEN, "output_type": "pil"})
    assert pil.size == (32, 32) and pil.mode == "RGB"
    first, velocity = generate_and_velocities(engine, images)
    assert velocity_error(velocity, bf16_velocity) < VELOCITY_REL_MAX, velocity_error(velocity, bf16_velocity)
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

    # The tolerance rejects a broken model: each layer's per-channel scales 1.5x too large.
    with torch.no_grad():
        for m in layers:
            m.weight_scale.mul_(1.5)
    _, broken = generate_and_velocities(engine, images)
    assert velocity_error(broken, bf16_velocity) > VELOCITY_REL_MAX, velocity_error(broken, bf16_velocity)


def test_quantized_checkpoint_loads_without_bf16_transformer_weights(pipe_dir, quantized_dir, images,
                                                                     bf16_image, bf16_velocity, tmp_path):
    stripped = pipeline_without_transformer_weights(pipe_dir, tmp_path)
    engine = Engine(stripped, quantized=quantized_dir, device="cpu").load()
    assert quant_layers(engine.transformer)
    image, velocity = generate_and_velocities(engine, images)
    assert velocity_error(velocity, bf16_velocity) < VELOCITY_REL_MAX, velocity_error(velocity, bf16_velocity)
    assert psnr(image, bf16_image) > PSNR_MIN, psnr(image, bf16_image)
    # Without the checkpoint, the same folder cannot give a transformer: nothing else was read.
    with pytest.raises(CheckpointError, match="no .safetensors"):
        Engine(stripped, backend="int8-torch", device="cpu").load()


@pytest.mark.slow
def test_lora_merged_at_load_and_runtime_on_checkpoint_agree(pipe_dir, quantized_dir, lora_file, images,
                                                             bf16_image, bf16_velocity, tmp_path):
    ref, ref_velocity = generate_and_velocities(Engine(pipe_dir, backend="bf16", lora=lora_file, device="cpu"),
                                                images)
    # The LoRA moves the output far beyond the tolerance (57-90% measured), so "applied" is
    # tested, not assumed.
    assert velocity_error(ref_velocity, bf16_velocity) > 10 * VELOCITY_REL_MAX
    assert psnr(ref, bf16_image) < PSNR_MIN - 3, psnr(ref, bf16_image)

    merged = Engine(pipe_dir, backend="int8-torch", lora=lora_file, device="cpu")
    image, velocity = generate_and_velocities(merged, images)
    assert merged.lora_layers["merged"] and not merged.lora_layers["runtime"]
    assert velocity_error(velocity, ref_velocity) < VELOCITY_REL_MAX, velocity_error(velocity, ref_velocity)
    assert psnr(image, ref) > PSNR_MIN, psnr(image, ref)

    stripped = pipeline_without_transformer_weights(pipe_dir, tmp_path)
    runtime = Engine(stripped, quantized=quantized_dir, lora=lora_file, device="cpu")
    image, velocity = generate_and_velocities(runtime, images)
    assert runtime.lora_layers["runtime"]
    assert all(m.lora_names == ("engine",) for n, m in runtime.transformer.named_modules()
               if n in runtime.lora_layers["runtime"])
    assert velocity_error(velocity, ref_velocity) < VELOCITY_REL_MAX, velocity_error(velocity, ref_velocity)
    assert psnr(image, ref) > PSNR_MIN, psnr(image, ref)


def test_quantized_text_encoder(pipe_dir, images, bf16_image, bf16_velocity):
    engine = Engine(pipe_dir, backend="int8-torch", quantize_text_encoder=True, device="cpu")
    image, velocity = generate_and_velocities(engine, images)
    assert velocity_error(velocity, bf16_velocity) < VELOCITY_REL_MAX, velocity_error(velocity, bf16_velocity)
    te = engine.pipeline.text_encoder
    assert quant_layers(te) and all(m.format == "w8-int8" for m in quant_layers(te))
    assert engine.text_encoder_report.bytes_after < engine.text_encoder_report.bytes_before
    assert psnr(image, bf16_image) > PSNR_MIN, psnr(image, bf16_image)


def test_w8a8_text_encoder(pipe_dir, images, bf16_image, bf16_velocity):
    """A W8A8 backend for the text encoder: its Linears compute in int8, the image stays close."""
    engine = Engine(pipe_dir, backend="int8-torch", quantize_text_encoder="int8-torch", device="cpu")
    image, velocity = generate_and_velocities(engine, images)
    assert velocity_error(velocity, bf16_velocity) < VELOCITY_REL_MAX, velocity_error(velocity, bf16_velocity)
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


def test_an_older_diffusers_is_a_clear_error(pipe_dir, monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", "0.36.0")  # no zero_cond_t: Edit-2511 cannot be built
    with pytest.raises(InputError, match=r"diffusers >= 0\.37.*found 0\.36\.0"):
        Engine(pipe_dir, backend="bf16", device="cpu").load()
    monkeypatch.setattr(diffusers, "__version__", "0.37.0")
    assert Engine(pipe_dir, backend="bf16", device="cpu").load().loaded


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
