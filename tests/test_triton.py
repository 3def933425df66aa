"""Triton kernels against the reference arithmetic of qkernels.formats / qkernels.ops.

CPU: the kernels run under TRITON_INTERPRET=1 (set by conftest.py before triton is imported) on
small odd shapes. GPU (``-m gpu``): the same checks at Qwen-Image shapes, plus bit-exactness
against torch._int_mm, no host sync in a forward, and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qkernels import InputError, QuantLinear, UnsupportedShapeError, formats, list_backends, ops
from qkernels.capabilities import triton_reason
from qkernels.ops import gemms

from .metrics import E4M3_RMS, ROUNDING_RMS, predicted_error, rel_error

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")
import qkernels.triton as kt  # noqa: E402  (after the importorskip; conftest set TRITON_INTERPRET)

HAS_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent
DEV = torch.device("cuda" if HAS_CUDA else "cpu")  # CPU means the interpreter
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MS = (1, 17, 100)
FMT = {False: "w8a8-int8", True: "w8a8-fp8"}


def dt_id(dt):
    return str(dt).split(".")[-1]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality, also for e4m3 (whose NaN != NaN)."""
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def activation(m, k, dtype, device=DEV):
    """Rows of different magnitudes, with the cases the rounding rules are about: exact ties
    (row 0 has amax 127, so its scale is exactly 1), -0.0, an all-zero row, and values
    small enough to land on e4m3 subnormals."""
    x = torch.randn(m, k) * torch.rand(m, 1) * 4
    x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, -0.0, 126.5, 127.0])
    x[0, 8:12] = torch.tensor([1e-5, -3e-5, 2e-4, 7e-3])
    if m > 2:
        x[2] = 0
    return x.to(dtype).to(device)


# --------------------------------------------------------------------------------------------
# activation quantization: bit for bit equal to the reference quantizer


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("m", MS)
def test_quantize_per_token_bit_exact(m, dtype, smooth, fp8):
    k = 203
    x = activation(m, k, dtype)
    sm = (torch.rand(k, device=DEV) + 0.5) if smooth else None
    q, s = kt.quantize_per_token(x, sm, fp8)
    q_ref, s_ref = formats.quantize_per_token(x, FMT[fp8], sm)
    assert same_bits(s, s_ref), f"scales differ in {(s != s_ref).sum().item()} rows"
    assert same_bits(q, q_ref), f"{(q.float() != q_ref.float()).sum().item()} values differ"
    if not smooth and not fp8:  # scale exactly 1: ties round to even
        assert s[0].item() == 1.0 and q[0, :8].tolist() == [0, 2, 2, 0, -2, 0, 126, 127]


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
def test_quantize_per_tensor_bit_exact(dtype, smooth, fp8):
    m, k = 37, 208
    x = activation(m, k, dtype)
    sm = (torch.rand(k, device=DEV) + 0.5) if smooth else None
    # A calibrated amax of half the real one: a quarter of the values clamp.
    scale = formats.static_scale_from_amax(x.float().abs().max().cpu() / 2, FMT[fp8]).to(DEV)
    q, rs = kt.quantize_per_tensor(x, scale, sm, fp8)
    q_ref, rs_ref = formats.quantize_per_tensor(x, scale, FMT[fp8], sm)
    assert same_bits(rs, rs_ref) and same_bits(q, q_ref)
    qmax = formats.get_format(FMT[fp8]).qmax
    assert (q.float().abs() == qmax).any(), "the clamp was not exercised"


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_quantize_non_finite_rows(fp8):
    x = torch.randn(6, 77, device=DEV)
    x[1, 3], x[4, 70] = float("nan"), float("inf")
    q, s = kt.quantize_per_token(x, None, fp8)
    q_ref, s_ref = formats.quantize_per_token(x, FMT[fp8])
    assert torch.isnan(s[1]) and torch.isinf(s[4])  # as the reference: NaN propagates, Inf stays Inf
    keep = [0, 2, 3, 5]
    assert same_bits(s[keep], s_ref[keep]) and same_bits(q[keep], q_ref[keep])
    q, rs = kt.quantize_per_tensor(x, torch.tensor(0.05, device=DEV), None, fp8)
    assert torch.isnan(rs[1]) and torch.isnan(rs[4]) and (rs[keep] == 0.05).all()


def _edge_activation(k: int) -> torch.Tensor:
    """Rows whose abs-max sits where a blocked kernel could miss it: the first column, the last
    (a padded tile's last real lane), the middle, and each 4096-wide block's first column (the
    two-pass kernel); an all-zero row; a row so small that amax / 448 is under 2^-126 (the scale
    floor keeps its reciprocal finite)."""
    edges = sorted({0, k // 2, k - 1, *range(4096, k, 4096)})
    x = torch.randn(len(edges) + 2, k)
    for j, col in enumerate(edges):
        x[j, col] = 40.0 if j % 2 else -40.0
    x[-2] = 0
    x[-1] = torch.randn(k) * 1e-37
    return x


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
@pytest.mark.parametrize("k", [192, 320, 7000, 16000, 16500])
def test_quantize_per_token_rows_bit_exact(k, fp8):
    """The per-token kernel's row layouts (one power-of-two tile with padding lanes up to 16384,
    two passes past it) against the reference, the amax placed at the block edges: a kernel that
    dropped a block from the amax gets that row's scale wrong."""
    x = _edge_activation(k).to(DEV)
    q, s = kt.quantize_per_token(x, None, fp8)
    q_ref, s_ref = formats.quantize_per_token(x, FMT[fp8])
    assert same_bits(s, s_ref) and same_bits(q, q_ref)
    assert s[-2].item() == 1.0 and s[-1].item() == formats.MIN_ACTIVATION_SCALE and q[-1].float().abs().max() > 0
    want = (torch.tensor(40.0) / torch.tensor(formats.get_format(FMT[fp8]).qmax)).item()  # fp32
    assert (s[:-2] == want).all()


def test_quantize_per_token_multiplies_by_the_reciprocal():
    """The format's per-token arithmetic is x * (1 / scale), not x / scale: on values at an int8
    rounding boundary the two differ, and the kernel follows the reference, not the division."""
    scale = torch.tensor(3.0) / torch.tensor(127.0)  # amax 3, in fp32: 1 / scale is inexact
    inv = torch.ones(()) / scale
    # values a few ulps either side of the rounding boundaries (j + 0.5) * scale
    up = down = (torch.arange(127.0) + 0.5) * scale
    steps = [up]
    for _ in range(4):
        up, down = torch.nextafter(up, torch.tensor(1e9)), torch.nextafter(down, torch.tensor(-1e9))
        steps += [up, down]
    cand = torch.cat(steps)
    differs = ((cand / scale).round() != (cand * inv).round()) & (cand < 3)
    assert differs.any(), "no value tells division from reciprocal multiply"
    x = torch.cat([torch.tensor([3.0]), cand[differs][:8]])[None].to(DEV)
    q, s = kt.quantize_per_token(x, None, False)
    assert s.item() == scale.item()
    q_ref, _ = formats.quantize_per_token(x, "w8a8-int8")
    assert same_bits(q, q_ref)
    divided = (x.cpu() / scale).round().to(torch.int8)
    assert not torch.equal(q.cpu(), divided)


@pytest.mark.parametrize("fmt", ["w8-int8", "w8-fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
def test_dequantize_weight_kernel_bit_exact(fmt, dtype):
    """The layerwise backends' CUDA upcast equals formats.dequantize_weight bit for bit (a
    column tail: K = 2100 is one full 2048 block and a masked one); a wrong row scale is seen."""
    w = torch.randn(37, 2100) * 3
    q, s = formats.quantize_weight(w, fmt)
    q, s = q.to(DEV), s.to(DEV)
    got = kt.dequantize_weight(q, s, dtype)
    assert got.dtype == dtype and same_bits(got, formats.dequantize_weight(q, s, dtype))
    s_bad = s.clone()
    s_bad[5] *= 1.01
    assert not torch.equal(kt.dequantize_weight(q, s_bad, dtype), got)
    with pytest.raises(InputError, match="int8/e4m3"):
        kt.dequantize_weight(q.float(), s, dtype)


def test_quantize_rejects_bad_inputs():
    x = torch.randn(4, 32, device=DEV)
    with pytest.raises(InputError, match="input_smooth"):
        kt.quantize_per_token(x, torch.ones(31, device=DEV), False)
    with pytest.raises(InputError, match="2-D"):
        kt.quantize_per_token(x[None], None, False)


# --------------------------------------------------------------------------------------------
# int8 GEMM


def rand_int8(*shape, device=DEV):
    return torch.randint(-127, 128, shape, dtype=torch.int8, device=device)


@pytest.mark.parametrize("m,k,n", [(1, 203, 77), (17, 208, 144), (100, 192, 77), (300, 130, 200)])
def test_int8_gemm_int32_accumulation_exact(m, k, n):
    # |acc| <= 127^2 * K < 2^24 for K <= 1040: fp32 holds it exactly, so unit scales and fp32
    # out expose the int32 accumulator itself. K=192 takes the unmasked (EVEN_K) loop; M=300
    # spans several M tiles in the grouped order.
    a, w = rand_int8(m, k), rand_int8(n, k)
    y = kt.int8_gemm(a, torch.ones(m, device=DEV), w, torch.ones(n, device=DEV), None, torch.float32)
    ref = a.cpu().int() @ w.cpu().int().t()
    assert torch.equal(y.cpu(), ref.float())
    # Broken input: one flipped weight value changes the result.
    w[5 % n, 0] = -w[5 % n, 0] if w[5 % n, 0] != 0 else 1
    assert not torch.equal(kt.int8_gemm(a, torch.ones(m, device=DEV), w, torch.ones(n, device=DEV), None,
                                        torch.float32).cpu(), ref.float())


@pytest.mark.parametrize("out_dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", MS)
def test_int8_gemm_epilogue_equals_reference(m, bias, out_dtype):
    k, n = 203, 77
    a, w = rand_int8(m, k), rand_int8(n, k)
    a_s = torch.rand(m, device=DEV) * 1e-2
    w_s = torch.rand(n, device=DEV) * 1e-2
    b = torch.randn(n, dtype=torch.bfloat16, device=DEV) if bias else None
    y = kt.int8_gemm(a, a_s, w, w_s, b, out_dtype)
    ref = ops.int8_mm_dequant.reference(a.cpu(), a_s.cpu(), w.cpu(), w_s.cpu(), None if b is None else b.cpu(),
                                        out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert torch.equal(y.cpu(), ref), f"max diff {(y.cpu().float() - ref.float()).abs().max().item()}"


@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("m", MS)
def test_int8_static_fused_equals_reference(m, dtype, smooth):
    k, n = 203, 77
    x = activation(m, k, dtype)
    w, w_s = formats.quantize_weight(torch.randn(n, k, device=DEV), "w8a8-int8")
    sm = (torch.rand(k, device=DEV) + 0.5) if smooth else None
    b = torch.randn(n, dtype=dtype, device=DEV)
    scale = formats.static_scale_from_amax(x.float().abs().max().cpu() * 0.7, "w8a8-int8").to(DEV)
    y = kt.int8_static_gemm(x, scale, sm, w, w_s, b)
    q, rs = formats.quantize_per_tensor(x.cpu(), scale.cpu(), "w8a8-int8", None if sm is None else sm.cpu())
    ref = ops.dequant_epilogue(q.int() @ w.cpu().int().t(), rs, w_s.cpu(), b.cpu(), dtype)
    assert y.dtype == dtype and torch.equal(y.cpu(), ref)
    # Broken input: a 10% different static scale gives a different result.
    assert not torch.equal(kt.int8_static_gemm(x, scale * 1.1, sm, w, w_s, b).cpu(), ref)


def test_int8_static_fused_non_finite_token_poisons_its_row_only():
    k, n = 130, 77
    x = torch.randn(9, k, device=DEV)
    w, w_s = formats.quantize_weight(torch.randn(n, k, device=DEV), "w8a8-int8")
    scale = torch.tensor(0.03, device=DEV)
    clean = kt.int8_static_gemm(x, scale, None, w, w_s, None)
    for bad in (float("nan"), float("inf"), float("-inf")):
        xb = x.clone()
        xb[4, 100] = bad
        y = kt.int8_static_gemm(xb, scale, None, w, w_s, None)
        assert not torch.isfinite(y[4]).any()
        keep = [0, 1, 2, 3, 5, 6, 7, 8]
        assert torch.equal(y[keep], clean[keep])


def test_gemm_rejects_bad_inputs():
    a, w = rand_int8(5, 64), rand_int8(32, 48)
    with pytest.raises(InputError, match="K=64"):
        kt.int8_gemm(a, torch.ones(5, device=DEV), w, torch.ones(32, device=DEV), None, torch.bfloat16)
    w = rand_int8(32, 64)
    with pytest.raises(InputError, match="weight_scale"):
        kt.int8_gemm(a, torch.ones(5, device=DEV), w, torch.ones(31, device=DEV), None, torch.bfloat16)
    with pytest.raises(InputError, match="activation dtype"):
        kt.int8_gemm(a.float(), torch.ones(5, device=DEV), w, torch.ones(32, device=DEV), None, torch.bfloat16)
    with pytest.raises(InputError, match="output dtype"):
        kt.int8_gemm(a, torch.ones(5, device=DEV), w, torch.ones(32, device=DEV), None, torch.int32)


# --------------------------------------------------------------------------------------------
# fp8 and weight-only GEMMs: within the format's error bound against float64


def _check_bound(y, ref, bound, rebuild_broken):
    err = rel_error(y.cpu(), ref)
    assert err < bound, f"relative error {err:.4g} over the format's bound {bound:.4g}"
    broken = rel_error(rebuild_broken().cpu(), ref)
    assert broken > bound, f"a 10% wrong scale gave {broken:.4g}, still under the bound {bound:.4g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("m", MS)
def test_fp8_gemm_within_bound(m, dtype):
    k, n = 203, 144
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    wf = torch.randn(n, k, device=DEV) * k**-0.5
    b = torch.randn(n, dtype=dtype, device=DEV) * 0.1
    w, w_s = formats.quantize_weight(wf, "w8a8-fp8")
    q, s = kt.quantize_per_token(x, None, True)
    y = kt.fp8_gemm(q, s, w, w_s, b, dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = (x.cpu().double() @ wf.cpu().double().t()) + b.cpu().double()
    bound = predicted_error("w8a8-fp8", x.cpu(), wf.cpu(), dtype)
    _check_bound(y, ref, bound, lambda: kt.fp8_gemm(q, s, w, w_s * 1.1, b, dtype))
    # Against the op's own fp32 reference (same quantized inputs): only summation order and the
    # output rounding differ.
    exact = gemms.fp8_gemm.reference(q.cpu(), s.cpu(), w.cpu(), w_s.cpu(), b.cpu(), torch.float32)
    assert rel_error(y.cpu(), exact) < 2 * ROUNDING_RMS[dtype] + 1e-6


# The interpreter runs each program as numpy: small tiles keep it to seconds. On a GPU the
# kernel's own Hopper default (kernel_report: TMA loads, wgmma with one group in flight).
TMA_TEST_CONFIG = None if HAS_CUDA else dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4,
                                             num_stages=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dt_id)
@pytest.mark.parametrize("m", MS)
def test_fp8_gemm_tma_within_bound_and_equal_to_fp8_gemm(m, dtype):
    """The experimental persistent TMA kernel: the format's bound against float64 (a 10% wrong
    scale fails it), and the pointer kernel's result up to summation order."""
    k, n = 208, 144  # TMA: K % 16 == 0
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    wf = torch.randn(n, k, device=DEV) * k**-0.5
    b = torch.randn(n, dtype=dtype, device=DEV) * 0.1
    w, w_s = formats.quantize_weight(wf, "w8a8-fp8")
    q, s = kt.quantize_per_token(x, None, True)
    y = kt.fp8_gemm_tma(q, s, w, w_s, b, dtype, config=TMA_TEST_CONFIG)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = (x.cpu().double() @ wf.cpu().double().t()) + b.cpu().double()
    _check_bound(y, ref, predicted_error("w8a8-fp8", x.cpu(), wf.cpu(), dtype),
                 lambda: kt.fp8_gemm_tma(q, s, w, w_s * 1.1, b, dtype, config=TMA_TEST_CONFIG))
    y_ptr = kt.fp8_gemm(q, s, w, w_s, b, dtype)
    assert rel_error(y.cpu(), y_ptr.cpu().double()) < 2 * ROUNDING_RMS[dtype] + 1e-6


def test_fp8_gemm_tma_refuses_a_k_tma_cannot_stride():
    q = torch.zeros(16, 203, device=DEV).to(torch.float8_e4m3fn)
    w = torch.zeros(32, 203, device=DEV).to(torch.float8_e4m3fn)
    with pytest.raises(UnsupportedShapeError, match="K % 16 == 0"):
        kt.fp8_gemm_tma(q, torch.ones(16, device=DEV), w, torch.ones(32, device=DEV), None, torch.bfloat16)


@pytest.mark.parametrize("fmt", ["w8-int8", "w8-fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dt_id)
@pytest.mark.parametrize("m", MS)
def test_weight_only_gemm_within_bound(m, dtype, fmt):
    k, n = 203, 77
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    wf = torch.randn(n, k, device=DEV) * k**-0.5
    b = torch.randn(n, dtype=dtype, device=DEV) * 0.1
    w, w_s = formats.quantize_weight(wf, fmt)
    y = kt.weight_only_gemm(x, w, w_s, b)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = (x.cpu().double() @ wf.cpu().double().t()) + b.cpu().double()
    _check_bound(y, ref, predicted_error(fmt, x.cpu(), wf.cpu(), dtype),
                 lambda: kt.weight_only_gemm(x, w, w_s * 1.1, b))


def test_e4m3_bound_constant_is_what_the_fp8_tests_use():
    # The fp8 bound is e4m3's rounding (2^-4 / sqrt 3 rms), not something looser.
    assert abs(E4M3_RMS - 2**-4 / 3**0.5) < 1e-12


# --------------------------------------------------------------------------------------------
# backends, registration, imports


def test_backends_listed_with_reasons(monkeypatch):
    rows = {r.name: r for r in list_backends(DEV)}
    assert rows["int8-triton"].format == "w8a8-int8" and rows["fp8-triton"].format == "w8a8-fp8"
    assert rows["int8-triton"].available and rows["fp8-triton"].available
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in triton_reason(torch.device("cpu"))


def test_a_triton_older_than_the_kernels_need_is_a_reason_not_a_crash(monkeypatch, caplog):
    """Triton 3.3 (torch 2.7) has no triton.knobs and no host TMA descriptors, so qkernels.triton
    cannot import there; 3.4 (binder the 4th of 4 device-cache entries) to 3.9 pass the
    launcher's simulated checks. An older one makes the Triton backends unavailable with the
    reason (`auto` then picks a torch-native backend), the shared ops keep their PyTorch
    references with that reason logged, and the int8-fp8 attention refuses with it."""
    from qkernels import capabilities
    from qkernels.attention import ops as attention_ops
    from qkernels.backends import triton_backends as tb
    from qkernels.errors import BackendUnavailableError

    for version in ("3.3.1", "3.2.0", "2.3.1"):
        reason = capabilities.triton_version_reason(version)
        assert reason is not None and version in reason and "3.4" in reason
    for version in ("3.4.0", "3.4.0rc1", "3.9.0", "3.10.0+git1234abcd"):
        assert capabilities.triton_version_reason(version) is None, version

    old = capabilities.triton_version_reason("3.3.1")
    monkeypatch.setattr(capabilities, "triton_import_reason", lambda: old)
    monkeypatch.setattr(tb, "triton_import_reason", lambda: old)
    monkeypatch.setattr(attention_ops, "triton_import_reason", lambda: old)
    assert triton_reason(DEV) == old
    rows = {r.name: r for r in list_backends(DEV)}
    assert not rows["fp8-triton"].available and old in rows["fp8-triton"].reason

    op = ops.quantize_per_token
    saved = op._impls.get("cuda")
    try:
        x = torch.randn(3, 32)
        with caplog.at_level("WARNING", logger="qkernels"):
            q, s = tb._lazy_cuda_impl(op)(x, None, False)
        assert op._impls["cuda"] is op.reference and old in caplog.text
        ref_q, ref_s = formats.quantize_per_token(x, "w8a8-int8")
        assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    finally:
        if saved is not None:
            op.register("cuda", saved)
    with pytest.raises(BackendUnavailableError, match="3.4"):
        attention_ops._lazy_triton()


def test_import_qkernels_does_not_import_triton():
    code = ("import sys, qkernels, qkernels.backends, qkernels.ops.gemms; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_triton_that_cannot_import_leaves_the_reference_paths_working(tmp_path):
    """A `triton` that fails to import (a broken install; an old one fails the same way inside
    qkernels.triton): the int8-fp8 attention's CPU path is its PyTorch reference and must not
    import the kernel module (it did, for one padding constant), and the Triton backends are
    unavailable with the import error as their reason."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('this triton is broken')\n")
    code = """
import torch, qkernels
from qkernels import list_backends
from qkernels.attention import sdpa
from qkernels.attention.reference import quantized_attention
q, k, v = (torch.randn(1, 2, 40, 64, dtype=torch.bfloat16) for _ in range(3))
assert torch.equal(sdpa(q, k, v, mode="int8-fp8"), quantized_attention(q, k, v)), "reference differs"
rows = {r.name: r for r in list_backends(torch.device("cpu"))}
assert not rows["fp8-triton"].available and "this triton is broken" in rows["fp8-triton"].reason
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.parametrize("backend", ["int8-triton", "fp8-triton"])
def test_backend_static_and_dynamic_paths(backend):
    # M=33 takes the one-launch static kernel, M=100 quant kernel + GEMM (FUSED_STATIC_MAX_M).
    k, n = 208, 144
    lin = torch.nn.Linear(k, n, device=DEV).to(torch.bfloat16)
    for m in (33, 100):
        _backend_paths(backend, lin, torch.randn(m, k, dtype=torch.bfloat16, device=DEV))


def _backend_paths(backend, lin, x):
    k = x.shape[1]
    fmt = formats.get_format(formats.FORMATS["w8a8-fp8" if "fp8" in backend else "w8a8-int8"])
    scale = formats.static_scale_from_amax(x.float().abs().max().cpu(), fmt)
    smooth = torch.rand(k, device=DEV) + 0.5
    for kw in ({}, dict(input_smooth=smooth), dict(activation="static", input_scale=scale),
               dict(activation="static", input_scale=scale, input_smooth=smooth)):
        layer = QuantLinear.from_linear(lin, backend, **kw)
        y = layer(x)
        # The same layer through the torch-native backend of its format computes the same
        # quantized arithmetic (int8: exactly the same; fp8: up to summation order and rounding).
        other = "int8-torch" if backend == "int8-triton" else "fp8-scaled-mm"
        if DEV.type == "cuda" or other == "int8-torch":
            ref = layer.set_backend(other)(x)
            if other == "int8-torch":
                assert torch.equal(y, ref), kw
            else:
                assert rel_error(y, ref) < 2 * ROUNDING_RMS[torch.bfloat16], kw


def test_gemm_ops_pass_opcheck():
    # Schema and fake implementations of the Triton ops (their CPU implementation is the reference).
    a, w = rand_int8(17, 64, device="cpu"), rand_int8(48, 64, device="cpu")
    b = torch.randn(48, dtype=torch.bfloat16)
    torch.library.opcheck(gemms.int8_gemm.torch_op, (a, torch.rand(17), w, torch.rand(48), b, torch.bfloat16))
    x = torch.randn(17, 64, dtype=torch.bfloat16)
    torch.library.opcheck(gemms.int8_static_gemm.torch_op,
                          (x, torch.tensor(0.05), torch.rand(64) + 0.5, w, torch.rand(48), b))
    af, wf = (torch.randn(17, 64) * 10).to(torch.float8_e4m3fn), torch.randn(48, 64).to(torch.float8_e4m3fn)
    # test_schema multiplies the inputs to detect mutation, which CPU torch cannot do in e4m3.
    torch.library.opcheck(gemms.fp8_gemm.torch_op, (af, torch.rand(17), wf, torch.rand(48), None, torch.float16),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
    torch.library.opcheck(gemms.weight_only_gemm.torch_op, (x, w, torch.rand(48), b))


# --------------------------------------------------------------------------------------------
# GPU: Qwen-Image shapes

QWEN_KN = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 18432)]
GPU_CASES = [pytest.param(m, k, n, id=f"M{m}-K{k}-N{n}") for m in (4096, 8192) for (k, n) in QWEN_KN]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", GPU_CASES)
def test_gpu_qwen_shapes(m, k, n):
    dev = torch.device("cuda")
    x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
    wf = torch.randn(n, k, device=dev) * k**-0.5
    b = torch.randn(n, dtype=torch.bfloat16, device=dev) * 0.1
    smooth = torch.rand(k, device=dev) + 0.5
    # activation quant: bit-exact with the reference quantizer
    for fp8 in (False, True):
        q, s = kt.quantize_per_token(x, smooth, fp8)
        q_ref, s_ref = formats.quantize_per_token(x, FMT[fp8], smooth)
        assert same_bits(s, s_ref) and same_bits(q, q_ref), f"fp8={fp8}"
    # int32 accumulation bit-exact vs torch._int_mm: small values keep |acc| < 2^24, so the fp32
    # output is the int32 accumulator itself; full-range values compare after the same rounding.
    ones_m, ones_n = torch.ones(m, device=dev), torch.ones(n, device=dev)
    for lo, hi in ((-3, 4), (-127, 128)):
        a = torch.randint(lo, hi, (m, k), dtype=torch.int8, device=dev)
        wi = torch.randint(lo, hi, (n, k), dtype=torch.int8, device=dev)
        acc = torch._int_mm(a, wi.t())
        assert torch.equal(kt.int8_gemm(a, ones_m, wi, ones_n, None, torch.float32), acc.float())
        if lo == -3:
            assert torch.equal(kt.int8_gemm(a, ones_m, wi, ones_n, None, torch.float32).int(), acc)
    # dynamic int8: the epilogue equals the torch._int_mm path
    w8, w8_s = formats.quantize_weight(wf, "w8a8-int8")
    q, s = kt.quantize_per_token(x, None, False)
    y = kt.int8_gemm(q, s, w8, w8_s, b, torch.bfloat16)
    assert torch.equal(y, ops.int8_mm_dequant.reference(q, s, w8, w8_s, b, torch.bfloat16))
    ref = x.double() @ wf.double().t() + b.double()
    assert rel_error(y, ref) < predicted_error("w8a8-int8", x, wf, torch.bfloat16)
    # static fused == reference quantize-with-scale + GEMM
    scale = formats.static_scale_from_amax(x.float().abs().amax(), "w8a8-int8").to(dev)
    y = kt.int8_static_gemm(x, scale, smooth, w8, w8_s, b)
    qs, rs = formats.quantize_per_tensor(x, scale, "w8a8-int8", smooth)
    assert torch.equal(y, ops.int8_mm_dequant.reference(qs, rs, w8, w8_s, b, torch.bfloat16))
    # fp8 and weight-only: within the format's bound against float64, and a broken scale fails
    wf8, wf8_s = formats.quantize_weight(wf, "w8a8-fp8")
    q, s = kt.quantize_per_token(x, None, True)
    bound = predicted_error("w8a8-fp8", x, wf, torch.bfloat16)
    _check_bound(kt.fp8_gemm(q, s, wf8, wf8_s, b, torch.bfloat16), ref, bound,
                 lambda: kt.fp8_gemm(q, s, wf8, wf8_s * 1.1, b, torch.bfloat16))
    for fmt in ("w8-int8", "w8-fp8"):
        w, w_s = formats.quantize_weight(wf, fmt)
        _check_bound(kt.weight_only_gemm(x, w, w_s, b), ref, predicted_error(fmt, x, wf, torch.bfloat16),
                     lambda: kt.weight_only_gemm(x, w, w_s * 1.1, b))


@pytest.mark.gpu
@pytest.mark.parametrize("backend,kw", [
    ("int8-triton", {}), ("int8-triton", dict(activation="static", input_scale=0.02)),
    ("fp8-triton", {}), ("fp8-triton", dict(activation="static", input_scale=0.02)),
    ("int8-layerwise", {}), ("fp8-layerwise", {}),
])
def test_gpu_forward_does_not_sync_and_compiles(backend, kw):
    lin = torch.nn.Linear(3072, 3072, device="cuda").to(torch.bfloat16)
    layer = QuantLinear.from_linear(lin, backend, **kw)
    x = torch.randn(2, 2048, 3072, dtype=torch.bfloat16, device="cuda")
    y = layer(x)  # first call: compile + autotune (these sync, once per shape bucket)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y2 = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y, y2)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), y, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_fast_launch_path_is_exact_across_specializations():
    """After its first launch a kernel is launched directly (qkernels.triton._launch): the second
    and later calls, with M = 1 (a constexpr for Triton), 17, 32 in one autotune bucket, and an
    activation one element off 16-byte alignment, give the reference's results bit for bit."""
    dev = torch.device("cuda")
    k, n = 3072, 1024
    wf = torch.randn(n, k, device=dev) * k**-0.5
    b = torch.randn(n, dtype=torch.bfloat16, device=dev)
    w8, w8_s = formats.quantize_weight(wf, "w8a8-int8")
    for m in (1, 17, 32, 32):
        for offset in (0, 1):
            flat = torch.randn(m * k + offset, dtype=torch.bfloat16, device=dev)
            x = flat[offset:].view(m, k)
            for _ in range(2):  # first: through Triton (may compile); second: the direct launch
                q, s = kt.quantize_per_token(x, None, False)
                q_ref, s_ref = formats.quantize_per_token(x, "w8a8-int8")
                assert same_bits(q, q_ref) and same_bits(s, s_ref), (m, offset)
                y = kt.int8_gemm(q, s, w8, w8_s, b, torch.bfloat16)
                assert torch.equal(y, ops.int8_mm_dequant.reference(q, s, w8, w8_s, b, torch.bfloat16)), (m, offset)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,kw", [
    ("int8-triton", {}), ("int8-triton", dict(activation="static", input_scale=0.02)),
    ("fp8-triton", {}), ("fp8-triton", dict(activation="static", input_scale=0.02)),
    ("fp8-triton", dict(smooth=True)),
])
def test_gpu_replayed_forward_equals_the_direct_one(monkeypatch, backend, kw):
    """From its third call at an (M, dtype) a Triton layer replays its recorded launches
    (qkernels.triton._launch.Replay): the results equal the un-replayed forward's bit for bit,
    for M = 1 / 17 / 300 / 4096, an input 2 bytes off alignment (another specialization: not
    replayed from the aligned plan), earlier results not overwritten by later calls (fresh
    outputs), and after a move (the plans are dropped and rebuilt)."""
    from qkernels.backends.triton_backends import _TritonW8A8

    dev = torch.device("cuda")
    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 1024, device=dev).to(torch.bfloat16)
    kw = dict(kw)
    smooth = kw.pop("smooth", False)
    if smooth:
        kw["input_smooth"] = torch.rand(3072, device=dev) + 0.5
    layer = QuantLinear.from_linear(lin, backend, **kw)

    def inputs(m, offset):
        flat = torch.randn(m * 3072 + offset, dtype=torch.bfloat16, device=dev)
        return flat[offset:].view(m, 3072)

    cases = [(m, off) for m in (1, 17, 300, 4096) for off in (0, 1)]
    xs = {c: [inputs(*c) for _ in range(4)] for c in cases}
    monkeypatch.setattr(_TritonW8A8, "REPLAY", False)
    direct = {c: [layer(x) for x in xs[c]] for c in cases}
    monkeypatch.setattr(_TritonW8A8, "REPLAY", True)
    for moved in (False, True):
        if moved:
            layer.cpu().cuda()
            assert layer._plans == {}
        got = {c: [layer(x) for x in xs[c]] for c in cases}  # all kept: none may alias a later one
        for c in cases:
            for i, (a, b) in enumerate(zip(got[c], direct[c])):
                assert torch.equal(a, b), (backend, kw, c, i, moved)
        replayed = [key for key, plan in layer._plans.items() if type(plan) is not int]
        assert {m for m, _ in replayed} >= {1, 17, 300}, layer._plans  # the replay did run


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["int8-triton", "fp8-triton"])
def test_gpu_replayed_gemm_equals_the_direct_one(monkeypatch, backend):
    """The fused blocks' GEMM on a quantized activation (``forward_quantized``) is replayed from
    its third call per (M, epilogue): bit-equal to the un-replayed call for the plain, GELU and
    gated-residual epilogues (a strided gate view, as the blocks pass), M = 1 / 17 / 300, and
    each kept result its own."""
    from qkernels.backends.triton_backends import _TritonW8A8
    from qkernels.linear import QuantizedActivation

    dev = torch.device("cuda")
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(3072, 1024, device=dev).to(torch.bfloat16), backend)
    fp8 = backend == "fp8-triton"
    cases = []
    for m in (1, 17, 300):
        for i in range(3):
            x = torch.randn(m, 3072, dtype=torch.bfloat16, device=dev)
            act = QuantizedActivation(*ops.quantize_per_token(x, None, fp8), x.dtype)
            mod = torch.randn(2, 3 * 1024, dtype=torch.bfloat16, device=dev)
            rows = torch.randint(0, 2, (m,), dtype=torch.int32, device=dev)
            residual = torch.randn(m, 1024, dtype=torch.bfloat16, device=dev)
            for kw in ({}, dict(gelu=True), dict(residual=residual, gate=mod[:, 1024:2048], gate_rows=rows)):
                cases.append((act, kw))
    monkeypatch.setattr(_TritonW8A8, "REPLAY", False)
    direct = [layer.forward_quantized(act, **kw) for act, kw in cases]
    monkeypatch.setattr(_TritonW8A8, "REPLAY", True)
    for _ in range(2):  # compile / record
        for act, kw in cases:
            layer.forward_quantized(act, **kw)
    got = [layer.forward_quantized(act, **kw) for act, kw in cases]
    for i, (a, b) in enumerate(zip(got, direct)):
        assert torch.equal(a, b), (backend, i)
    assert sum(type(p) is not int for p in layer._plans.values()) == 9, layer._plans  # 3 M x 3 epilogues


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["int8-triton", "fp8-triton"])
def test_gpu_replay_scratch_is_safe_across_streams_and_graph_capture(monkeypatch, backend):
    """A replayed forward's temporaries (the quantized activation and its scales) live in a
    scratch buffer per thread, device and stream (qkernels.triton._launch._scratch). Two streams
    replaying the same layer at once, and a CUDA graph captured from a replay and replayed after
    eager replays on the same stream, give the direct forward's results bit for bit: the streams
    have a buffer each, and the capture allocates its own temporaries (the graph keeps them)."""
    from qkernels.backends.triton_backends import _TritonW8A8
    from qkernels.triton import _launch

    dev = torch.device("cuda")
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(3072, 1024, device=dev).to(torch.bfloat16), backend)
    xs = [torch.randn(16, 3072, dtype=torch.bfloat16, device=dev) * (i + 1) for i in range(8)]
    monkeypatch.setattr(_TritonW8A8, "REPLAY", False)
    direct = [layer(x) for x in xs]
    monkeypatch.setattr(_TritonW8A8, "REPLAY", True)
    for _ in range(3):
        layer(xs[0])  # compile, record
    plan = layer._plans[(16, torch.bfloat16)]
    assert type(plan) is not int and plan.scratch_bytes > 0

    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    got = [None] * len(xs)
    for i, x in enumerate(xs):  # interleaved issue: each stream's launches overlap the other's
        with torch.cuda.stream(streams[i % 2]):
            got[i] = layer(x)
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    for i, (a, b) in enumerate(zip(got, direct)):
        assert torch.equal(a, b), ("two streams", i)

    static = xs[0].clone()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(static)  # warm-up on the capture's stream, as torch documents
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        y_graph = layer(static)
    for i in (3, 4, 5):  # eager replays on this stream write this stream's scratch in between
        assert torch.equal(layer(xs[i]), direct[i])
    static.copy_(xs[6])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_graph, direct[6])
    here = (xs[0].device, torch.cuda.current_stream().cuda_stream)
    assert here in (_launch._scratch_buffers.buffers or {})  # the eager replays used this stream's scratch


def test_fp8_triton_layer_takes_the_tma_gemm_when_enabled(monkeypatch):
    """FP8Triton.TMA_MIN_M routes the layer's GEMM to fp8_gemm_tma (and nothing else changes):
    same result as the default path up to summation order, and the op is the one called."""
    from qkernels.backends.triton_backends import FP8Triton

    lin = torch.nn.Linear(64, 96, dtype=torch.bfloat16, device=DEV)
    layer = QuantLinear.from_linear(lin, "fp8-triton")
    x = torch.randn(3, 11, 64, dtype=torch.bfloat16, device=DEV)
    y_default = layer(x)
    calls = []
    original = kt.fp8_gemm_tma

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(kt, "fp8_gemm_tma", spy)  # CPU: the backend calls the launchers directly
    monkeypatch.setattr(gemms.fp8_gemm_tma, "_impls", {"cuda": spy})  # CUDA: through the op
    monkeypatch.setattr(FP8Triton, "TMA_MIN_M", 16)
    y_tma = layer(x)
    assert calls == [(33, 64)]
    assert rel_error(y_tma.cpu(), y_default.cpu().double()) < 2 * ROUNDING_RMS[torch.bfloat16]
    layer(x[:, :5])  # 15 tokens: under TMA_MIN_M, the default kernel
    assert calls == [(33, 64)]


def test_fp8_triton_takes_the_tma_gemm_on_hopper_only(monkeypatch):
    """TMA is sm90 hardware: on an Ada GPU (sm89, fp8 tensor cores) the layer keeps the pointer
    GEMM at every M; on sm90 it takes the TMA GEMM from TMA_MIN_M tokens, and below them never."""
    from qkernels.backends import triton_backends as tb
    from qkernels.registry import get_backend

    backend = get_backend("fp8-triton")
    big = SimpleNamespace(shape=(tb.FP8Triton.TMA_MIN_M, 3072), device=torch.device("cuda", 0))
    small = SimpleNamespace(shape=(tb.FP8Triton.TMA_MIN_M - 1, 3072), device=torch.device("cuda", 0))
    for capability, want in (((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(tb, "cuda_capability", lambda index, c=capability: c)
        assert backend._tma(big) is want, capability
        assert backend._tma(small) is False


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", GPU_CASES + [pytest.param(300, 3072, 3072, id="M300-K3072-N3072")])
def test_gpu_fp8_gemm_tma_qwen_shapes(m, k, n):
    """The experimental persistent TMA e4m3 GEMM on the GPU, default config, at Qwen-Image shapes
    (and an M that leaves a partial tile): the format's bound against float64, a 10% wrong
    scale fails it, and fp8_gemm's result up to summation order."""
    dev = torch.device("cuda")
    x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
    wf = torch.randn(n, k, device=dev) * k**-0.5
    b = torch.randn(n, dtype=torch.bfloat16, device=dev) * 0.1
    w, w_s = formats.quantize_weight(wf, "w8a8-fp8")
    q, s = kt.quantize_per_token(x, None, True)
    y = kt.fp8_gemm_tma(q, s, w, w_s, b, torch.bfloat16)
    ref = x.double() @ wf.double().t() + b.double()
    _check_bound(y, ref, predicted_error("w8a8-fp8", x, wf, torch.bfloat16),
                 lambda: kt.fp8_gemm_tma(q, s, w, w_s * 1.1, b, torch.bfloat16))
    y_ptr = kt.fp8_gemm(q, s, w, w_s, b, torch.bfloat16)
    assert rel_error(y, y_ptr.double()) < 2 * ROUNDING_RMS[torch.bfloat16] + 1e-6
