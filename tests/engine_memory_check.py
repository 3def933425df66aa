"""Run in a fresh process by ``test_engine_lifecycle``: the resident memory of this process before
``Engine.load()``, loaded (after one generate), and after ``unload()``. Prints one JSON line.

    python -m tests.engine_memory_check PIPELINE_DIR [--keep-reference]

``--keep-reference`` holds the pipeline object across ``unload()`` (what a leaking engine does), so
the test can show its tolerance catches a leak.

Before the first measurement the process loads, runs and unloads the tiny demo pipeline once: the
modules ``load()`` imports lazily and the kernels' first-call set-up stay for the life of the
process whatever the model (46 MB of them, measured: a first cycle on the widened pipeline ended
46 MB over its start, the second and third 4 MB over theirs). Code is not the engine's memory; the
weights and activations of the model being measured are, and they were never loaded before.
"""

import gc
import json
import os
import sys


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv) -> int:
    import diffusers  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from diffusers import QwenImageEditPlusPipeline  # noqa: F401
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401

    import qkernels.backends  # noqa: F401
    from qpipeline.demo_pipeline import reference_images, small_vae_references
    from qpipeline.engine import Engine, _trim_heap

    import tempfile

    from qpipeline.demo_pipeline import demo_engine

    folder, keep = argv[0], "--keep-reference" in argv
    images = reference_images(1, size=32, seed=1)
    with tempfile.TemporaryDirectory() as tiny, small_vae_references():
        warm = demo_engine(tiny, device="cpu")
        warm.generate(images, "p", num_steps=1, height=32, width=32)
        warm.unload()
        del warm
    engine = Engine(folder, device="cpu", dtype=torch.float32)
    gc.collect()
    _trim_heap()
    before = rss_bytes()
    with small_vae_references():
        engine.load()
        engine.generate(images, "p", num_steps=2, height=32, width=32)
        loaded = rss_bytes()
        held = engine.pipeline if keep else None
        engine.unload()
    after = rss_bytes()
    print(json.dumps(dict(before=before, loaded=loaded, after=after, held=held is not None)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
