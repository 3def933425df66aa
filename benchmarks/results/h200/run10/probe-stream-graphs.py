"""Probe (run 10, call 5): does the stream's batch-2 forward replay its CUDA graph? Counts graph
captures, replays and eager (padded) runs of the graphed block loop over stream ticks, and what
the forward is given (text mask, its all-ones-ness, shapes).

    python benchmarks/results/h200/run10/probe-stream-graphs.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time

import torch

sys.path.insert(0, ".")
from benchmarks.pipeline import PROMPT, build_pipeline  # noqa: E402
from benchmarks.stream import camera_frame  # noqa: E402
from qpipeline import graphs  # noqa: E402
from qpipeline import stream as st  # noqa: E402
from qpipeline.blocks import fuse_model  # noqa: E402
from qpipeline.engine import Engine  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 else "probe-stream-graphs.json"
dev = torch.device("cuda")
pipe = build_pipeline("full", dev, seed=0)
engine = Engine(pipe, backend="fp8-scaled-mm", device=dev).load()
fuse_model(pipe.transformer)
graphs.enable_cuda_graphs(pipe.transformer, max_shapes=4)
counts = dict(captures=0, replays=0, eager=0)
seen = []
orig_init, orig_replay, orig_run = graphs._Graph.__init__, graphs._Graph.replay, graphs._run


def init(self, *a, **k):
    counts["captures"] += 1
    return orig_init(self, *a, **k)


def replay(self, *a, **k):
    counts["replays"] += 1
    return orig_replay(self, *a, **k)


def run(*a, **k):
    counts["eager"] += 1
    return orig_run(*a, **k)


graphs._Graph.__init__, graphs._Graph.replay, graphs._run = init, replay, run
orig_block_run = graphs.GraphedBlockList.run


def block_run(self, kwargs):
    m = kwargs.get("encoder_hidden_states_mask")
    jk = kwargs.get("joint_attention_kwargs")
    am = jk.get("attention_mask") if isinstance(jk, dict) else None
    seen.append(dict(hidden=list(kwargs["hidden_states"].shape), text=list(kwargs["encoder_hidden_states"].shape),
                     mask=None if m is None else [list(m.shape), str(m.dtype), bool(m.all())],
                     joint_mask=None if am is None else [list(am.shape), str(am.dtype), bool(am.all())],
                     key=repr(graphs._signature(graphs._without_all_ones_masks(kwargs)))[:400]))
    return orig_block_run(self, kwargs)


graphs.GraphedBlockList.run = block_run
ed = st.StreamEditor(engine, PROMPT, steps=2, size=512, seed=0, output="np", threshold=None, vlm_every=8,
                     vlm_threshold=0.0, batch=True)
ticks = []
for t in range(8):
    before = dict(counts)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ed.process(camera_frame("moving", 10 * t, 512))
    torch.cuda.synchronize()
    ticks.append(dict(t=t, ms=1e3 * (time.perf_counter() - t0), **{k: counts[k] - before[k] for k in counts}))
    print(ticks[-1], flush=True)
json.dump(dict(ticks=ticks, forwards=seen), open(OUT, "w"), indent=1)
for s in seen[-3:]:
    print(s, flush=True)
