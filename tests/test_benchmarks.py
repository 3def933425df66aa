"""The benchmarks run in CI (CPU, smallest sizes) and write complete files: every column, every
variant (unavailable ones with a reason), a PNG; the harness's statistics and metrics are right."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from benchmarks import accuracy, e2e, gemm, harness, host_overhead, kernel_report, make_readme_table
from benchmarks.variants import all_variants
from qkernels import QuantLinear, list_backends

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("torchao-int8-dynamic", "torchao-fp8-rowwise", "bnb-int8", "diffusers-layerwise-fp8")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _check_files(out: Path, name: str, columns: list[str]):
    header, rows = _read_csv(out / f"{name}.csv")
    assert header == harness.ENV_COLUMNS + columns
    data = json.loads((out / f"{name}.json").read_text())
    assert data["columns"] == header and len(data["rows"]) == len(rows)
    for key in ("device_name", "torch", "timestamp", "git_commit"):
        assert key in data["env"]
    png = (out / f"{name}.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 2000
    return rows


def _every_variant_reported(rows):
    """Each registered backend and each peer appears: measured ('ok') or with a stated reason."""
    names = {r["variant"] for r in rows}
    for b in list_backends("cpu"):
        assert b.name in names, f"backend {b.name} missing from results"
    for peer in PEERS:
        assert peer in names, f"peer {peer} silently dropped"
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith(("unavailable", "not installed", "skipped")), r


@pytest.fixture(scope="module")
def gemm_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("gemm")
    # --tiny (K=256, N=512): --quick's M=512 x 3072 x 3072 takes ~0.8 s a bf16 matmul on a 2-core
    # CI machine and made this fixture ~100 s of the suite
    assert gemm.main(["--tiny", "--device", "cpu", "--budget", "0.02", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def accuracy_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    assert accuracy.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_gemm_files_complete(gemm_out):
    rows = _check_files(gemm_out, "gemm", gemm.COLUMNS)
    _every_variant_reported(rows)
    measured = [r for r in rows if r["status"] == "ok" and r["bench"] == "gemm"]
    assert {int(r["M"]) for r in measured} == set(gemm.TINY_M)
    for r in measured:
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["tflops"]) > 0 and r["pct_of_peak"] == ""  # CPU: no peak, left blank
        assert math.isfinite(float(r["rel_error_vs_bf16"])) and r["speedup_vs_bf16"] != ""
        if r["variant"] == "bf16":
            assert float(r["rel_error_vs_bf16"]) == 0.0 and float(r["speedup_vs_bf16"]) == 1.0
    # W8A8 int8 against bf16 on N(0,1) x N(0,1/K) data: per-row int8 of both operands, each
    # amax/127/sqrt(12) relative rms with amax <= 4.5 sigma for 256 samples, in quadrature,
    # x1.5 margin -> 0.022. A wrong scale or transposed weight gives ~0.05 to ~1.4.
    int8 = [r for r in measured if r["variant"] == "int8-torch"]
    assert int8 and all(float(r["rel_error_vs_bf16"]) < 1.5 * math.sqrt(2) * 4.5 / 127 / math.sqrt(12) for r in int8)
    for name in ("act-quant-int8", "act-quant-fp8", "raw-int_mm", "raw-bf16-mm"):
        assert any(r["variant"] == name and r["status"] == "ok" for r in rows), name


def test_accuracy_files_complete(accuracy_out):
    rows = _check_files(accuracy_out, "accuracy", accuracy.COLUMNS)
    _every_variant_reported(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    by = {(r["case"], r["variant"], r["reference"]): r for r in ok}
    measured = {r["variant"] for r in ok}
    for case in ("gaussian", "outliers", "dit-block", "transformer"):
        for v in measured:
            assert (case, v, "float64") in by, (case, v)
            if v != "bf16":
                assert (case, v, "bf16") in by, (case, v)
    for r in ok:
        rel, sqnr, cos = float(r["rel_error"]), float(r["sqnr_db"]), float(r["cosine"])
        assert abs(sqnr + 20 * math.log10(rel)) < 1e-3 and -1 <= cos <= 1
    # bf16 output rounding alone: rms 2^-8/sqrt(3) relative -> ~53 dB; 45 dB leaves room for the
    # K-term accumulation rounding.
    assert float(by[("gaussian", "bf16", "float64")]["sqnr_db"]) > 45
    # Per-token int8: outlier channels set every token's scale, so its error must grow (the
    # effect this case exists to show); weight-only int8 does not see activations at all.
    g, o = (float(by[(c, "int8-torch", "float64")]["rel_error"]) for c in ("gaussian", "outliers"))
    assert o > 2 * g
    wg, wo = (float(by[(c, "int8-layerwise", "float64")]["rel_error"]) for c in ("gaussian", "outliers"))
    assert abs(wo - wg) < 0.2 * wg


def test_readme_table_from_results(gemm_out, accuracy_out, tmp_path):
    for src in (gemm_out, accuracy_out):
        for f in src.iterdir():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    md = tmp_path / "results.md"
    assert make_readme_table.main([str(tmp_path), "--out", str(md), "--csv", str(tmp_path / "all.csv")]) == 0
    text = md.read_text()
    assert "## Results" in text and "### GEMM" in text and "### Accuracy" in text
    assert "`int8-torch`" in text and "torchao-fp8-rowwise" in text
    _, all_rows = _read_csv(tmp_path / "all.csv")
    assert len(all_rows) == len(_read_csv(gemm_out / "gemm.csv")[1]) + len(_read_csv(accuracy_out / "accuracy.csv")[1])


def test_readme_table_stream_and_block_rows(tmp_path):
    """The stream section puts a variant's moving and still scenes on one line (frames/s against
    the plain bf16 loop, latency, skip rate, the larger peak), one line per size and VLM setting;
    the host section's per-block rows get a table of their own (not a column of the M table)."""
    env = dict(device="cuda", device_name="GPU", torch="2", triton="3", cuda="13", git_commit="abc",
               timestamp="t", load_avg="0.1")
    stream = [dict(env, bench="stream", variant=v, status="ok", quant_backend=b, scene=scene, size=size, steps=2,
                   camera_fps=30.0, fps=fps, fps_vs_plain_bf16=vs, latency_p50_ms=p50, latency_p95_ms=p95,
                   skip_rate=skip, peak_gb=peak, vlm_every=every, vlm_threshold=thr)
              for v, b, size, every, thr, scene, fps, vs, p50, p95, skip, peak in (
                  ("plain-bf16", "bf16", 256, 1, "", "moving", 4.0, 1.0, 200, 300, 0.0, 59.0),
                  ("plain-bf16", "bf16", 256, 1, "", "still", 4.1, "", 190, 290, 0.0, 59.5),
                  ("fused", "fp8-triton", 256, 8, 0.0, "moving", 12.5, 3.125, 150, 180, 0.0, 38.0),
                  ("fused", "fp8-triton", 256, 8, 0.0, "still", 30.0, "", 10, 100, 0.9, 38.2),
                  ("fused", "fp8-triton", 512, 8, 0.95, "moving", 7.9, 3.3, 379, 454, 0.0, 38.8))]
    host = [dict(env, bench="host", variant="fp8-triton", activation="dynamic", status="ok", M=16, K=3072, N=3072,
                 host_us=24.0, wall_us=25.0, launches=2),
            dict(env, bench="host", variant="fp8-triton+fused", activation="block", status="ok", M=144, K="", N="",
                 host_us=900.0, wall_us=950.0, note="per block")]
    for name, rows in (("stream", stream), ("host", host)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            w.writerows(rows)
    text = make_readme_table.render(tmp_path)
    assert "| `plain-bf16` | bf16 | 256^2 | every 1 | 4.00 (1.00x) | 200 / 300 | 4.10, 0% | 59.5 |" in text
    assert "| `fused` | fp8-triton | 256^2 | every 8 | 12.50 (3.12x) | 150 / 180 | 30.00, 90% | 38.2 |" in text
    assert "| `fused` | fp8-triton | 512^2 | every 8, < 0.95 | 7.90 (3.30x) | 379 / 454 |  | 38.8 |" in text
    assert "| `fp8-triton+fused` | 900.0 / 950.0 |" in text
    assert "M=144" not in text and "M=16" in text


@pytest.mark.slow
def test_e2e_quick_one_block(tmp_path):
    assert e2e.main(["--quick", "--reference", "--device", "cpu", "--blocks", "1", "--reps", "1", "--no-peers",
                     "--only", "int8-torch", "--out", str(tmp_path)]) == 0
    rows = _check_files(tmp_path, "e2e", e2e.COLUMNS)
    by = {r["variant"]: r for r in rows}
    assert by["bf16"]["status"] == "ok" and by["int8-torch"]["status"] == "ok"
    # 128x128 + reference = 2 x 8x8 patches, + 16 text tokens
    assert int(by["bf16"]["tokens"]) == 2 * 64 + 16
    bf, q = by["bf16"], by["int8-torch"]
    assert int(q["weight_bytes"]) < int(bf["weight_bytes"])
    # int8 block weights: 1 byte + a 4-byte scale per 64-wide row vs 2 bytes -> under 0.6x
    assert float(q["block_weight_bytes"]) < 0.6 * float(bf["block_weight_bytes"])
    # the first call's peak (compile, tuning) apart from the timed forwards'
    assert int(q["first_call_peak_bytes"]) > 0 and int(q["peak_mem_bytes"]) > 0
    assert 0 < float(q["rel_error_vs_bf16"]) < 0.05
    assert q["load_status"] == "ok" and float(q["load_s"]) > 0  # qpipeline is here: load is measured
    assert float(bf["ms_60_blocks_extrapolated"]) == pytest.approx(float(bf["median_ms"]) * 60)


@pytest.mark.slow
def test_pipeline_quick(tmp_path):
    """benchmarks.pipeline on the tiny pipeline: each variant a row with its own stage times, or
    the reason it cannot run here (CUDA graphs on a CPU), never a missing row."""
    from benchmarks import pipeline

    assert pipeline.main(["--quick", "--variants", "engine-bf16,engine-fp8-fused,engine-fp8-fused-graphs",
                          "--out", str(tmp_path)]) == 0
    rows = _check_files(tmp_path, "pipeline", pipeline.COLUMNS)
    by = {r["variant"]: r for r in rows}
    assert by.keys() == {"engine-bf16", "engine-fp8-fused", "engine-fp8-fused-graphs"}
    for v in ("engine-bf16", "engine-fp8-fused"):
        r = by[v]
        assert r["status"] == "ok" and float(r["s_per_image"]) > 0, r
        stages = sum(float(r[k]) for k in ("encode_ms", "vae_encode_ms", "denoise_ms", "decode_ms", "other_ms"))
        assert stages == pytest.approx(float(r["total_ms"]), rel=1e-3)
    assert 20 < float(by["engine-fp8-fused"]["psnr_vs_bf16"]) < float("inf")  # quantized: close, not equal
    assert "CUDA" in by["engine-fp8-fused-graphs"]["status"]


# --------------------------------------------------------------------------------------------
# harness


def test_peaks_table():
    assert harness.peak_for("NVIDIA H100 80GB HBM3", "int8") == 1979
    assert harness.peak_for("NVIDIA H100 PCIe", "bf16") == 756
    assert harness.peak_for("NVIDIA H200", "fp8") == 1979
    assert harness.peak_for("NVIDIA A100-SXM4-80GB", "bf16") == 312
    assert harness.peak_for("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert harness.percent_of_peak(494.5, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(50.0)
    assert harness.percent_of_peak(10.0, "Intel Xeon (2 threads)", "bf16") is None


def test_bench_statistics_and_rotation():
    seen = []
    inputs = [(torch.full((4,), float(i)),) for i in range(3)]
    t = harness.bench(lambda x: seen.append(int(x[0])), inputs, "cpu", warmup=2, min_reps=7, budget_s=0.0)
    assert t.n == 7 and t.p20_ms <= t.median_ms <= t.p80_ms and t.spread_ms >= 0
    assert seen[:6] == [0, 1, 2, 0, 1, 2]  # every call takes the next buffer


def test_compare_detects_a_broken_scale():
    lin = nn.Linear(128, 96, dtype=torch.bfloat16)
    x = torch.randn(32, 128, dtype=torch.bfloat16)
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    q = QuantLinear.from_linear(lin, "int8-torch")
    good = harness.compare(q(x), ref)
    with torch.no_grad():
        q.weight_scale.mul_(1.05)  # a 5% wrong scale
    bad = harness.compare(q(x), ref)
    bound = 1.5 * math.sqrt(2) * 4.5 / 127 / math.sqrt(12)  # as in test_gemm_files_complete
    assert good["rel_error"] < bound < bad["rel_error"]
    assert good["sqnr_db"] > bad["sqnr_db"]
    nan = harness.compare(torch.full((4,), float("nan")), torch.ones(4))
    assert all(math.isnan(v) for v in nan.values())


def test_write_results_rejects_undeclared_columns(tmp_path):
    env = harness.environment("cpu")
    harness.write_results(tmp_path, "x", [{"a": 1.0}], env, ["a"])
    with pytest.raises(ValueError, match="not declared"):
        harness.write_results(tmp_path, "y", [{"a": 1, "b": 2}], env, ["a"])


def test_module_bytes_counts_quantized_storage():
    lin = nn.Linear(256, 128, bias=False, dtype=torch.bfloat16)
    assert harness.module_bytes(lin) == 256 * 128 * 2
    q = QuantLinear.from_linear(lin, "int8-torch")
    assert harness.module_bytes(q) == 256 * 128 + 128 * 4


def test_unavailable_variant_is_listed_not_dropped():
    names = {v.name: v for v in all_variants("cpu", compile_peers=True)}
    for peer in PEERS:
        assert peer in names
    assert names["torchao-int8-dynamic+compile"].compiled
    for v in names.values():
        assert v.available or v.status.startswith(("unavailable", "not installed"))


@pytest.mark.slow
def test_gpu_suite_dry_run_plumbing(tmp_path):
    env = dict(os.environ, QK_DRY_RUN="1", QK_STEPS="gemm", QK_GEMM_ARGS="--tiny --budget 0.02 --device cpu",
               PYTHON=sys.executable)
    out = tmp_path / "suite"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu_suite.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert {"results.tar.gz", "summary.md", "results.csv", "gemm.png", "suite.log"} <= files
    assert len(files) <= 8  # what comes back from a GPU machine
    assert "### GEMM" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_host_overhead_simulated(tmp_path):
    """benchmarks.host_overhead --simulate (in a subprocess: it needs real Triton JIT functions)
    writes one measured row per (backend, activation, M), each forward two launches (one for the
    fused static int8 kernel at M <= 64), the torch-op reference row, and the per-block rows
    (bf16, fused with and without the replay)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--simulate", "--shapes", "96x128",
                           "--m", "16", "--reps", "20", "--blocks", "1", "--rounds", "3", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header, rows = _read_csv(tmp_path / "host.csv")
    assert header == harness.ENV_COLUMNS + host_overhead.COLUMNS
    measured = {(r["variant"], r["activation"]): r for r in rows if r["status"] == "ok"}
    assert set(measured) == {("torch-op", "-"), *((b, a) for b in host_overhead.SIMULATED
                                                  for a in ("dynamic", "static")),
                             *((name, "block") for name, _, _ in host_overhead.BLOCK_VARIANTS)}
    for (variant, activation), r in measured.items():
        if activation == "block":  # a difference of two timings: positive unless noise swamps a block
            assert float(r["host_us"]) > 0, r
            continue
        assert float(r["host_us"]) > 0
        if variant != "torch-op":
            fused = variant == "int8-triton" and activation == "static"
            assert int(r["launches"]) == (1 if fused else 2), r


def test_collect_rows_keeps_what_was_measured_on_sigint():
    """The GPU suite stops a step at its time limit with SIGINT (sent twice: to the process and to
    its group); the rows measured so far are still returned and the derived columns filled."""
    import signal

    def run(args, rows):
        rows.append({"variant": "bf16"})
        os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt here
        rows.append({"variant": "never"})

    def finish(rows):
        os.kill(os.getpid(), signal.SIGINT)  # the second signal: must be ignored, not raise
        rows[0]["done"] = True

    before = signal.getsignal(signal.SIGINT)
    try:
        rows, interrupted = harness.collect_rows(run, None, "t", finish=finish)
    finally:
        signal.signal(signal.SIGINT, before)
    assert interrupted and rows == [{"variant": "bf16", "done": True}]
    rows, interrupted = harness.collect_rows(lambda args, rows: rows.append({}), None, "t")
    assert not interrupted and rows == [{}] and signal.getsignal(signal.SIGINT) is before


def test_gpu_suite_skips_steps_past_its_budget(tmp_path):
    env = dict(os.environ, QK_DRY_RUN="1", QK_STEPS="gemm accuracy", QK_BUDGET_S="0", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu_suite.sh"), str(tmp_path / "s")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    log = (tmp_path / "s" / "suite.log").read_text()
    assert "skip gemm" in log and "skip accuracy" in log
    assert "gemm(skipped: budget) accuracy(skipped: budget)" in log


@pytest.mark.slow
def test_kernel_report_hopper_configs_fit(tmp_path):
    """benchmarks.kernel_report compiles the 8-bit GEMMs' Hopper configs for sm90 on this CPU (a
    subprocess: real Triton JIT). At the MLP shape, for both autotune buckets, every config fits
    the H100's 227 KiB of shared memory without spilling; every config whose warps form warp
    groups over a 64-row tile uses wgmma; the e4m3 GEMMs keep one MMA group in flight across K
    steps (the int8 one does not: a Triton limitation, benchmarks/results/sm90-compiled/NOTES.md),
    and the experimental TMA kernel is fed by TMA alone."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--quick", "--only",
                           "int8_gemm,fp8_gemm,fp8_gemm_tma", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header, rows = _read_csv(tmp_path / "kernels.csv")
    assert header == harness.ENV_COLUMNS + kernel_report.COLUMNS
    assert {r["kernel"] for r in rows} == {"int8_gemm", "fp8_gemm", "fp8_gemm_tma"}
    assert {r["M"] for r in rows} == {"16", "8192"}
    for r in rows:
        what = f"{r['kernel']} {r['block_m']}x{r['block_n']}x{r['block_k']} s{r['num_stages']} w{r['num_warps']}"
        assert r["status"] == "ok", (what, r["status"])
        assert 0 < int(r["shared_bytes"]) <= 227 * 1024, what
        assert int(r["spill_store_bytes"]) == 0 and int(r["spill_load_bytes"]) == 0, what
        assert 0 < int(r["registers"]) <= 255 and int(r["blocks_per_sm"]) >= 1, what
        if int(r["block_m"]) % 64 == 0 and int(r["num_warps"]) % 4 == 0:
            assert int(r["wgmma"]) > 0 and int(r["mma_sync"]) == 0, what
            if r["kernel"].startswith("fp8"):
                assert r["wgmma_in_flight"] == "1", what
        if r["kernel"] == "fp8_gemm_tma":
            assert int(r["tma"]) > 0 and int(r["cp_async"]) == 0, what
        assert len(r["ptx_sha"]) == 12


def test_stream_quick_writes_its_rows(tmp_path):
    """benchmarks.stream --quick (tiny pipeline, CPU, 32^2): measured rows for the plain loop and
    the stream batch with skip and reuse, the CUDA-only variant listed with its reason."""
    from benchmarks import stream

    variants = "plain-bf16,batch-skip-reuse-quant,batch-skip-reuse-fused-graphs-quant"
    assert stream.main(["--quick", "--variants", variants, "--frames", "3", "--quality-frames", "2",
                        "--out", str(tmp_path)]) == 0
    rows = _check_files(tmp_path, "stream", stream.COLUMNS)
    got = {(r["variant"], r["scene"]): r for r in rows}
    assert set(got) == {(v, s) for v in variants.split(",") for s in stream.SCENES}
    for (variant, scene), r in got.items():
        if "graphs" in variant:
            assert r["status"] == "unavailable: CUDA graphs need CUDA"
            continue
        assert r["status"] == "ok", r
        assert float(r["fps"]) > 0 and 0 < float(r["latency_p50_ms"]) <= float(r["latency_p95_ms"])
        assert int(r["results"]) >= 2 and float(r["peak_gb"]) > 0
        assert float(r["fps_overall"]) > 0 and float(r["first_result_ms"]) > 0
        # the stages' host times per tick: each measured, the forward's nonzero, tick_ms their sum
        stages = [float(r[f"host_ms_{st}"]) for st in ("prepare", "vlm", "vae_encode", "forward", "decode", "finish")]
        assert min(stages) >= 0 and stages[3] > 0 and stages[1] > 0
        assert float(r["tick_ms"]) == pytest.approx(sum(stages), rel=1e-6)
    # the still scene with skip off: a still output (coherence); with skip on, frames are skipped
    plain_still = got[("plain-bf16", "still")]
    assert plain_still["output_change"] == "" or float(plain_still["output_change"]) < 1e-3
    assert float(plain_still["skip_rate"]) == 0.0
    reuse_still = got[("batch-skip-reuse-quant", "still")]
    assert float(reuse_still["skip_rate"]) > 0
    assert float(got[("batch-skip-reuse-quant", "moving")]["psnr_vs_vlm_every_frame"]) > 0
    assert float(got[("batch-skip-reuse-quant", "moving")]["fps_vs_plain_bf16"]) > 0


def test_simulated_driver_keeps_autotuning_off_the_disk():
    """Our kernels cache their autotuning on disk (qkernels.triton._common.AUTOTUNE_CACHE); under
    the simulated driver the "timings" are not measurements, so they must not be written there
    (a real sm90 run sharing the cache would take them as measured). The check is restored after."""
    from triton.runtime import autotuner

    from benchmarks.simulated_gpu import simulated_driver

    original = autotuner.Autotuner.check_disk_cache
    benched = []
    with simulated_driver():
        patched = autotuner.Autotuner.check_disk_cache
        assert patched is not original
        assert patched(None, ("key",), [], lambda: benched.append(1)) is False  # benchmarked, not cached
        assert benched == [1]
    assert autotuner.Autotuner.check_disk_cache is original
