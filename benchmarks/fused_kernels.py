"""The fused block's memory-bound kernels alone, at Qwen-Image's shapes, against the device's copy
rate: which launch choice (``qkernels.triton.fused.TUNING``, ``qkernels.triton.quant.TUNING``)
moves the most bytes per second.

    python -m benchmarks.fused_kernels --out out/fused     # CUDA

Kernels: ``layernorm_modulate_quant`` (x [M, 3072] bf16 -> e4m3 + scales) with the row held as
exact chunks or as one power-of-two tile, 2, 4 and 8 warps a row; the separate
``quantize_per_token`` pass at K = 3072 (the attention output) and K = 12288 (the MLP's hidden
activation), 1 or 2 rows a program, 4, 8 and 16 warps (run 9 also measured it with chunked
rows: slower, since removed); ``qk_norm_rope`` (two streams' q|k|v [M, 9216] -> joint q, k, v)
with split pair loads, 2, 4, 8 warps a token (run 5 measured the strided loads at a tenth of the
copy rate); and ``clone`` of the same bytes as the roof, per K. Rows: median us
(triton.testing.do_bench), GB/s, % of the copy rate; ``current`` marks the launch choice the
tuning tables make now.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import harness

COLUMNS = ["bench", "kernel", "variant", "M", "K", "median_us", "gbps", "pct_of_copy", "current", "status"]


def run(args, rows: list[dict]) -> list[dict]:
    import triton.testing

    from qkernels.triton import fused, quant

    dev = torch.device("cuda")
    dim, heads = 3072, 24
    fused_default, quant_default = dict(fused.TUNING), dict(quant.TUNING)

    def timed(fn) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3  # us

    for m in args.m:
        copy_rate = {}
        xs = {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k in (dim, 4 * dim)}
        for k, x in xs.items():
            copy_us = timed(lambda: x.clone())
            copy_rate[k] = 2 * x.numel() * 2 / copy_us / 1e3  # read + write, GB/s
            rows.append(dict(bench="fused-kernels", kernel="clone", variant="-", M=m, K=k, median_us=copy_us,
                             gbps=copy_rate[k], pct_of_copy=100.0, status="ok"))

        def add(kernel, variant, k, us, nbytes, current):
            gbps = nbytes / us / 1e3
            pct = 100 * gbps / copy_rate[k]
            rows.append(dict(bench="fused-kernels", kernel=kernel, variant=variant, M=m, K=k, median_us=us,
                             gbps=gbps, pct_of_copy=pct, current=current, status="ok"))
            print(f"[fused] M={m:5d} K={k:5d} {kernel:26s} {variant:24s} {us:8.1f} us {gbps:7.0f} GB/s "
                  f"({pct:3.0f}% of copy){' *' if current else ''}", flush=True)

        x = xs[dim]
        mod = torch.randn(2, 6 * dim, device=dev, dtype=torch.bfloat16)
        rows_g = torch.zeros(m, dtype=torch.int32, device=dev)
        for chunked in (True, False):
            for warps in (2, 4, 8):
                fused.TUNING.update(lmq_chunked=chunked, lmq_warps=warps)
                us = timed(lambda: fused.layernorm_modulate_quant(x, mod[:, :dim], mod[:, dim:2 * dim], rows_g,
                                                                  1e-6, True))
                current = chunked == fused_default["lmq_chunked"] and warps == fused_default["lmq_warps"]
                add("layernorm_modulate_quant", f"{'chunks' if chunked else 'one tile'} warps={warps}", dim, us,
                    m * dim * 3 + m * 4, current)
        fused.TUNING.update(fused_default)

        for k, xk in xs.items():
            for n_rows in ((1, 2) if k == dim else (1,)):
                for warps in (4, 8, 16):
                    quant.TUNING.update(quant_rows=n_rows, quant_warps=warps)
                    us = timed(lambda: quant.quantize_per_token(xk, None, True))
                    quant.TUNING.update(quant_default)
                    r, _, w = quant._launch_shape(m, k, quant._SINGLE_PASS_MAX_K, quant.TUNING)
                    add("quantize_per_token", f"rows={n_rows} warps={warps}", k, us, m * k * 3 + m * 4,
                        (r, w) == (n_rows, warps))

        l_txt = 208
        qt = torch.randn(l_txt, 3 * dim, device=dev, dtype=torch.bfloat16)
        qi = torch.randn(m - l_txt, 3 * dim, device=dev, dtype=torch.bfloat16)
        w = [torch.randn(128, device=dev, dtype=torch.bfloat16) for _ in range(4)]
        ct = torch.randn(l_txt, 64, 2, device=dev)
        ci = torch.randn(m - l_txt, 64, 2, device=dev)
        for warps in (2, 4, 8):
            fused.TUNING.update(qk_split=True, qk_warps=warps)
            us = timed(lambda: fused.qk_norm_rope(qt, qi, 1, heads, *w, ct, ci, 1e-6))
            add("qk_norm_rope", f"split warps={warps}", dim, us, 2 * m * 3 * dim * 2,
                fused_default["qk_split"] and warps == fused_default["qk_warps"])
        fused.TUNING.update(fused_default)
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
