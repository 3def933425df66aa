"""Attention benchmark: qkernels' int8-fp8 attention against every bf16 SDPA backend at Qwen-Image's
shapes, in isolation and as the model calls attention.

    python -m benchmarks.attention --out out/attention            # H200: S 4300/8400/16600, B 1/2
    python -m benchmarks.attention --quick --out out/attention    # CPU/CI: tiny shape, nothing timed
                                                                  # that runs in the interpreter

Rows (``attention.csv``, rewritten after every row, so an interrupted run keeps what it measured):
one per (variant, B, S), 24 heads of 128, non-causal. ``tflops`` is 4 B H S^2 D / time (the
bf16-equivalent rate, also for the 8-bit kernel); ``speedup_vs_best_bf16`` is against the fastest
plain bf16 SDPA backend at that shape. ``rel_error`` / ``cosine_min_head``: against fp32 attention
(SDPA's efficient backend on fp32 inputs) on inputs with realistic outliers: a per-channel K bias
of std 4, 8 query rows 8x larger, a per-channel V offset of std 0.5; ``rel_error_zero_mean_v``: the
same inputs without the V offset (e4m3 P's worst case, ~0.036).

Variants:
  sdpa-cudnn / -flash / -efficient / -math  torch SDPA with one backend, contiguous [B, H, S, D]
  qk-int8-fp8             qkernels.attention.sdpa (quantization pass + kernel)
  qk-int8-fp8-kernel      the attention kernel alone on pre-quantized operands
  qk-bf16                 qkernels.attention.sdpa(mode="bf16")
  model-native[-ones]     the model's call: text/image cat, diffusers' native dispatch on
                          [B, S, H, D] (permuted views), [-ones: with the all-ones text mask the
                          demo inputs pass], output flatten and split .contiguous()
  model-native-cudnn      the same through diffusers' _native_cudnn backend (.contiguous() copies)
  model-qk-int8-fp8       the processor's call: joint_attention on the two streams, no cat/split
  model-qk-bf16           the processor's bf16 call (cat, SDPA on views, split)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

from . import harness

COLUMNS = ["bench", "variant", "status", "B", "H", "S", "D", "text_tokens", "median_ms", "p20_ms", "p80_ms",
           "spread_ms", "tflops", "peak_kind", "pct_of_peak", "speedup_vs_best_bf16", "best_bf16",
           "rel_error", "cosine_min_head", "rel_error_zero_mean_v", "note"]

FULL_S = [4300, 8400, 16600]  # 512^2 + ref, 1024^2 + ref, 1024^2 + 3 refs
FULL_B = [1, 2]
HEADS, HEAD_DIM = 24, 128
TEXT_TOKENS = 208
BF16_BACKENDS = ["cudnn", "flash", "efficient", "math"]
MATH_MAX_S = 8400  # the math backend materializes [B, H, S, S] in fp32: 13.5 GB at B=2, S=8400


def make_inputs(b: int, h: int, s: int, d: int, device, seed: int, v_mean: float = 0.5):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, h, s, d, generator=g) + 4 * torch.randn(1, h, 1, d, generator=g)
    v = torch.randn(b, h, s, d, generator=g) + v_mean * torch.randn(1, h, 1, d, generator=g)
    q[:, :, 1:9] *= 8
    return tuple(t.to(device, torch.bfloat16) for t in (q, k, v))


def fp32_reference(q, k, v):
    """fp32 attention: the efficient backend on CUDA (no [S, S] buffer), math on CPU."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double())


def head_cosine(o, ref) -> float:
    return F.cosine_similarity(o.double().flatten(2), ref.double().flatten(2), dim=-1).min().item()


def _backend_fn(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]

    def fn(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


def _segments(q, k, v, text: int):
    """The model's layout: text and image streams, [B, S_i, H, D] views of [B, S_i, H*D] buffers."""
    out = []
    for t in (q, k, v):
        bshd = t.transpose(1, 2).contiguous()  # [B, S, H, D], as the projections' unflatten gives
        out.append((bshd[:, :text].contiguous(), bshd[:, text:].contiguous()))
    return out


def _model_native(backend: str, ones_mask: bool):
    """Diffusers' QwenDoubleStreamAttnProcessor2_0 around attention: cat, dispatch, flatten, split."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    def fn(segs, text):
        (tq, iq), (tk, ik), (tv, iv) = segs
        mask = None
        if ones_mask:
            b = tq.shape[0]
            mask = torch.cat([torch.ones(b, text, dtype=torch.bool, device=tq.device),
                              torch.ones(b, iq.shape[1], dtype=torch.bool, device=tq.device)], dim=1)[:, None, None, :]
        q, k, v = torch.cat([tq, iq], 1), torch.cat([tk, ik], 1), torch.cat([tv, iv], 1)
        o = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=backend).flatten(2, 3)
        return o[:, :text].contiguous(), o[:, text:].contiguous()
    return fn


def _model_ours(mode: str):
    from qkernels.attention import _bf16_sdpa, joint_attention

    def fn(segs, text):
        (tq, iq), (tk, ik), (tv, iv) = segs
        if mode == "int8-fp8":
            to, io = joint_attention(tq, tk, tv, iq, ik, iv)
        else:
            q, k, v = (torch.cat(p, 1).transpose(1, 2) for p in segs)
            o = _bf16_sdpa(q, k, v, None, None).transpose(1, 2)
            to, io = o[:, :text], o[:, text:]
        return to.flatten(2, 3).contiguous(), io.flatten(2, 3).contiguous()
    return fn


def _kernel_only(q, k, v):
    """The attention kernel alone, on operands quantized once: returns a callable of no inputs."""
    from qkernels.attention import _key_bias
    from qkernels.attention import int8_fp8_attention as ka

    b, h, s, d = q.shape
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    s_pad = -(-s // ka.PAD) * ka.PAD
    bias = _key_bias(None, b, s, s_pad, q.device)
    ops = ka.quantize_segments(qt[:, :0], qt, kt[:, :0], kt, vt[:, :0], vt, bias, 1 / math.sqrt(d))
    out = torch.empty_like(qt)

    def run():
        ka.attention_core(*ops, out, out, 0, s)
        return out
    return run


def run(args, rows: list[dict]) -> list[dict]:
    device = torch.device(args.device or harness.default_device())
    args.rows_so_far = rows
    cuda = device.type == "cuda"
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if args.quick:
        shapes = [(1, 2, 200, 64)]
    else:
        shapes = [(b, HEADS, s, HEAD_DIM) for s in (args.s or FULL_S) for b in (args.b or FULL_B)]
    budget = args.budget if args.budget is not None else (0.1 if args.quick else 0.5)
    timed = cuda  # CPU: the Triton variants are the interpreter; nothing here is a CPU speed question
    triton_reason = None if (cuda or interp) else "unavailable: Triton kernels need CUDA (or TRITON_INTERPRET=1)"

    for b, h, s, d in shapes:
        text = min(TEXT_TOKENS, s // 4)
        q, k, v = make_inputs(b, h, s, d, device, seed=s + b)
        ref = fp32_reference(q, k, v)
        q0, k0, v0 = make_inputs(b, h, s, d, device, seed=s + b, v_mean=0.0)
        ref0 = fp32_reference(q0, k0, v0)
        flops = 4.0 * b * h * s * s * d
        segs = _segments(q, k, v, text)
        variants = [(f"sdpa-{n}", "bf16", _backend_fn(n)) for n in BF16_BACKENDS]
        from qkernels.attention import sdpa

        variants += [("qk-int8-fp8", "int8", lambda q, k, v: sdpa(q, k, v)),
                     ("qk-int8-fp8-kernel", "int8", None),
                     ("qk-bf16", "bf16", lambda q, k, v: sdpa(q, k, v, mode="bf16")),
                     ("model-native", "bf16", "native"), ("model-native-ones", "bf16", "native-ones"),
                     ("model-native-cudnn", "bf16", "_native_cudnn"),
                     ("model-qk-int8-fp8", "int8", "int8-fp8"), ("model-qk-bf16", "bf16", "bf16")]
        for name, kind, fn in variants:
            if args.only and name not in args.only.split(","):
                continue
            row = dict(bench="attention", variant=name, B=b, H=h, S=s, D=d, peak_kind=kind,
                       text_tokens=text if name.startswith("model-") else None)
            is_triton = "int8" in name
            if is_triton and triton_reason:
                rows.append(dict(row, status=triton_reason))
                _progress(rows[-1], args)
                continue
            if name == "sdpa-math" and s > MATH_MAX_S:
                rows.append(dict(row, status=f"skipped: the math backend at S={s} materializes B*H*S^2 fp32 scores"))
                _progress(rows[-1], args)
                continue
            if name.startswith("sdpa-") and not cuda and name != "sdpa-math":
                rows.append(dict(row, status="skipped: CPU has only the math/flash-CPU paths; not a GPU question"))
                _progress(rows[-1], args)
                continue
            try:
                with torch.no_grad():
                    if name.startswith("model-"):
                        if isinstance(fn, str) and fn.startswith(("native", "_native")):
                            call = _model_native(fn.replace("-ones", ""), fn.endswith("-ones"))
                        else:
                            call = _model_ours(fn)
                        t_o, i_o = call(segs, text)
                        o = torch.cat([t_o, i_o], 1).unflatten(-1, (h, d)).transpose(1, 2)
                        row.update(_errors(o, ref))
                        bench_fn, bench_in = call, [(segs, text)]
                    elif fn is None:
                        run_kernel = _kernel_only(q, k, v)
                        o = run_kernel().transpose(1, 2)
                        row.update(_errors(o, ref), note="pre-quantized operands; the quantization pass excluded")
                        bench_fn, bench_in = run_kernel, [()]
                    else:
                        o = fn(q, k, v)
                        row.update(_errors(o, ref))
                        row["rel_error_zero_mean_v"] = harness.compare(fn(q0, k0, v0), ref0)["rel_error"]
                        bench_fn, bench_in = fn, [(q, k, v)]
                    if timed and not (is_triton and interp):
                        t = harness.bench(bench_fn, bench_in, device, budget_s=budget, warmup=2)
                        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, spread_ms=t.spread_ms,
                                   tflops=flops / (t.median_ms * 1e-3) / 1e12)
                        row["pct_of_peak"] = harness.percent_of_peak(row["tflops"], args.device_name, kind)
                    else:
                        row["note"] = "not timed: " + ("the Triton interpreter" if is_triton else "CPU")
                row["status"] = "ok"
            except Exception as exc:
                row["status"] = harness.fmt_status(exc)
            rows.append(row)
            _progress(row, args)
        del q, k, v, q0, k0, v0, ref, ref0, segs
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _errors(o, ref) -> dict:
    c = harness.compare(o, ref)
    return {"rel_error": c["rel_error"], "cosine_min_head": head_cosine(o, ref)}


def _speedups(rows: list[dict]) -> None:
    best: dict[tuple, tuple[float, str]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("median_ms") and r["variant"].startswith("sdpa-"):
            key = (r["B"], r["S"])
            if key not in best or r["median_ms"] < best[key][0]:
                best[key] = (r["median_ms"], r["variant"])
    for r in rows:
        key = (r.get("B"), r.get("S"))
        if r.get("status") == "ok" and r.get("median_ms") and key in best:
            r["speedup_vs_best_bf16"] = best[key][0] / r["median_ms"]
            r["best_bf16"] = best[key][1]


def _progress(row: dict, args) -> None:
    """Print the row and rewrite the results so far (a run cut short keeps every measured row)."""
    if row.get("status") != "ok":
        print(f"[attention] {row['variant']:<20} B={row['B']} S={row['S']}: {row['status']}", flush=True)
    else:
        t = f"{row['median_ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s" if row.get("median_ms") else "not timed"
        print(f"[attention] {row['variant']:<20} B={row['B']} S={row['S']:<6} {t}  rel.err {row['rel_error']:.2e}  "
              f"cos {row['cosine_min_head']:.5f}", flush=True)
    harness.write_results(args.out, "attention", args.rows_so_far, args.env, COLUMNS)


def plot(rows: list[dict], path, env: dict) -> str:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tflops")]
    batches = sorted({r["B"] for r in ok}) or [1]

    def draw(axes):
        for ax, b in zip(axes, batches):
            sel = [r for r in ok if r["B"] == b]
            for name in sorted({r["variant"] for r in sel}):
                pts = sorted((r["S"], r["tflops"]) for r in sel if r["variant"] == name)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, label=name)
            ax.axhline(840, color="k", lw=0.6, ls="--")
            ax.set_xlabel("S (tokens)")
            ax.set_ylabel("TFLOP/s (bf16-equivalent)")
            ax.set_title(f"B={b}, {HEADS} heads x {HEAD_DIM} (dashed: 840 target)", fontsize=9)
            ax.grid(alpha=0.3)
        if axes:
            axes[0].legend(fontsize=6)

    title = f"attention, {env['device_name']}, torch {env['torch']}, {env['timestamp']}"
    return harness.save_plot(path, draw, title=title, ncols=len(batches), nplots=len(batches))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/attention", help="output folder (attention.csv, .json, .png)")
    p.add_argument("--quick", action="store_true", help="CPU/CI: one tiny shape, accuracy only")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--s", type=lambda t: [int(x) for x in t.split(",")], default=None, help="comma list of S")
    p.add_argument("--b", type=lambda t: [int(x) for x in t.split(",")], default=None, help="comma list of B")
    p.add_argument("--only", default=None, help="comma list of variants")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or harness.default_device())
    env = harness.environment(device)
    args.env, args.device_name = env, env["device_name"]
    print(f"[attention] {env['device_name']}  torch {env['torch']}  triton {env['triton']}  commit {env['git_commit']}",
          flush=True)
    rows, interrupted = harness.collect_rows(run, args, "attention", finish=_speedups)
    paths = harness.write_results(args.out, "attention", rows, env, COLUMNS)
    paths["png"] = plot(rows, f"{args.out}/attention.png", env)
    print(f"[attention] wrote {', '.join(paths.values())}", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
