"""Seconds per edited image: a full-size Qwen-Image-Edit pipeline, end to end, per variant.

    python -m benchmarks.pipeline --variants diffusers-bf16,engine-bf16,engine-fp8 --images 1 --steps 8 \\
        --cfg 1 --out out/pipeline                                                       # GPU
    python -m benchmarks.pipeline --quick --out out/pipeline                             # CPU (CI)

The pipeline is ``diffusers.QwenImageEditPlusPipeline`` built on the device from configs written
here, with SEEDED RANDOM WEIGHTS (nothing is downloaded; image quality means nothing, speed and
memory are those of the real model): the 60-block Qwen-Image transformer (~41 GB bf16), the
Qwen2.5-VL-7B text encoder with its vision tower (~16.6 GB bf16), the Qwen-Image VAE and the
flow-match scheduler. Tokenizer: a byte-level BPE with no merges plus the Qwen chat special tokens
(every byte is a token, so a prompt is ~4x longer in tokens than with the real vocabulary:
``text_tokens`` in each row says how many the transformer saw). Every weight is created on the
device in bf16 (``torch.device`` context + default dtype): no float32 or CPU copy exists.

Variants (run in this order whatever order they are given in, since quantizing is in place and
one built pipeline serves them all):
    diffusers-bf16           the plain pipeline call, bf16 (baseline of ``speedup_vs_diffusers``)
    engine-bf16              Engine around the same modules (per-stage timings)
    engine-bf16-batched-cfg  + cond/uncond in one batch-2 forward (cfg > 1 only)
    engine-bf16-cache        + embedding cache (a fill call first; the timed calls hit)
    engine-fp8               transformer quantized in place (--quant-backend, w8a8-fp8), text
                             encoder int8 weight-only (--text-encoder-backend: W8A8 or bf16)
    engine-fp8-batched-cfg, engine-fp8-cache
    checkpoint-load          save_quantized of the fp8 transformer, files read once (page cache),
                             then load_quantized timed, with and without sha256 verification
    engine-fp8-24gb          the 24 GB mode: fp8 + int8 text encoder + model CPU offload
    engine-fp8-fused, engine-fp8-fused-batched-cfg, engine-fp8-fused-graphs
                             the fused block path (qpipeline.blocks), + batched CFG, + CUDA graphs

Per (variant, images, steps, cfg): ``--warmup`` untimed calls, then ``--reps`` timed calls;
cells are medians over the reps; ``step_ms`` lists the last rep's steps. ``peak_gb`` is the
allocator's peak over the timed calls (``torch.cuda.max_memory_allocated``; add ~0.5-1 GB of
CUDA context for a card's limit), ``reserved_gb`` the caching allocator's peak reservation.
``psnr_vs_bf16``: the image against engine-bf16's for the same configuration and seed.
Rows are written after each measurement (CSV + JSON), so a stopped run keeps what it finished;
SIGINT is handled as in the other benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from . import harness

COLUMNS = [
    "bench", "variant", "status", "model", "height", "width", "n_images", "steps", "cfg", "reps",
    "s_per_image", "total_ms", "encode_ms", "vae_encode_ms", "denoise_ms", "step_ms_median", "step_ms",
    "decode_ms", "other_ms", "speedup_vs_diffusers", "denoise_speedup_vs_bf16", "peak_gb", "reserved_gb",
    "base_gb", "psnr_vs_bf16", "image_std", "text_tokens", "image_tokens", "cache_hits", "batched_cfg_calls",
    "load_s", "verify", "checkpoint_gb", "build_s", "quantize_s", "note",
]
VARIANTS = ["diffusers-bf16", "engine-bf16", "engine-bf16-batched-cfg", "engine-bf16-cache", "engine-fp8",
            "engine-fp8-batched-cfg", "engine-fp8-cache", "checkpoint-load", "engine-fp8-24gb",
            # last: they rewire the shared transformer (fused blocks, then graphs over them)
            "engine-fp8-fused", "engine-fp8-fused-batched-cfg", "engine-fp8-fused-graphs"]
PROMPT = "make the sky stormy and add a red umbrella"

# ---------------------------------------------------------------------------------------------
# configs (written here; nothing is read from a hub)

# Qwen2.5-VL-7B-Instruct, text model and vision tower. Token ids come from the tokenizer below.
QWEN25_VL_7B_TEXT = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
    rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False,
    rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
)
QWEN25_VL_7B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, out_hidden_size=3584,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu",
)
# Qwen-Image's flow-match scheduler: dynamic (resolution-dependent) shift, exponential time shift.
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
)
# The CPU/CI model: the tiny widths of tests/tiny_pipeline.py.
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, rope_theta=1000000.0,
                 rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})
TINY_VISION = dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
TINY_VAE = dict(base_dim=24, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
                latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def build_tokenizer():
    """Byte-level BPE with no merges (256 byte tokens + the chat special tokens), in memory."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=SPECIAL_TOKENS[1:], model_max_length=4096)


def build_processor(tokenizer, tiny: bool):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(Qwen2VLProcessor):
        # Qwen2VLProcessor without its video processor (which needs torchvision); the image path
        # is Qwen2VLProcessor's own. Same as tests/tiny_pipeline.py.
        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, **kwargs)

    # Full size: the image processor's defaults (patch 14, merge 2, 56^2 .. 28^2*1280 px), which are
    # Qwen2.5-VL's; a 384^2 condition image becomes 28x28 patches -> 196 tokens.
    ip = (Qwen2VLImageProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56}) if tiny
          else Qwen2VLImageProcessor())
    return ImageOnlyProcessor(image_processor=ip, tokenizer=tokenizer)


@contextlib.contextmanager
def _on_device_in(dtype, device, seed):
    device = torch.device(device)
    fork = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                yield
        finally:
            torch.set_default_dtype(old)


@torch.no_grad()
def build_text_encoder(model: str, tokenizer, device, seed: int = 0, dtype=torch.bfloat16):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tiny = model == "tiny"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text, vision = (TINY_TEXT, TINY_VISION) if tiny else (QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION)
    vocab = len(tokenizer) if tiny else text["vocab_size"]
    assert vocab >= len(tokenizer)  # every id the tokenizer emits has an embedding row
    config = Qwen2_5_VLConfig(
        text_config={**text, "vocab_size": vocab, "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"]}, vision_config=vision, hidden_size=text["hidden_size"],
        vocab_size=vocab, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with _on_device_in(dtype, device, seed):
        return Qwen2_5_VLForConditionalGeneration(config).eval().requires_grad_(False)


@torch.no_grad()
def build_pipeline(model: str, device, seed: int = 0, dtype=torch.bfloat16):
    """``model``: "full" (the real sizes) or "tiny". Seeded random weights, made on ``device``."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    from qpipeline.demo import build_demo_transformer

    tiny = model == "tiny"
    tokenizer = build_tokenizer()
    if tiny:
        transformer = build_demo_transformer("tiny", seed=seed, dtype=dtype, device=device, in_channels=16,
                                             out_channels=4, joint_attention_dim=16)
    else:
        transformer = build_demo_transformer("full-width", num_layers=60, seed=seed, dtype=dtype, device=device)
    text_encoder = build_text_encoder(model, tokenizer, device, seed + 1, dtype)
    with _on_device_in(dtype, device, seed + 2):
        vae = AutoencoderKLQwenImage(**(TINY_VAE if tiny else {})).eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(**({} if tiny else QWEN_IMAGE_SCHEDULER))
    pipe = QwenImageEditPlusPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder,
                                     tokenizer=tokenizer, processor=build_processor(tokenizer, tiny),
                                     scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def reference_pixels(pixels: int | None):
    """The edit pipeline resizes each input image to ``VAE_IMAGE_SIZE`` px (1024^2) for the VAE;
    ``--reference-pixels`` lowers it (CPU runs, small-token studies). None: unchanged."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    old = edit_plus.VAE_IMAGE_SIZE
    if pixels:
        edit_plus.VAE_IMAGE_SIZE = pixels
    try:
        yield
    finally:
        edit_plus.VAE_IMAGE_SIZE = old


def input_images(n: int, size: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)  # seeded noise: never blank
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# measurement


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device):
    harness._sync(device)


def _psnr(a, b):
    import numpy as np

    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


class Run:
    """One process: one built pipeline, the variants in order, rows written as they come."""

    def __init__(self, args, rows):
        self.args, self.rows = args, rows
        self.device = torch.device(args.device or harness.default_device())
        self.env = harness.environment(self.device)
        self.pipe = None
        self.bf16_images: dict = {}
        self.common = dict(bench="pipeline", model=args.model, height=args.size, width=args.size)

    def add(self, row):
        self.rows.append(row)
        _finish(self.rows)
        harness.write_results(self.args.out, "pipeline", self.rows, self.env, COLUMNS)
        msg = row["status"] if row["status"] != "ok" else (
            f"{row.get('s_per_image', 0) or 0:.3f} s/image  peak {row.get('peak_gb') or 0:.2f} GB"
            + (f"  load {row['load_s']:.2f} s" if row.get("load_s") else ""))
        cfg = f"{row.get('n_images')} img {row.get('steps')} steps cfg {row.get('cfg')}" if row.get("steps") else ""
        print(f"[pipeline] {row['variant']:<24} {cfg:<24} {msg}", flush=True)

    def configs(self):
        for n in self.args.images:
            for steps in self.args.steps:
                for cfg in self.args.cfg:
                    yield n, steps, cfg

    def build(self):
        t0 = time.perf_counter()
        self.pipe = build_pipeline(self.args.model, self.device, seed=self.args.seed)
        _sync(self.device)
        self.build_s = time.perf_counter() - t0
        gb = harness.module_bytes(self.pipe.transformer) / 1e9, harness.module_bytes(self.pipe.text_encoder) / 1e9
        print(f"[pipeline] built the {self.args.model} pipeline (SEEDED RANDOM WEIGHTS) on {self.device} in "
              f"{self.build_s:.1f} s: transformer {gb[0]:.1f} GB, text encoder {gb[1]:.1f} GB", flush=True)

    def measure(self, variant, call, n, steps, cfg, *, engine=None, fill=False):
        row = dict(self.common, variant=variant, n_images=n, steps=steps, cfg=cfg)
        images = input_images(n, self.args.input_size, seed=self.args.seed)
        kw = dict(prompt=PROMPT, num_steps=steps, true_cfg_scale=cfg, seed=self.args.seed, height=self.args.size,
                  width=self.args.size)
        try:
            for _ in range(self.args.warmup + (1 if fill else 0)):
                call(images, **kw)
            _free(self.device)
            totals, timings, out = [], [], None
            with harness.PeakMemory(self.device) as pm:
                for _ in range(self.args.reps):
                    _sync(self.device)
                    t0 = time.perf_counter()
                    out = call(images, **kw)
                    _sync(self.device)
                    totals.append(time.perf_counter() - t0)
                    if engine is not None:
                        timings.append(engine.last_timings)
            row.update(status="ok", reps=len(totals), s_per_image=statistics.median(totals))
            if self.device.type == "cuda":
                row.update(peak_gb=pm.peak / 1e9, base_gb=pm.base / 1e9,
                           reserved_gb=torch.cuda.max_memory_reserved(self.device) / 1e9)
            else:
                row.update(peak_gb=pm.peak / 1e9, base_gb=pm.base / 1e9, note=f"CPU memory: {pm.method}")
            if timings:
                med = lambda k: statistics.median(t[k] for t in timings)  # noqa: E731
                last = timings[-1]
                row.update({k: med(k) for k in ("total_ms", "encode_ms", "vae_encode_ms", "denoise_ms", "decode_ms",
                                                "other_ms")})
                row.update(step_ms_median=statistics.median(last["step_ms"]) if last["step_ms"] else None,
                           step_ms=";".join(f"{s:.1f}" for s in last["step_ms"]), text_tokens=last["text_tokens"],
                           image_tokens=last["image_tokens"], cache_hits=last["cache_hits"],
                           batched_cfg_calls=last.get("batched_cfg_calls"))
            key = (n, steps, cfg)
            row["image_std"] = float(out.std())
            if variant == "engine-bf16":
                self.bf16_images[key] = out
            if key in self.bf16_images:
                row["psnr_vs_bf16"] = _psnr(out, self.bf16_images[key])
        except torch.cuda.OutOfMemoryError as exc:
            row["status"] = harness.fmt_status(exc)
            _free(self.device)
        except Exception as exc:
            row["status"] = harness.fmt_status(exc)
        self.add(row)

    # --- variants -----------------------------------------------------------------------------

    def run(self):
        from qpipeline.engine import Engine

        wanted = [v for v in VARIANTS if v in self.args.variants]
        self.build()
        quantized = False
        for variant in wanted:
            fp8 = "fp8" in variant or variant == "checkpoint-load"
            if fp8 and not quantized:
                t0 = time.perf_counter()
                self.engine_fp8 = Engine(self.pipe, backend=self.args.quant_backend, device=self.device,
                                         quantize_text_encoder=self._te_backend()).load()
                _free(self.device)
                self.quantize_s = time.perf_counter() - t0
                quantized = True
            if variant == "checkpoint-load":
                self.checkpoint_load()
                continue
            if variant == "diffusers-bf16":
                call = self.diffusers_call
                engine = None
            else:
                opts = dict(batched_cfg=variant.endswith("batched-cfg"), embedding_cache=variant.endswith("cache"),
                            offload=variant.endswith("24gb"), fuse="fused" in variant,
                            cuda_graphs=variant.endswith("graphs"))
                backend = self.args.quant_backend if fp8 else "bf16"
                try:
                    engine = Engine(self.pipe, backend=backend, device=self.device,
                                    quantize_text_encoder=self._te_backend() if fp8 else False,
                                    **opts).load()
                except Exception as exc:  # e.g. CUDA graphs on a CPU: the variant's row says why
                    self.add(dict(self.common, variant=variant, status=harness.fmt_status(exc)))
                    continue
                call = engine.generate
            for n, steps, cfg in self.configs():
                if variant.endswith("batched-cfg") and cfg <= 1:
                    self.add(dict(self.common, variant=variant, n_images=n, steps=steps, cfg=cfg,
                                  status="skipped: cfg 1 runs one transformer pass per step, nothing to batch"))
                    continue
                self.measure(variant, lambda imgs, **kw: call(imgs, output_type="np", **kw), n, steps, cfg,
                             engine=engine, fill=variant.endswith("cache"))
                if self.rows[-1]["status"] == "ok":
                    self.rows[-1].update(build_s=self.build_s, quantize_s=getattr(self, "quantize_s", None))
                    if fp8:
                        te = f"text encoder {self._te_backend() or 'bf16'}"
                        self.rows[-1]["note"] = "; ".join(filter(None, [self.rows[-1].get("note"), te]))

    def _te_backend(self):
        return False if self.args.text_encoder_backend == "none" else self.args.text_encoder_backend

    def diffusers_call(self, images, *, prompt, num_steps, true_cfg_scale, seed, height, width, output_type):
        extra = {"negative_prompt": " "} if true_cfg_scale > 1 else {}
        with torch.inference_mode():
            return self.pipe(image=images, prompt=prompt, num_inference_steps=num_steps, true_cfg_scale=true_cfg_scale,
                             height=height, width=width, generator=torch.Generator("cpu").manual_seed(seed),
                             output_type=output_type, **extra).images[0]

    def checkpoint_load(self):
        from qpipeline import load_quantized, save_quantized

        base = dict(self.common, variant="checkpoint-load")
        tmp = tempfile.mkdtemp(prefix="qk-pipeline-ckpt-", dir=self.args.checkpoint_dir)
        try:
            ckpt = os.path.join(tmp, "transformer")
            t0 = time.perf_counter()
            save_quantized(self.pipe.transformer, ckpt)
            save_s = time.perf_counter() - t0
            size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
            for f in sorted(os.listdir(ckpt)):  # read once: the timed loads come from the page cache
                with open(os.path.join(ckpt, f), "rb") as fh:
                    while fh.read(64 << 20):
                        pass
            for verify in (False, True):
                row = dict(base, verify=verify, checkpoint_gb=size / 1e9, note=f"save {save_s:.1f} s")
                try:
                    _free(self.device)
                    _sync(self.device)
                    t0 = time.perf_counter()
                    model = load_quantized(ckpt, device=self.device, backend=self.args.quant_backend, verify=verify)
                    _sync(self.device)
                    row.update(status="ok", load_s=time.perf_counter() - t0)
                    del model
                except Exception as exc:
                    row["status"] = harness.fmt_status(exc)
                _free(self.device)
                self.add(row)
        except Exception as exc:
            self.add(dict(base, status=harness.fmt_status(exc)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _finish(rows):
    """speedup_vs_diffusers (s/image) and denoise_speedup_vs_bf16 (engine-bf16's denoise stage),
    per configuration."""
    key = lambda r: (r.get("n_images"), r.get("steps"), r.get("cfg"))  # noqa: E731
    ok = [r for r in rows if r.get("status") == "ok" and r.get("s_per_image")]
    base = {key(r): r["s_per_image"] for r in ok if r["variant"] == "diffusers-bf16"}
    den = {key(r): r["denoise_ms"] for r in ok if r["variant"] == "engine-bf16" and r.get("denoise_ms")}
    for r in ok:
        if key(r) in base:
            r["speedup_vs_diffusers"] = base[key(r)] / r["s_per_image"]
        if key(r) in den and r.get("denoise_ms"):
            r["denoise_speedup_vs_bf16"] = den[key(r)] / r["denoise_ms"]


def plot(rows, path, env):
    ok = [r for r in rows if r.get("status") == "ok" and r.get("s_per_image")]

    def draw(axes):
        labels = [f"{r['variant']} {r['n_images']}img {r['steps']}st cfg{r['cfg']:g}" for r in ok]
        axes[0].barh(labels, [r["s_per_image"] for r in ok], color="tab:blue")
        axes[0].set_xlabel("s / image (median)")
        axes[1].barh(labels, [r.get("peak_gb") or 0 for r in ok], color="tab:orange")
        axes[1].set_xlabel("peak GB")
        for ax in axes:
            ax.tick_params(axis="y", labelsize=6)
            ax.grid(axis="x", alpha=0.3)

    title = f"pipeline {ok[0]['model'] if ok else ''} {env['device_name']}, torch {env['torch']}"
    return harness.save_plot(path, draw, title=title, ncols=2, nplots=2, size=(6.0, 0.3 * max(len(ok), 4) + 1))


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def _floats(s):
    return [float(x) for x in s.split(",") if x]


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/pipeline")
    p.add_argument("--quick", action="store_true", help="tiny pipeline on the CPU, 32^2, 2 steps, cfg 4 (CI)")
    p.add_argument("--device", default=None)
    p.add_argument("--model", choices=("full", "tiny"), default=None, help="default full (tiny with --quick)")
    p.add_argument("--variants", default=None, help=f"comma list (default all): {','.join(VARIANTS)}")
    p.add_argument("--images", type=_ints, default=None, help="input images per edit, comma list (default 1,3)")
    p.add_argument("--steps", type=_ints, default=None, help="denoising steps, comma list (default 4,8)")
    p.add_argument("--cfg", type=_floats, default=None, help="true_cfg_scale values (default 1,4)")
    p.add_argument("--size", type=int, default=None, help="output height = width in px (default 1024)")
    p.add_argument("--input-size", type=int, default=None, help="input image side in px (default 1024)")
    p.add_argument("--reference-pixels", type=int, default=None,
                   help="the pipeline's VAE resize target per input image (default: its 1024*1024)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per configuration (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1)")
    p.add_argument("--quant-backend", default="fp8-scaled-mm", help="the transformer's w8a8 backend")
    p.add_argument("--text-encoder-backend", default="int8-layerwise",
                   help="int8-layerwise, fp8-layerwise (weight-only), a W8A8 backend such as fp8-scaled-mm (not with "
                        "24gb), or none (bf16)")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoint-load writes (default: the temp dir)")
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
    args.images = args.images or ([1] if q else [1, 3])
    args.steps = args.steps or ([2] if q else [4, 8])
    args.cfg = args.cfg or ([4.0] if q else [1.0, 4.0])
    args.size = args.size or (32 if q else 1024)
    args.input_size = args.input_size or (32 if q else 1024)
    args.reference_pixels = args.reference_pixels or (64 * 64 if q else None)
    args.reps = args.reps or (1 if q else 2)
    args.warmup = args.warmup if args.warmup is not None else (0 if q else 1)
    if args.size % 16:
        print(f"error: --size must be a multiple of 16 (VAE /8 x patch 2), got {args.size}", file=sys.stderr)
        return 2
    device = torch.device(args.device or harness.default_device())
    args.device = str(device)
    rows: list[dict] = []
    state = {}

    def run(args, rows):
        r = state["run"] = Run(args, rows)
        print(f"[pipeline] {r.env['device_name']}  torch {r.env['torch']}  commit {r.env['git_commit']}  "
              f"{args.model} model  {args.size}^2  images {args.images} steps {args.steps} cfg {args.cfg}", flush=True)
        with reference_pixels(args.reference_pixels):
            r.run()

    rows, interrupted = harness.collect_rows(run, args, "pipeline", finish=_finish)
    env = state["run"].env if "run" in state else harness.environment(device)
    paths = harness.write_results(args.out, "pipeline", rows, env, COLUMNS)
    paths["png"] = plot(rows, f"{args.out}/pipeline.png", env)
    print(f"[pipeline] wrote {', '.join(paths.values())}", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
