"""save_quantized / load_quantized: round trips, other backends, sharding, and every refusal."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qkernels import CheckpointError, QuantLinear
from qkernels.backends.torch_native import quantize_activation
from qkernels.registry import _BACKENDS, Backend, register_backend
from qpipeline import checkpoint as ckmod
from qpipeline import load_quantized, quantize_model, save_quantized
from qpipeline.demo import build_demo_transformer, demo_inputs

from .metrics import rel_error

ROOT = Path(__file__).resolve().parents[1]


class Stack(nn.Module):
    """A plain nn.Module (no config): rebuilt with cls() on load."""

    def __init__(self, width: int = 64, depth: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.register_buffer("table", torch.arange(width, dtype=torch.float32) / width, persistent=False)

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return self.norm(x) + self.table


ckmod.register_model_class(Stack)  # a plain module: checkpoints may name only registered classes


@pytest.fixture(scope="module")
def tiny_demo():
    """The tiny Qwen-Image demo, quantized with the qwen-image recipe, and its inputs/outputs."""
    model = build_demo_transformer("tiny")
    report = quantize_model(model, "qwen-image")
    inputs = demo_inputs(model, text_tokens=8)
    with torch.no_grad():
        out = model(**inputs)[0]
    return model, report, inputs, out


@pytest.fixture(scope="module")
def saved(tiny_demo, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "q"
    save_quantized(tiny_demo[0], path, tiny_demo[1])
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite(ckpt: Path, edit_tensors=None, edit_config=None):
    """Change the stored tensors / config, then re-record the shard's size and sha256 and the
    config's checksum, so that the check under test is the one that must catch it (not a hash)."""
    path = ckpt / "diffusion_pytorch_model.safetensors"
    config = json.loads((ckpt / "quantization_config.json").read_text())
    if edit_tensors:
        tensors = edit_tensors(dict(load_file(path)))
        save_file(tensors, path)
        config["shards"]["diffusion_pytorch_model.safetensors"] = {"bytes": path.stat().st_size,
                                                 "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if edit_config:
        edit_config(config)
    config["config_sha256"] = ckmod._config_digest(config)
    (ckpt / "quantization_config.json").write_text(json.dumps(config))


# ----------------------------------------------------------------------------------------------
# round trips


def test_save_load_identical_outputs(tiny_demo, saved):
    model, _, inputs, out = tiny_demo
    loaded = load_quantized(saved)
    assert loaded.load_seconds > 0
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], out)
    q = loaded.transformer_blocks[0].attn.to_q
    assert isinstance(q, QuantLinear) and q.weight.dtype == torch.int8 and q.backend == "int8-torch"
    assert type(loaded.img_in) is nn.Linear and loaded.img_in.weight.dtype == torch.bfloat16
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    # rotary tables are not in the state dict: computed at construction, equal to the original's
    assert torch.equal(loaded.pos_embed.pos_freqs, model.pos_embed.pos_freqs)
    for key, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t), key
    # the file is plain safetensors: any reader sees the same tensors
    with safe_open(str(saved / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("transformer_blocks.0.attn.to_q.weight"), model.transformer_blocks[0].attn.to_q.weight)
    cfg = json.loads((saved / "quantization_config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["model"]["class"].endswith(":QwenImageTransformer2DModel")
    assert cfg["layers"]["transformer_blocks.0.attn.to_q"] == {
        "format": "w8a8-int8", "static": False, "smooth": False, "bias_dtype": "bfloat16",
        "in_features": 64, "out_features": 64, "backend": "int8-torch"}
    assert cfg["report"]["quantized"] == 28


class Int8Reference(Backend):
    """A second w8a8-int8 backend for the test: the same quantized inputs, a float64 GEMM."""

    name = "int8-reference-test"
    format = "w8a8-int8"
    devices = ("cpu", "cuda")

    def forward(self, layer, x):
        q, s = quantize_activation(layer, x, fp8=False)
        y = (q.double() @ layer.weight.double().T) * s.double()[:, None] * layer.weight_scale.double()[None, :]
        return (y if layer.bias is None else y + layer.bias.double()).to(x.dtype)


@pytest.fixture
def reference_backend():
    register_backend(Int8Reference)
    yield Int8Reference.name
    del _BACKENDS[Int8Reference.name]


def test_load_with_another_backend_of_the_format(tiny_demo, saved, reference_backend):
    _, _, inputs, out = tiny_demo
    loaded = load_quantized(saved, backend=reference_backend)
    layer = loaded.transformer_blocks[1].img_mlp.net[2]
    assert layer.backend == reference_backend
    assert loaded.img_in.__class__ is nn.Linear
    # per layer: int8-torch accumulates exactly in int32 and applies the scales in fp32; the
    # reference does it in fp64. Both round once to bf16: they differ by at most one bf16 ulp
    # (2^-7 relative), plus fp32 rounding where a bias cancels the product (atol).
    x = torch.randn(37, layer.in_features, dtype=torch.bfloat16)
    ours = layer(x)
    layer.set_backend("int8-torch")
    theirs = layer(x)
    assert torch.allclose(ours.float(), theirs.float(), rtol=2**-7, atol=1e-5)
    layer.set_backend(reference_backend)
    # whole model: an ulp can move an activation-quantization rounding downstream; measured
    # 0 difference on this model, against ~3e-3 for int8 vs bf16
    with torch.no_grad():
        y = loaded(**inputs)[0]
    assert rel_error(y, out) < 2e-3
    broken = load_quantized(saved, backend=reference_backend)
    broken.transformer_blocks[0].img_mod[1].weight_scale.mul_(1.1)  # a deliberately wrong scale
    with torch.no_grad():
        assert rel_error(broken(**inputs)[0], out) > 2e-3


def test_load_backend_of_another_format_is_refused(saved):
    with pytest.raises(CheckpointError, match="fp8-scaled-mm.*w8a8-fp8.*holds w8a8-int8"):
        load_quantized(saved, backend="fp8-scaled-mm")


def test_sharded_checkpoint(tiny_demo, tmp_path):
    model, report, inputs, out = tiny_demo
    path = save_quantized(model, tmp_path / "q", report, max_shard_bytes=100_000)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    cfg = json.loads((path / "quantization_config.json").read_text())
    assert set(index["weight_map"]) == set(cfg["tensors"]) and set(index["weight_map"].values()) == set(shards)
    loaded = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], out)
    # one shard gone: refused, naming it
    (path / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"{shards[1]} is missing"):
        load_quantized(path)


def test_plain_module_static_smoothed_fp8(tmp_path):
    class Stats:
        def for_layer(self, name):
            class S:
                channel_amax = torch.linspace(0.5, 4.0, 64)
                amax = torch.tensor(4.0)
            return S

    torch.manual_seed(0)
    model = Stack().to(torch.float16)
    from qpipeline import Recipe

    quantize_model(model, Recipe(format="w8a8-fp8", activation="static", smoothquant_alpha=0.5), calibration=Stats())
    x = torch.randn(5, 64, dtype=torch.float16)
    with torch.no_grad():
        y = model(x)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert isinstance(loaded, Stack) and loaded.layers[0].format == "w8a8-fp8"
    assert loaded.layers[0].input_scale is not None and loaded.layers[0].input_smooth is not None
    assert loaded.table.dtype == torch.float16  # a non-persistent buffer, in the dtype it was saved in
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_transformers_model_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    quantize_model(model, "generic")
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert type(loaded) is type(model) and isinstance(loaded.lm_head, QuantLinear)
    rope = loaded.model.rotary_emb
    assert torch.equal(rope.inv_freq, model.model.rotary_emb.inv_freq)  # rebuilt, not loaded
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


# ----------------------------------------------------------------------------------------------
# refusals


def test_truncated_file_refused(saved, tmp_path):
    ck = copy_checkpoint(saved, tmp_path / "c")
    data = (ck / "diffusion_pytorch_model.safetensors").read_bytes()
    (ck / "diffusion_pytorch_model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated or was replaced"):
        load_quantized(ck)
    # even with the config's size and hash made to agree, the header shows the truncation
    rewrite(ck, edit_config=lambda c: c["shards"].update({"diffusion_pytorch_model.safetensors": {
        "bytes": len(data) - 100, "sha256": hashlib.sha256(data[:-100]).hexdigest()}}))
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is truncated"):
        load_quantized(ck)


def test_tampered_file_refused(saved, tmp_path):
    ck = copy_checkpoint(saved, tmp_path / "c")
    data = bytearray((ck / "diffusion_pytorch_model.safetensors").read_bytes())
    data[-1000] ^= 0x40
    (ck / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_quantized(ck)
    load_quantized(ck, verify=False)  # sizes and headers only: documented to accept it


def test_verification_runs_beside_the_load_and_names_the_tampered_shard(saved, tmp_path, monkeypatch):
    """The sha256 of each shard is computed in background threads while the tensors load; the
    model comes back only after they matched. Where a tampered shard breaks the load itself,
    the error names the tampering, not what broke."""
    import threading

    from qpipeline import checkpoint

    ck = copy_checkpoint(saved, tmp_path / "c")
    threads = []
    real = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda p: (threads.append(threading.current_thread().name), real(p))[1])
    load_quantized(ck)
    assert threads and all(t.startswith("qk-sha256") for t in threads)
    data = bytearray((ck / "diffusion_pytorch_model.safetensors").read_bytes())
    data[-1000] ^= 0x40
    (ck / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data))

    def broken_load(*args):
        raise RuntimeError("what the corrupted bytes broke")

    monkeypatch.setattr(checkpoint, "_load_checked", broken_load)
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_quantized(ck)
    with pytest.raises(RuntimeError, match="what the corrupted bytes broke"):
        load_quantized(ck, verify=False)


def test_missing_tensor_refused(saved, tmp_path):
    key = "transformer_blocks.1.attn.to_k.weight_scale"
    ck = copy_checkpoint(saved, tmp_path / "c")
    rewrite(ck, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError, match=f"missing from the safetensors files: {key}"):
        load_quantized(ck)
    rewrite(ck, edit_config=lambda c: c["tensors"].pop(key))
    with pytest.raises(CheckpointError, match=f"lacks tensor.*{key}"):
        load_quantized(ck)


def test_unexpected_tensor_refused(saved, tmp_path):
    ck = copy_checkpoint(saved, tmp_path / "c")
    rewrite(ck, lambda t: {**t, "extra.weight": torch.zeros(3)},
            lambda c: c["tensors"].update({"extra.weight": {"dtype": "float32", "shape": [3]}}))
    with pytest.raises(CheckpointError, match="the model does not: extra.weight"):
        load_quantized(ck)


def test_wrong_dtype_and_shape_refused(saved, tmp_path):
    # against the manifest
    ck = copy_checkpoint(saved, tmp_path / "a")
    rewrite(ck, lambda t: {**t, "img_in.weight": t["img_in.weight"].float()})
    with pytest.raises(CheckpointError, match=r"img_in.weight in diffusion_pytorch_model.safetensors is float32.*says bfloat16"):
        load_quantized(ck)
    # against the format: an int8 layer's weight stored as bf16 (manifest edited to agree)
    key = "transformer_blocks.0.attn.to_q.weight"
    ck = copy_checkpoint(saved, tmp_path / "b")
    rewrite(ck, lambda t: {**t, key: t[key].to(torch.bfloat16)},
            lambda c: c["tensors"][key].update(dtype="bfloat16"))
    with pytest.raises(CheckpointError, match=f"{key}: format w8a8-int8 stores int8, the checkpoint has bfloat16"):
        load_quantized(ck)
    # against the model: a bias one element short
    key = "transformer_blocks.0.attn.to_q.bias"
    ck = copy_checkpoint(saved, tmp_path / "c")
    rewrite(ck, lambda t: {**t, key: t[key][:-1].clone()}, lambda c: c["tensors"][key].update(shape=[63]))
    with pytest.raises(CheckpointError, match=rf"{key}: the model expects shape \[64\], the checkpoint has \[63\]"):
        load_quantized(ck)


def test_unknown_format_version_refused(saved, tmp_path):
    ck = copy_checkpoint(saved, tmp_path / "c")
    rewrite(ck, edit_config=lambda c: c.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99; this qkernels .* reads version 1.*re-quantize"):
        load_quantized(ck)
    rewrite(ck, edit_config=lambda c: c.update(format_version=1, layers={
        **c["layers"], "transformer_blocks.0.attn.to_q": {**c["layers"]["transformer_blocks.0.attn.to_q"],
                                                           "format": "w4a4"}}))
    with pytest.raises(Exception, match="unknown format 'w4a4'"):
        load_quantized(ck)


def test_layer_map_that_does_not_fit_the_model_refused(saved, tmp_path):
    """The config's layer map is checked against the built model before any tensor is read."""
    ck = copy_checkpoint(saved, tmp_path / "c")
    name = "transformer_blocks.0.attn.to_q"
    rewrite(ck, edit_config=lambda c: c["layers"].update({"transformer_blocks.0.attn.nope": c["layers"][name]}))
    with pytest.raises(CheckpointError, match="quantized layer transformer_blocks.0.attn.nope does not exist"):
        load_quantized(ck)
    ck = copy_checkpoint(saved, tmp_path / "d")
    rewrite(ck, edit_config=lambda c: c["layers"][name].update(in_features=c["layers"][name]["in_features"] + 1))
    with pytest.raises(CheckpointError, match=f"{name} is Linear .* quantized Linear in the config"):
        load_quantized(ck)
    ck = copy_checkpoint(saved, tmp_path / "e")
    rewrite(ck, edit_config=lambda c: c["layers"][name].update(bias_dtype="load"))  # a torch attribute, not a dtype
    with pytest.raises(CheckpointError, match=f"{name} has an unknown bias dtype 'load'"):
        load_quantized(ck)


def test_pickle_refused(tmp_path, tiny_demo):
    state = {k: v for k, v in tiny_demo[0].state_dict().items()}
    for name in ("model.bin", "model.pt", "model.ckpt"):
        torch.save(state, tmp_path / name)
        with pytest.raises(CheckpointError, match="pickle file; only safetensors checkpoints are accepted"):
            load_quantized(tmp_path / name)
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_quantized(folder)
    with pytest.raises(CheckpointError, match="only safetensors"):
        ckmod.load_pretrained(folder)


def test_existing_output_refused_and_failed_save_keeps_old(tiny_demo, saved, tmp_path, monkeypatch):
    model, report, inputs, out = tiny_demo
    target = copy_checkpoint(saved, tmp_path / "q")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        save_quantized(model, target, report)

    calls = []
    real = ckmod._write_safetensors

    def failing(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(ckmod, "_write_safetensors", failing)
    with pytest.raises(OSError, match="No space left"):
        save_quantized(model, target, report, overwrite=True, max_shard_bytes=100_000)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the earlier checkpoint, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp folder left behind
    monkeypatch.setattr(ckmod, "_write_safetensors", real)
    save_quantized(model, target, report, overwrite=True, max_shard_bytes=100_000)
    assert not (target / "diffusion_pytorch_model.safetensors").exists() and (target / "diffusion_pytorch_model.safetensors.index.json").exists()
    with torch.no_grad():
        assert torch.equal(load_quantized(target)(**inputs)[0], out)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_quantized(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no quantization_config.json"):
        load_quantized(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "quantization_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(tmp_path / "bad")


@pytest.mark.gpu
def test_load_onto_cuda(tiny_demo, saved):
    _, _, inputs, out = tiny_demo
    loaded = load_quantized(saved, device="cuda")
    assert all(t.is_cuda for t in loaded.state_dict().values())
    layer = loaded.transformer_blocks[0].attn.to_q
    assert layer.weight.dtype == torch.int8 and layer.backend != "bf16"
    cuda_inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        y = loaded(**cuda_inputs)[0].cpu()
    # another int8 kernel and bf16 attention on the GPU: differences of the order of the int8
    # error itself (~3e-3 against bf16 here), not more
    assert rel_error(y, out) < 1e-2


def test_meta_model_cannot_be_saved(tmp_path):
    with torch.device("meta"):
        model = Stack()
    with pytest.raises(CheckpointError, match="meta device"):
        save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------------------------
# load memory

_LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    from qpipeline import load_quantized
    from tests.test_checkpoint import Stack

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    load_quantized(sys.argv[2])  # warm-up: imports and allocator, on a small checkpoint
    open("/proc/self/clear_refs", "w").write("5")
    baseline = status("VmRSS")
    model = load_quantized(sys.argv[1], verify=False, skeleton=lambda: Stack(2048, 16))
    # CPU tensors may be lazily mapped from the file: touch every byte so they are resident
    for t in model.state_dict().values():
        t.view(-1).view(torch.uint8).max()
    print(baseline, status("VmHWM"), model.load_seconds)
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_load_makes_no_high_precision_copy(tmp_path):
    # Stack(2048, 16): 16 x 2048^2 bf16 = 128 MiB; its int8 checkpoint is ~64 MiB
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Stack(2048, 16)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 2048**-0.5)
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize_model(model, "int8-torch")
    save_quantized(model, tmp_path / "q")
    ckpt_bytes = (tmp_path / "q" / "model.safetensors").stat().st_size
    small = Stack().to(torch.bfloat16)
    quantize_model(small, "int8-torch")
    save_quantized(small, tmp_path / "small")
    p = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(tmp_path / "q"), str(tmp_path / "small")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    baseline, peak, seconds = p.stdout.split()[-3:]
    grown = int(peak) - int(baseline)
    # the loaded model is the checkpoint's bytes; 24 MiB for the skeleton's buffers and the
    # allocator. A bf16 skeleton (or a bf16 copy) would add 128 MiB.
    assert grown <= ckpt_bytes + 24 * 2**20, (grown / 2**20, ckpt_bytes / 2**20, bf16_bytes / 2**20)
    print(f"load: {grown / 2**20:.0f} MiB resident for a {ckpt_bytes / 2**20:.0f} MiB checkpoint, {float(seconds):.2f} s")
