"""PEFT LoRA on QuantLinear through diffusers: load_lora_weights, set_adapters, unload_lora_weights,
kohya keys; computed with QuantLinear's run-time bf16 branch."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from qkernels import LoRAError, QuantLinear
from qpipeline import lora as qlora
from qpipeline import quantize_model
from qpipeline.demo import demo_inputs

from .metrics import rel_error
from .tiny_pipeline import build_pipeline

pytest.importorskip("peft")

TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.img_mlp.net.2",
           "transformer_blocks.1.txt_mlp.net.0.proj"]
RANK = 4
# The quantized model vs the bf16 model with the same LoRA merged: the LoRA branch is computed in
# bf16 either way (merged: one bf16 rounding of W + delta), so what separates them is the int8
# quantization of the base weights, measured 3.3e-3 on this model without a LoRA
# (test_integrations_diffusers); 6e-3 as there, and a wrong LoRA scale (x2) must fail it.
BOUND = 6e-3


def lora_weights(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in TARGETS:
        m = model.get_submodule(name)
        # large enough to move the output well past the quantization error (~10% of the weight)
        A = torch.randn(RANK, m.in_features, generator=g) * m.in_features**-0.5
        B = torch.randn(m.out_features, RANK, generator=g) * 0.3 * RANK**-0.5
        out[name] = (A.to(torch.bfloat16), B.to(torch.bfloat16))
    return out


def diffusers_file(path, weights):
    save_file({f"transformer.{n}.lora_{k}.weight": t.contiguous() for n, (A, B) in weights.items()
               for k, t in (("A", A), ("B", B))}, path)
    return path


def kohya_file(path, weights, alpha):
    sd = {}
    for n, (A, B) in weights.items():
        key = "lora_unet_" + n.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = A.contiguous(), B.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, path)
    return path


@pytest.fixture(scope="module")
def setup():
    pipe = build_pipeline()
    bf16 = copy.deepcopy(pipe.transformer)
    quantize_model(pipe.transformer, "qwen-image")
    inputs = demo_inputs(bf16, text_tokens=8)
    return pipe, bf16, inputs


def merged_reference(bf16, weights, scale):
    ref = copy.deepcopy(bf16)
    qlora.merge(ref, {n: qlora.LoRAWeights(A, B, None) for n, (A, B) in weights.items()}, scale)
    return ref


def test_load_set_adapters_unload(setup, tmp_path):
    pipe, bf16, inputs = setup
    t = pipe.transformer
    with torch.no_grad():
        base = t(**inputs)[0]
    w1, w2 = lora_weights(t, 1), lora_weights(t, 2)
    pipe.load_lora_weights(str(diffusers_file(tmp_path / "a.safetensors", w1)), adapter_name="a")
    pipe.load_lora_weights(str(diffusers_file(tmp_path / "b.safetensors", w2)), adapter_name="b")
    layer = t.get_submodule(TARGETS[0])
    assert type(layer).__name__ == "QuantLoraLinear" and isinstance(layer.base_layer, QuantLinear)
    assert layer.lora_A["a"].weight.dtype == torch.bfloat16  # the compute dtype, not the 8-bit one
    assert layer.base_layer.weight.dtype == torch.int8

    pipe.set_adapters(["a"], [0.5])
    with torch.no_grad():
        y = t(**inputs)[0]
        ref = merged_reference(bf16, w1, 0.5)(**inputs)[0]
        assert rel_error(y, ref) < BOUND
        assert rel_error(merged_reference(bf16, w1, 1.0)(**inputs)[0], ref) > BOUND  # a wrong scale fails
    pipe.set_adapters(["a", "b"], [0.5, 1.0])
    with torch.no_grad():
        both = t(**inputs)[0]
    pipe.unload_lora_weights()
    assert type(t.get_submodule(TARGETS[0])) is QuantLinear
    with torch.no_grad():
        assert torch.equal(t(**inputs)[0], base)  # nothing of the LoRA is left
    # the same arithmetic as QuantLinear's own run-time branch (add_lora): bit-identical
    qlora.apply_runtime(t, {n: qlora.LoRAWeights(A, B, None) for n, (A, B) in w1.items()}, 0.5, name="x")
    with torch.no_grad():
        assert torch.equal(t(**inputs)[0], y)
    qlora.apply_runtime(t, {n: qlora.LoRAWeights(A, B, None) for n, (A, B) in w2.items()}, 1.0, name="y")
    with torch.no_grad():
        assert torch.equal(t(**inputs)[0], both)
    qlora.remove_runtime(t, "x"), qlora.remove_runtime(t, "y")


def test_kohya_keys_through_diffusers_converter(setup, tmp_path):
    pipe, bf16, inputs = setup
    t = pipe.transformer
    w = lora_weights(t, 3)
    alpha = 2.0  # scale alpha / r = 0.5
    pipe.load_lora_weights(str(kohya_file(tmp_path / "k.safetensors", w, alpha)), adapter_name="k")
    try:
        # diffusers' Qwen converter folds alpha / r into the matrices (PEFT's scaling stays 1)
        layer = t.get_submodule(TARGETS[2])
        assert type(layer).__name__ == "QuantLoraLinear" and layer.scaling["k"] == 1.0
        with torch.no_grad():
            assert rel_error(t(**inputs)[0], merged_reference(bf16, w, alpha / RANK)(**inputs)[0]) < BOUND
        with pytest.raises(LoRAError, match="cannot merge a LoRA into an 8-bit"):
            pipe.fuse_lora()
    finally:
        pipe.unload_lora_weights()
    assert type(t.get_submodule(TARGETS[2])) is QuantLinear
