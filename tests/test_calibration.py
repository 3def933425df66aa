"""Calibration: activation statistics, their file, static scales, SmoothQuant, bad inputs."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from calibration import ActivationStats, LayerStats, smoothing_factors
from calibration.collect import ActivationCollector, collect, flow_matching_batches
from calibration.smoothquant import SMOOTH_MAX, SMOOTH_MIN
from qkernels import formats
from qkernels.errors import CalibrationError
from qkernels.linear import QuantLinear
from tests.metrics import rel_error


class TwoLayer(nn.Module):
    """norm -> fc1 -> gelu -> fc2: fc1's input has the outlier channels the norm's gain makes,
    as LayerNorm gains do in real transformers."""

    def __init__(self, k=256, hidden=384, n=128, outliers=4, factor=50.0):
        super().__init__()
        self.norm = nn.LayerNorm(k)
        self.fc1 = nn.Linear(k, hidden)
        self.fc2 = nn.Linear(hidden, n)
        with torch.no_grad():
            self.norm.weight[torch.randperm(k)[:outliers]] = factor

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def batches(n, m=64, k=256, dtype=torch.bfloat16):
    return [torch.randn(m, k, dtype=dtype) for _ in range(n)]


def linear_inputs(model, data):
    """Every input each Linear saw, by name, collected the plain way (for comparison)."""
    seen, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: seen.setdefault(name, []).append(a[0].detach().reshape(-1, m.in_features))))
    with torch.no_grad():
        for x in data:
            model(x)
    for h in handles:
        h.remove()
    return seen


# --------------------------------------------------------------------------------------------
# collection


def test_collected_statistics_equal_direct_computation():
    model = TwoLayer().to(torch.bfloat16)
    data = batches(5)
    stats = collect(model, data, progress=False, subsample=10**9)
    direct = linear_inputs(model, data)
    assert set(stats) == {"fc1", "fc2"} and stats.metadata["forward_passes"] == 5
    for name, xs in direct.items():
        s = stats.for_layer(name)
        allx = torch.cat(xs).float()
        # abs-max is exact in any dtype: the same numbers, not approximately.
        assert torch.equal(s.channel_amax, allx.abs().amax(dim=0))
        assert torch.equal(s.amax, allx.abs().max())
        # percentile: max over calls of each call's 99.9th percentile (kthvalue, k = ceil(q n)).
        per_call = [x.float().abs().reshape(-1).kthvalue(math.ceil(0.999 * x.numel())).values for x in xs]
        assert torch.equal(s.percentile, torch.stack(per_call).max())
        assert s.calls == 5 and s.tokens == 5 * 64
        assert s.channel_amax.dtype == torch.float32 and s.channel_amax.shape == (xs[0].shape[1],)
    # the outlier channels are what the statistics show: fc1's 4 largest channels are ~50x the median
    ch = stats.for_layer("fc1").channel_amax
    assert (ch.topk(4).values.min() / ch.median()) > 20


def test_percentile_subsample_is_close_to_exact():
    # 64 x 4096 = 262144 elements per call, subsampled to 65536: the percentile's rank error is
    # ~sqrt(q (1-q) / n) = 1.2e-4, i.e. within the 99.85-99.95th percentiles.
    lin = nn.Linear(4096, 8)
    data = [torch.randn(64, 4096) for _ in range(2)]
    s = collect(lin, data, progress=False).for_layer("")
    exact = [x.abs().reshape(-1).quantile(torch.tensor([0.9985, 0.9995])) for x in data]
    lo = max(e[0] for e in exact)
    hi = max(e[1] for e in exact)
    assert lo <= s.percentile <= hi
    assert s.percentile < s.amax


def test_timestep_buckets_and_context_manager():
    model = nn.Sequential(nn.Linear(32, 16))
    with ActivationCollector(model, timestep_buckets=4) as c:
        for t, scale in ((0.9, 1.0), (0.1, 10.0)):
            c.set_timestep(t)
            model(torch.randn(8, 32) * scale)
    s = c.stats().for_layer("0")
    by_t = s.amax_by_timestep
    assert by_t[1] == -1 and by_t[2] == -1  # no input in those buckets
    assert by_t[0] > 5 * by_t[3]  # t=0.1 saw 10x larger inputs
    assert torch.equal(s.amax, by_t.max())
    # hooks are gone after the context: another forward changes nothing
    model(torch.randn(8, 32) * 1000)
    assert c.stats().for_layer("0").amax == s.amax


def test_hooks_never_read_device_values(monkeypatch):
    """No .item()/float()/bool() on a tensor inside a hook (a host sync per layer on CUDA)."""
    model = TwoLayer().to(torch.bfloat16)
    data = batches(2)
    with ActivationCollector(model, timestep_buckets=2, subsample=1000) as c:
        def refuse(*a, **k):
            raise AssertionError("a hook read a tensor value on the host")
        with monkeypatch.context() as mp:
            for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
                mp.setattr(torch.Tensor, attr, refuse)
            c.set_timestep(0.3)
            for x in data:
                model(x)
    assert c.stats().for_layer("fc1").calls == 2


@pytest.mark.gpu
def test_collection_does_not_sync_on_cuda():
    model = TwoLayer().to("cuda", torch.bfloat16)
    data = [x.cuda() for x in batches(3)]
    # subsample 1000 < 64 x 256 elements: the random-subsample path runs too
    with ActivationCollector(model, timestep_buckets=2, subsample=1000) as c:
        c.set_timestep(0.7)
        model(data[0])  # warm-up: lazy CUDA init may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x in data[1:]:
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    stats = c.stats()
    ref = collect(model.cpu(), [x.cpu() for x in data], progress=False, subsample=10**9)
    # same statistics as on the CPU, up to the bf16 rounding of CUDA's LayerNorm (2^-8 relative)
    torch.testing.assert_close(stats.for_layer("fc1").channel_amax, ref.for_layer("fc1").channel_amax,
                               rtol=2**-7, atol=0)


def test_save_load_round_trip(tmp_path):
    model = TwoLayer().to(torch.bfloat16)
    stats = collect(model, batches(3), progress=False, timestep_buckets=2, timestep_fn=lambda b: 0.75,
                    metadata=dict(samples=3, steps=1))
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    back = ActivationStats.load(path, model)
    assert set(back) == set(stats)
    for name in stats:
        a, b = stats.for_layer(name), back.for_layer(name)
        for what in ("channel_amax", "amax", "percentile", "amax_by_timestep"):
            assert torch.equal(getattr(a, what), getattr(b, what))
        assert (a.calls, a.tokens, a.percentile_q) == (b.calls, b.tokens, b.percentile_q)
    assert back.metadata["model_class"] == "TwoLayer" and back.metadata["samples"] == 3
    assert back.metadata["version"] == 1
    assert back.for_layer("norm") is None


def test_cli_on_tiny_demo(tmp_path):
    from calibration.collect import main

    out = tmp_path / "stats.safetensors"
    assert main(["--demo-size", "tiny", "--samples", "2", "--steps", "3", "--image-hw", "4", "4",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    from qpipeline.demo import build_demo_transformer

    model = build_demo_transformer("tiny")
    stats = ActivationStats.load(out, model)  # matches every Linear of the tiny demo
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len(stats) == n_linear and stats.metadata["forward_passes"] == 6
    assert stats.metadata["samples"] == 2 and stats.metadata["steps"] == 3
    assert len(stats.metadata["timesteps"]) == 3 and stats.metadata["timesteps"][0] == 1.0
    # 4 timestep buckets over [0, 1]: exactly the buckets the 3 sigmas fall in saw inputs
    visited = {min(int(t * 4), 3) for t in stats.metadata["timesteps"]}
    by_t = stats.for_layer("transformer_blocks.0.img_mlp.net.0.proj").amax_by_timestep
    assert {i for i in range(4) if by_t[i] > 0} == visited and len(visited) < 4
    # --model: a local diffusers folder (transformer/ subfolder), loaded from disk only
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    out2 = tmp_path / "stats2.safetensors"
    assert main(["--model", str(tmp_path / "pipe"), "--samples", "1", "--steps", "2", "--image-hw", "4", "4",
                 "--out", str(out2), "--no-progress", "--device", "cpu"]) == 0
    s2 = ActivationStats.load(out2, model)
    assert s2.metadata["source"] == str(tmp_path / "pipe") and s2.metadata["forward_passes"] == 2
    assert main(["--model", str(tmp_path / "nowhere"), "--out", str(out2)]) == 2


def test_flow_matching_batches_interpolate_latents():
    from qpipeline.demo import build_demo_transformer

    model = build_demo_transformer("tiny")
    b = list(flow_matching_batches(model, samples=1, steps=3, image_hw=(2, 2), text_tokens=4))
    assert len(b) == 3
    ts = [float(x["timestep"][0]) for x in b]
    assert ts[0] == 1.0 and ts == sorted(ts, reverse=True)
    # same text for every step of a sample; the latent moves from noise toward x0
    assert all(torch.equal(x["encoder_hidden_states"], b[0]["encoder_hidden_states"]) for x in b)
    assert not torch.equal(b[0]["hidden_states"], b[1]["hidden_states"])


# --------------------------------------------------------------------------------------------
# static scales: the statistics are used


def test_static_scale_from_statistics():
    s = collect(nn.Linear(64, 32), batches(2, k=64, dtype=torch.float32), progress=False).for_layer("")
    for fmt in ("w8a8-int8", "w8a8-fp8"):
        qmax = formats.get_format(fmt).qmax
        assert torch.equal(s.static_scale(fmt), s.amax / qmax)
        assert torch.equal(s.static_scale(fmt, clip=True), s.percentile / qmax)
        smooth = torch.rand(64) + 0.5
        assert torch.equal(s.static_scale(fmt, smooth=smooth), (s.channel_amax / smooth).max() / qmax)
    with pytest.raises(CalibrationError, match="cannot be combined with SmoothQuant"):
        s.static_scale("w8a8-int8", clip=True, smooth=torch.ones(64))


def test_statistics_change_static_scales_and_outputs():
    """Doubling the recorded abs-max doubles the layer's static scale and changes its output:
    the statistics are what the static activation mode computes with."""
    lin = nn.Linear(128, 64).to(torch.bfloat16)
    data = batches(4, k=128)
    stats = collect(lin, data, progress=False).for_layer("")
    x = data[0]
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    outs = []
    for factor in (1.0, 2.0, 8.0):
        changed = LayerStats("", stats.channel_amax * factor, stats.amax * factor, stats.percentile * factor)
        scale = changed.static_scale("w8a8-int8")
        layer = QuantLinear.from_linear(lin, "int8-torch", activation="static", input_scale=scale)
        assert torch.equal(layer.input_scale, stats.amax * factor / 127)
        outs.append(layer(x))
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    # and the calibrated scale is the best of them: a coarser grid costs accuracy
    errs = [rel_error(y, ref) for y in outs]
    assert errs[0] < errs[1] < errs[2]


# --------------------------------------------------------------------------------------------
# SmoothQuant


def test_smoothing_factors_formula_and_degenerate_channels():
    w = torch.randn(16, 8)
    a = torch.rand(8) * 10 + 0.1
    s = smoothing_factors(a, w, alpha=0.5)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, a.sqrt() / w.abs().amax(0).sqrt())
    torch.testing.assert_close(smoothing_factors(a, w, 1.0), a)
    torch.testing.assert_close(smoothing_factors(a, w, 0.0), 1 / w.abs().amax(0))
    # after smoothing at alpha 0.5, max|x_j / s_j| == max|W_j * s_j| per channel (balanced)
    torch.testing.assert_close(a / s, (w * s).abs().amax(0))
    a2, w2 = a.clone(), w.clone()
    a2[0], w2[:, 1], a2[2], a2[3] = 0, 0, float("inf"), 1e30
    s2 = smoothing_factors(a2, w2, 0.5)
    assert s2[0] == 1 and s2[1] == 1 and s2[2] == 1  # zero / zero-column / non-finite -> 1
    assert s2[3] == SMOOTH_MAX and SMOOTH_MIN <= s2.min()
    with pytest.raises(CalibrationError, match="alpha"):
        smoothing_factors(a, w, 1.5)
    with pytest.raises(CalibrationError, match="another layer"):
        smoothing_factors(torch.rand(9), w)


def test_smoothquant_halves_int8_error_on_outlier_channels():
    """Activations with 4 outlier channels (x50): int8 dynamic per-token error with SmoothQuant
    (alpha 0.5, from collected statistics) is at least 2x lower than without. Neither no
    smoothing nor alpha 0 (s = 1/max|W|: the activation keeps its outliers) gets there, so this
    fails if smoothing is skipped."""
    model = TwoLayer(factor=50.0).to(torch.bfloat16)
    stats = collect(model, batches(8), progress=False)
    x = model.norm(torch.randn(256, 256, dtype=torch.bfloat16))  # fresh inputs, same distribution
    lin = model.fc1
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    plain = rel_error(QuantLinear.from_linear(lin, "int8-torch")(x), ref)

    def smoothed(alpha):
        s = smoothing_factors(stats.for_layer("fc1").channel_amax, lin.weight, alpha)
        return rel_error(QuantLinear.from_linear(lin, "int8-torch", input_smooth=s)(x), ref)

    assert plain / smoothed(0.5) >= 2.0, (plain, smoothed(0.5))
    assert plain / smoothed(0.0) < 2.0
    # the same test on outlier-free activations shows no such gain: the gain is the outliers'
    calm = TwoLayer(factor=1.0).to(torch.bfloat16)
    cs = collect(calm, batches(8), progress=False).for_layer("fc1")
    xc = calm.norm(torch.randn(256, 256, dtype=torch.bfloat16))
    refc = xc.double() @ calm.fc1.weight.double().t() + calm.fc1.bias.double()
    e_plain = rel_error(QuantLinear.from_linear(calm.fc1, "int8-torch")(xc), refc)
    sc = smoothing_factors(cs.channel_amax, calm.fc1.weight, 0.5)
    e_smooth = rel_error(QuantLinear.from_linear(calm.fc1, "int8-torch", input_smooth=sc)(xc), refc)
    assert e_plain / e_smooth < 2.0


# --------------------------------------------------------------------------------------------
# bad inputs


def test_statistics_of_another_model_are_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    collect(TwoLayer(k=256), batches(2, dtype=torch.float32), progress=False).save(path)
    with pytest.raises(CalibrationError, match=r"fc1 \(model K=128, statistics K=256\).*another model"):
        ActivationStats.load(path, TwoLayer(k=128))
    other = nn.Sequential(nn.Linear(256, 384))
    with pytest.raises(CalibrationError, match=r"layer\(s\) the model does not have.*fc1"):
        ActivationStats.load(path, other)


def test_missing_layers_are_named(tmp_path):
    model = TwoLayer()
    stats = collect(model, batches(2, dtype=torch.float32), progress=False, layers=lambda n: n == "fc1")
    stats.save(tmp_path / "s.safetensors")
    with pytest.raises(CalibrationError, match=r"no statistics for 1 Linear layer\(s\) of the model: fc2"):
        ActivationStats.load(tmp_path / "s.safetensors", model)
    # a layer the calibration forward never called is recorded, and not reported as missing
    class Unused(TwoLayer):
        def forward(self, x):
            return self.fc1(self.norm(x))

    stats = collect(Unused(), batches(2, dtype=torch.float32), progress=False)
    assert stats.metadata["layers_without_input"] == ["fc2"] and stats.for_layer("fc2") is None
    stats.save(tmp_path / "u.safetensors")
    ActivationStats.load(tmp_path / "u.safetensors", Unused())


def test_non_finite_statistics_are_refused(tmp_path):
    model = TwoLayer()
    data = batches(2, dtype=torch.float32)
    data[1][3, 7] = float("nan")
    with pytest.raises(CalibrationError, match="fc1.channel_amax holds non-finite"):
        collect(model, data, progress=False)
    # a tampered file: an inf written into a stored statistic
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = tmp_path / "s.safetensors"
    collect(model, batches(2, dtype=torch.float32), progress=False).save(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["fc2.amax"] = torch.tensor(float("inf"))
    save_file(tensors, path, metadata=meta)
    with pytest.raises(CalibrationError, match="fc2.amax holds non-finite"):
        ActivationStats.load(path)


def test_empty_sample_set_is_refused(tmp_path):
    with pytest.raises(CalibrationError, match="sample set is empty"):
        collect(TwoLayer(), [], progress=False)
    with pytest.raises(CalibrationError, match="sample set is empty"):
        collect(TwoLayer(), iter(()), progress=False)
    r = subprocess.run([sys.executable, "-m", "calibration.collect", "--demo-size", "tiny", "--samples", "0",
                        "--out", str(tmp_path / "s.safetensors")], capture_output=True, text=True)
    assert r.returncode != 0 and "empty sample set" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s.safetensors").exists()


def test_unreadable_or_foreign_files(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        ActivationStats.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationError, match="not a readable"):
        ActivationStats.load(junk)
    from safetensors.torch import save_file

    save_file({"fc1.amax": torch.tensor(1.0)}, tmp_path / "plain.safetensors")
    with pytest.raises(CalibrationError, match="no 'calibration' metadata"):
        ActivationStats.load(tmp_path / "plain.safetensors")


# --------------------------------------------------------------------------------------------
# quantize_model uses the statistics (static scales, SmoothQuant), and the error budget


def _model_error(model, inputs, refs):
    from qpipeline.sensitivity import output_error

    return output_error(model, inputs, refs)


def test_quantize_model_static_scales_come_from_statistics():
    import copy

    from qpipeline import get_recipe, quantize_model

    base = TwoLayer().to(torch.bfloat16)
    data = batches(4)
    stats = collect(base, data, progress=False)
    recipe = get_recipe("generic").replace(backend="int8-torch", activation="static")
    outs = []
    for factor in (1.0, 4.0):
        changed = ActivationStats({n: LayerStats(n, s.channel_amax * factor, s.amax * factor, s.percentile * factor)
                                   for n, s in stats.layers.items()}, stats.metadata)
        model = copy.deepcopy(base)
        quantize_model(model, recipe, calibration=changed)
        for name in ("fc1", "fc2"):
            layer = getattr(model, name)
            assert isinstance(layer, QuantLinear) and "activation=static" in repr(layer)
            assert torch.equal(layer.input_scale, changed.for_layer(name).static_scale("w8a8-int8"))
        with torch.no_grad():
            outs.append(model(data[0]))
    assert not torch.equal(outs[0], outs[1])


def test_quantize_model_static_clipping_uses_the_percentile():
    import copy

    from qpipeline import get_recipe, quantize_model

    base = TwoLayer().to(torch.bfloat16)
    data = batches(4)
    stats = collect(base, data, progress=False)
    recipe = get_recipe("generic").replace(backend="int8-torch", activation="static")
    clipped, plain = copy.deepcopy(base), copy.deepcopy(base)
    quantize_model(clipped, recipe, calibration=stats.with_clipping())
    quantize_model(plain, recipe, calibration=stats)
    for name in ("fc1", "fc2"):
        s = stats.for_layer(name)
        assert s.percentile < s.amax
        assert torch.equal(getattr(clipped, name).input_scale, s.percentile / 127)
        assert torch.equal(getattr(plain, name).input_scale, s.amax / 127)
    with torch.no_grad():
        assert not torch.equal(clipped(data[0]), plain(data[0]))
    # percentile clipping and SmoothQuant do not combine: a clear error, not a wrong scale
    with pytest.raises(CalibrationError, match="cannot be combined with SmoothQuant"):
        quantize_model(copy.deepcopy(base), recipe.replace(smoothquant_alpha=0.5), calibration=stats.with_clipping())


def test_quantize_model_smoothquant_halves_model_error():
    """End to end through quantize_model: smoothquant_alpha=0.5 with collected statistics sets
    each layer's input_smooth from them and cuts the model's output error >= 2x on outlier
    activations; without statistics (smoothing skipped) it does not."""
    import copy

    from qpipeline import get_recipe, quantize_model
    from qpipeline.sensitivity import run_outputs

    base = TwoLayer(factor=50.0).to(torch.bfloat16)
    stats = collect(base, batches(8), progress=False)
    test = batches(4)
    refs = run_outputs(base, test)
    recipe = get_recipe("generic").replace(backend="int8-torch", smoothquant_alpha=0.5)
    errs = {}
    for label, cal in (("smoothed", stats), ("skipped", None)):
        model = copy.deepcopy(base)
        report = quantize_model(model, recipe, calibration=cal)
        assert (model.fc1.input_smooth is not None) == (cal is not None)
        assert all(row.smoothed == (cal is not None) for row in report.quantized)
        errs[label] = _model_error(model, test, refs)
    expect = smoothing_factors(stats.for_layer("fc1").channel_amax, base.fc1.weight, 0.5)
    model = copy.deepcopy(base)
    quantize_model(model, recipe, calibration=stats)
    assert torch.equal(model.fc1.input_smooth, expect)
    assert errs["skipped"] / errs["smoothed"] >= 2.0, errs


def _budget_runs(make_model, inputs, recipe_kw, fractions=(0.8, 0.4)):
    """Quantize fresh copies without a budget and with budgets at ``fractions`` of the unbudgeted
    model error; return (unbudgeted error, [(budget, report, measured error), ...])."""
    from qpipeline import get_recipe, quantize_model
    from qpipeline.sensitivity import run_outputs

    recipe = get_recipe("generic").replace(backend="int8-torch", **recipe_kw)
    model = make_model()
    refs = run_outputs(model, inputs)
    quantize_model(model, recipe)
    full = _model_error(model, inputs, refs)
    runs = []
    for f in fractions:
        model = make_model()
        report = quantize_model(model, recipe.replace(max_error=f * full), inputs=inputs)
        measured = _model_error(model, inputs, refs)
        runs.append((f * full, report, measured, model))
    return full, runs


def _check_budget(full, runs):
    kept_counts = []
    for budget, report, measured, model in runs:
        assert full > budget  # without the budget the model is over it: the check below can fail
        # within the budget, measured independently on the final model
        assert measured <= budget, (measured, budget)
        assert report.model_error == pytest.approx(measured, rel=1e-6) and report.error_budget == budget
        kept = [r for r in report.kept if r.reason and r.reason.startswith("error budget")]
        assert kept, "a budget below the unbudgeted error must keep some layer"
        for r in report.kept:  # kept layers really are high precision in the model
            assert isinstance(model.get_submodule(r.name), nn.Linear)
        for r in report.quantized:
            assert isinstance(model.get_submodule(r.name), QuantLinear) and r.model_error is not None
        # the report says what each kept layer cost
        assert all(r.model_error is not None and f"{r.model_error:.2e}" in r.reason for r in kept)
        # the costliest layer alone already exceeds a tight budget: it is kept
        costs = {r.name: r.model_error for r in report.layers if r.model_error is not None}
        worst = max(costs, key=costs.get)
        if costs[worst] > budget:
            assert worst in {r.name for r in kept}
        assert "model output error" in report.format_table()
        kept_counts.append(len(kept))
    # a tighter budget keeps more layers in high precision
    assert kept_counts == sorted(kept_counts) and kept_counts[-1] > kept_counts[0], kept_counts


def test_error_budget_on_demo_transformer():
    from qpipeline.demo import build_demo_transformer
    from qpipeline.sensitivity import default_inputs

    make = lambda: build_demo_transformer("tiny", num_layers=1)  # noqa: E731
    inputs = default_inputs(make(), samples=1, steps=1, image_hw=(4, 4), text_tokens=8)
    full, runs = _budget_runs(make, inputs, {})
    assert full > 0
    _check_budget(full, runs)


def test_error_budget_on_transformers_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

    def make():
        torch.manual_seed(0)
        return transformers.LlamaModel(config).to(torch.bfloat16).eval()

    g = torch.Generator().manual_seed(0)
    inputs = [dict(input_ids=torch.randint(0, 128, (2, 24), generator=g))]
    full, runs = _budget_runs(make, inputs, {})
    _check_budget(full, runs)


def test_error_budget_needs_inputs_for_unknown_models():
    from qpipeline import get_recipe, quantize_model
    from qkernels.errors import RecipeError

    with pytest.raises(RecipeError, match="pass inputs="):
        quantize_model(TwoLayer(), get_recipe("generic").replace(backend="int8-torch", max_error=0.01))
    with pytest.raises(RecipeError, match="at least one input"):
        quantize_model(TwoLayer(), get_recipe("generic").replace(backend="int8-torch", max_error=0.01), inputs=[])


def test_quantize_cli_max_error(tmp_path, capsys):
    import json

    from qpipeline.demo import build_demo_transformer
    from qpipeline.quantize import main

    build_demo_transformer("tiny", num_layers=1).save_pretrained(tmp_path / "model" / "transformer")
    rc = main(["--model", str(tmp_path / "model"), "--backend", "int8-torch", "--recipe", "generic",
               "--max-error", "0.004", "--device", "cpu", "--out", str(tmp_path / "q"),
               "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    totals = json.loads((tmp_path / "r.json").read_text())["totals"]
    assert totals["error_budget"] == 0.004 and totals["model_error"] <= 0.004
    assert totals["kept"] >= 1 and "model output error" in out.out
