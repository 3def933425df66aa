"""qkernels as a transformers quantization backend: AutoModel.from_pretrained(quantization_config=...),
save_pretrained folders that reload as the same 8-bit model, tied lm_head left alone."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from qkernels import CheckpointError, QuantLinear
from qkernels.capabilities import major_minor
from qpipeline import quantize_model, save_quantized
from qpipeline.integrations._common import TRANSFORMERS_MIN_VERSION

from .metrics import rel_error

transformers = pytest.importorskip("transformers")
if major_minor(transformers.__version__) < TRANSFORMERS_MIN_VERSION:
    # the dev extra installs a newer one (CI runs this file); a GPU machine's own may be older,
    # and its `pytest -m gpu` must still collect (this file has no gpu test)
    pytest.skip(f"needs transformers >= {'.'.join(map(str, TRANSFORMERS_MIN_VERSION))}, found "
                f"{transformers.__version__}", allow_module_level=True)
from qpipeline.integrations.transformers import QKernelsConfig  # noqa: E402

# Logits of a 2-layer model in w8a8-int8 vs bf16: each quantized layer adds ~0.5-1% (int8 rms at
# these widths, weight and activation in quadrature); 14 layers in 2 residual blocks, measured
# ~1.5e-2. 0.05 (the CLI tests' bound for the same models) fails on a 10% scale error everywhere.
BOUND = 0.05


def tiny_lm(tmp_path, tie: bool):
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, t in sa.items():
        assert t.dtype == sb[k].dtype and torch.equal(t.float(), sb[k].float()), k


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_automodel_quantizes_while_loading_and_round_trips(tmp_path, tie):
    path = tiny_lm(tmp_path, tie)
    q = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                          quantization_config=QKernelsConfig())
    layers = {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14 + (0 if tie else 1)
    if tie:  # left alone: quantizing would untie it and keep a second copy
        assert type(q.lm_head) is nn.Linear and q.lm_head.weight is q.model.embed_tokens.weight
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        y_ref = ref(ids).logits
    report = quantize_model(ref, "generic")
    equal_state(q, ref)  # the same bits as quantize_model, which keeps the tied head too
    if tie:
        assert "tied to model.embed_tokens.weight" in next(l.reason for l in report.layers if l.name == "lm_head")
    with torch.no_grad():
        y = q(ids).logits
        assert rel_error(y, y_ref) < BOUND

    q.save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "qkernels" and len(cfg["layers"]) == len(layers)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # no extra arguments
    equal_state(q, back)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, y)
        for m in back.modules():
            if isinstance(m, QuantLinear):
                m.weight_scale.mul_(1.1)  # a wrong scale fails the bound
        assert rel_error(back(ids).logits, y_ref) > BOUND


def test_folder_saying_qkernels_with_high_precision_tensors_is_refused(tmp_path):
    path = tiny_lm(tmp_path, False)
    q = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                          quantization_config=QKernelsConfig())
    q.save_pretrained(tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.mlp.down_proj.weight"
    sd[key] = sd[key].to(torch.bfloat16)
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layer model\.layers\.1\.mlp\.down_proj is w8a8-int8.*bfloat16"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_quantize_model_then_save_pretrained(tmp_path):
    path = tiny_lm(tmp_path, False)
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    quantize_model(m, "generic")
    m.save_pretrained(tmp_path / "q")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(back.lm_head, QuantLinear)
    equal_state(m, back)


def test_transformers_below_the_floor_quantizes_and_refuses_save_pretrained(tmp_path, monkeypatch):
    """Under a transformers older than the quantizer's floor (simulated), quantize_model still
    quantizes and the model runs (the engine's text encoder needs nothing more), while
    save_pretrained, which could only write the 8-bit codes as plain weights, raises and writes
    nothing."""
    path = tiny_lm(tmp_path, False)
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        ref = m(ids).logits
    # the module object the quantizer's `import transformers` gets (transformers swaps its own
    # sys.modules entry while it loads, so it need not be this file's `transformers`)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.17.0")
    monkeypatch.delitem(sys.modules, "qpipeline.integrations.transformers")  # imported afresh: it refuses
    quantize_model(m, "generic")
    assert isinstance(m.lm_head, QuantLinear) and getattr(m, "hf_quantizer", None) is None
    with torch.no_grad():
        assert rel_error(m(ids).logits, ref) < BOUND
    with pytest.raises(CheckpointError, match=r"save_pretrained cannot write.*transformers >= 5\.20, found 5\.17\.0"):
        m.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    # save_quantized still writes the folder, its config.json with the quantization_config block
    # the integration would have written: where the integration imports, it reloads as this model
    save_quantized(m, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]["quant_method"] == "qkernels"
    monkeypatch.undo()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert isinstance(back.lm_head, QuantLinear)
    equal_state(m, back)
