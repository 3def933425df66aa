"""QuantLinear with every available backend against a float64 reference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load, save

from qkernels import (
    BackendUnavailableError,
    CheckpointError,
    InputError,
    QuantLinear,
    UnsupportedShapeError,
    formats,
    get_backend,
    list_backends,
)
from qkernels.registry import _BACKENDS, Backend

from .metrics import predicted_error, rel_error

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def quant_backends(device="cpu"):
    return [r.name for r in list_backends(device) if r.available and r.name != "bf16"]


def shapes_for(backend: str):
    """(K, N) pairs that are not powers of two, within the backend's constraints."""
    pairs = [(208, 144)]  # multiples of 16 (fp8 _scaled_mm) and 8 (_int_mm)
    if get_backend(backend).unsupported_shape_reason(203, 77) is None:
        pairs.append((203, 77))
    return pairs


def make_linear(k, n, bias=True, dtype=torch.bfloat16, device="cpu"):
    lin = nn.Linear(k, n, bias=bias, device=device, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.normal_(0, k**-0.5)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


def reference(x, lin):
    y = x.double() @ lin.weight.double().t()
    return y + lin.bias.double() if lin.bias is not None else y


def case_ids(backend, k, n, dtype, m):
    return f"{backend}-{str(dtype).split('.')[-1]}-K{k}N{n}-M{m}"


CASES = [
    pytest.param(b, k, n, dt, m, id=case_ids(b, k, n, dt, m))
    for b in quant_backends()
    for (k, n) in shapes_for(b)
    for dt in DTYPES
    for m in (1, 17, 100)
]


@pytest.mark.parametrize("backend,k,n,dtype,m", CASES)
def test_accuracy_against_float64(backend, k, n, dtype, m):
    lin = make_linear(k, n, dtype=dtype)
    x = torch.randn(m, k, dtype=dtype)
    layer = QuantLinear.from_linear(lin, backend)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = reference(x, lin)
    bound = predicted_error(layer.format, x, lin.weight, dtype)
    err = rel_error(y, ref)
    assert err < bound, f"relative error {err:.4g} over the format's bound {bound:.4g}"
    # The same check fails on a deliberately wrong weight scale (10% off): the bound is tight
    # enough to catch it.
    layer.weight_scale.mul_(1.1)
    broken = rel_error(layer(x), ref)
    assert broken > bound, f"a 10% wrong scale gave {broken:.4g}, still under the bound {bound:.4g}"


@pytest.mark.parametrize("backend", quant_backends())
def test_leading_dims_and_bias_free(backend):
    k, n = shapes_for(backend)[0]
    lin = make_linear(k, n, bias=False)
    layer = QuantLinear.from_linear(lin, backend)
    x = torch.randn(2, 3, 5, k, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 3, 5, n)
    torch.testing.assert_close(y.reshape(-1, n), layer(x.reshape(-1, k)), rtol=0, atol=0)
    assert rel_error(y, reference(x, lin)) < predicted_error(layer.format, x.reshape(-1, k), lin.weight, torch.bfloat16)


@pytest.mark.parametrize("backend", quant_backends())
def test_static_and_smoothed_activation(backend):
    k, n = shapes_for(backend)[0]
    lin = make_linear(k, n)
    x = torch.randn(64, k, dtype=torch.bfloat16)
    fmt = formats.get_format(get_backend(backend).format)
    if not fmt.quantizes_activations:
        with pytest.raises(InputError, match="weight-only"):
            QuantLinear.from_linear(lin, backend, activation="static", input_scale=0.1)
        return
    scale = formats.static_scale_from_amax(x.float().abs().max(), fmt)
    smooth = torch.rand(k) + 0.5
    static = QuantLinear.from_linear(lin, backend, activation="static", input_scale=scale)
    smoothed = QuantLinear.from_linear(lin, backend, input_smooth=smooth)
    assert "activation=static" in repr(static) and "smoothed" in repr(smoothed)
    ref = reference(x, lin)
    # A per-tensor scale is coarser than per-token: its step is the tensor's amax / qmax in every
    # row, so the bound uses that step for every row.
    x_worst = x.float().clone()
    x_worst[:, 0] = x.float().abs().max()
    assert rel_error(static(x), ref) < predicted_error(fmt.name, x_worst, lin.weight, torch.bfloat16)
    # Smoothed: the kernel quantizes x / s and W * s, so the bound is that of those operands.
    smooth_bound = predicted_error(fmt.name, x.float() / smooth, lin.weight.float() * smooth, torch.bfloat16)
    assert rel_error(smoothed(x), ref) < smooth_bound
    smoothed.input_smooth.mul_(1.1)  # a smoothing factor not matching the one folded into W
    assert rel_error(smoothed(x), ref) > smooth_bound
    # The static path equals the reference quantize-with-scale + GEMM.
    q, rs = formats.quantize_per_tensor(x, scale, fmt)
    qx = q.float() * rs[:, None]
    wq = formats.dequantize_weight(static.weight, static.weight_scale)
    expect = qx @ wq.t() + lin.bias.float()
    torch.testing.assert_close(static(x).float(), expect, rtol=2**-7, atol=1e-3)


def test_int8_accumulator_bit_exact():
    from qkernels.ops import int_mm

    for m, k, n in [(1, 24, 40), (17, 200, 88), (100, 64, 136)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        assert torch.equal(int_mm(a, w), a.int() @ w.int().t())


@pytest.mark.parametrize("backend", quant_backends())
def test_state_dict_bytes_and_round_trip(backend):
    lin = make_linear(1024, 1024)
    layer = QuantLinear.from_linear(lin, backend)
    sd = layer.state_dict()
    fmt = formats.get_format(layer.format)
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].dtype == fmt.dtype and sd["weight"].shape == (1024, 1024)
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].shape == (1024,)
    bf16_bytes = sum(p.numel() * p.element_size() for p in lin.parameters())
    assert layer.nbytes() <= 0.53 * bf16_bytes
    blob = save(sd)
    fresh = QuantLinear(1024, 1024, format=layer.format, backend=backend)
    fresh.load_state_dict(load(blob))
    x = torch.randn(9, 1024, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))


def test_load_refuses_wrong_dtype_and_shape():
    layer = QuantLinear.from_linear(make_linear(64, 32), "int8-torch")
    sd = layer.state_dict()
    fresh = QuantLinear(64, 32, format="w8a8-int8", backend="int8-torch")
    with pytest.raises(CheckpointError, match="weight"):
        fresh.load_state_dict({**sd, "weight": sd["weight"].float()})
    with pytest.raises(CheckpointError, match="weight_scale"):
        fresh.load_state_dict({**sd, "weight_scale": sd["weight_scale"][:16]})


def test_module_to_dtype_keeps_format():
    layer = QuantLinear.from_linear(make_linear(64, 32), "fp8-scaled-mm", activation="static", input_scale=0.05)
    model = nn.Sequential(layer).to(torch.float16)
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.dtype == torch.float32 and layer.input_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float16  # bias follows the compute dtype
    assert model(torch.randn(3, 64, dtype=torch.float16)).dtype == torch.float16


@pytest.mark.parametrize("backend", quant_backends())
def test_set_backend_same_format_never_requantizes(backend):
    lin = make_linear(208, 144)
    layer = QuantLinear.from_linear(lin, backend)
    same = [r.name for r in list_backends("cpu") if r.available and r.format == layer.format]
    w = layer.weight.clone()
    x = torch.randn(20, 208, dtype=torch.bfloat16)
    y = layer(x)
    for other in same:
        layer.set_backend(other)
        assert layer.backend == other and torch.equal(layer.weight, w)
        torch.testing.assert_close(layer(x), y, rtol=2**-7, atol=2**-7)
    wrong = next(r.name for r in list_backends("cpu") if r.format not in (layer.format, "none"))
    with pytest.raises(InputError, match="computes format"):
        layer.set_backend(wrong)


# --------------------------------------------------------------------------------------------
# bad inputs


def test_unknown_backend_lists_known():
    with pytest.raises(InputError, match="int8-torch"):
        QuantLinear.from_linear(make_linear(64, 32), "int9-magic")


def test_unavailable_backend_names_reason_and_alternatives():
    class CudaOnly(Backend):
        name, format, devices = "test-cuda-only", "w8a8-int8", ("cuda",)

    _BACKENDS[CudaOnly.name] = CudaOnly()
    try:
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA; the CPU-only case is what is tested here")
        # On the CPU the choice is recorded for the device the layer moves to (see
        # test_device_follow.py); computing here names the reason and what can run here.
        layer = QuantLinear.from_linear(make_linear(64, 32), "test-cuda-only")
        assert layer.backend == "test-cuda-only" and layer.backend_unavailable_reason is not None
        with pytest.raises(BackendUnavailableError, match=r"runs on cuda.*Available here: int8-torch"):
            layer(torch.randn(3, 64, dtype=torch.bfloat16))
    finally:
        del _BACKENDS[CudaOnly.name]


def test_unsupported_shape():
    with pytest.raises(UnsupportedShapeError, match="multiples of 8"):
        QuantLinear.from_linear(make_linear(60, 32), "int8-torch")
    with pytest.raises(UnsupportedShapeError, match="multiples of 16"):
        QuantLinear.from_linear(make_linear(64, 40), "fp8-scaled-mm")


def test_bad_forward_inputs():
    layer = QuantLinear.from_linear(make_linear(64, 32), "int8-torch")
    with pytest.raises(InputError, match="input on meta"):
        layer(torch.empty(3, 64, device="meta"))
    with pytest.raises(InputError, match="features"):
        layer(torch.randn(3, 65))
    with pytest.raises(InputError, match="dtype"):
        layer(torch.ones(3, 64, dtype=torch.int32))
    assert layer(torch.randn(0, 64, dtype=torch.bfloat16)).shape == (0, 32)
    assert layer(torch.randn(2, 0, 64)).shape == (2, 0, 32)


@pytest.mark.parametrize("backend", quant_backends())
def test_non_contiguous_input(backend):
    k, n = shapes_for(backend)[0]
    layer = QuantLinear.from_linear(make_linear(k, n), backend)
    x = torch.randn(k, 33, dtype=torch.bfloat16).t()
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))


@pytest.mark.parametrize("backend,static", [
    (b, static) for b in quant_backends() for static in (False, True)
    if not static or formats.get_format(get_backend(b).format).quantizes_activations
])
def test_non_finite_token_poisons_only_its_row(backend, static):
    k, n = shapes_for(backend)[0]
    kw = dict(activation="static", input_scale=0.02) if static else {}
    layer = QuantLinear.from_linear(make_linear(k, n), backend, **kw)
    x = torch.randn(6, k, dtype=torch.bfloat16)
    clean = layer(x)
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[3, 5] = bad
        y = layer(xb)
        assert not torch.isfinite(y[3]).any(), f"{bad} in token 3 gave finite outputs"
        keep = [0, 1, 2, 4, 5]
        assert torch.equal(y[keep], clean[keep])


def test_zero_rows_get_finite_scale_and_exact_zeros():
    for fmt in formats.FORMATS:
        w = torch.randn(5, 32)
        w[2] = 0
        q, s = formats.quantize_weight(w, fmt)
        assert torch.isfinite(s).all() and s[2] == 1.0 and (q[2].float() == 0).all()
        xq, xs = formats.quantize_per_token(w, fmt)
        assert torch.isfinite(xs).all() and (xq[2].float() == 0).all()


def test_rounding_is_half_to_even_and_clamped():
    # With amax 127 the scale is exactly 1, so values land on .5 exactly.
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0, 126.5]])
    q, s = formats.quantize_per_token(x, "w8a8-int8")
    assert s.item() == 1.0
    assert q.tolist() == [[0, 2, 2, 0, -2, 127, 126]]
    q, s = formats.quantize_per_tensor(torch.tensor([[300.0, -300.0, 2.5]]), torch.tensor(1.0), "w8a8-int8")
    assert q.tolist() == [[127, -127, 2]]
    q, _ = formats.quantize_per_tensor(torch.tensor([[1000.0, -1000.0]]), torch.tensor(1.0), "w8a8-fp8")
    assert q.float().tolist() == [[448.0, -448.0]]


def test_compile_fullgraph_matches_eager():
    layer = QuantLinear.from_linear(make_linear(64, 48), "int8-torch")
    x = torch.randn(4, 20, 64, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_ops_pass_opcheck():
    from qkernels import ops

    x = torch.randn(17, 64, dtype=torch.bfloat16)
    smooth = torch.rand(64) + 0.5
    for fp8 in (False, True):
        torch.library.opcheck(ops.quantize_per_token.torch_op, (x, smooth, fp8))
        torch.library.opcheck(ops.quantize_per_tensor.torch_op, (x, torch.tensor(0.05), None, fp8))
    a = torch.randint(-127, 128, (17, 64), dtype=torch.int8)
    w = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    torch.library.opcheck(ops.int8_mm_dequant.torch_op,
                          (a, torch.rand(17), w, torch.rand(48), torch.randn(48, dtype=torch.bfloat16), torch.bfloat16))


def test_cli_prints_backend_table():
    out = subprocess.run([sys.executable, "-m", "qkernels", "--device", "cpu"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("bf16", "int8-torch", "fp8-scaled-mm", "int8-layerwise", "fp8-layerwise", "auto ->"):
        assert name in out


@pytest.mark.parametrize("fmt", ["w8-int8", "w8-fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantize_weight_is_one_fp32_product_rounded_once(fmt, dtype):
    """The one-pass dequantization equals the fp32 product rounded once to ``dtype``, and a
    product rounded in ``dtype`` (the cheaper, wrong arithmetic) is told apart."""
    w = torch.randn(64, 96) * 3
    q, s = formats.quantize_weight(w, fmt)
    got = formats.dequantize_weight(q, s, dtype)
    want = (q.float() * s[:, None]).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    if dtype != torch.float32:
        assert not torch.equal(got, q.to(dtype) * s.to(dtype)[:, None])
