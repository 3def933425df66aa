"""int8-cublaslt: availability, layout planning (CPU), and the GEMM, epilogue and layer (GPU)."""

from __future__ import annotations

import ctypes
import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from qkernels import BackendUnavailableError, InputError, QuantLinear, UnsupportedShapeError, list_backends
from qkernels import capabilities, ops
from qkernels.cublaslt import _lib, plan
from qkernels.registry import resolve_backend

from .metrics import predicted_error, rel_error

HAS_CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# availability (CPU)


def test_cpu_row_says_why():
    row = next(r for r in list_backends("cpu") if r.name == "int8-cublaslt")
    assert row.format == "w8a8-int8" and not row.available
    assert row.reason == "runs on cuda, not cpu"
    with pytest.raises(BackendUnavailableError, match=r"int8-cublaslt.*runs on cuda.*Available here: int8-torch"):
        resolve_backend("int8-cublaslt", "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="tests the reason given on a machine without CUDA")
def test_cuda_row_without_cuda():
    reason = capabilities.cublaslt_reason(torch.device("cuda"))
    assert reason and "no usable CUDA device" in reason


def test_missing_cupy_reason_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    capabilities.cupy_reason.cache_clear()
    try:
        reason = capabilities.cupy_reason()
    finally:
        monkeypatch.undo()
        capabilities.cupy_reason.cache_clear()
    assert "CuPy is not installed" in reason
    assert "pip install 'qkernels[cublaslt]'" in reason and "cupy-cuda12x" in reason and "cupy-cuda13x" in reason


def test_missing_library_reason(monkeypatch, tmp_path):
    bogus = tmp_path / "libcublasLt.so.99"
    bogus.write_bytes(b"not an ELF file")
    for found, expect in (([], "not loaded by torch, not in an nvidia-cublas wheel"), ([str(bogus)], str(bogus))):
        monkeypatch.setattr(_lib, "candidates", lambda found=found: found)
        _lib._load.cache_clear()
        capabilities._cublaslt_library_reason.cache_clear()
        try:
            reason = capabilities._cublaslt_library_reason()
            with pytest.raises(OSError, match="libcublasLt not found"):
                _lib.lib()
        finally:
            _lib._load.cache_clear()
            capabilities._cublaslt_library_reason.cache_clear()
        assert reason.startswith("libcublasLt not found") and expect in reason
        assert "nvidia-cublas" in reason


def test_library_search_order(monkeypatch):
    monkeypatch.setattr(_lib, "_loaded_in_process", lambda: ["/torch/lib/libcublasLt.so.13"])
    monkeypatch.setattr(_lib, "_in_nvidia_packages", lambda: ["/site/nvidia/cu13/lib/libcublasLt.so.13",
                                                              "/torch/lib/libcublasLt.so.13"])
    monkeypatch.setattr(_lib.ctypes.util, "find_library", lambda name: "libcublasLt.so.12")
    assert _lib.candidates() == ["/torch/lib/libcublasLt.so.13", "/site/nvidia/cu13/lib/libcublasLt.so.13",
                                 "libcublasLt.so.12"]


def test_import_never_loads_cupy_or_cublaslt():
    code = ("import sys, qkernels, qkernels.cublaslt.plan, qkernels.cublaslt.epilogue; "
            "from qkernels.cublaslt import _lib; qkernels.list_backends('cpu'); "
            "print('cupy' in sys.modules, _lib._load.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "0"]  # CuPy not imported, libcublasLt never looked up


def test_struct_layouts_match_cublaslt_h():
    # cublasLtMatmulHeuristicResult_t: algo (8 x uint64), size_t workspaceSize, int state,
    # float wavesCount, int reserved[4].
    R = _lib.HeuristicResult
    assert ctypes.sizeof(_lib.MatmulAlgo) == 64 and ctypes.sizeof(R) == 96
    assert [R.algo.offset, R.workspaceSize.offset, R.state.offset, R.wavesCount.offset, R.reserved.offset] == \
        [0, 64, 72, 76, 80]
    err = _lib.CublasLtError("cublasLtMatmul", 15, "M=3")
    assert "CUBLAS_STATUS_NOT_SUPPORTED (15)" in str(err) and "M=3" in str(err)
    with pytest.raises(_lib.CublasLtError, match="INVALID_VALUE"):
        _lib.check("cublasLtMatmulDescCreate", 7)


# --------------------------------------------------------------------------------------------
# layout planning (CPU): every transpose / leading-dimension case, checked by emulating the
# column-major GEMM the plan describes on the tensors' own memory.


def strided(rows, cols, layout, dtype, pad=3):
    """A rows x cols tensor viewing a flat buffer: row-major, column-major, or either with a
    padded leading dimension; returns (flat buffer from the first element, tensor)."""
    if layout in ("row", "row-pad"):
        ld = cols + (pad if layout == "row-pad" else 0)
        strides, size = (ld, 1), (rows - 1) * ld + cols
    else:
        ld = rows + (pad if layout == "col-pad" else 0)
        strides, size = (1, ld), (cols - 1) * ld + rows
    if dtype == torch.int8:
        flat = torch.randint(-127, 128, (size,), dtype=torch.int8)
    else:
        flat = torch.full((size,), SENTINEL, dtype=dtype)  # padding must survive untouched
    return flat, flat.as_strided((rows, cols), strides)


SENTINEL = -2**31  # no product of these small int8 matrices reaches it
LAYOUTS = ["row", "col", "row-pad", "col-pad"]
PLAN_CASES = [
    pytest.param(m, n, k, la, lw, lo, id=f"M{m}N{n}K{k}-a_{la}-w_{lw}-out_{lo}")
    for (m, n, k) in [(1, 12, 8), (5, 8, 12), (17, 20, 36), (6, 1, 4)]
    for la in LAYOUTS for lw in LAYOUTS for lo in LAYOUTS
]


@pytest.mark.parametrize("m,n,k,la,lw,lo", PLAN_CASES)
def test_plan_emulation_is_exact(m, n, k, la, lw, lo):
    a_flat, a = strided(m, k, la, torch.int8)
    w_flat, w = strided(n, k, lw, torch.int8)
    d_flat, out = strided(m, n, lo, torch.int32)
    p = plan.plan_linear(m, n, k, a.stride(), w.stride(), out.stride())
    assert (p.m, p.n, p.k) == ((n, m, k) if p.swapped else (m, n, k))
    assert p.swapped == (out.stride(1) == 1 or n == 1)
    first, second = (w_flat, a_flat) if p.swapped else (a_flat, w_flat)
    plan.emulate(p, first, second, d_flat)
    assert torch.equal(out.long(), a.long() @ w.long().t())
    # Padding between rows/columns is never written.
    assert (d_flat == SENTINEL).sum() == d_flat.numel() - m * n


def test_plan_emulation_check_fails_on_a_wrong_plan():
    a_flat, a = strided(5, 8, "row", torch.int8)
    w_flat, w = strided(12, 8, "row", torch.int8)
    d_flat, out = strided(5, 12, "row", torch.int32)
    p = plan.plan_linear(5, 12, 8, a.stride(), w.stride(), out.stride())
    # op(A) read as N on an N x K storage instead of T on the K x N one: same shape, wrong data.
    wrong = plan.GemmPlan(p.m, p.n, p.k, plan.Storage(p.a.cols, p.a.rows, p.a.cols, _lib.OP_N), p.b, p.d, True)
    plan.emulate(wrong, w_flat, a_flat, d_flat)
    assert not torch.equal(out.long(), a.long() @ w.long().t())


def test_linear_plan_is_tn_with_contiguous_lds():
    m, n, k = 8192, 12288, 3072
    p = plan.plan_linear(m, n, k, (k, 1), (k, 1), (n, 1))
    assert p.ops == "TN" and p.swapped and (p.m, p.n, p.k) == (n, m, k)
    assert p.a == plan.Storage(rows=k, cols=n, ld=k, op=_lib.OP_T)  # the weight, read in place
    assert p.b == plan.Storage(rows=k, cols=m, ld=k, op=_lib.OP_N)  # the activation
    assert p.d == plan.Storage(rows=n, cols=m, ld=n, op=_lib.OP_N)  # out^T, i.e. row-major out
    assert plan.imma_reason(p) is None
    assert p.layout_specs() == ((_lib.R_8I, k, n, k), (_lib.R_8I, k, m, k), (_lib.R_32I, n, m, n))


@pytest.mark.parametrize("la,lw,lo,expect", [
    ("row", "row", "row", None),
    ("row", "row", "col", None),                       # TN as well, but m = M must be % 4
    ("col", "row", "row", "ops are TT"),
    ("row", "col", "row", "ops are NN"),
    ("col", "col", "col", "ops are NT"),
])
def test_imma_reason_per_layout(la, lw, lo, expect):
    m, n, k = 8, 12, 16
    _, a = strided(m, k, la, torch.int8, pad=0)
    _, w = strided(n, k, lw, torch.int8, pad=0)
    _, out = strided(m, n, lo, torch.int32, pad=0)
    reason = plan.imma_reason(plan.plan_linear(m, n, k, a.stride(), w.stride(), out.stride()))
    if expect is None:
        assert reason is None
    else:
        assert expect in reason and "IMMA takes only TN" in reason


def test_imma_reason_alignment_of_dims_and_lds():
    k, n = 12, 8
    p = plan.plan_linear(7, n, k, (k + 2, 1), (k, 1), (n, 1))  # a's rows padded to ld 14
    assert "ldB = 14" in plan.imma_reason(p)
    p = plan.plan_linear(5, 6, 8, (8, 1), (8, 1), (6, 1))
    assert "m = 6 is not a multiple of 4" in plan.imma_reason(p)
    p = plan.plan_linear(5, 6, 8, (8, 1), (8, 1), (1, 5))     # column-major out: m = M = 5
    assert "m = 5" in plan.imma_reason(p) and "ldC/D = 5" in plan.imma_reason(p)
    assert plan.alignment_reason(0x1000, 0x2004) is None
    assert "0x1002" in plan.alignment_reason(0x1000, 0x1002)


def test_plan_refuses_storage_without_unit_stride():
    with pytest.raises(UnsupportedShapeError, match="no unit stride"):
        plan.plan_linear(4, 8, 8, (16, 2), (8, 1), (8, 1))
    with pytest.raises(UnsupportedShapeError, match="overlap"):
        plan.plan_linear(4, 8, 8, (4, 1), (8, 1), (8, 1))
    with pytest.raises(UnsupportedShapeError, match="empty"):
        plan.as_column_major(0, 4, 4, 1)


def test_linear_shape_reason():
    for k, n in [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432), (3584, 3072), (204, 76)]:
        assert plan.linear_shape_reason(k, n) is None, (k, n)  # 204 x 76: % 4 but not % 8 (_int_mm's rule)
    assert "multiples of 4" in plan.linear_shape_reason(203, 76)
    assert "multiples of 4" in plan.linear_shape_reason(204, 77)
    from qkernels import get_backend

    assert get_backend("int8-cublaslt").unsupported_shape_reason(203, 77) is not None


def test_m_bucket():
    assert [plan.m_bucket(m) for m in (1, 16, 17, 100, 5000, 8192, 8193, 16000)] == \
        [16, 16, 32, 128, 8192, 8192, 16384, 16384]
    with pytest.raises(UnsupportedShapeError):
        plan.m_bucket(0)


# --------------------------------------------------------------------------------------------
# epilogue (CPU parts): source variants and the bf16 rounding it implements


def test_epilogue_source_variants():
    from qkernels.cublaslt import epilogue

    src = epilogue.kernel_source(torch.bfloat16, torch.float16)
    assert "#define HAS_BIAS 1" in src and "f32_to_bf16" in src and "h2f(v)" in src
    # Separate roundings, as torch does them: an FMA would round once and differ.
    assert "__fmul_rn(__fmul_rn(__int2float_rn(acc_row[n]), sa), w_scale[n])" in src and "__fadd_rn" in src
    assert "#define HAS_BIAS 0" in epilogue.kernel_source(torch.float32, None)
    with pytest.raises(InputError, match="dequant epilogue"):
        epilogue.kernel_source(torch.int8, None)


def _bf16_bits_as_kernel(f: torch.Tensor) -> torch.Tensor:
    """The kernel's f32_to_bf16, step for step, in int64 arithmetic."""
    u = f.view(torch.int32).long() & 0xFFFFFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return torch.where(nan, torch.full_like(r, 0x7FC0), r)


def test_bf16_rounding_matches_torch():
    f = torch.cat([torch.randn(100_000) * 10.0 ** torch.randint(-30, 30, (100_000,)),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.3895e38, -3.3895e38,
                                 1.00390625, 1.01171875, 2**-133])])  # ties, overflow to inf, subnormal
    torch_bits = f.to(torch.bfloat16).view(torch.int16).long() & 0xFFFF
    assert torch.equal(_bf16_bits_as_kernel(f), torch_bits)
    nan_bits = _bf16_bits_as_kernel(torch.tensor([float("nan")]))
    assert torch.tensor([nan_bits.item()], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).isnan().all()


def test_op_reference_passes_opcheck():
    from qkernels.cublaslt import int8_mm_dequant

    a = torch.randint(-127, 128, (17, 64), dtype=torch.int8)
    w = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    args = (a, torch.rand(17), w, torch.rand(48), torch.randn(48, dtype=torch.bfloat16), torch.bfloat16)
    torch.library.opcheck(int8_mm_dequant.torch_op, args)
    assert torch.equal(int8_mm_dequant(*args), ops.dequant_epilogue(a.int() @ w.int().t(), *args[1:2], args[3],
                                                                    args[4], torch.bfloat16))


# --------------------------------------------------------------------------------------------
# GPU

gpu = pytest.mark.gpu

# Qwen-Image GEMMs (K, N): attention qkv/out 3072x3072, MLP up 3072->12288 and down
# 12288->3072, adaLN 3072->18432, text 3584->3072.
QWEN_KN = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432), (3584, 3072)]


def _gemm_ok():
    if not HAS_CUDA:
        return "needs CUDA"
    return capabilities.cublaslt_reason(torch.device("cuda"))


def _needs_backend():
    reason = _gemm_ok()
    if reason:
        pytest.fail(f"int8-cublaslt unavailable on this GPU machine: {reason}")


def _rand_int8(*shape, device="cuda"):
    return torch.randint(-127, 128, shape, dtype=torch.int8, device=device)


@gpu
@pytest.mark.parametrize("k,n", QWEN_KN, ids=[f"K{k}N{n}" for k, n in QWEN_KN])
@pytest.mark.parametrize("m", [1, 17, 333, 4096])
def test_gemm_bit_exact_vs_int_mm_qwen_shapes(m, k, n):
    _needs_backend()
    from qkernels.cublaslt.matmul import int8_gemm

    a, w = _rand_int8(m, k), _rand_int8(n, k)
    got = int8_gemm(a, w)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got, ops.int_mm(a, w))  # torch._int_mm (M <= 16 zero-padded)


@gpu
@pytest.mark.parametrize("m,k,n", [(1, 4, 4), (7, 204, 76), (100, 1028, 260), (5000, 3076, 3068)])
def test_gemm_bit_exact_odd_shapes(m, k, n):
    # K, N % 4 but not % 8: shapes torch._int_mm refuses. float64 is exact below 2^53.
    _needs_backend()
    from qkernels.cublaslt.matmul import int8_gemm

    a, w = _rand_int8(m, k), _rand_int8(n, k)
    ref = (a.double() @ w.double().t()).int()
    assert torch.equal(int8_gemm(a, w), ref)
    a[0, 0] = 100 if a[0, 0] != 100 else -100  # one changed input is seen
    assert not torch.equal(int8_gemm(a, w), ref)


@gpu
def test_gemm_column_major_out_and_refusals():
    _needs_backend()
    from qkernels.cublaslt.matmul import int8_gemm

    m, k, n = 64, 256, 96
    a, w = _rand_int8(m, k), _rand_int8(n, k)
    out = torch.empty(n, m, dtype=torch.int32, device="cuda").t()  # column-major [M, N]
    int8_gemm(a, w, out)
    assert torch.equal(out, ops.int_mm(a, w))
    with pytest.raises(UnsupportedShapeError, match="IMMA takes only TN"):
        int8_gemm(a, _rand_int8(k, n).t())  # weight stored [K, N]: NN
    with pytest.raises(UnsupportedShapeError, match="multiple of 4"):
        int8_gemm(_rand_int8(m, 258), _rand_int8(n, 258))
    with pytest.raises(UnsupportedShapeError, match="4-byte aligned"):
        int8_gemm(_rand_int8(m, k + 2)[:, 2:], w)
    with pytest.raises(InputError, match="int8 operands"):
        int8_gemm(a.float(), w)


@gpu
def test_algorithm_cache_hit_and_bucket_reuse():
    _needs_backend()
    from qkernels.cublaslt import matmul

    matmul.clear_cache()
    k, n = 3072, 3072
    w = _rand_int8(n, k)
    a = _rand_int8(5000, k)
    ref = ops.int_mm(a, w)
    assert torch.equal(matmul.int8_gemm(a, w), ref)
    first = matmul.cache_info()
    assert first["searches"] == 1 and first["hits"] == 0 and first["shapes"] == 1
    assert torch.equal(matmul.int8_gemm(a, w), ref)
    second = matmul.cache_info()
    assert second["searches"] == 1 and second["hits"] == 1
    a2 = _rand_int8(6000, k)  # same bucket (8192): no new search
    assert torch.equal(matmul.int8_gemm(a2, w), ops.int_mm(a2, w))
    third = matmul.cache_info()
    assert third["searches"] == 1 and third["checked_reuse"] + third["heuristic_fallback"] == 1
    assert third["shapes"] == 2 and third["algorithms"] == 1


def _epilogue_inputs(m, n, bias_dtype):
    acc = torch.randint(-2**31, 2**31 - 1, (m, n), dtype=torch.int32, device="cuda")
    acc[:, :8] = torch.randint(-3000, 3000, (m, min(8, n)), dtype=torch.int32, device="cuda")
    a_scale = torch.rand(m, device="cuda") * 1e-3
    a_scale[1:2] = float("nan")   # a poisoned token (when m > 1)
    w_scale = torch.rand(n, device="cuda") * 1e-2
    bias = None if bias_dtype is None else torch.randn(n, device="cuda").to(bias_dtype)
    return acc, a_scale, w_scale, bias


@gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_epilogue_bit_exact_vs_reference(out_dtype, bias_dtype):
    _needs_backend()
    from qkernels.cublaslt.epilogue import dequant_epilogue

    for m, n in [(1, 4), (3, 1030), (70000, 12)]:  # grid.y loop past 65535 rows
        acc, a_scale, w_scale, bias = _epilogue_inputs(m, n, bias_dtype)
        got = dequant_epilogue(acc, a_scale, w_scale, bias, out_dtype)
        ref = ops.dequant_epilogue(acc, a_scale, w_scale, bias, out_dtype)
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
        if m > 1:
            assert got[1].isnan().all() and not got[0].isnan().any()
    # A 1-ulp change of one weight scale is seen.
    acc, a_scale, w_scale, bias = _epilogue_inputs(4, 64, bias_dtype)
    w_scale[20] = torch.nextafter(w_scale[20], torch.tensor(1.0, device="cuda"))
    got = dequant_epilogue(acc, a_scale, w_scale, bias, out_dtype)
    w_scale[20] = torch.nextafter(w_scale[20], torch.tensor(0.0, device="cuda"))
    ref = ops.dequant_epilogue(acc, a_scale, w_scale, bias, out_dtype)
    if out_dtype == torch.float32:  # (bf16/fp16 rounding may absorb one fp32 ulp)
        assert not torch.equal(got[[0, 2, 3], 20], ref[[0, 2, 3], 20])


def make_linear(k, n, bias=True, dtype=torch.bfloat16):
    lin = nn.Linear(k, n, bias=bias, device="cuda", dtype=torch.float32)
    with torch.no_grad():
        lin.weight.normal_(0, k**-0.5)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("k,n,m,bias,static", [
    (3072, 3072, 333, True, False), (3072, 12288, 17, False, False), (3584, 3072, 1, True, True),
    (208, 144, 100, True, False),
])
def test_layer_equals_int8_torch(dtype, k, n, m, bias, static):
    _needs_backend()
    lin = make_linear(k, n, bias=bias, dtype=dtype)
    kw = dict(activation="static", input_scale=0.02) if static else {}
    layer = QuantLinear.from_linear(lin, "int8-torch", **kw)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    ref = layer(x)
    layer.set_backend("int8-cublaslt")
    assert "backend=int8-cublaslt" in repr(layer)
    y = layer(x)
    # Same quantization op, exact int32 accumulator, same fp32 epilogue order: equal bits.
    assert torch.equal(y, ref)
    # And within the format's error bound of the float64 product; a 10% scale error is not.
    exact = x.double() @ lin.weight.double().t() + (lin.bias.double() if bias else 0)
    if not static:
        bound = predicted_error("w8a8-int8", x, lin.weight, dtype)
        assert rel_error(y, exact) < bound
        layer.weight_scale.mul_(1.1)
        assert rel_error(layer(x), exact) > bound


@gpu
def test_layer_odd_shape_int_mm_cannot_take():
    _needs_backend()
    lin = make_linear(204, 76)
    layer = QuantLinear.from_linear(lin, "int8-cublaslt")
    x = torch.randn(2, 9, 204, dtype=torch.bfloat16, device="cuda")
    y = layer(x)
    q, s = ops.quantize_per_token(x.reshape(-1, 204), None, False)
    expect = ops.dequant_epilogue((q.double() @ layer.weight.double().t()).int(), s, layer.weight_scale,
                                  layer.bias, torch.bfloat16)
    assert y.shape == (2, 9, 76) and torch.equal(y.reshape(-1, 76), expect)
    with pytest.raises(UnsupportedShapeError, match="multiples of 8"):
        layer.set_backend("int8-torch")


@gpu
def test_forward_never_syncs_the_host():
    _needs_backend()
    layer = QuantLinear.from_linear(make_linear(3072, 3072), "int8-cublaslt")
    x = torch.randn(777, 3072, dtype=torch.bfloat16, device="cuda")
    layer(x)  # first call: algorithm search (timed, so it syncs) and kernel compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        y = layer(y)  # 3072 -> 3072 again: a second shape-cache hit
        with pytest.raises(RuntimeError, match="synchroniz"):
            y.sum().item()  # the guard is live: a real sync raises
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(y).all()


@gpu
def test_compile_fullgraph_matches_eager():
    _needs_backend()
    layer = QuantLinear.from_linear(make_linear(256, 192), "int8-cublaslt")
    x = torch.randn(4, 20, 256, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


@gpu
def test_op_opcheck_on_cuda():
    _needs_backend()
    from qkernels import cublaslt

    cublaslt.enable()
    a, w = _rand_int8(17, 64), _rand_int8(48, 64)
    args = (a, torch.rand(17, device="cuda"), w, torch.rand(48, device="cuda"),
            torch.randn(48, dtype=torch.bfloat16, device="cuda"), torch.bfloat16)
    torch.library.opcheck(cublaslt.int8_mm_dequant.torch_op, args)
