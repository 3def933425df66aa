"""Helpers shared by the Triton kernels: interpreter detection, autotune configs, input checks.

Importing this module imports triton; nothing outside ``qkernels.triton`` imports it at module
level, so ``import qkernels`` never does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..errors import InputError, UnsupportedShapeError
from ._launch import KernelLauncher, cdiv, next_power_of_2

# Read once at import, like triton.jit itself: a kernel decorated under TRITON_INTERPRET=1 is an
# interpreted function for the life of the process.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"



def _fix_interpreter_index() -> None:
    """Triton 3.4-3.6's interpreter turns a runtime int into a 1-element array and indexes with
    ``int(array)``, which numpy >= 2.4 refuses, so ``range(0, K, BLOCK_K)`` fails under
    TRITON_INTERPRET (triton-lang/triton#9171, fixed upstream by #9172). Apply the same one-line
    fix, only under the interpreter and only where the failure is present."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor
    if getattr(original, "_qkernels_index_fix", False):
        return

    def index(self):
        return int(self.handle.data.reshape(-1)[0])

    def patched(tensor, *scope):  # (tensor, scope) in Triton 3.6+, (tensor) in 3.4 and 3.5
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched._qkernels_index_fix = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_index()

# Offsets are int32 inside the kernels: every operand must stay under 2^31 elements
# (8192 x 18432 outputs = 151M, far under).
_MAX_NUMEL = 2**31 - 1

TORCH_TO_TL = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
}

# 1.5 * 2^23: for |v| <= 2^22, (v + C) - C is v rounded to an integer, half to even, by the
# fp32 add's own rounding. libdevice.rint is an extern call the interpreter cannot run, so this
# is the one rounding used on CUDA and under TRITON_INTERPRET alike.
RINT_MAGIC = 12582912.0


def m_bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two (at most 16384), so a new token
    count re-uses the configuration tuned for its bucket instead of re-tuning."""
    return min(next_power_of_2(m), 16384)


def cfg(bm: int, bn: int, bk: int, stages: int, warps: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_stages=stages, num_warps=warps)


# Under the interpreter one small config: each program runs as numpy, so autotuning would run
# every config for real, and block sizes only trade Python overhead for numpy work.
# Measured at M=100, K=208, N=144 on this project's 2-core CI machine, int8 GEMM per launch:
# 32x64x64 0.31 s, 64x64x64 0.12 s, 128x64x64 0.07 s (fp8 / weight-only 0.08 s; 128x128x128
# makes those 0.25-0.3 s). GROUP_M 2 so that M > 256 exercises the grouped tile order.
INTERPRET_CONFIGS = [cfg(128, 64, 64, 1, 4, 2)]

SMALL_M = 64  # buckets up to this use the small-M configs


def prune_by_m(configs, named_args, **kwargs):
    """Small-M buckets try only the small-M configs and large ones only the large: halves the
    autotune time of each new (bucket, N, K)."""
    if len(configs) == 1:
        return configs
    small = named_args["M_BUCKET"] <= SMALL_M
    keep = [c for c in configs if (c.kwargs["BLOCK_M"] <= SMALL_M) == small]
    return keep or configs


def check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise InputError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.numel() > _MAX_NUMEL:
        raise UnsupportedShapeError(f"{name} has {t.numel()} elements; the Triton kernels index with int32 (< 2^31)")


def check_vector(name: str, t: torch.Tensor | None, n: int, dtype: torch.dtype | None = torch.float32) -> None:
    if t is None:
        return
    if t.shape != (n,):
        raise InputError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise InputError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise InputError(f"{name} must be contiguous")


def check_device(*tensors: torch.Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise InputError(f"tensors on different devices: {sorted(map(str, devices))}")
    dev = next(iter(devices))
    if dev.type != "cuda" and not INTERPRET:
        raise InputError(f"Triton kernels need CUDA tensors (CPU only under TRITON_INTERPRET=1), got {dev}")


@triton.jit
def rint_clamp_int8(q):
    """Clamp to [-127, 127], then round half to even. Equal to torch's round-then-clamp for every
    finite q, since the bounds are integers."""
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    return ((q + 12582912.0) - 12582912.0).to(tl.int8)


@triton.jit
def soft_e4m3_bits(v):
    """float8_e4m3fn bit pattern (as uint8) of fp32 ``v`` already clamped to [-448, 448],
    rounded to nearest even, subnormals included.

    Only used under TRITON_INTERPRET, whose own fp32 -> e4m3 cast flushes subnormal results
    to zero; on CUDA the hardware cast (cvt.rn.satfinite) is used.
    e' = max(floor(log2|v|), -6) picks the binade (grid step 2^(e'-3)); m = rint(|v| / step)
    is in [0, 16]; bits = (e' + 6) * 8 + m, where m = 16 carries into the next binade and the
    subnormal binade (e' = -6) needs no special case.
    """
    bits = v.to(tl.int32, bitcast=True)
    sign = ((bits >> 24) & 0x80).to(tl.int32)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    inv_step = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e'), exact
    m = ((tl.abs(v) * inv_step + 12582912.0) - 12582912.0).to(tl.int32)
    out = (e + 6) * 8 + m
    out = tl.where(v != v, 0x7F, out)
    return (out | sign).to(tl.uint8)


# --------------------------------------------------------------------------------------------
# GEMM building blocks


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in GROUP_M-row bands, so programs running together share W tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_m)
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def gemm_tile_setup(a_ptr, w_ptr, M, N, stride_am, stride_ak, stride_wn, stride_wk,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (``offs_m``, ``offs_n``) and the pointers of its first K tiles:
    A [M, K] row-major as [BLOCK_M, BLOCK_K], and the stored [N, K] weight read through its
    strides as [BLOCK_K, BLOCK_N] (K-major B, the layout 8-bit wgmma takes: never transposed or
    copied). Edge rows/cols wrap onto valid ones (``rm``), so loads need no M/N mask; the store
    is masked."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk
    return offs_m, offs_n, rm, rk, a_ptrs, w_ptrs


@triton.jit
def load_k_tiles(a_ptrs, w_ptrs, rk, k, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The k-th A and W tiles; past K (when K % BLOCK_K != 0) zeros, which add nothing to a dot."""
    if EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(w_ptrs)
    else:
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)  # a float 0 casts to any dtype
        b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
    return a, b


# Kernels read this global as a compile-time constant.
INTERPRET_C = tl.constexpr(INTERPRET)


@triton.jit
def round_fp32_to_bf16_grid(y):
    """y rounded to bf16 precision (nearest even), still fp32. The interpreter's fp32 -> bf16 cast
    truncates where CUDA's cvt.rn rounds; pre-rounding makes the truncation exact, so CPU tests
    see CUDA's results. NaN and Inf keep their class (0x7FC00000 + 0x7FFF keeps the exponent)."""
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_dtype(v, dtype: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype``'s grid (bf16 / fp16; fp32 unchanged), kept in fp32. The
    interpreter's fp32 -> bf16 cast truncates, so it rounds by bits there."""
    if dtype == tl.bfloat16:
        if INTERPRET_C:
            v = round_fp32_to_bf16_grid(v)
        else:
            v = v.to(tl.bfloat16).to(tl.float32)
    if dtype == tl.float16:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def store_scaled(c_ptr, y, w_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn,
                 HAS_BIAS: tl.constexpr):
    """``y * w_scale[n] (+ bias)`` in fp32, cast to C's dtype, masked store. ``y`` already holds
    the row-scaled accumulator, so the order is that of ``qkernels.ops.dequant_epilogue``."""
    n_mask = offs_n < N
    ws = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = y * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if INTERPRET_C and c_ptr.dtype.element_ty == tl.bfloat16:
        y = round_fp32_to_bf16_grid(y)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])


# Epilogues after the scale (``EPILOGUE``): the elementwise work a DiT block does right after its
# Linears, done on the fp32 tile before the one rounding to C's dtype.
EPI_NONE, EPI_GELU_TANH, EPI_GATED_RESIDUAL = 0, 1, 2


@triton.jit
def store_epilogue(c_ptr, y, w_scale_ptr, bias_ptr, res_ptr, gate_ptr, grow_ptr, offs_m, offs_n, M, N,
                   stride_cm, stride_cn, stride_gm, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr):
    """:func:`store_scaled` plus an epilogue on the fp32 value ``v = y * w_scale (+ bias)``:
    ``EPI_GELU_TANH``: ``gelu_tanh(v) = v * sigmoid(2u)``, ``u = sqrt(2/pi) (v + 0.044715 v^3)``
    (``0.5 (1 + tanh u) = sigmoid(2u)``: no tanh, which the interpreter lacks);
    ``EPI_GATED_RESIDUAL``: ``residual[m, n] + gate[gate_rows[m], n] * v`` (adaLN's gated
    residual; ``residual`` has C's strides, ``gate`` rows are ``stride_gm`` apart)."""
    n_mask = offs_n < N
    mask = (offs_m[:, None] < M) & n_mask[None, :]
    ws = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = y * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # The unfused block rounds the Linear's output, then each elementwise op, to C's dtype: so
    # does this, so that fused and unfused blocks compute the same numbers.
    if EPILOGUE == 1:
        y = round_to_dtype(y, c_ptr.dtype.element_ty)
        u = 0.7978845608028654 * (y + 0.044715 * (y * y * y))
        y = y / (1.0 + tl.exp(-2.0 * u))
    if EPILOGUE == 2:
        y = round_to_dtype(y, c_ptr.dtype.element_ty)
        m_safe = offs_m % M
        g_row = tl.load(grow_ptr + m_safe)
        g = tl.load(gate_ptr + g_row[:, None].to(tl.int64) * stride_gm + offs_n[None, :], mask=mask, other=0.0)
        r = tl.load(res_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, mask=mask, other=0.0)
        y = r.to(tl.float32) + round_to_dtype(g.to(tl.float32) * y, c_ptr.dtype.element_ty)
    if INTERPRET_C and c_ptr.dtype.element_ty == tl.bfloat16:
        y = round_fp32_to_bf16_grid(y)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask)


def gemm_grid(m: int, n: int):
    return lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)


def launch_gemm(launch, pointers: tuple, a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, tail: tuple = (),
                **meta) -> None:
    """Launch a GEMM kernel whose arguments are ``pointers`` then ``M, N, K, M_BUCKET``, the
    strides of A [M, K], W [N, K] and C [M, N] (the signature every GEMM kernel here shares) and
    ``tail``, on the grid and autotune key of that shape. fp32 epilogues without FMA contraction:
    (acc * a_s) * w_s + bias as separate roundings, like torch."""
    m, k = a.shape
    n = w.shape[0]
    mb = m_bucket(m)
    launch(gemm_grid(m, n), (mb, n, k),
           (*pointers, m, n, k, mb, a.stride(0), a.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
            *tail),
           **meta)


def check_epilogue(m: int, n: int, gelu: bool, residual: torch.Tensor | None, gate: torch.Tensor | None,
                   gate_rows: torch.Tensor | None, out_dtype: torch.dtype) -> int:
    """The ``EPILOGUE`` code for these arguments, after checking them (see :func:`store_epilogue`)."""
    if residual is None:
        if gate is not None or gate_rows is not None:
            raise InputError("gate / gate_rows are given without a residual")
        return EPI_GELU_TANH if gelu else EPI_NONE
    if gelu:
        raise InputError("one epilogue at a time: gelu or a gated residual, not both")
    if gate is None or gate_rows is None:
        raise InputError("a gated residual needs residual, gate and gate_rows")
    if residual.shape != (m, n) or residual.dtype != out_dtype or not residual.is_contiguous():
        raise InputError(f"residual must be a contiguous [{m}, {n}] {out_dtype} tensor, got "
                         f"{residual.dtype} {tuple(residual.shape)}")
    if gate.dim() != 2 or gate.shape[1] != n or gate.stride(1) != 1:
        raise InputError(f"gate must be [G, {n}] with unit column stride, got {tuple(gate.shape)}")
    if gate_rows.shape != (m,) or gate_rows.dtype != torch.int32:
        raise InputError(f"gate_rows must be int32 [{m}], got {gate_rows.dtype} {tuple(gate_rows.shape)}")
    check_device(residual, gate, gate_rows)
    return EPI_GATED_RESIDUAL


def scaled_gemm(launch, a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, dtype: torch.dtype, gelu: bool = False,
                residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                gate_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Check and launch a rowwise-scaled 8-bit GEMM kernel (``a`` and ``w`` both ``dtype``):
    ``(a @ w.T) * a_scale[M] * w_scale[N] (+ bias)``, then the optional epilogue (GELU-tanh, or
    ``residual + gate[gate_rows] * y``), out in ``out_dtype``."""
    m, n, k = check_gemm(a, w, w_scale, bias, (dtype,), (dtype,))
    check_vector("a_scale", a_scale, m)
    check_out_dtype(out_dtype)
    epilogue = check_epilogue(m, n, gelu, residual, gate, gate_rows, out_dtype)
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    launch_gemm(launch, (a, w, c, a_scale, w_scale, *_epilogue_pointers(bias, residual, gate, gate_rows, w_scale)),
                a, w, c, (gate.stride(0) if gate is not None else 0,), HAS_BIAS=bias is not None, EPILOGUE=epilogue)
    return c


def _epilogue_pointers(bias, residual, gate, gate_rows, dummy):
    """bias, residual, gate, gate_rows pointers; an unused one points at ``dummy`` (never read)."""
    return tuple(t if t is not None else dummy for t in (bias, residual, gate, gate_rows))


def check_gemm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               a_dtypes: tuple[torch.dtype, ...], w_dtypes: tuple[torch.dtype, ...]) -> tuple[int, int, int]:
    check_2d("activation", a)
    check_2d("weight", w)
    if a.dtype not in a_dtypes:
        raise InputError(f"activation dtype {a.dtype} not supported here; expected one of {a_dtypes}")
    if w.dtype not in w_dtypes:
        raise InputError(f"weight dtype {w.dtype} not supported here; expected one of {w_dtypes}")
    m, k = a.shape
    n, kw = w.shape
    if k != kw:
        raise InputError(f"activation has K={k}, weight [N, K] has K={kw}")
    check_vector("weight_scale", w_scale, n)
    check_vector("bias", bias, n, dtype=None)
    check_device(a, w, w_scale, bias)
    return m, n, k


OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_out_dtype(dtype: torch.dtype) -> None:
    if dtype not in OUT_DTYPES:
        raise InputError(f"output dtype {dtype} not supported; use bfloat16, float16 or float32")


# Autotune configs for Hopper (sm90): wgmma needs num_warps % 4 == 0 and BLOCK_M % 64 == 0;
# 8-bit operands: BLOCK_K 128 is 128 B per row, one full swizzle line. 128 x 256 x 128 with 3
# stages is 144 KB of shared memory (of 227 KB). Small-M configs (M bucket <= 64) fall back to
# mma.sync tiles of 16/32 rows and take a wide K slice, since those shapes are bound by reading W.
CONFIGS_8BIT = INTERPRET_CONFIGS if INTERPRET else [
    cfg(128, 256, 128, 3, 8),
    cfg(128, 256, 128, 4, 8),
    cfg(256, 128, 128, 3, 8),
    cfg(128, 128, 128, 4, 8),
    cfg(128, 128, 128, 4, 4),
    cfg(128, 256, 64, 4, 8),
    cfg(64, 256, 128, 4, 4),
    cfg(128, 128, 64, 5, 4),
    # small M
    cfg(16, 64, 256, 4, 4),
    cfg(32, 64, 256, 4, 4),
    cfg(64, 64, 256, 3, 4),
    cfg(32, 128, 128, 4, 4),
    cfg(64, 128, 128, 4, 4),
]

# 16-bit activation tiles (weight-only and the fused static kernel): 128 x 64 bf16 is 128 B rows.
CONFIGS_16BIT_A = INTERPRET_CONFIGS if INTERPRET else [
    cfg(128, 256, 64, 3, 8),
    cfg(128, 128, 64, 4, 8),
    cfg(128, 128, 64, 4, 4),
    cfg(128, 128, 128, 3, 8),
    cfg(64, 256, 64, 4, 4),
    # small M
    cfg(16, 64, 128, 4, 4),
    cfg(32, 64, 128, 4, 4),
    cfg(64, 64, 128, 3, 4),
    cfg(16, 128, 128, 4, 4),
    cfg(64, 128, 64, 4, 4),
]

AUTOTUNE_KEY = ["M_BUCKET", "N", "K"]
# Autotuning results go to Triton's cache directory (TRITON_CACHE_DIR, default ~/.triton/cache),
# keyed by Triton's version, the target (sm90, ...), the kernel's source, the tuning key and the
# configs: a second process (the server's restart, the next quantize run) reuses them instead of
# timing every config of every new shape again. (Triton skips the disk cache under the interpreter
# and for configs with a pre-hook.)
AUTOTUNE_CACHE = True


def even_k(args) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


def make_launcher(kernel, fp_fusion: bool = False):
    """``launch(grid, key, args, **meta)`` for ``kernel``: a :class:`KernelLauncher` (the Python
    launch work paid once per specialization), or under the interpreter a plain launch.

    The kernel compiles with FMA contraction only if ``fp_fusion`` (or a call's own
    ``enable_fp_fusion``) says so. The references, the interpreter and the unfused block round
    every product; a contracted ``a * b + c`` rounds once, which only a GPU run shows. Run 11 (an
    H100) found a launch that had left Triton's default on (one of four): the epilogue pass's gated
    residual compiled to one ``fma.rn.bf16x2`` and was a bf16 step off in 27% of its entries
    (``tests/contraction_checks.py`` now checks the compiled code of every kernel but the
    attention's)."""
    if INTERPRET:
        return lambda grid, key, args, **meta: kernel[grid](*args, **{"enable_fp_fusion": fp_fusion, **meta})
    return KernelLauncher(kernel, fp_fusion)
