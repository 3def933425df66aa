"""Every Triton kernel here but the attention's compiles, as its launcher launches it, without
FMA contraction: under ``benchmarks.simulated_gpu`` (compiled for sm90 by Triton and ptxas, nothing
runs) each public entry of ``qkernels.triton`` is called once and the kernel it launched is read.

Why: the PyTorch references, the interpreter and the unfused block round every product. A
contracted ``a * b + c`` rounds once, so a kernel compiled with contraction computes other
numbers than its reference on the GPU only, where the CPU tests cannot see it. Run 11 on an H100
found one: the epilogue-only pass's gated residual compiled to one ``fma.rn.bf16x2`` and was off
by a bf16 step in 27% of its entries. The GEMMs are compiled too, each autotuner cut to its
first config (tuning would compile every config; the launch options do not depend on it).

Run by ``tests/test_launch.py`` in a subprocess (it needs a real ``triton.jit``).
``python tests/contraction_checks.py [--break-fusion]`` prints one line per kernel and exits
non-zero on the first failure; ``--break-fusion`` launches the epilogue pass with contraction
allowed (the defect above), which the checks must catch.
"""

from __future__ import annotations

import gc
import importlib
import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.simulated_gpu import cuda_path_on_cpu, simulated_driver  # noqa: E402


def check(name: str, ok: bool) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
        sys.exit(1)


def compiled_kernels(hashes: set[str]) -> dict[str, object]:
    """The compiled kernels (Triton's ``CompiledKernel``) behind these launch hashes."""
    from triton.compiler.compiler import CompiledKernel

    with warnings.catch_warnings():  # isinstance on every live object touches deprecated module attributes
        warnings.simplefilter("ignore")
        return {o.metadata.hash: o for o in gc.get_objects()
                if isinstance(o, CompiledKernel) and o.metadata.hash in hashes}


def drive(kt, only_epilogue: bool) -> None:
    """One call of each entry, at small shapes (the sizes reach the compiler only as
    ints; alignment and dtypes decide the kernel)."""
    bf16, f32, i32 = torch.bfloat16, torch.float32, torch.int32
    m, k, n, g = 64, 128, 96, 2
    res, gate, rows = torch.empty(m, n, dtype=bf16), torch.empty(g, 2 * n, dtype=bf16)[:, n:], torch.zeros(m, dtype=i32)
    kt.gemm_epilogue(torch.empty(m, n, dtype=f32), bf16, False, res, gate, rows)
    if only_epilogue:
        return
    kt.gemm_epilogue(torch.empty(m, n, dtype=bf16), bf16, True, None, None, None)
    x = torch.empty(m, k, dtype=bf16)
    kt.quantize_per_token(x, None, True)
    kt.quantize_per_tensor(x, torch.ones(1), torch.ones(k), False)
    kt.dequantize_weight(torch.zeros(n, k, dtype=torch.int8), torch.ones(n), bf16)
    mod = torch.empty(g, 2 * k, dtype=bf16)
    kt.layernorm_modulate_quant(x, mod[:, :k], mod[:, k:], torch.zeros(m, dtype=i32), 1e-6, True)
    heads, d, lt, li = 2, 64, 8, 16
    rope = (torch.empty(lt, d // 2, 2), torch.empty(li, d // 2, 2))
    norms = [torch.ones(d, dtype=bf16) for _ in range(4)]
    kt.qk_norm_rope(torch.empty(lt, 3 * heads * d, dtype=bf16), torch.empty(li, 3 * heads * d, dtype=bf16), 1, heads,
                    *norms, *rope, 1e-6)
    # the GEMMs, with each epilogue (their dequant and epilogue arithmetic is elementwise too)
    mods = {name: importlib.import_module(f"qkernels.triton.{name}") for name in ("int8_gemm", "fp8_gemm",
                                                                                 "weight_only_gemm")}
    for tuned in (mods["int8_gemm"]._int8_gemm_kernel, mods["int8_gemm"]._int8_static_gemm_kernel,
                  mods["fp8_gemm"]._fp8_gemm_kernel, mods["weight_only_gemm"]._weight_only_gemm_kernel):
        tuned.configs = tuned.configs[:1]
    ws, bias, sa = torch.ones(n), torch.zeros(n, dtype=bf16), torch.ones(m)
    for dtype, gemm in ((torch.int8, kt.int8_gemm), (torch.float8_e4m3fn, kt.fp8_gemm), (torch.float8_e4m3fn,
                                                                                         kt.fp8_gemm_tma)):
        a, w = torch.zeros(m, k, dtype=dtype), torch.zeros(n, k, dtype=dtype)
        for epilogue in ((False, None, None, None), (True, None, None, None), (False, res, gate, rows)):
            gemm(a, sa, w, ws, bias, bf16, *epilogue)
    w8 = torch.zeros(n, k, dtype=torch.int8)
    kt.int8_static_gemm(x, torch.ones(1), torch.ones(k), w8, ws, bias)
    kt.weight_only_gemm(x, w8, ws, bias)


def main(argv: list[str]) -> int:
    with simulated_driver() as sim, cuda_path_on_cpu():
        import qkernels.triton as kt
        from qkernels.triton import fused

        if "--break-fusion" in argv:  # the defect: the epilogue pass launched with contraction allowed
            launch = fused._epilogue_launch
            fused._epilogue_launch = lambda grid, key, args, **meta: launch(grid, key, args,
                                                                            **{**meta, "enable_fp_fusion": True})
        drive(kt, only_epilogue="--break-fusion" in argv)
        launched = {}
        for launch in sim.launches:
            launched.setdefault(launch.kernel_hash, launch.kernel)
        kernels = compiled_kernels(set(launched))
        check("every launch's compiled kernel found", len(kernels) == len(launched))
        for h, name in launched.items():
            md, ptx = kernels[h].metadata, kernels[h].asm["ptx"]
            # no kernel here calls tl.fma: an fma in the PTX is the compiler's contraction (with it
            # allowed, quantize_per_tensor compiled its NaN-poison sum to fma, the epilogue pass its gated
            # residual)
            contracted = len(re.findall(r"\bfma\.rn\.", ptx))
            check(f"{name}: compiled without FMA contraction (enable_fp_fusion={md.enable_fp_fusion}, "
                  f"{contracted} fma in its PTX)", not md.enable_fp_fusion and contracted == 0)
    print("all contraction checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
