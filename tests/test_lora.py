"""LoRA: merge before quantizing, run-time branch on QuantLinear, key handling, file safety."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from qkernels import CheckpointError, InputError, LoRAError, QuantLinear
from qpipeline import lora as qlora

from .metrics import MARGIN, ROUNDING_RMS, predicted_error, rel_error

K, N, R = 208, 144, 8
BACKENDS = ["int8-torch", "int8-layerwise"]


def make_linear(k=K, n=N, dtype=torch.bfloat16):
    lin = nn.Linear(k, n, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.normal_(0, k**-0.5)
        lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


def make_lora(k=K, n=N, r=R, dtype=torch.bfloat16):
    """A LoRA whose delta is ~30% of the weight (rms): large enough that dropping or mis-scaling
    it is far outside every tolerance below."""
    A = torch.randn(r, k) * k**-0.5
    B = torch.randn(n, r) * (0.3 / math.sqrt(r))  # (B@A)_ij ~ N(0, 0.09 / k), W_ij ~ N(0, 1 / k)
    return A.to(dtype), B.to(dtype)


def branch_bound(dtype):
    # Adding the branch rounds twice in `dtype`: h = x @ A.T, then the addmm's output (CPU and
    # CUDA accumulate bf16/fp16 GEMMs in fp32). fp32: a few ulps of 2^-24 per op, K-term sums.
    if dtype == torch.float32:
        return 1e-5
    return MARGIN * math.sqrt(2) * ROUNDING_RMS[dtype]


# --------------------------------------------------------------------------------------------
# run-time branch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_runtime_branch_equals_float64_branch(backend, dtype):
    lin = make_linear(dtype=dtype)
    A, B = make_lora()
    scale = 0.75
    x = torch.randn(17, K, dtype=dtype)
    layer = QuantLinear.from_linear(lin, backend)
    y_base = layer(x).double()  # the quantized GEMM alone
    layer.add_lora("style", A, B, scale)
    y = layer(x)
    assert y.dtype == dtype and layer.lora_names == ("style",)
    branch = (x.double() @ A.double().t()) @ B.double().t() * scale
    ref = y_base + branch
    err = rel_error(y, ref)
    assert err < branch_bound(dtype), f"{err:.3g} >= {branch_bound(dtype):.3g}"
    # The check fails on a wrong branch: a 10% mis-scaled LoRA.
    assert rel_error(y_base + branch * 1.1, ref) > branch_bound(dtype)
    layer.remove_lora("style")
    assert layer.lora_names == () and torch.equal(layer(x).double(), y_base)


def test_runtime_branch_close_to_merged_in_float64():
    lin = make_linear()
    A, B = make_lora()
    x = torch.randn(33, K, dtype=torch.bfloat16)
    layer = QuantLinear.from_linear(lin, "int8-torch").add_lora("l", A, B, 1.0)
    w_merged = lin.weight.double() + B.double() @ A.double()
    ref = x.double() @ w_merged.t() + lin.bias.double()
    # Only the base weight is quantized: the format's bound for W alone covers it.
    bound = predicted_error("w8a8-int8", x, lin.weight, torch.bfloat16)
    assert rel_error(layer(x), ref) < bound
    assert rel_error(QuantLinear.from_linear(lin, "int8-torch")(x), ref) > bound  # LoRA missing


def test_lora_tensors_follow_compute_dtype_never_8bit_and_stay_out_of_state_dict():
    layer = QuantLinear.from_linear(make_linear(), "int8-torch")
    keys = set(layer.state_dict())
    A, B = make_lora()
    layer.add_lora("l", A, B, 0.5)
    assert set(layer.state_dict()) == keys  # the checkpoint stays format-pure
    layer.to(torch.float16)
    a, b, s = layer._loras["l"]
    assert a.dtype == b.dtype == torch.float16 and layer.weight.dtype == torch.int8 and s == 0.5
    # An 8-bit cast (what PEFT did to LoRA weights with layerwise casting) leaves them alone.
    layer._apply(lambda t: t.to(torch.float8_e4m3fn) if t.is_floating_point() else t)
    a, b, _ = layer._loras["l"]
    assert a.dtype == b.dtype == torch.float16
    x = torch.randn(5, K, dtype=torch.float16)
    assert layer.float()(x.float()).dtype == torch.float32


def test_add_lora_refuses_bad_input():
    layer = QuantLinear.from_linear(make_linear(), "int8-torch")
    A, B = make_lora()
    with pytest.raises(InputError, match=r"expected A \[r, 208\]"):
        layer.add_lora("l", A[:, :-1], B)
    with pytest.raises(InputError, match="8 bits"):
        layer.add_lora("l", A.to(torch.float8_e4m3fn), B)
    layer.add_lora("l", A, B)
    with pytest.raises(InputError, match="already attached"):
        layer.add_lora("l", A, B)
    with pytest.raises(InputError, match="attached: l"):
        layer.remove_lora("other")


# --------------------------------------------------------------------------------------------
# merge before quantizing


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"to_q": make_linear(), "proj": make_linear(N, K)})])


def lora_state_dict(model, layout: str, prefix: str, alpha: float | None):
    """A LoRA file for every Linear of ``model`` in one of the accepted key layouts."""
    sd, ref = {}, {}
    a_name, b_name = {"peft": ("lora_A.weight", "lora_B.weight"), "kohya": ("lora_down.weight", "lora_up.weight")}[layout]
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            A, B = make_lora(m.in_features, m.out_features)
            sd[f"{prefix}{name}.{a_name}"], sd[f"{prefix}{name}.{b_name}"] = A, B
            if alpha is not None:
                sd[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
            ref[name] = (A, B)
    return sd, ref


def merge_bound(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, eff: float, exact: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |merged - exact| for merge's arithmetic: delta = eff * (B @ A) in fp32
    (an r-term dot and one multiply: (r + 1) u of eff * |B| @ |A|, u = 2^-24), the fp32 add (u of
    |W| + |delta|), then one rounding to bf16 (2^-8 of the fp32 sum). Where W and delta cancel,
    the fp32 terms dominate: the bf16 half-ulp of the exact sum alone is not a bound there."""
    u = 2.0**-24
    mags = eff * (B.double().abs() @ A.double().abs())
    fp32 = (A.shape[0] + 2) * u * (w.double().abs() + mags)
    return 2.0**-8 * (exact.abs() + fp32) + fp32


@pytest.mark.parametrize("layout,prefix,alpha", [
    ("peft", "transformer.", None), ("peft", "", 4.0), ("kohya", "diffusion_model.", 4.0)])
def test_merge_then_quantize_within_int8_bound(tmp_path, layout, prefix, alpha):
    model = TwoLayers()
    originals = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    sd, ref = lora_state_dict(model, layout, prefix, alpha)
    save_file(sd, tmp_path / "lora.safetensors")
    scale = 0.8
    merged = qlora.merge(model, tmp_path / "lora.safetensors", scale=scale)
    assert merged == sorted(ref)
    eff = scale * (1.0 if alpha is None else alpha / R)
    for name, (A, B) in ref.items():
        lin = model.get_submodule(name)
        w64 = originals[name].double() + eff * B.double() @ A.double()
        assert (lin.weight.double() - w64).abs().le(merge_bound(originals[name], A, B, eff, w64)).all()
        x = torch.randn(17, lin.in_features, dtype=torch.bfloat16)
        q = QuantLinear.from_linear(lin, "int8-torch")
        y_ref = x.double() @ w64.t() + lin.bias.double()
        bound = predicted_error("w8a8-int8", x, lin.weight, torch.bfloat16)
        assert rel_error(q(x), y_ref) < bound
        # A wrong merge (LoRA at half strength) is caught by the same bound.
        w_bad = originals[name].double() + 0.5 * eff * B.double() @ A.double()
        assert rel_error(x.double() @ w_bad.t() + lin.bias.double(), y_ref) > bound


def test_unknown_keys_refused_with_their_names():
    model = TwoLayers()
    sd, _ = lora_state_dict(model, "peft", "transformer.", None)
    sd["transformer.blocks.0.to_k.lora_A.weight"] = sd["transformer.blocks.0.to_q.lora_A.weight"]
    sd["transformer.blocks.0.to_k.lora_B.weight"] = sd["transformer.blocks.0.to_q.lora_B.weight"]
    sd["transformer.blocks.0.norm.diff_b"] = torch.zeros(3)
    before = model.blocks[0].to_q.weight.clone()
    with pytest.raises(LoRAError, match=r"blocks\.0\.norm\.diff_b"):
        qlora.merge(model, sd)
    del sd["transformer.blocks.0.norm.diff_b"]
    with pytest.raises(LoRAError, match=r"match no layer.*blocks\.0\.to_k"):
        qlora.merge(model, sd)
    assert torch.equal(model.blocks[0].to_q.weight, before)  # nothing half-applied


def test_merge_into_quantized_layer_points_to_add_lora():
    model = TwoLayers()
    sd, _ = lora_state_dict(model, "peft", "", None)
    model.blocks[0]["to_q"] = QuantLinear.from_linear(model.blocks[0]["to_q"], "int8-torch")
    with pytest.raises(LoRAError, match="apply_runtime"):
        qlora.merge(model, sd)
    # apply_runtime attaches a branch to the QuantLinear and merges into the bf16 layer left.
    done = qlora.apply_runtime(model, sd, name="l")
    assert done == {"runtime": ["blocks.0.to_q"], "merged": ["blocks.0.proj"]}
    assert model.blocks[0]["to_q"].lora_names == ("l",)
    with pytest.raises(LoRAError, match="not quantized"):
        qlora.apply_runtime(model, sd, name="m", merge_unquantized=False)


def test_shape_mismatch_refused():
    model = TwoLayers()
    sd, _ = lora_state_dict(model, "peft", "", None)
    sd["blocks.0.to_q.lora_A.weight"] = torch.randn(R, K + 8, dtype=torch.bfloat16)
    with pytest.raises(LoRAError, match=r"blocks\.0\.to_q: LoRA maps 216 -> 144, layer is 208 -> 144"):
        qlora.merge(model, sd)


def test_load_lora_refuses_pickle_and_garbage(tmp_path):
    torch.save({"a.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "lora.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        qlora.load_lora(tmp_path / "lora.bin")
    (tmp_path / "renamed.safetensors").write_bytes((tmp_path / "lora.bin").read_bytes())
    with pytest.raises(CheckpointError, match="pickle"):
        qlora.load_lora(tmp_path / "renamed.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        qlora.load_lora(tmp_path / "junk.safetensors")


def test_merge_on_demo_transformer_with_diffusion_model_prefix():
    from qpipeline.demo import build_demo_transformer, demo_inputs

    model = build_demo_transformer("tiny")
    inputs = demo_inputs(model)
    before = model(**inputs)[0]
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer_blocks")]
    sd = {}
    for n in targets:
        m = model.get_submodule(n)
        A, B = make_lora(m.in_features, m.out_features, r=4)
        sd[f"diffusion_model.{n}.lora_down.weight"], sd[f"diffusion_model.{n}.lora_up.weight"] = A, B
        sd[f"diffusion_model.{n}.alpha"] = torch.tensor(4.0)
    assert qlora.merge(model, sd) == sorted(targets)
    # A rerun of the same bf16 model is bit-identical on CPU, so any difference is the LoRA's;
    # 1e-2 is far above bf16 noise and far below the ~4% a 0.3-strength LoRA makes here.
    assert rel_error(model(**inputs)[0], before) > 1e-2

