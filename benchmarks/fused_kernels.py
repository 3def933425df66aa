"""The fused block's memory-bound kernels alone, at Qwen-Image's shapes, against the device's copy
rate: which launch choice (``qkernels.triton.fused.TUNING``) moves the most bytes per second.

    python -m benchmarks.fused_kernels --out out/fused     # CUDA

Kernels: ``layernorm_modulate_quant`` (x [M, 3072] bf16 -> e4m3 + scales) for 4, 8 and 16 warps a
row; ``qk_norm_rope`` (two streams' q|k|v [M, 9216] -> joint q, k, v) with strided or split pair
loads and 2, 4, 8 warps a token; the separate ``quantize_per_token`` pass; and ``clone`` of the
same bytes as the roof. Rows: median us (triton.testing.do_bench), GB/s, % of the copy rate.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import harness

COLUMNS = ["bench", "kernel", "variant", "M", "K", "median_us", "gbps", "pct_of_copy", "status"]


def run(args, rows: list[dict]) -> list[dict]:
    import triton.testing

    from qkernels.triton import fused, quant

    dev = torch.device("cuda")
    dim, heads = 3072, 24

    def timed(fn) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3  # us

    for m in args.m:
        x = torch.randn(m, dim, device=dev, dtype=torch.bfloat16)
        copy_us = timed(lambda: x.clone())
        copy_rate = 2 * x.numel() * 2 / copy_us / 1e3  # read + write, GB/s
        rows.append(dict(bench="fused-kernels", kernel="clone", variant="-", M=m, K=dim, median_us=copy_us,
                         gbps=copy_rate, pct_of_copy=100.0, status="ok"))

        def add(kernel, variant, us, nbytes):
            gbps = nbytes / us / 1e3
            rows.append(dict(bench="fused-kernels", kernel=kernel, variant=variant, M=m, K=dim, median_us=us,
                             gbps=gbps, pct_of_copy=100 * gbps / copy_rate, status="ok"))
            print(f"[fused] M={m:5d} {kernel:26s} {variant:18s} {us:8.1f} us {gbps:7.0f} GB/s "
                  f"({100 * gbps / copy_rate:3.0f}% of copy)", flush=True)

        mod = torch.randn(2, 6 * dim, device=dev, dtype=torch.bfloat16)
        rows_g = torch.zeros(m, dtype=torch.int32, device=dev)
        lmq_bytes = m * dim * 3 + m * 4
        for warps in (4, 8, 16):
            fused.TUNING["lmq_warps"] = warps
            us = timed(lambda: fused.layernorm_modulate_quant(x, mod[:, :dim], mod[:, dim:2 * dim], rows_g, 1e-6, True))
            add("layernorm_modulate_quant", f"warps={warps}", us, lmq_bytes)
        fused.TUNING["lmq_warps"] = None
        add("quantize_per_token", "-", timed(lambda: quant.quantize_per_token(x, None, True)), lmq_bytes)

        l_txt = 208
        qt = torch.randn(l_txt, 3 * dim, device=dev, dtype=torch.bfloat16)
        qi = torch.randn(m - l_txt, 3 * dim, device=dev, dtype=torch.bfloat16)
        w = [torch.randn(128, device=dev, dtype=torch.bfloat16) for _ in range(4)]
        ct = torch.randn(l_txt, 64, 2, device=dev)
        ci = torch.randn(m - l_txt, 64, 2, device=dev)
        qk_bytes = 2 * m * 3 * dim * 2
        for split in (False, True):
            for warps in (2, 4, 8):
                fused.TUNING.update(qk_split=split, qk_warps=warps)
                us = timed(lambda: fused.qk_norm_rope(qt, qi, 1, heads, *w, ct, ci, 1e-6))
                add("qk_norm_rope", f"{'split' if split else 'strided'} warps={warps}", us, qk_bytes)
        fused.TUNING.update(qk_split=False, qk_warps=4)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fused_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/fused")
    p.add_argument("--m", type=lambda t: [int(v) for v in t.split(",")], default=[2256, 8400])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("[fused] needs CUDA: these are GPU timings (the kernels' correctness is tested on CPU)")
        return 0
    env = harness.environment(torch.device("cuda"))
    rows, interrupted = harness.collect_rows(run, args, "fused-kernels")
    harness.write_results(args.out, "fused_kernels", rows, env, COLUMNS)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
