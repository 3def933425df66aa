"""GEMM microbenchmark: every qkernels backend and the peers against bf16 ``F.linear`` on the
Linear shapes of Qwen-Image, plus activation quantization alone and the raw kernels.

    python -m benchmarks.gemm --out out/gemm            # full sweep (GPU-sized)
    python -m benchmarks.gemm --quick --out out/gemm    # CPU/CI-sized, ~1-2 minutes on 2 cores

Rows (``gemm.csv``): one per (variant, M, K, N). ``speedup_vs_bf16`` is against bf16 F.linear
at the same shape (compiled variants against ``bf16+compile`` when that was measured: see
``baseline``); ``rel_error_vs_bf16`` is ||y - y_bf16|| / ||y_bf16|| on the first input buffer.
Variants that cannot run here are one row each with their reason in ``status``.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from qkernels import ops
from qkernels.capabilities import fp8_gemm_reason

from . import harness
from .variants import all_variants

# (K, N) of Qwen-Image's Linears: attention q/k/v/out 3072->3072, MLP up 3072->12288 and down
# 12288->3072, adaLN modulation 3072->18432, text-stream input 3584->3072.
FULL_SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432), (3584, 3072)]
FULL_M = [1, 16, 256, 1024, 4096, 8192, 16384]
QUICK_SHAPES = [(3072, 3072), (1024, 4096)]
QUICK_M = [1, 17, 512]
TINY_SHAPES = [(256, 512)]
TINY_M = [1, 17, 64]

COLUMNS = [
    "bench", "variant", "family", "format", "status", "M", "K", "N", "median_ms", "p20_ms", "p80_ms",
    "spread_ms", "tflops", "peak_kind", "pct_of_peak", "speedup_vs_bf16", "baseline", "rel_error_vs_bf16",
    "gbps", "n_buffers", "note",
]


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        k, n = item.lower().split("x")
        out.append((int(k), int(n)))
    return out


def make_linear(k: int, n: int, device, dtype=torch.bfloat16, seed: int = 0) -> nn.Linear:
    g = torch.Generator(device="cpu").manual_seed(seed)
    lin = nn.Linear(k, n, bias=True, dtype=dtype, device=device)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * k**-0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin.requires_grad_(False)


def _raw_kernels(device: torch.device) -> list[tuple[str, str, str | None]]:
    """(name, peak kind, unavailable reason) of the bare GEMM kernels, no quantization around
    them: the ceiling each backend's epilogue and activation quantization eat into. The two
    Triton e4m3 kernels (fp8-triton's GEMM and the experimental persistent TMA one) side by side
    decide FP8Triton.TMA_MIN_M."""
    fp8 = fp8_gemm_reason(device)
    fp8_status = f"unavailable: {fp8}" if fp8 else None
    triton_status = fp8_status or (None if device.type == "cuda" else
                                   "unavailable: Triton on CPU is the interpreter (tests only), not benchmarked")
    tma_status = triton_status
    if tma_status is None and torch.cuda.get_device_capability(device)[0] < 9:
        tma_status = "unavailable: the TMA kernel needs Hopper (sm90+)"
    return [("raw-bf16-mm", "bf16", None), ("raw-int_mm", "int8", None),
            ("raw-scaled_mm-fp8", "fp8", fp8_status), ("raw-triton-fp8", "fp8", triton_status),
            ("raw-triton-fp8-tma", "fp8", tma_status)]


def run(args, rows: list[dict] | None = None) -> list[dict]:
    device = torch.device(args.device or harness.default_device())
    if args.tiny:
        shapes, ms = TINY_SHAPES, TINY_M
    elif args.quick:
        shapes, ms = QUICK_SHAPES, QUICK_M
    else:
        shapes, ms = FULL_SHAPES, FULL_M
    if args.shapes:
        shapes = _parse_shapes(args.shapes)
    if args.m:
        ms = [int(m) for m in args.m.split(",")]
    budget = args.budget if args.budget is not None else (0.15 if (args.quick or args.tiny) else 0.5)
    compile_peers = args.compile_peers if args.compile_peers is not None else device.type == "cuda"
    import torch._dynamo as dynamo

    limit = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(dynamo.config, limit, max(getattr(dynamo.config, limit), 4 * len(ms)))
    variants = all_variants(device, peers=not args.no_peers, compile_peers=compile_peers,
                            compile_ours=args.compile_ours, only=args.only.split(",") if args.only else None)

    rows = [] if rows is None else rows
    for v in variants:
        if not v.available:
            rows.append(dict(bench="gemm", variant=v.name, family=v.family, format=v.format, status=v.status))
            print(f"[gemm] {v.name}: {v.status}", flush=True)

    for k, n in shapes:
        lin = make_linear(k, n, device)
        # Fresh input buffers per M, shared by every variant so errors compare like for like.
        inputs: dict[int, list[torch.Tensor]] = {}
        g = torch.Generator(device="cpu").manual_seed(1000 + k + n)
        for m in ms:
            nbuf = harness.n_buffers_for(m * k * 2, device, max_buffers=3 if device.type == "cpu" else 8)
            inputs[m] = [torch.randn(m, k, generator=g).to(device, torch.bfloat16) for _ in range(nbuf)]
        refs = {m: F.linear(inputs[m][0], lin.weight, lin.bias) for m in ms}

        for v in variants:
            if not v.available:
                continue
            try:
                module = nn.Sequential(copy.deepcopy(lin))
                fn = v.apply(module)
                fn = fn if v.compiled else module[0]
            except Exception as exc:
                rows.append(dict(bench="gemm", variant=v.name, family=v.family, format=v.format, K=k, N=n,
                                 status=harness.fmt_status(exc)))
                print(f"[gemm] {v.name} K={k} N={n}: {rows[-1]['status']}", flush=True)
                continue
            for m in ms:
                row = dict(bench="gemm", variant=v.name, family=v.family, format=v.format, M=m, K=k, N=n,
                           peak_kind=v.peak_kind, n_buffers=len(inputs[m]), note=v.note or None)
                try:
                    with torch.no_grad():
                        y = fn(inputs[m][0])
                        row.update(rel_error_vs_bf16=harness.compare(y, refs[m])["rel_error"])
                        t = harness.bench(fn, [(x,) for x in inputs[m]], device, budget_s=budget,
                                          warmup=1 if args.quick or args.tiny else 3)
                    _fill_timing(row, t, 2.0 * m * k * n, device)
                    row["status"] = "ok"
                except Exception as exc:
                    row["status"] = harness.fmt_status(exc)
                rows.append(row)
                _progress(row)
            del module, fn
            if device.type == "cuda":
                torch.cuda.empty_cache()

        # activation quantization alone (qkernels.ops.quantize_per_token), once per (M, K)
        for fp8 in (False, True):
            name = "act-quant-fp8" if fp8 else "act-quant-int8"
            if args.only and name not in args.only.split(","):
                continue
            for m in ms:
                row = dict(bench="act-quant", variant=name, family="qkernels-op",
                           format="w8a8-fp8" if fp8 else "w8a8-int8", M=m, K=k, n_buffers=len(inputs[m]),
                           note="ops.quantize_per_token alone; N does not apply")
                try:
                    with torch.no_grad():
                        t = harness.bench(lambda x: ops.quantize_per_token(x, None, fp8),
                                          [(x,) for x in inputs[m]], device, budget_s=budget, warmup=1)
                    _fill_timing(row, t, None, device)
                    # reads M*K bf16, writes M*K 8-bit + M fp32 scales
                    row["gbps"] = (m * k * 3 + m * 4) / (t.median_ms * 1e-3) / 1e9
                    row["status"] = "ok"
                except Exception as exc:
                    row["status"] = harness.fmt_status(exc)
                rows.append(row)
                _progress(row)

        # bare kernels on pre-quantized operands
        w8 = torch.randint(-127, 128, (n, k), generator=g).to(device, torch.int8)
        wf8 = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(device, torch.float8_e4m3fn)
        ws = torch.ones(1, n, device=device)
        for name, kind, reason in _raw_kernels(device):
            if args.only and name not in args.only.split(","):
                continue
            for m in ms:
                triton_kernel = name.startswith("raw-triton")
                row = dict(bench="raw-kernel", variant=name, family="triton" if triton_kernel else "torch", M=m, K=k,
                           N=n, peak_kind=kind,
                           note=("kernel on pre-quantized operands, its fused rowwise-scale epilogue included"
                                 if triton_kernel else
                                 "bare kernel on pre-quantized operands, no activation quant or epilogue"))
                if reason:
                    row["status"] = reason
                    rows.append(row)
                    break
                if name == "raw-int_mm" and device.type == "cuda" and m <= 16:
                    row["status"] = "skipped: torch._int_mm on CUDA needs M > 16"
                    rows.append(row)
                    continue
                try:
                    if name == "raw-bf16-mm":
                        ops_in = [(x, lin.weight) for x in inputs[m]]
                        fn = lambda a, w: a @ w.t()  # noqa: E731
                    elif name == "raw-int_mm":
                        ops_in = [(torch.randint(-127, 128, (m, k), generator=g).to(device, torch.int8), w8)
                                  for _ in inputs[m]]
                        fn = lambda a, w: torch._int_mm(a, w.t())  # noqa: E731
                    else:
                        ops_in = [((torch.randn(m, k, generator=g) * 100).clamp(-448, 448)
                                   .to(device, torch.float8_e4m3fn), wf8) for _ in inputs[m]]
                        sa = torch.ones(m, 1, device=device)
                        if name == "raw-scaled_mm-fp8":
                            fn = lambda a, w: torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=ws,  # noqa: E731
                                                               out_dtype=torch.bfloat16)
                        else:
                            import qkernels.triton as kt

                            kernel = kt.fp8_gemm_tma if name.endswith("-tma") else kt.fp8_gemm
                            fn = lambda a, w, kernel=kernel: kernel(a, sa[:, 0], w, ws[0], None,  # noqa: E731
                                                                    torch.bfloat16)
                    row["n_buffers"] = len(ops_in)
                    t = harness.bench(fn, ops_in, device, budget_s=budget, warmup=1)
                    _fill_timing(row, t, 2.0 * m * k * n, device)
                    row["status"] = "ok"
                except Exception as exc:
                    row["status"] = harness.fmt_status(exc)
                rows.append(row)
                _progress(row)
        del lin, inputs, refs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows  # speedups: main's collect_rows(finish=_speedups), interrupted or not


_DEVICE_NAME: dict[str, str] = {}


def _fill_timing(row: dict, t: harness.Timing, flops: float | None, device: torch.device) -> None:
    row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, spread_ms=t.spread_ms)
    if flops is not None and t.median_ms > 0:
        row["tflops"] = flops / (t.median_ms * 1e-3) / 1e12
        name = _DEVICE_NAME.get("name", "")
        row["pct_of_peak"] = harness.percent_of_peak(row["tflops"], name, row.get("peak_kind", "bf16"))


def _progress(row: dict) -> None:
    if row.get("status") != "ok":
        print(f"[gemm] {row['variant']:<28} M={row.get('M')} K={row.get('K')} N={row.get('N')}: {row['status']}",
              flush=True)
        return
    extra = f"{row['tflops']:8.2f} T/s" if row.get("tflops") is not None else f"{row.get('gbps', 0):8.2f} GB/s"
    print(f"[gemm] {row['variant']:<28} M={row['M']:<6} K={row['K']:<6} N={str(row.get('N') or '-'):<6} "
          f"{row['median_ms']:9.4f} ms  {extra}", flush=True)


def _speedups(rows: list[dict]) -> None:
    base = {}
    for r in rows:
        if r.get("status") == "ok" and r["variant"] in ("bf16", "bf16+compile"):
            base[(r["variant"], r["M"], r["K"], r["N"])] = r["median_ms"]
    for r in rows:
        if r.get("status") != "ok" or r.get("bench") == "act-quant":
            continue
        key = (r["M"], r["K"], r["N"])
        ref = "bf16+compile" if r["variant"].endswith("+compile") and ("bf16+compile", *key) in base else "bf16"
        if r.get("bench") == "raw-kernel":
            ref = "bf16"
        if (ref, *key) in base and r["median_ms"]:
            r["speedup_vs_bf16"] = base[(ref, *key)] / r["median_ms"]
            r["baseline"] = ref


def plot(rows: list[dict], path, env: dict) -> str:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("speedup_vs_bf16") is not None
          and r.get("bench") != "raw-kernel"]
    shapes = sorted({(r["K"], r["N"]) for r in ok}) or [(0, 0)]

    def draw(axes):
        for ax, (k, n) in zip(axes, shapes):
            sel = [r for r in ok if (r["K"], r["N"]) == (k, n)]
            for name in sorted({r["variant"] for r in sel}):
                pts = sorted((r["M"], r["speedup_vs_bf16"]) for r in sel if r["variant"] == name)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, label=name)
            ax.axhline(1.0, color="k", lw=0.6, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("speedup vs bf16 F.linear")
            ax.set_title(f"K={k} N={n}", fontsize=9)
            ax.grid(alpha=0.3)
        if axes:
            axes[0].legend(fontsize=6)

    title = f"GEMM, {env['device_name']}, torch {env['torch']}, {env['timestamp']}"
    return harness.save_plot(path, draw, title=title, ncols=min(3, len(shapes)), nplots=len(shapes))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench", help="output folder (gemm.csv, gemm.json, gemm.png)")
    p.add_argument("--quick", action="store_true", help="CPU/CI-sized: M in 1,17,512; two shapes")
    p.add_argument("--tiny", action="store_true", help="smallest sweep (tests): K=256 N=512, M in 1,17,64")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--shapes", default=None, help="comma list of KxN, e.g. 3072x3072,3072x12288")
    p.add_argument("--m", default=None, help="comma list of M values")
    p.add_argument("--only", default=None, help="comma list of variant names (bf16 always kept)")
    p.add_argument("--no-peers", action="store_true", help="skip torchao / bitsandbytes / diffusers")
    p.add_argument("--compile-peers", dest="compile_peers", action="store_true", default=None,
                   help="add torch.compile'd torchao (+ bf16) variants (default: on for CUDA only)")
    p.add_argument("--no-compile-peers", dest="compile_peers", action="store_false")
    p.add_argument("--compile-ours", action="store_true", help="add torch.compile'd qkernels variants")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or harness.default_device())
    env = harness.environment(device)
    _DEVICE_NAME["name"] = env["device_name"]
    print(f"[gemm] {env['device_name']}  torch {env['torch']}  triton {env['triton']}  commit {env['git_commit']}",
          flush=True)
    rows, interrupted = harness.collect_rows(run, args, "gemm", finish=_speedups)
    paths = harness.write_results(args.out, "gemm", rows, env, COLUMNS)
    paths["png"] = plot(rows, f"{args.out}/gemm.png", env)
    print(f"[gemm] wrote {', '.join(paths.values())}", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
