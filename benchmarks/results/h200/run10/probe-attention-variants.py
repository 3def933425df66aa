"""Probe (run 10): launch variants of the int8-fp8 attention kernel at the model's shape, each config
forced (no autotuning), against cuDNN bf16 SDPA in the same process.

    python benchmarks/results/h200/run10/probe-attention-variants.py OUT.jsonl

Variants (pre-quantized operands from qkernels' own quantization pass; only the kernel is timed):
  ptr         the shipped kernel (pointer loads, cp.async pipelining)
  tma         the same arithmetic with Q, K, V and K's scale/offset through TMA tensor descriptors
  tma-ws      + ``tl.range(..., warp_specialize=True)``: Triton's automatic warp specialization (a
              producer warp issues the TMA loads; consumer warp groups keep their own barriers)
  *-accmma    P.V accumulated by the wgmma into the running fp32 accumulator (``dot(p, v, acc)``)
              instead of a fresh dot added to it: one 64-register accumulator fewer

Each row: ms (median of CUDA-event timings), bf16-equivalent TFLOP/s, the max abs difference to the
shipped kernel's output (0 for the same arithmetic), rel. error against fp32 SDPA. One JSON object a
line, written as it goes.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention_variants as tma_mod  # noqa: E402
from benchmarks.attention import make_inputs  # noqa: E402
from qkernels.attention import int8_fp8_attention as mod  # noqa: E402
from qkernels.attention import _unmasked_bias  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 else "probe-attention-variants.jsonl"
H, D = 24, 128
CONFIGS = [(128, 128, 2, 8), (128, 64, 2, 8), (64, 128, 2, 4), (64, 128, 3, 4), (64, 64, 2, 4)]


def timed(fn, reps=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def emit(row):
    print(json.dumps(row), flush=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(row) + "\n")


def main():
    dev = torch.device("cuda")
    for s in (8400,):
        q, k, v = make_inputs(1, H, s, D, dev, seed=0)
        flops = 4 * H * s * s * D
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v))
        emit(dict(variant="sdpa-cudnn", S=s, ms=ms, tflops=flops / ms / 1e9))
        qs_, ks_, vs_ = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D] views
        e = qs_[:, :0]
        s_pad = -(-s // mod.PAD) * mod.PAD
        bias = _unmasked_bias(1, s, s_pad, dev)
        ops = mod.quantize_segments(e, qs_, e, ks_, e, vs_, bias, 1 / math.sqrt(D))
        q8, qsc, k8, ksc, v8t, vsc = ops
        bh = q8.shape[0]
        o0 = torch.empty(1, 0, H, D, dtype=torch.bfloat16, device=dev)
        o_base = torch.empty(1, s, H, D, dtype=torch.bfloat16, device=dev)
        mod.attention_core(*ops, o0, o_base, 0, s)
        best = getattr(mod._attention_kernel, "best_config", None)
        ms = timed(lambda: mod.attention_core(*ops, o0, o_base, 0, s))
        err = float((o_base.float().transpose(1, 2) - ref).norm() / ref.norm())
        emit(dict(variant="ptr-autotuned", S=s, ms=ms, tflops=flops / ms / 1e9, rel_error=err,
                  config=str(best)))
        o = torch.empty_like(o_base)
        st = (o.stride(0), o.stride(1), o.stride(2))
        for bm, bn, stages, warps in CONFIGS:
            variants = [("ptr", None)] + [(f"tma{'-ws' if ws else ''}{'-accmma' if am else ''}", (ws, am))
                                          for ws in (False, True) for am in (False, True)]
            for name, opt in variants:
                row = dict(variant=name, S=s, block_m=bm, block_n=bn, stages=stages, warps=warps)
                try:
                    if opt is None:
                        def run():
                            mod._attention_kernel.fn[(s_pad // bm, bh)](
                                q8, k8, v8t, qsc, ksc, vsc, o0, o, 0, s, H, s_pad, s_pad, 16384, *st, *st,
                                HEAD_DIM=D, SOFT_FP8=False, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                num_stages=stages)
                    else:
                        ws, am = opt
                        qd = TensorDescriptor(q8, [bh * s_pad, D], [D, 1], [bm, D])
                        kd = TensorDescriptor(k8, [bh * s_pad, D], [D, 1], [bn, D])
                        vd = TensorDescriptor(v8t, [bh * D, s_pad], [s_pad, 1], [D, bn])
                        sd = TensorDescriptor(ksc, [bh * 2, s_pad], [s_pad, 1], [1, bn])

                        def run():
                            tma_mod._attention_kernel_tma[(s_pad // bm, bh)](
                                qd, kd, vd, qsc, sd, vsc, o0, o, 0, s, H, s_pad, s_pad, 16384, *st, *st,
                                HEAD_DIM=D, SOFT_FP8=False, BLOCK_M=bm, BLOCK_N=bn, WS=ws, ACC_MMA=am,
                                num_warps=warps, num_stages=stages)
                    o.zero_()
                    run()
                    torch.cuda.synchronize()
                    row["max_diff_vs_shipped"] = float((o.float() - o_base.float()).abs().max())
                    row["rel_error"] = float((o.float().transpose(1, 2) - ref).norm() / ref.norm())
                    ms = timed(run)
                    row.update(ms=ms, tflops=flops / ms / 1e9)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is a row too
                    row["status"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                emit(row)
        del ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
