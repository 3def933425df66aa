"""Probe (run 10, call 4): where a stream tick's time goes on the GPU. The fused + graphs stream at
512^2, 2 steps, stream batch, the moving camera, inline (no camera thread), with the device
synchronized before and after every stage so each stage's time is its own GPU + host time,
serialized (the real stream overlaps them on three CUDA streams; this says how much work each is).

    python benchmarks/results/h200/run10/probe-stream-stages.py OUT.json
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from benchmarks.pipeline import PROMPT, build_pipeline  # noqa: E402
from benchmarks.stream import camera_frame  # noqa: E402
from qpipeline import stream as st  # noqa: E402
from qpipeline.blocks import fuse_model  # noqa: E402
from qpipeline.engine import Engine  # noqa: E402
from qpipeline.graphs import enable_cuda_graphs  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 else "probe-stream-stages.json"
dev = torch.device("cuda")
pipe = build_pipeline("full", dev, seed=0)
engine = Engine(pipe, backend="fp8-scaled-mm", device=dev).load()
fuse_model(pipe.transformer)
enable_cuda_graphs(pipe.transformer, max_shapes=4)

times: dict = {}


@contextlib.contextmanager
def timed(self, stage):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        torch.cuda.synchronize()
        times.setdefault(stage, []).append(1e3 * (time.perf_counter() - t0))


st.StreamEditor._timed = timed
result = {}
for every in (1, 8):
    ed = st.StreamEditor(engine, PROMPT, steps=2, size=512, seed=0, output="np", threshold=None, vlm_every=every,
                         vlm_threshold=0.0 if every > 1 else 0.95, batch=True)
    for t in range(4):  # warm-up: graphs for 1 and 2 rows, autotuning
        ed.process(camera_frame("moving", 10 * t, 512))
    times.clear()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 16
    for t in range(n):
        ed.process(camera_frame("moving", 10 * (t + 4), 512))
    torch.cuda.synchronize()
    wall = 1e3 * (time.perf_counter() - t0) / n
    row = {k: dict(mean_ms=statistics.mean(v), median_ms=statistics.median(v), calls=len(v)) for k, v in times.items()}
    row["tick_ms_serialized"] = wall
    row["per_tick_sum_ms"] = sum(sum(v) for v in times.values()) / n
    result[f"vlm_every_{every}"] = row
    print(every, json.dumps(row, indent=1), flush=True)
    ed.flush()
json.dump(result, open(OUT, "w"), indent=1)
