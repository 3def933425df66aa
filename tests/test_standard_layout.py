"""One checkpoint layout, the standard one: save_quantized writes what from_pretrained reads
(config.json with a quantization_config block + sharded, indexed safetensors under the library's
names) beside our manifest; load_quantized reads that, save_pretrained folders, and today's layout."""

from __future__ import annotations

import json

import pytest
import torch

from qkernels import QuantLinear
import qpipeline.checkpoint as ckmod
from qpipeline import load_quantized, quantize_model, save_quantized
from qpipeline.demo import build_demo_transformer, demo_inputs

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, t in sa.items():
        assert t.dtype == sb[k].dtype and torch.equal(bits(t), bits(sb[k])), k


@pytest.fixture(scope="module")
def demo():
    model = build_demo_transformer("tiny")
    quantize_model(model, "qwen-image")
    inputs = demo_inputs(model, text_tokens=8)
    with torch.no_grad():
        out = model(**inputs)[0]
    return model, inputs, out


@pytest.mark.parametrize("shard", [None, 100_000], ids=["one-file", "sharded"])
def test_save_quantized_folder_loads_with_from_pretrained(demo, tmp_path, shard):
    model, inputs, out = demo
    kw = {"max_shard_bytes": shard} if shard else {}
    d = save_quantized(model, tmp_path / "q", **kw)
    names = sorted(p.name for p in d.iterdir())
    assert "config.json" in names and "quantization_config.json" in names
    if shard:
        assert "diffusion_pytorch_model.safetensors.index.json" in names
        assert "diffusion_pytorch_model-00001-of-" in names[1]
    else:
        assert "diffusion_pytorch_model.safetensors" in names
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["_class_name"] == "QwenImageTransformer2DModel"
    assert cfg["quantization_config"]["quant_method"] == "qkernels"
    assert cfg["quantization_config"]["layers"]["transformer_blocks.0.attn.to_q"]["format"] == "w8a8-int8"

    hf = diffusers.QwenImageTransformer2DModel.from_pretrained(d)  # no extra arguments
    ours = load_quantized(d)
    for loaded in (hf, ours):
        assert_identical(model, loaded)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs)[0], out)


def test_transformers_model_folder(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    # through a bf16 folder, as models arrive: `.to(bf16)` of a fresh model also casts its rotary
    # table, which from_pretrained recomputes in fp32 (a plain bf16 round trip differs the same way)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    quantize_model(model, "generic")
    d = save_quantized(model, tmp_path / "q")
    assert {"config.json", "model.safetensors", "quantization_config.json"} <= {p.name for p in d.iterdir()}
    back = transformers.AutoModelForCausalLM.from_pretrained(d)
    assert isinstance(back.lm_head, QuantLinear)
    assert_identical(model, back)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_todays_layout_still_loads(demo, tmp_path):
    """model.safetensors + quantization_config.json and no config.json, as written until now."""
    model, inputs, out = demo
    d = save_quantized(model, tmp_path / "q")
    (d / "config.json").unlink()
    (d / "diffusion_pytorch_model.safetensors").rename(d / "model.safetensors")
    manifest = json.loads((d / "quantization_config.json").read_text())
    manifest["shards"] = {"model.safetensors": manifest["shards"].pop("diffusion_pytorch_model.safetensors")}
    manifest["config_sha256"] = ckmod._config_digest(manifest)
    (d / "quantization_config.json").write_text(json.dumps(manifest))
    loaded = load_quantized(d)
    assert_identical(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], out)


def test_save_pretrained_folder_loads_with_load_quantized(demo, tmp_path):
    model, inputs, out = demo
    model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "quantization_config.json").exists()
    loaded = load_quantized(tmp_path / "hf")
    assert_identical(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], out)


def test_load_pretrained_reads_one_variant(tmp_path):
    """A folder holding model weights and their fp16 variant: one set is read, never both."""
    from qpipeline.checkpoint import load_pretrained

    from .tiny_pipeline import build_transformer

    m = build_transformer(dtype=torch.float32)
    m.save_pretrained(tmp_path / "t")
    m16 = build_transformer(seed=1, dtype=torch.float16)
    m16.save_pretrained(tmp_path / "t", variant="fp16")  # another model's weights as the variant
    names = sorted(p.name for p in (tmp_path / "t").glob("*.safetensors"))
    assert names == ["diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"]
    plain = load_pretrained(tmp_path / "t", dtype=torch.float32)
    for k, t in m.state_dict().items():
        assert torch.equal(plain.state_dict()[k], t), k
    fp16 = load_pretrained(tmp_path / "t", dtype=torch.float16, variant="fp16")
    for k, t in m16.state_dict().items():
        assert torch.equal(fp16.state_dict()[k], t), k
