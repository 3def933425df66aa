"""Engine features on the tiny QwenImageEditPlusPipeline, on CPU: per-stage timings, batched CFG,
the embedding cache, model CPU offload, a pipeline object in place of a folder.

Batched CFG tolerance. The batch-2 forward differs from two batch-1 forwards only in the order
of floating-point sums (GEMM blocking at twice the rows, a masked softmax over the padded
prompt), so the two outputs should agree to the rounding of a bf16 output: half an ulp, uniform,
is 2^-9/sqrt(3) = 1.1e-3 relative rms; BATCH_TOL allows two such roundings (2.3e-3). Measured:
7e-4 on the padded (shorter) prompt, 0 on the other. Attending to the padding instead (the mask
dropped) is off by ~1e-2, so the bound tells "masks honored" from "masks ignored"; for scale, the
whole bf16 forward is 2.3e-2 from float32.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from qkernels import InputError, QuantLinear
from qpipeline import engine_features as ef
from qpipeline.engine import Engine

from .tiny_pipeline import build_pipeline, build_transformer, reference_images, save_pipeline, small_vae_references

BATCH_TOL = 2 * 2**-9 / math.sqrt(3)
GEN = dict(prompt="make it red", num_steps=2, seed=0, height=32, width=32, output_type="np")


def psnr(a, b) -> float:
    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def rel(a, ref) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


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
def sequential(pipe_dir, images):
    """The plain bf16 engine's image at cfg 4 and its timings."""
    engine = Engine(pipe_dir, backend="bf16", device="cpu")
    t0 = time.perf_counter()
    image = engine.generate(images, true_cfg_scale=4.0, **GEN)
    wall_ms = (time.perf_counter() - t0) * 1e3
    return image, engine.last_timings, wall_ms


# --------------------------------------------------------------------------------------------
# timings


def test_timings_per_stage(sequential):
    _, t, wall_ms = sequential
    assert t["clock"] == "perf_counter" and t["steps"] == GEN["num_steps"] == len(t["step_ms"])
    assert t["encode_calls"] == 2  # cfg 4: prompt and negative prompt
    for stage in ("encode_ms", "vae_encode_ms", "decode_ms", "denoise_ms"):
        assert t[stage] > 0, stage
    assert all(s > 0 for s in t["step_ms"]) and t["denoise_ms"] == pytest.approx(sum(t["step_ms"]))
    named = t["encode_ms"] + t["vae_encode_ms"] + t["decode_ms"] + t["denoise_ms"]
    # the stages are disjoint parts of the call, and the call is inside the measured wall time
    assert named <= t["total_ms"] <= wall_ms
    assert t["other_ms"] == pytest.approx(t["total_ms"] - named) and t["other_ms"] >= 0


# --------------------------------------------------------------------------------------------
# batched CFG


def test_batched_forward_equals_sequential_within_bf16_rounding():
    """One step's transformer outputs, prompts of 7 and 12 tokens (the shorter one padded)."""
    model = build_transformer()
    D = model.config.joint_attention_dim
    hs = torch.randn(1, 32, model.config.in_channels).bfloat16()  # output 4x4 + reference 4x4 patches
    cond, neg = torch.randn(1, 7, D).bfloat16(), torch.randn(1, 12, D).bfloat16()
    kw = dict(hidden_states=hs, timestep=torch.full((1,), 0.5).bfloat16(), img_shapes=[[(1, 4, 4), (1, 4, 4)]],
              guidance=None, attention_kwargs={}, return_dict=False, encoder_hidden_states_mask=None)

    def batched():
        b = ef.CFGBatcher()
        b.encoded(cond, None)
        b.encoded(neg, None)
        c = b.forward(model.forward, (), dict(kw, encoder_hidden_states=cond))[0]
        n = b.forward(model.forward, (), dict(kw, encoder_hidden_states=neg))[0]
        assert b.batched_calls == 1 and b.plain_calls == 0  # the second call reused the batch
        return c, n

    with torch.inference_mode():
        ref_c = model(encoder_hidden_states=cond, **kw)[0]
        ref_n = model(encoder_hidden_states=neg, **kw)[0]
        c, n = batched()
        assert c.shape == ref_c.shape and n.shape == ref_n.shape
        assert rel(c, ref_c) < BATCH_TOL and rel(n, ref_n) < BATCH_TOL, (rel(c, ref_c), rel(n, ref_n))
        # The bound rejects a batch that attends to the padding (mask dropped).
        honest = ef.pad_pair
        try:
            ef.pad_pair = lambda e, m: (honest(e, m)[0], None)
            broken, _ = batched()
        finally:
            ef.pad_pair = honest
        assert rel(broken, ref_c) > 2 * BATCH_TOL, rel(broken, ref_c)


def test_pad_pair():
    a, b = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    e, m = ef.pad_pair([a, b], [None, None])
    assert e.shape == (2, 5, 4) and torch.equal(e[0, :3], a[0]) and torch.equal(e[0, 3:], torch.zeros(2, 4))
    assert m.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    e, m = ef.pad_pair([a, a], [None, None])  # equal lengths, no masks: no mask at all
    assert m is None and e.shape == (2, 3, 4)


def test_engine_batched_cfg_matches_sequential(pipe_dir, images, sequential):
    engine = Engine(pipe_dir, backend="bf16", device="cpu", batched_cfg=True)
    image = engine.generate(images, true_cfg_scale=4.0, **GEN)
    assert engine.last_timings["batched_cfg_calls"] == GEN["num_steps"]
    # Per-step velocities within ~1e-3 (above) give images ~60 dB apart; 45 dB is the engine
    # tests' bound for a correct model (tests/test_engine.py).
    assert psnr(image, sequential[0]) > 45, psnr(image, sequential[0])
    # cfg 1: one pass per step, nothing to batch
    engine.generate(images, true_cfg_scale=1.0, **GEN)
    assert engine.last_timings["batched_cfg_calls"] == 0
    # the wrappers are gone after the call
    assert "forward" not in engine.transformer.__dict__ and "encode_prompt" not in engine.pipeline.__dict__


# --------------------------------------------------------------------------------------------
# embedding cache


def test_cache_hit_returns_the_same_image_and_changes_miss(pipe_dir, images):
    plain = Engine(pipe_dir, backend="bf16", device="cpu").generate(images, true_cfg_scale=1.0, **GEN)
    engine = Engine(pipe_dir, backend="bf16", device="cpu", embedding_cache=True)
    first = engine.generate(images, true_cfg_scale=1.0, **GEN)
    t_miss = engine.last_timings
    assert (t_miss["cache_hits"], t_miss["cache_misses"]) == (0, 1)
    again = engine.generate(images, true_cfg_scale=1.0, **GEN)
    t_hit = engine.last_timings
    assert (t_hit["cache_hits"], t_hit["cache_misses"]) == (1, 0)
    assert np.array_equal(first, plain) and np.array_equal(again, first)
    assert t_hit["encode_ms"] < t_miss["encode_ms"]
    # a changed prompt misses; so does one changed pixel of one input image
    engine.generate(images, true_cfg_scale=1.0, **{**GEN, "prompt": "make it blue"})
    assert engine.last_timings["cache_misses"] == 1
    changed = [images[0].copy(), images[1]]
    changed[0].putpixel((0, 0), tuple((v + 1) % 256 for v in changed[0].getpixel((0, 0))))
    engine.generate(changed, true_cfg_scale=1.0, **GEN)
    assert engine.last_timings["cache_misses"] == 1 and len(engine.embedding_cache) == 3
    engine.unload()
    assert len(engine.embedding_cache) == 0


def test_embedding_cache_lru_and_keys():
    images = reference_images(2)
    k = ef.embedding_key("a", images, n=1)
    assert k == ef.embedding_key("a", [i.copy() for i in images], n=1)  # content, not identity
    assert k != ef.embedding_key("a", images[:1], n=1) and k != ef.embedding_key("a", images[::-1], n=1)
    assert k != ef.embedding_key("a", images, n=2) and k != ef.embedding_key("b", images, n=1)
    assert ef.embedding_key(["ab", "c"], None) != ef.embedding_key(["a", "bc"], None)  # length-prefixed
    cache = ef.EmbeddingCache(max_entries=2)
    cache.put("x", 1)
    cache.put("y", 2)
    assert cache.get("x") == 1  # x is now the most recent
    cache.put("z", 3)  # evicts y
    assert cache.get("y") is None and cache.get("x") == 1 and cache.get("z") == 3
    assert (cache.hits, cache.misses, len(cache)) == (3, 1, 2)
    with pytest.raises(InputError, match="max_entries"):
        ef.EmbeddingCache(0)


# --------------------------------------------------------------------------------------------
# offload and pipeline objects


def test_offload_with_quantized_modules(pipe_dir, images):
    """diffusers' model CPU offload around a quantized transformer and text encoder. On the CPU
    its hooks move nothing, but they are installed, removed and installed again by each call
    (maybe_free_model_hooks) around the engine's own wrappers, and the 8-bit tensors must keep
    their dtype through the pipeline's .to() calls."""
    ref = Engine(pipe_dir, backend="int8-torch", quantize_text_encoder=True, device="cpu")
    want = ref.generate(images, true_cfg_scale=4.0, **GEN)
    engine = Engine(pipe_dir, backend="int8-torch", quantize_text_encoder=True, device="cpu", offload=True,
                    batched_cfg=True)
    for _ in range(2):
        got = engine.generate(images, true_cfg_scale=4.0, **GEN)
        assert engine.last_timings["batched_cfg_calls"] == GEN["num_steps"]
        assert psnr(got, want) > 45, psnr(got, want)
    t = engine.transformer
    assert hasattr(t, "_hf_hook") and "forward" in t.__dict__  # offload's hook is back, ours is gone
    layers = [m for m in list(t.modules()) + list(engine.pipeline.text_encoder.modules()) if isinstance(m, QuantLinear)]
    assert layers and all(m.weight.dtype == torch.int8 for m in layers)


@pytest.mark.gpu
def test_offload_on_cuda_keeps_idle_components_off_the_device(pipe_dir, images):
    ref = Engine(pipe_dir, backend="fp8-scaled-mm", quantize_text_encoder=True, device="cuda")
    want = ref.generate(images, true_cfg_scale=4.0, **GEN)
    ref.unload()
    engine = Engine(pipe_dir, backend="fp8-scaled-mm", quantize_text_encoder=True, device="cuda", offload=True)
    got = engine.generate(images, true_cfg_scale=4.0, **GEN)
    assert psnr(got, want) > 45, psnr(got, want)
    # after the call every component is back on the CPU, quantized tensors still 8-bit
    for name in ("transformer", "text_encoder", "vae"):
        m = getattr(engine.pipeline, name)
        assert all(p.device.type == "cpu" for p in [*m.parameters(), *m.buffers()]), name
    layers = [m for m in engine.transformer.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    assert engine.last_timings["clock"] == "cuda-events" and engine.last_timings["total_ms"] > 0


def test_engine_from_a_pipeline_object(images):
    engine = Engine(build_pipeline(), backend="int8-torch", device="cpu", embedding_cache=2)
    image = engine.generate(images, true_cfg_scale=1.0, **GEN)
    assert image.shape == (32, 32, 3) and engine.report is not None and engine.report.quantized
    assert any(isinstance(m, QuantLinear) for m in engine.transformer.modules())
    engine.unload()
    with pytest.raises(InputError, match="unloaded"):
        engine.generate(images, **GEN)
    with pytest.raises(InputError, match="already quantized"):
        pipe = build_pipeline()
        Engine(pipe, backend="int8-torch", device="cpu").load()
        Engine(pipe, backend="bf16", device="cpu").load()
    with pytest.raises(InputError, match="pipeline folder"):
        Engine(build_pipeline(), quantized="q/")


# --------------------------------------------------------------------------------------------
# the fused block path and CUDA graphs through the engine


def test_engine_fuse_gives_the_unfused_image(pipe_dir, images):
    """fuse=True rewires every block of the quantized transformer; on the CPU the fused block's
    arithmetic is the unfused one's (tests/test_fused.py), so the image is the same, bit for bit."""
    want = Engine(pipe_dir, backend="int8-torch", device="cpu").generate(images, true_cfg_scale=4.0, **GEN)
    engine = Engine(pipe_dir, backend="int8-torch", device="cpu", fuse=True)
    got = engine.generate(images, true_cfg_scale=4.0, **GEN)
    blocks = engine.transformer.transformer_blocks
    assert engine.fuse_report is not None and len(engine.fuse_report.fused) == len(blocks) > 0
    assert not engine.fuse_report.kept
    assert all(type(b).__name__.startswith("Fused") for b in blocks)
    np.testing.assert_array_equal(got, want)


def test_engine_fuse_and_graphs_refuse_what_they_cannot_do(pipe_dir):
    from qkernels import BackendUnavailableError

    with pytest.raises(InputError, match="bf16"):
        Engine(pipe_dir, backend="bf16", device="cpu", fuse=True)
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        Engine(pipe_dir, backend="int8-torch", device="cpu", cuda_graphs=True)


@pytest.mark.gpu
def test_engine_fused_graphs_on_cuda(pipe_dir, images):
    """On the GPU: fused + CUDA graphs gives the unfused fp8 engine's image (reductions in another
    order: PSNR, not bit equality), twice in a row (the second call replays the captured graphs)."""
    ref = Engine(pipe_dir, backend="fp8-triton", device="cuda")
    want = ref.generate(images, true_cfg_scale=4.0, **GEN)
    ref.unload()
    engine = Engine(pipe_dir, backend="fp8-triton", device="cuda", fuse=True, cuda_graphs=True)
    for _ in range(2):
        got = engine.generate(images, true_cfg_scale=4.0, **GEN)
        assert psnr(got, want) > 40, psnr(got, want)
    assert len(engine.fuse_report.fused) == len(engine.transformer.transformer_blocks)
