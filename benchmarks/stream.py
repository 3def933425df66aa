"""Stream mode: frames per second and latency of a synthetic camera through ``StreamEditor``.

    python -m benchmarks.stream --out $OUT/stream                   # GPU: full size, 256/384/512^2
    python -m benchmarks.stream --quick --out out/stream            # CPU (CI): tiny pipeline, 32^2

The pipeline is benchmarks.pipeline's full-size Qwen-Image-Edit with SEEDED RANDOM WEIGHTS (speed
and memory are the real model's; images mean nothing). The camera is generated and seeded: a
"moving" scene (a smooth texture panning 2 px per frame and a square crossing it) and a "still"
scene (one frame repeated). A camera thread submits frames at ``--fps`` (default 30, faster than
the GPU: the editor's latest-frame-wins slot drops what it cannot take) for ``--seconds`` (default
8; or ``--frames`` frames); a result is counted when it comes out of ``results()``.

Variants (in this order; quantizing is in place, so bf16 runs first):
    plain-bf16                  one frame through all its steps, bf16 transformer (the baseline)
    plain-quant                 the same, the transformer quantized (--quant-backend)
    batch-quant                 + stream batch (frame t step k and frame t+1 step k-1 in one forward)
    batch-skip-reuse-quant      + similar-frame skip (threshold 0.98) and the VLM embedding every
                                --vlm-every frames (or when the similarity drops below --vlm-threshold)
    batch-skip-reuse-fused-graphs-quant  + the fused block path and CUDA graphs (CUDA only)

Columns per (variant, scene, size): ``fps``, the steady rate a viewer sees: (results - 1) / seconds
from the first result out to the last; ``fps_overall``: results / seconds from the first frame in
to the last result out (it also counts the pipeline's fill, ``first_result_ms``, so a short camera
run understates the rate: run 6's 40-frame runs measured this one); ``latency_p50_ms`` / ``latency_p95_ms`` (frame in to result out, every result),
``computed_p95_ms`` (results that were computed, not skipped), ``peak_gb``, ``skip_rate``,
``dropped``, ``rows_per_forward``, ``encodes``; ``fps_vs_plain_bf16``; ``host_ms_<stage>``: host milliseconds
per worker tick in each stage of ``qpipeline.stream.STAGES`` (``tick_ms``: their sum); ``output_change`` and
``input_change``: mean |difference| of consecutive outputs / inputs on [0, 1] pixels (the still
scene with skip off is the coherence check: < 1e-3); ``psnr_vs_vlm_every_frame`` (rows with VLM
reuse, moving scene): the quality cost of reusing the embedding, from an inline run of
``--quality-frames`` frames against the same run with the embedding of every frame (100 dB: identical,
e.g. when every frame differed enough from the last encoded one to refresh it anyway).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import threading
import time

import numpy as np
import torch

from . import harness
from .pipeline import PROMPT, build_pipeline

COLUMNS = [
    "bench", "variant", "status", "model", "quant_backend", "scene", "size", "steps", "frames", "camera_fps",
    "results", "fps", "fps_vs_plain_bf16", "fps_overall", "first_result_ms", "latency_p50_ms", "latency_p95_ms",
    "computed_p95_ms", "peak_gb", "skip_rate", "dropped", "rows_per_forward", "encodes", "output_change",
    "input_change", "psnr_vs_vlm_every_frame", "vlm_every", "vlm_threshold", "threshold", "tick_ms",
    "host_ms_prepare", "host_ms_vlm", "host_ms_vae_encode", "host_ms_forward", "host_ms_decode", "host_ms_finish",
    "note",
]
VARIANTS = ["plain-bf16", "plain-quant", "batch-quant", "batch-skip-reuse-quant", "batch-skip-reuse-fused-graphs-quant"]
SCENES = ["moving", "still"]


def camera_frame(scene: str, t: int, size: int, seed: int = 0):
    """Frame ``t`` of the synthetic camera: a seeded smooth texture (8 px cells, bilinear) that pans
    2 px per frame with a square crossing it; the still scene is frame 0 every time."""
    from PIL import Image

    t = 0 if scene == "still" else t
    rng = np.random.default_rng(seed)
    cells = Image.fromarray((rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8))
    img = np.asarray(cells.resize((size, size), Image.Resampling.BILINEAR)).copy()
    img = np.roll(img, 2 * t, axis=1)
    s = max(4, size // 8)
    x = (3 * t) % (size - s)
    img[size // 3: size // 3 + s, x: x + s] = (240, 40, 30)
    return Image.fromarray(img)


def _percentile(values, q):
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _change(images):
    a = [np.asarray(i, np.float32) / (255.0 if np.asarray(i).dtype == np.uint8 else 1.0) for i in images]
    d = [float(np.abs(x - y).mean()) for x, y in zip(a, a[1:])]
    return statistics.mean(d) if d else None


def _psnr(a, b):
    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


class Run:
    def __init__(self, args, rows):
        self.args, self.rows = args, rows
        self.device = torch.device(args.device or harness.default_device())
        self.env = harness.environment(self.device)
        self.base_fps: dict = {}

    def add(self, row):
        key = (row.get("scene"), row.get("size"))
        if row.get("status") == "ok":
            if row["variant"] == "plain-bf16":
                self.base_fps[key] = row["fps"]
            if self.base_fps.get(key) and row.get("fps"):
                row["fps_vs_plain_bf16"] = row["fps"] / self.base_fps[key]
        self.rows.append(row)
        harness.write_results(self.args.out, "stream", self.rows, self.env, COLUMNS)
        msg = row["status"] if row["status"] != "ok" else (
            f"{row['fps'] or 0:.2f} frames/s ({row['fps_overall']:.2f} overall)  p50 {row['latency_p50_ms']:.0f} ms  p95 {row['latency_p95_ms']:.0f} ms  "
            f"skip {row['skip_rate']:.0%}  peak {row.get('peak_gb') or 0:.2f} GB")
        print(f"[stream] {row['variant']:<36} {row.get('scene', ''):<7} {row.get('size', '')}^2  {msg}", flush=True)

    def options(self, variant):
        reuse = "reuse" in variant
        return dict(batch=variant.startswith("batch"), threshold=0.98 if reuse else None,
                    vlm_every=self.args.vlm_every if reuse else 1,
                    vlm_threshold=self.args.vlm_threshold if reuse else 0.95)

    def stream(self, engine, variant, scene, size):
        """One camera run through a threaded editor: (results, editor, frames sent)."""
        from qpipeline.stream import StreamEditor

        a = self.args
        opts = self.options(variant)
        # warm-up: every row count the stream batch will see, and the first call of each kernel
        warm = StreamEditor(engine, PROMPT, steps=a.steps, size=size, seed=a.seed, output="np", **opts)
        for t in range(a.warmup):
            warm.process(camera_frame(scene, t, size, a.seed))
        warm.flush()
        harness._sync(self.device)
        ed = StreamEditor(engine, PROMPT, steps=a.steps, size=size, seed=a.seed, output="np", **opts)
        frames = [camera_frame(scene, t, size, a.seed) for t in range(a.frames)]
        gc.collect()
        results = []
        with harness.PeakMemory(self.device) as pm, ed:
            reader = threading.Thread(target=lambda: results.extend(ed.results()), daemon=True)
            reader.start()
            period = 1.0 / a.fps
            t0 = time.monotonic()
            for i, f in enumerate(frames):
                time.sleep(max(0.0, t0 + i * period - time.monotonic()))
                ed.submit(f)
            ed.close(timeout=None)
            reader.join()
        return results, ed, frames, pm

    def measure(self, engine, variant, scene, size):
        a = self.args
        row = dict(bench="stream", variant=variant, model=a.model, scene=scene, size=size, steps=a.steps,
                   quant_backend=a.quant_backend if variant.endswith("quant") else "bf16",
                   frames=a.frames, camera_fps=a.fps, vlm_every=self.options(variant)["vlm_every"],
                   vlm_threshold=self.options(variant)["vlm_threshold"] if "reuse" in variant else None,
                   threshold=self.options(variant)["threshold"])
        try:
            results, ed, frames, pm = self.stream(engine, variant, scene, size)
            rep = ed.report()
            lat = [r.latency_ms for r in results]
            computed = [r.latency_ms for r in results if not r.skipped]
            t0 = min(r.t_in for r in results)
            span = results[-1].t_out - t0
            steady = results[-1].t_out - results[0].t_out
            row.update(status="ok", results=len(results),
                       fps=(len(results) - 1) / steady if len(results) > 1 and steady > 0 else None,
                       fps_overall=len(results) / span, first_result_ms=1e3 * (results[0].t_out - t0),
                       latency_p50_ms=_percentile(lat, 0.5), latency_p95_ms=_percentile(lat, 0.95),
                       computed_p95_ms=_percentile(computed, 0.95), skip_rate=rep["skip_rate"],
                       dropped=rep["dropped"], rows_per_forward=rep["rows_per_forward"], encodes=rep["encodes"],
                       output_change=_change([r.image for r in results]),
                       input_change=_change([frames[r.seq] for r in results]),
                       peak_gb=pm.peak / 1e9)
            stages = {k: v for k, v in rep.items() if k.startswith("host_ms_")}
            row.update(stages, tick_ms=sum(stages.values()))
            if self.device.type != "cuda":
                row["note"] = f"CPU memory: {pm.method}; {str(a.dtype).removeprefix('torch.')} pipeline"
            if "reuse" in variant and scene == "moving" and a.quality_frames:
                row["psnr_vs_vlm_every_frame"] = self.vlm_quality(engine, variant, size)
        except torch.cuda.OutOfMemoryError as exc:
            row["status"] = harness.fmt_status(exc)
            gc.collect()
            torch.cuda.empty_cache()
        except Exception as exc:
            row["status"] = harness.fmt_status(exc)
        self.add(row)

    def vlm_quality(self, engine, variant, size):
        """Median PSNR of the embedding-reuse outputs against the every-frame embedding, inline
        (same frames, no drops, skip off)."""
        from qpipeline.stream import StreamEditor

        a = self.args
        frames = [camera_frame("moving", t, size, a.seed) for t in range(a.quality_frames)]
        outs = {}
        for every in (1, a.vlm_every):
            ed = StreamEditor(engine, PROMPT, steps=a.steps, size=size, seed=a.seed, output="np", threshold=None,
                              vlm_every=every, vlm_threshold=a.vlm_threshold, batch=True)
            res = [r for f in frames for r in ed.process(f)] + ed.flush()
            outs[every] = [r.image for r in res]
        return min(100.0, statistics.median(_psnr(x, y) for x, y in zip(outs[1], outs[a.vlm_every])))

    def run(self):
        from qpipeline.engine import Engine

        a = self.args
        wanted = [v for v in VARIANTS if v in a.variants]
        t0 = time.perf_counter()
        pipe = build_pipeline(a.model, self.device, seed=a.seed, dtype=a.dtype)
        harness._sync(self.device)
        print(f"[stream] built the {a.model} pipeline (SEEDED RANDOM WEIGHTS) on {self.device} in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        engine = None
        for variant in wanted:
            quant = variant.endswith("quant")
            if engine is None or (quant and engine.backend == "bf16"):
                engine = Engine(pipe, backend=a.quant_backend if quant else "bf16", device=self.device).load()
            if "fused-graphs" in variant:
                reason = self.fuse(pipe)
                if reason:
                    for scene in SCENES:
                        for size in a.sizes:
                            self.add(dict(bench="stream", variant=variant, model=a.model, scene=scene, size=size,
                                          steps=a.steps, status=f"unavailable: {reason}"))
                    continue
            for size in a.sizes:
                for scene in SCENES:
                    self.measure(engine, variant, scene, size)

    def fuse(self, pipe) -> str | None:
        """The fused block path and CUDA graphs on the quantized transformer; the reason if not."""
        if self.device.type != "cuda":
            return "CUDA graphs need CUDA"
        from qpipeline.blocks import fuse_model
        from qpipeline.graphs import enable_cuda_graphs

        report = fuse_model(pipe.transformer)
        if report.kept:
            return f"blocks not fused: {report.kept[0][1]}"
        enable_cuda_graphs(pipe.transformer, max_shapes=2 * self.args.steps)
        return None


def plot(rows, path, env):
    ok = [r for r in rows if r.get("status") == "ok" and r.get("fps")]

    def draw(axes):
        labels = [f"{r['variant']} {r['scene']} {r['size']}" for r in ok]
        axes[0].barh(labels, [r["fps"] for r in ok], color="tab:blue")
        axes[0].set_xlabel("frames / s")
        axes[1].barh(labels, [r["latency_p95_ms"] or 0 for r in ok], color="tab:orange")
        axes[1].set_xlabel("p95 latency, ms")
        for ax in axes:
            ax.tick_params(axis="y", labelsize=6)
            ax.grid(axis="x", alpha=0.3)

    title = f"stream {ok[0]['model'] if ok else ''} {env['device_name']}, torch {env['torch']}"
    return harness.save_plot(path, draw, title=title, ncols=2, nplots=2, size=(6.0, 0.3 * max(len(ok), 4) + 1))


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/stream")
    p.add_argument("--quick", action="store_true", help="tiny pipeline on the CPU, 32^2, 4 frames, no warm-up (CI)")
    p.add_argument("--device", default=None)
    p.add_argument("--model", choices=("full", "tiny"), default=None, help="default full (tiny with --quick)")
    p.add_argument("--variants", default=None, help=f"comma list (default all): {','.join(VARIANTS)}")
    p.add_argument("--sizes", default=None, help="frame sides, comma list (default 256,384,512)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0, help="how long the camera runs per run (default 8)")
    p.add_argument("--frames", type=int, default=None, help="frames the camera sends per run (default: --seconds "
                   "x --fps; 4 with --quick)")
    p.add_argument("--fps", type=float, default=30.0, help="camera frame rate (default 30)")
    p.add_argument("--vlm-every", type=int, default=8, help="VLM embedding refresh period with reuse (default 8)")
    p.add_argument("--vlm-threshold", type=float, default=0.95,
                   help="with reuse, also refresh when the frame's similarity to the encoded one drops below "
                        "this (default 0.95, the editor's; 0: only every --vlm-every frames)")
    p.add_argument("--quality-frames", type=int, default=None, help="frames of the reuse quality run (default 16)")
    p.add_argument("--warmup", type=int, default=None, help="untimed frames first per run (default steps + 1)")
    p.add_argument("--quant-backend", default=None,
                   help="the transformer's backend for *-quant (default fp8-triton on CUDA, what the engine's "
                        "'auto' picks there; int8-torch on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    q = args.quick
    args.model = args.model or ("tiny" if q else "full")
    args.variants = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        print(f"error: unknown variants {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    args.sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([32] if q else [256, 384, 512])
    if any(s % 16 for s in args.sizes):
        print(f"error: --sizes must be multiples of 16 (VAE /8 x patch 2), got {args.sizes}", file=sys.stderr)
        return 2
    if args.seconds <= 0 or args.fps <= 0:
        print("error: --seconds and --fps must be > 0", file=sys.stderr)
        return 2
    args.frames = args.frames or (4 if q else max(2, round(args.seconds * args.fps)))
    args.quality_frames = args.quality_frames if args.quality_frames is not None else (3 if q else 16)
    args.warmup = args.warmup if args.warmup is not None else (0 if q else args.steps + 1)
    if q and args.device is None:
        args.device = "cpu"
    device = torch.device(args.device or harness.default_device())
    cpu = device.type == "cpu"
    # bf16 on the GPU; float32 on the CPU, where bf16 conv3d (the VAE) is ~4x slower
    args.dtype = torch.float32 if cpu else torch.bfloat16
    if args.quant_backend is None:  # the CPU has int8 GEMMs; fp8 only on sm89+
        args.quant_backend = "int8-torch" if cpu else "fp8-triton"
    args.device = str(device)
    state = {}

    def run(args, rows):
        r = state["run"] = Run(args, rows)
        print(f"[stream] {r.env['device_name']}  torch {r.env['torch']}  commit {r.env['git_commit']}  "
              f"{args.model} model  sizes {args.sizes}  {args.steps} steps  {args.frames} frames at "
              f"{args.fps:g} fps", flush=True)
        r.run()

    rows, interrupted = harness.collect_rows(run, args, "stream")
    env = state["run"].env if "run" in state else harness.environment(device)
    paths = harness.write_results(args.out, "stream", rows, env, COLUMNS)
    paths["png"] = plot(rows, f"{args.out}/stream.png", env)
    print(f"[stream] wrote {', '.join(paths.values())}", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
