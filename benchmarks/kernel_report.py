"""What each Triton kernel and tuning config compiles to on Hopper, without a GPU.

    python -m benchmarks.kernel_report --out out/kernels            # every kernel, every config
    python -m benchmarks.kernel_report --quick --out out/kernels    # one shape, M=16 and 8192

Under ``benchmarks.simulated_gpu`` Triton compiles each kernel for sm90 exactly as a launch would
(the same binder, so the same specialization of the arguments), and ptxas reports registers and
spills. Per (kernel, config, shape) row: shared memory, registers, spill bytes, blocks per SM that
shared memory and registers allow, and what the inner loop is made of (``wgmma`` warp-group MMAs
vs ``mma.sync``, their instruction shape, how many MMA groups stay in flight across K iterations,
``cp.async`` copies vs TMA bulk copies). A config that spills, or that fits one block per SM, is
a tuning lead to check before spending GPU time on it; ``ptx_sha`` (the PTX
with names and line info removed) shows whether two versions of a kernel compile to the same code.

Nothing here is a timing: it says what the hardware will be given, not how fast it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import harness

COLUMNS = ["bench", "kernel", "status", "M", "K", "N", "block_m", "block_n", "block_k", "group_m", "num_stages",
           "num_warps", "shared_bytes", "registers", "spill_store_bytes", "spill_load_bytes", "blocks_per_sm",
           "wgmma", "wgmma_shape", "wgmma_in_flight", "mma_sync", "cp_async", "tma", "ptx_sha", "note"]

H100_SMEM_PER_SM = 233472  # 228 KiB per SM; a block may use 227 KiB of it
H100_REGS_PER_SM = 65536
SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432)]
MS = [16, 256, 8192]


def _tiny(dtype: torch.dtype) -> torch.Tensor:
    # Only the data pointer's alignment and the dtype reach the compiler; the sizes are the ints.
    return torch.empty(64, dtype=dtype)


def _gemm_args(kind: str, m: int, n: int, k: int, mb: int):
    bf16, f32, i8, e4 = torch.bfloat16, torch.float32, torch.int8, torch.float8_e4m3fn
    # int8/fp8 GEMMs: residual, gate and gate-row pointers after the bias, the gate's row stride
    # after C's strides; EPILOGUE 0 compiles the plain kernel the backends launch.
    epi = (_tiny(bf16), _tiny(bf16), _tiny(torch.int32))
    if kind == "int8_gemm":
        t = (_tiny(i8), _tiny(i8), _tiny(bf16), _tiny(f32), _tiny(f32), _tiny(bf16), *epi)
        meta = dict(HAS_BIAS=True, EPILOGUE=0)
    elif kind == "fp8_gemm":
        t = (_tiny(e4), _tiny(e4), _tiny(bf16), _tiny(f32), _tiny(f32), _tiny(bf16), *epi)
        meta = dict(HAS_BIAS=True, EPILOGUE=0)
    elif kind == "int8_static_gemm":
        t = (_tiny(bf16), _tiny(f32), _tiny(f32), _tiny(i8), _tiny(bf16), _tiny(f32), _tiny(bf16))
        meta = dict(HAS_SMOOTH=False, HAS_BIAS=True)
    elif kind == "weight_only_gemm":
        t = (_tiny(bf16), _tiny(i8), _tiny(bf16), _tiny(f32), _tiny(bf16))
        meta = dict(HAS_BIAS=True, INPUT_PRECISION=None)
    else:
        raise ValueError(kind)
    # strides of row-major [M, K] activation, [N, K] weight, [M, N] output (+ the gate's row stride)
    tail = (n,) if kind in ("int8_gemm", "fp8_gemm") else ()
    return t + (m, n, k, mb, k, 1, k, 1, n, 1) + tail, meta


GEMMS = {
    # kernel name -> (module, kernel attribute)
    "int8_gemm": ("qkernels.triton.int8_gemm", "_int8_gemm_kernel"),
    "fp8_gemm": ("qkernels.triton.fp8_gemm", "_fp8_gemm_kernel"),
    "int8_static_gemm": ("qkernels.triton.int8_gemm", "_int8_static_gemm_kernel"),
    "weight_only_gemm": ("qkernels.triton.weight_only_gemm", "_weight_only_gemm_kernel"),
}


# The experimental persistent TMA e4m3 GEMM (qkernels.triton.fp8_gemm_tma): its default and the
# variants a GPU sweep would try (stages, the flattened tile loop, a 128-wide N tile).
TMA_VARIANTS = [
    {},
    dict(num_stages=4),
    dict(FLATTEN=False),
    dict(BLOCK_N=128, num_stages=4),
]


def _tma_compile(m: int, n: int, k: int, variant: dict):
    from triton.tools.tensor_descriptor import TensorDescriptor

    fp8 = importlib.import_module("qkernels.triton.fp8_gemm")
    cfg = dict(fp8.TMA_CONFIG, **variant)
    flatten = cfg.pop("FLATTEN", True)
    e4, f32, bf16 = torch.float8_e4m3fn, torch.float32, torch.bfloat16
    a_desc = TensorDescriptor(_tiny(e4), [m, k], [k, 1], [cfg["BLOCK_M"], cfg["BLOCK_K"]])
    w_desc = TensorDescriptor(_tiny(e4), [n, k], [k, 1], [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    args = (a_desc, w_desc, _tiny(bf16), _tiny(f32), _tiny(f32), _tiny(bf16), _tiny(bf16), _tiny(bf16),
            _tiny(torch.int32), m, n, k, n, 1, n)
    compiled = fp8._fp8_gemm_tma_kernel.warmup(*args, grid=(132,), HAS_BIAS=True, EPILOGUE=0, NUM_PROGRAMS=132,
                                               FLATTEN=flatten,
                                               **cfg, enable_fp_fusion=False)
    return compiled, cfg, flatten


def _ptxas_stats(ptx: str, fmad: bool) -> dict:
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas

    # get_ptxas(arch) since Triton 3.6 (a separate ptxas for sm100+); get_ptxas() in 3.4 and 3.5
    ptxas = get_ptxas(90) if inspect.signature(get_ptxas).parameters else get_ptxas()
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [ptxas.path, "-v", f"--fmad={'true' if fmad else 'false'}", "--gpu-name=sm_90a",
               str(src), "-o", str(Path(d) / "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None,
            "spill_load_bytes": int(spills.group(2)) if spills else None}


def normalized_ptx(ptx: str, name: str) -> str:
    """The PTX's code: no DWARF sections (they name the inlined helper functions), line info,
    comments or the kernel's own name. Equal text, same machine code."""
    code = re.split(r"^\s*\.section\s+\.debug", ptx, maxsplit=1, flags=re.M)[0]
    lines = [ln for ln in code.splitlines() if not ln.lstrip().startswith((".loc", ".file", "//", "$L__tmp"))]
    return "\n".join(lines).replace(name, "KERNEL")


def _describe(kernel, name: str) -> dict:
    ptx = kernel.asm["ptx"]
    md = kernel.metadata
    shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    pending = [int(v) for v in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)]
    row = {"shared_bytes": md.shared, "num_warps": md.num_warps, "num_stages": md.num_stages,
           "wgmma": ptx.count("wgmma.mma_async"), "wgmma_shape": "+".join(shapes) or None,
           # The largest N of `wgmma.wait_group N`: how many warp-group MMA groups the K loop keeps
           # in flight while it issues the next (0: every MMA is waited for before the next).
           "wgmma_in_flight": max(pending) if pending else None,
           "mma_sync": ptx.count("mma.sync"),
           "cp_async": len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)), "tma": ptx.count("cp.async.bulk.tensor"),
           "ptx_sha": hashlib.sha256(normalized_ptx(ptx, md.name).encode()).hexdigest()[:12]}
    row.update(_ptxas_stats(ptx, md.enable_fp_fusion))
    threads = md.num_warps * 32
    limits = [H100_SMEM_PER_SM // max(md.shared, 1)] if md.shared else []
    if row["registers"]:
        limits.append(H100_REGS_PER_SM // (row["registers"] * threads))
    row["blocks_per_sm"] = min(limits + [2048 // threads])
    return row


def run(args, rows: list[dict]) -> list[dict]:
    from qkernels.triton._common import m_bucket, prune_by_m

    from .simulated_gpu import simulated_driver

    shapes = args.shapes
    ms = args.m
    only = set(args.only.split(",")) if args.only else None
    with simulated_driver():  # compiles for sm90; nothing runs
        for name, (module, attr) in GEMMS.items():
            if only and name not in only:
                continue
            autotuner = getattr(importlib.import_module(module), attr)
            jit = autotuner.fn.fn  # Autotuner -> Heuristics(EVEN_K) -> JITFunction
            for k, n in shapes:
                for m in ms:
                    mb = m_bucket(m)
                    targs, meta = _gemm_args(name, m, n, k, mb)
                    configs = prune_by_m(autotuner.configs, {"M_BUCKET": mb})
                    for config in configs:
                        c = config.kwargs
                        row = dict(bench="kernel", kernel=name, M=m, K=k, N=n, block_m=c["BLOCK_M"],
                                   block_n=c["BLOCK_N"], block_k=c["BLOCK_K"], group_m=c["GROUP_M"])
                        try:
                            compiled = jit.warmup(*targs, grid=(1,), **meta, **c, EVEN_K=k % c["BLOCK_K"] == 0,
                                                  num_warps=config.num_warps, num_stages=config.num_stages,
                                                  enable_fp_fusion=False)
                            row.update(_describe(compiled, name), status="ok")
                        except Exception as exc:
                            row["status"] = harness.fmt_status(exc)
                        rows.append(row)
                        _progress(row)
        if not only or "attention" in only:
            _attention_rows(args, rows)
        if only and "fp8_gemm_tma" not in only:
            return rows
        for k, n in shapes:
            for m in [m for m in ms if m > 64]:  # backends would use it at large M only
                for variant in TMA_VARIANTS:
                    row = dict(bench="kernel", kernel="fp8_gemm_tma", M=m, K=k, N=n,
                               note=", ".join(f"{key}={v}" for key, v in variant.items()) or "default")
                    try:
                        compiled, cfg, flatten = _tma_compile(m, n, k, variant)
                        row.update(block_m=cfg["BLOCK_M"], block_n=cfg["BLOCK_N"], block_k=cfg["BLOCK_K"],
                                   group_m=cfg["GROUP_M"])
                        row.update(_describe(compiled, "fp8_gemm_tma"), status="ok")
                    except Exception as exc:
                        row["status"] = harness.fmt_status(exc)
                        row.update(block_m="?", block_n="?", block_k="?")
                    rows.append(row)
                    _progress(row)
    return rows


# qkernels.attention's int8-fp8 attention kernel at the model's shape (24 heads of 128; the
# sequence length only enters as a runtime int): M = the query block, N = the key block, K = D.
ATTENTION_S = 8400


def _attention_rows(args, rows: list[dict]) -> None:
    mod = importlib.import_module("qkernels.attention.int8_fp8_attention")
    jit = mod._attention_kernel.fn  # Autotuner -> JITFunction
    i8, e4, f32, bf16 = torch.int8, torch.float8_e4m3fn, torch.float32, torch.bfloat16
    s_pad = -(-ATTENTION_S // mod.PAD) * mod.PAD
    d, h = 128, 24
    targs = (_tiny(i8), _tiny(i8), _tiny(e4), _tiny(f32), _tiny(f32), _tiny(f32), _tiny(bf16), _tiny(bf16), 0, ATTENTION_S, h, s_pad, s_pad, 16384, ATTENTION_S * h * d, h * d, d,
             ATTENTION_S * h * d, h * d, d)
    for config in mod._attention_kernel.configs:
        c = config.kwargs
        row = dict(bench="kernel", kernel="attention_int8_fp8", M=c["BLOCK_M"], K=d, N=c["BLOCK_N"],
                   block_m=c["BLOCK_M"], block_n=c["BLOCK_N"], block_k=d, group_m=None,
                   note=f"S={ATTENTION_S}, {h} heads of {d}")
        try:
            # with FMA contraction, as its launcher compiles it (make_launcher(..., fp_fusion=True))
            compiled = jit.warmup(*targs, grid=(1,), HEAD_DIM=d, SOFT_FP8=False, **c,
                                  num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True)
            row.update(_describe(compiled, "attention_int8_fp8"), status="ok")
        except Exception as exc:
            row["status"] = harness.fmt_status(exc)
        rows.append(row)
        _progress(row)
    qjit = mod._quantize_kernel
    strides = (ATTENTION_S * h * d, h * d, d)
    for kind, name in ((0, "attention_quant_q"), (1, "attention_quant_k"), (2, "attention_quant_v"), (3, "attention_stats")):
        block = mod._STATS_BLOCK if kind == 3 else mod._QUANT_BLOCK
        row = dict(bench="kernel", kernel=name, M=block, K=d, N="-", block_m=block, block_n="-", block_k=d,
                   note=f"S={ATTENTION_S}")
        try:
            if kind == 3:
                sargs = (*[_tiny(bf16)] * 4, _tiny(f32), _tiny(f32), _tiny(f32), _tiny(f32), 0, ATTENTION_S, h, s_pad,
                         *strides * 4)
                compiled = mod._stats_kernel.warmup(*sargs, grid=(1,), HEAD_DIM=d, BLOCK=block, num_warps=4,
                                                    enable_fp_fusion=True)
            else:
                qargs = (_tiny(bf16), _tiny(bf16), _tiny(f32), _tiny(f32), _tiny(f32), _tiny(e4 if kind == 2 else i8),
                         _tiny(f32), 0, ATTENTION_S, h, s_pad, *strides, *strides)
                compiled = qjit.warmup(*qargs, grid=(1,), KIND=kind, SCALE_MUL=0.1275, HEAD_DIM=d, BLOCK=block,
                                       SOFT_FP8=False, num_warps=4, enable_fp_fusion=True)
            row.update(_describe(compiled, name), status="ok")
        except Exception as exc:
            row["status"] = harness.fmt_status(exc)
        rows.append(row)
        _progress(row)


def _progress(row: dict) -> None:
    cfg = f"{row['block_m']}x{row['block_n']}x{row['block_k']} s{row.get('num_stages', '?')} w{row.get('num_warps', '?')}"
    if row["status"] != "ok":
        print(f"[kernels] {row['kernel']:<18} M={row['M']:<5} {row['K']}x{row['N']} {cfg}: {row['status']}", flush=True)
        return
    print(f"[kernels] {row['kernel']:<18} M={row['M']:<5} {row['K']}x{row['N']:<6} {cfg:<20} "
          f"smem {row['shared_bytes'] / 1024:6.1f} KiB  regs {row['registers']}  "
          f"spills {row['spill_store_bytes']}/{row['spill_load_bytes']}  blocks/SM {row['blocks_per_sm']}  "
          f"wgmma {row['wgmma']} {row['wgmma_shape'] or ''} in flight {row['wgmma_in_flight']}  mma {row['mma_sync']}  "
          f"cp.async {row['cp_async']} tma {row['tma']}  {row['ptx_sha']}",
          flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/kernels", help="output folder (kernels.csv, kernels.json)")
    p.add_argument("--quick", action="store_true", help="K=3072 N=12288 only, M in 16,8192")
    p.add_argument("--shapes", default=None, help="comma list of KxN")
    p.add_argument("--m", default=None, help="comma list of M values (each picks its autotune bucket's configs)")
    p.add_argument("--only", default=None, help=f"comma list of kernels: {','.join(GEMMS)},fp8_gemm_tma,attention")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes
                   else [(3072, 12288)] if args.quick else SHAPES)
    args.m = [int(v) for v in args.m.split(",")] if args.m else ([16, 8192] if args.quick else MS)
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("error: kernel_report compiles real kernels; unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    env = harness.environment("cpu")
    env["device_name"] = "sm90 (compiled by Triton on the CPU; simulated driver)"
    print(f"[kernels] triton {env['triton']}  target sm90  commit {env['git_commit']}", flush=True)
    rows, interrupted = harness.collect_rows(run, args, "kernels")
    paths = harness.write_results(args.out, "kernels", rows, env, COLUMNS)
    print(f"[kernels] wrote {', '.join(paths.values())}", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
