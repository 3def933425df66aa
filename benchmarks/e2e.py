"""End-to-end: forward time and peak memory of a Qwen-Image-architecture transformer, bf16 against
each backend and peer.

    python -m benchmarks.e2e --blocks 8 --height 1024 --width 1024 --reference --out out/e2e  # GPU
    python -m benchmarks.e2e --quick --out out/e2e                                            # CPU

The transformer is ``qpipeline.demo.build_demo_transformer`` (seeded random weights, real widths
with ``--size full-width``); a variant is built fresh, quantized in place one Linear at a time
(peak: the model plus one bf16 layer), timed, then freed before the next. ``peak_mem_bytes`` is
the timed forwards' peak; ``first_call_peak_bytes`` the first call's (compiles, tuning). Only the
Linears of ``transformer_blocks`` are quantized (embedders, norm_out and proj_out stay bf16), except for
diffusers' ``enable_layerwise_casting``, which picks its own layers.

Tokens: a HxW image is (H/16)x(W/16) latent patches (VAE /8, patch 2): 1024x1024 -> 4096;
``--reference`` adds one reference image of the same size, as the edit pipeline does; plus
``--text-tokens``. 1024x1024 + reference + 208 text = 8,400 tokens.

``ms_60_blocks_extrapolated`` and ``weight_gb_60_blocks_extrapolated`` scale the measured
per-block numbers to the real 60 blocks: extrapolated, not measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
import os
import tempfile
import time

import torch

from . import harness
from .variants import all_variants

COLUMNS = [
    "bench", "variant", "family", "format", "status", "size", "blocks", "tokens", "height", "width", "reference",
    "median_ms", "p20_ms", "p80_ms", "spread_ms", "reps", "speedup_vs_bf16", "baseline", "first_call_s",
    "build_s", "quantize_s", "weight_bytes", "block_weight_bytes", "peak_mem_bytes", "peak_minus_base_bytes",
    "first_call_peak_bytes", "mem_method", "rel_error_vs_bf16", "ms_60_blocks_extrapolated",
    "weight_gb_60_blocks_extrapolated", "load_s", "load_status", "gpu_ms", "share_gemm", "share_attention",
    "share_norm_fused", "share_act_quant", "share_other", "note",
]

# GPU kernel time by kind (--profile), from the kernel names the profiler reports. Checked in this
# order: a name matching several (e.g. a GEMM with "quant" in it) counts in the first.
_KINDS = (
    ("attention", ("attention", "attn", "fmha", "flash", "cudnn", "sdpa")),
    ("norm_fused", ("layernorm_modulate_quant", "qk_norm_rope")),  # the fused norm/modulate/RoPE kernels
    ("act_quant", ("quantize",)),  # separate activation-quant passes
    ("gemm", ("gemm", "gemv", "_mm", "matmul", "cutlass", "sm90_xmma", "nvjet", "cublas", "wgmma")),
)


def kernel_shares(fn, device) -> dict:
    """One forward under torch.profiler: its total GPU kernel time and the share of each kind
    (GEMM, attention, the fused norm + modulate + quant and q/k norm + RoPE kernels, separate
    activation-quant passes, other)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        harness._sync(device)
    totals = dict.fromkeys(["gemm", "attention", "norm_fused", "act_quant", "other"], 0.0)
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if not t or e.key.startswith(("cuda", "aten::", "Memcpy", "Memset")) and "kernel" not in e.key.lower():
            continue
        name = e.key.lower()
        kind = next((k for k, keys in _KINDS if any(w in name for w in keys)), "other")
        totals[kind] += t
    total = sum(totals.values())
    out = {"gpu_ms": total / 1e3}
    out.update({f"share_{k}": (v / total if total else None) for k, v in totals.items()})
    return out
REAL_BLOCKS = 60


def _blocks_only(name, layer) -> bool:
    return name.startswith("transformer_blocks.")


def _checkpoint_api():
    """(save_quantized, load_quantized) from qpipeline, or (None, reason)."""
    try:
        qp = importlib.import_module("qpipeline")
    except ImportError as exc:
        return None, f"skipped: qpipeline not importable ({exc})"
    save, load = getattr(qp, "save_quantized", None), getattr(qp, "load_quantized", None)
    if save is None or load is None:
        return None, "skipped: qpipeline.save_quantized/load_quantized not in this checkout"
    return (save, load), ""


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tma_default():
    from qkernels.backends.triton_backends import FP8Triton

    return FP8Triton.TMA_MIN_M


TMA_DEFAULT = _tma_default()


def run(args, rows: list[dict] | None = None) -> list[dict]:
    from qpipeline.demo import build_demo_transformer, demo_inputs

    device = torch.device(args.device or harness.default_device())
    for side in (args.height, args.width):
        if side % 16:
            raise SystemExit(f"--height/--width must be multiples of 16 (VAE /8 x patch 2), got {side}")
    hw = (args.height // 16, args.width // 16)
    compile_peers = args.compile_peers if args.compile_peers is not None else device.type == "cuda"
    variants = all_variants(device, peers=not args.no_peers, compile_peers=compile_peers,
                            compile_ours=args.compile_ours, only=args.only.split(",") if args.only else None,
                            model_level=True)
    ckpt, ckpt_reason = _checkpoint_api()
    common = dict(bench="e2e", size=args.size, blocks=args.blocks, height=args.height, width=args.width,
                  reference=bool(args.reference))
    rows, y_ref = ([] if rows is None else rows), None
    for v in variants:
        row = dict(common, variant=v.name, family=v.family, format=v.format, note=v.note or None)
        if not v.available:
            rows.append(dict(row, status=v.status))
            print(f"[e2e] {v.name}: {v.status}", flush=True)
            continue
        model = None
        try:
            _free(device)
            from qkernels.backends.triton_backends import FP8Triton, _TritonW8A8

            FP8Triton.TMA_MIN_M = TMA_DEFAULT if v.tma_min_m == -1 else v.tma_min_m
            _TritonW8A8.REPLAY = v.replay
            t0 = time.perf_counter()
            model = build_demo_transformer(args.size, num_layers=args.blocks, device=device,
                                           **({"zero_cond_t": True} if args.zero_cond_t else {}))
            harness._sync(device)
            row["build_s"] = time.perf_counter() - t0
            inputs = demo_inputs(model, image_hw=hw, reference_hw=hw if args.reference else None,
                                 text_tokens=args.text_tokens)
            if not args.text_mask:  # what the edit pipeline sends when no prompt token is padding
                inputs["encoder_hidden_states_mask"] = None
            row["tokens"] = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
            t0 = time.perf_counter()
            fn = v.apply(model, _blocks_only, whole_model=True) if v.name != "bf16" else model
            harness._sync(device)
            row["quantize_s"] = time.perf_counter() - t0 if v.name != "bf16" else 0.0
            row["weight_bytes"] = harness.module_bytes(model)
            row["block_weight_bytes"] = harness.module_bytes(model.transformer_blocks) / args.blocks
            # The first call compiles, autotunes and records: its peak holds Triton's 256 MiB
            # L2-flush buffer whenever a GEMM shape is tuned for the first time in this process (so
            # whichever variant comes first paid it: runs 8 and 11 read it as ~0.26 GB of the
            # replay's). The steady forwards' peak is the one a user's step sees.
            with torch.no_grad(), harness.PeakMemory(device) as first:
                t0 = time.perf_counter()
                y = fn(**inputs)[0]
                harness._sync(device)
                row["first_call_s"] = time.perf_counter() - t0
            with torch.no_grad(), harness.PeakMemory(device) as pm:
                t = harness.bench(lambda: fn(**inputs), [()], device, use_do_bench=False, warmup=args.warmup,
                                  min_reps=args.reps, max_reps=args.reps, budget_s=0.0)
            row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, spread_ms=t.spread_ms, reps=t.n,
                       peak_mem_bytes=pm.peak, peak_minus_base_bytes=pm.peak - pm.base,
                       first_call_peak_bytes=first.peak, mem_method=pm.method)
            if args.profile and device.type == "cuda":
                with torch.no_grad():
                    row.update(kernel_shares(lambda: fn(**inputs), device))
            y = y.float().cpu()
            if v.name == "bf16":
                y_ref = y
            if y_ref is not None:
                row["rel_error_vs_bf16"] = harness.compare(y, y_ref)["rel_error"]
            nonblock = row["weight_bytes"] - row["block_weight_bytes"] * args.blocks
            row["ms_60_blocks_extrapolated"] = t.median_ms * REAL_BLOCKS / args.blocks
            row["weight_gb_60_blocks_extrapolated"] = (nonblock + row["block_weight_bytes"] * REAL_BLOCKS) / 1e9
            row["status"] = "ok"
            if args.no_load or v.fuse or v.tma_min_m != -1 or not v.replay:  # one load row per backend is enough
                row["load_status"] = "skipped: --no-load" if args.no_load else "skipped: timed on the plain variant"
            else:
                row.update(_load_time(ckpt, ckpt_reason, v, model, device))
        except Exception as exc:
            row["status"] = harness.fmt_status(exc)
        finally:
            del model
            fn = None
            _free(device)
        rows.append(row)
        if row["status"] == "ok":
            print(f"[e2e] {v.name:<28} {row['tokens']} tokens  {row['median_ms']:9.2f} ms  "
                  f"weights {row['weight_bytes'] / 1e9:6.2f} GB  peak {row['peak_mem_bytes'] / 1e9:6.2f} GB  "
                  f"first call {row['first_call_s']:.1f} s  rel.err {row.get('rel_error_vs_bf16', float('nan')):.2e}",
                  flush=True)
        else:
            print(f"[e2e] {v.name}: {row['status']}", flush=True)
    return rows  # speedups: main's collect_rows(finish=_speedups), interrupted or not


def _speedups(rows: list[dict]) -> None:
    base = {r["variant"]: r["median_ms"] for r in rows if r.get("status") == "ok" and r["variant"].startswith("bf16")}
    for r in rows:
        if r.get("status") != "ok":
            continue
        ref = "bf16+compile" if r["variant"].endswith("+compile") and "bf16+compile" in base else "bf16"
        if ref in base:
            r["speedup_vs_bf16"], r["baseline"] = base[ref] / r["median_ms"], ref


def _load_time(ckpt, reason, v, model, device) -> dict:
    if v.family != "qkernels" or v.compiled:
        return {"load_status": "skipped: checkpoints are timed for qkernels variants only"}
    if ckpt is None:
        return {"load_status": reason}
    save, load = ckpt
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_dir = os.path.join(tmp, "checkpoint")  # save_quantized refuses an existing folder
            save(model, ckpt_dir)
            harness._sync(device)
            t0 = time.perf_counter()
            loaded = load(ckpt_dir, device=device, backend=v.name)
            harness._sync(device)
            dt = time.perf_counter() - t0
            del loaded
        return {"load_s": dt, "load_status": "ok"}
    except Exception as exc:
        return {"load_status": harness.fmt_status(exc)}


def plot(rows: list[dict], path, env: dict) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]

    def draw(axes):
        names = [r["variant"] for r in ok]
        axes[0].barh(names, [r["median_ms"] for r in ok], color="tab:blue")
        axes[0].set_xlabel("forward ms (median)")
        axes[1].barh(names, [r["weight_bytes"] / 1e9 for r in ok], color="tab:gray", label="weights")
        axes[1].barh(names, [(r["peak_mem_bytes"] - r["weight_bytes"]) / 1e9 for r in ok],
                     left=[r["weight_bytes"] / 1e9 for r in ok], color="tab:orange", label="peak - weights")
        axes[1].set_xlabel("GB")
        axes[1].legend(fontsize=6)
        for ax in axes:
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="x", alpha=0.3)

    r0 = ok[0] if ok else {}
    title = (f"e2e {r0.get('size')} x{r0.get('blocks')} blocks, {r0.get('tokens')} tokens, {env['device_name']}, "
             f"torch {env['torch']}")
    return harness.save_plot(path, draw, title=title, ncols=2, nplots=2, size=(5.0, 0.35 * max(len(ok), 4) + 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench")
    p.add_argument("--quick", action="store_true", help="tiny config, 2 blocks, 128x128 (CPU/CI)")
    p.add_argument("--device", default=None)
    p.add_argument("--size", default=None, help="demo size: tiny, small, full-width (default full-width)")
    p.add_argument("--blocks", type=int, default=None, help="transformer blocks (default 8; 60 is the real model)")
    p.add_argument("--height", type=int, default=None, help="output image height in pixels (default 1024)")
    p.add_argument("--width", type=int, default=None, help="output image width in pixels (default 1024)")
    p.add_argument("--reference", action="store_true", help="add one reference image of the same size (edit)")
    p.add_argument("--text-tokens", type=int, default=None, help="default 208")
    p.add_argument("--text-mask", action="store_true", help="pass an all-ones text mask (the pipeline passes "
                   "none when no prompt token is padding; default: none)")
    p.add_argument("--profile", action="store_true", help="CUDA: one profiled forward per variant, GPU time by "
                   "kind (GEMM, attention, activation quant, other)")
    p.add_argument("--no-load", action="store_true", help="do not time a checkpoint save + load per variant")
    p.add_argument("--zero-cond-t", action="store_true", help="Edit-2511's per-token modulation (modulate_index)")
    p.add_argument("--reps", type=int, default=None, help="timed forwards (default 10; quick 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", default=None, help="comma list of variant names (bf16 always kept)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--compile-peers", dest="compile_peers", action="store_true", default=None,
                   help="add torch.compile'd torchao and bf16 (default: on for CUDA only)")
    p.add_argument("--no-compile-peers", dest="compile_peers", action="store_false")
    p.add_argument("--compile-ours", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    q = args.quick
    args.size = args.size or ("tiny" if q else "full-width")
    args.blocks = args.blocks or (2 if q else 8)
    args.height = args.height or (128 if q else 1024)
    args.width = args.width or (128 if q else 1024)
    args.text_tokens = args.text_tokens or (16 if q else 208)
    args.reps = args.reps or (3 if q else 10)
    if q:
        args.warmup = min(args.warmup, 1)
    device = torch.device(args.device or harness.default_device())
    env = harness.environment(device)
    print(f"[e2e] {env['device_name']}  torch {env['torch']}  commit {env['git_commit']}  size {args.size} "
          f"x{args.blocks} blocks  {args.height}x{args.width}{' + reference' if args.reference else ''}", flush=True)
    rows, interrupted = harness.collect_rows(run, args, "e2e", finish=_speedups)
    paths = harness.write_results(args.out, "e2e", rows, env, COLUMNS)
    paths["png"] = plot(rows, f"{args.out}/e2e.png", env)
    print(f"[e2e] wrote {', '.join(paths.values())}", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
