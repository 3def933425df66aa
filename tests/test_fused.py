"""Fused block kernels and the fused Qwen-Image block.

CPU: the Triton kernels run under TRITON_INTERPRET=1 (conftest) on small shapes; on a GPU the same
tests run the compiled kernels (the ``gpu`` ones at Qwen-Image's widths).

The fused kernels reproduce the unfused bf16 block's roundings (``qkernels.ops.fused``), so the
comparisons are bit-exact where the arithmetic is the same: kernel == reference on CPU, and the
reference == diffusers' own composition. On CUDA the LayerNorm / RMSNorm reductions run in another
order and ``1/sqrt`` is approximate, so a value can land one grid step of its dtype away: the GPU
bounds allow that (one bf16 ulp before the quantization, i.e. a quantized value off by one step in
a few entries, never more).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton")
pytest.importorskip("diffusers")

import qkernels.triton as kt  # noqa: E402
from qkernels import QuantLinear, QuantizedActivation, formats  # noqa: E402
from qkernels.errors import InputError  # noqa: E402
from qkernels.ops import fused as fo  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
FMTS = ["w8a8-int8", "w8a8-fp8"]


def _exact_or_one_step(a: torch.Tensor, b: torch.Tensor, frac: float = 1e-3, exact: bool = True) -> None:
    """Equal on CPU (``exact``); on CUDA, in at most ``frac`` of the entries, one grid step apart
    for 8-bit values and up to two (2^-6 relative) for bf16 outputs: the bound the GPU runs
    passed with, not tightened to one step without a GPU run to show it holds."""
    if exact and not a.is_cuda:
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                           b.view(torch.uint8) if b.element_size() == 1 else b)
        return
    diff = (a.float() - b.float()).abs()
    # a grid step of the dtype at the larger magnitude: e4m3 2^-3 relative (4 significant bits)
    # or its subnormal spacing 2^-9, int8 1; bf16 2^-7 (8 significant bits), allowed twice
    rel, absolute = {torch.float8_e4m3fn: (2**-3, 2**-9), torch.int8: (0.0, 1.0)}.get(a.dtype, (2**-6, 1e-30))
    step = torch.maximum(a.float().abs(), b.float().abs()) * rel + absolute
    assert ((diff > 0).float().mean() <= frac) and bool((diff <= step).all())


# --------------------------------------------------------------------------------------------
# GEMM epilogues


def _gemm_case(fmt, m=100, k=208, n=144, g=3):
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w, ws = formats.quantize_weight(torch.randn(n, k, device=DEV), fmt)
    q, s = formats.quantize_per_token(x, fmt)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    res = torch.randn(m, n, device=DEV, dtype=torch.bfloat16)
    gate = torch.randn(g, 2 * n, device=DEV, dtype=torch.bfloat16)[:, n:]  # a strided view, as in the block
    rows = torch.randint(0, g, (m,), dtype=torch.int32, device=DEV)
    return q, s, w, ws, bias, res, gate, rows


def _within_fast_accumulation(out, ref, q, s, w, ws, epilogue, gate, rows) -> None:
    """The e4m3 GEMMs on sm90 let wgmma accumulate at its reduced internal precision (Triton's
    max_num_imprecise_acc = 2^30, as torch._scaled_mm's use_fast_accum): each partial sum keeps ~13
    significant bits (DeepSeek-V3 measured ~14; SageAttention2 calls it FP22), truncated, so against
    the exact fp32 sum an output is off by up to 2^-12 of the running sum of |products| per k32 MMA
    step, K/32 + 1 steps in all, times the epilogue's slope (GELU's <= 1.13, the gate's |g|), on top of
    the output's two bf16 steps. The run-10 H200 case: 3.4-4.2% of entries differ, some past two
    bf16 steps where the sum cancels."""
    k = q.shape[1]
    magnitude = (q.float().abs() @ w.float().abs().t()) * s.float().reshape(-1, 1) * ws.float().reshape(1, -1)
    slope = 1.13 if epilogue == "gelu" else gate.float()[rows.long()].abs()
    allowed = slope * magnitude * 2**-12 * (k // 32 + 1) + torch.maximum(out.float().abs(), ref.float().abs()) * 2**-6
    assert bool(((out.float() - ref.float()).abs() <= allowed).all())


LAUNCHERS = {"w8a8-int8": [kt.int8_gemm], "w8a8-fp8": [kt.fp8_gemm, kt.fp8_gemm_tma]}
REFS = {"w8a8-int8": fo._int8_fused_ref, "w8a8-fp8": fo._fp8_fused_ref}


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("epilogue", ["gelu", "gated-residual"])
def test_gemm_epilogue_equals_reference(fmt, epilogue):
    if DEV.type == "cuda" and fmt == "w8a8-fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 GEMM needs sm89+")
    q, s, w, ws, bias, res, gate, rows = _gemm_case(fmt)
    kw = dict(gelu=True) if epilogue == "gelu" else dict(residual=res, gate=gate, gate_rows=rows)
    args = (kw.get("gelu", False), kw.get("residual"), kw.get("gate"), kw.get("gate_rows"))
    ref = REFS[fmt](q, s, w, ws, bias, torch.bfloat16, *args)
    for launch in LAUNCHERS[fmt]:
        if launch is kt.fp8_gemm_tma and DEV.type == "cuda" and torch.cuda.get_device_capability() < (9, 0):
            continue
        out = launch(q, s, w, ws, bias, torch.bfloat16, *args)
        if fmt == "w8a8-fp8" and out.is_cuda:
            _within_fast_accumulation(out, ref, q, s, w, ws, epilogue, gate, rows)
        else:
            _exact_or_one_step(out, ref)
    if epilogue == "gated-residual":
        # the check catches a wrong gate row: every token shifted to the next modulation row
        broken = REFS[fmt](q, s, w, ws, bias, torch.bfloat16, False, res, gate, (rows + 1) % 3)
        assert (broken != ref).float().mean() > 0.3
        if fmt == "w8a8-fp8":  # ... and so does the fast-accumulation bound the GPU uses
            with pytest.raises(AssertionError):
                _within_fast_accumulation(broken, ref, q, s, w, ws, epilogue, gate, rows)


@pytest.mark.parametrize("ydtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("epilogue", ["gelu", "gated-residual", "none"])
def test_epilogue_pass_equals_reference(epilogue, ydtype):
    """The epilogue as its own pass (for GEMMs that are not ours: torch._scaled_mm, _int_mm) equals
    the reference on a GEMM output, fp32 or already bf16, on a shape no tile divides."""
    m, n, g = 70, 200, 3
    y = (torch.randn(m, n, device=DEV) * 4).to(ydtype)
    res = torch.randn(m, n, device=DEV, dtype=torch.bfloat16)
    gate = torch.randn(g, 2 * n, device=DEV, dtype=torch.bfloat16)[:, n:]
    rows = torch.randint(0, g, (m,), dtype=torch.int32, device=DEV)
    args = {"gelu": (True, None, None, None), "gated-residual": (False, res, gate, rows),
            "none": (False, None, None, None)}[epilogue]
    ref = fo.gemm_epilogue_reference(y.float(), torch.bfloat16, *args)
    out = kt.gemm_epilogue(y, torch.bfloat16, *args)
    _exact_or_one_step(out, ref)
    if epilogue == "gated-residual":  # a wrong gate row is caught
        broken = kt.gemm_epilogue(y, torch.bfloat16, False, res, gate, (rows + 1) % g)
        assert (broken != ref).float().mean() > 0.3


def test_backend_gemm_runs_the_epilogue_op():
    """A backend without a fused GEMM (int8-torch) computes the block's epilogues through
    ``ops.fused.gemm_epilogue``: its output equals scaled_mm + the reference epilogue."""
    from qkernels.registry import get_backend

    q, s, w, ws, bias, res, gate, rows = _gemm_case("w8a8-int8")
    layer = SimpleNamespace(weight=w, weight_scale=ws, bias=bias)
    backend = get_backend("int8-torch")
    y = backend.scaled_mm(layer, q, s)
    for args in ((True, None, None, None), (False, res, gate, rows), (False, None, None, None)):
        want = fo.gemm_epilogue_reference(y, torch.bfloat16, *args)
        # exact on CPU; on CUDA the pass's exp is the GPU's (not torch's): the bf16 one-step bound
        _exact_or_one_step(backend.gemm(layer, q, s, torch.bfloat16, *args), want)
    broken = backend.gemm(layer, q, s, torch.bfloat16, False, res, gate, (rows + 1) % gate.shape[0])  # a wrong row
    assert (broken != fo.gemm_epilogue_reference(y, torch.bfloat16, False, res, gate, rows)).float().mean() > 0.3


def test_epilogue_reference_is_the_unfused_arithmetic():
    """The reference epilogue equals what the unfused block computes from the Linear's output."""
    y = torch.randn(64, 96) * 3
    res = torch.randn(64, 96).bfloat16()
    gate = torch.randn(2, 96).bfloat16()
    rows = torch.randint(0, 2, (64,), dtype=torch.int32)
    yb = y.bfloat16()
    gelu_ref = fo.gemm_epilogue_reference(y, torch.bfloat16, True, None, None, None)
    # GELU-tanh of the same bf16 output in float64: the sigmoid form is correctly rounded to bf16
    # (half an ulp, 2^-9 relative, plus fp32's own error: within 2^-8) everywhere, also where
    # 0.5 v (1 + tanh u) cancels (v < -3); torch's bf16 GELU is not held to that there.
    v = yb.double()
    exact = v * torch.sigmoid(2 * (0.7978845608028654 * (v + 0.044715 * v**3)))  # = 0.5 v (1 + tanh u)
    assert torch.allclose(exact[v > -3], torch.nn.functional.gelu(v, approximate="tanh")[v > -3], rtol=1e-12)
    assert bool(((gelu_ref.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-38).all())
    wrong = fo.gemm_epilogue_reference(y * 1.01, torch.bfloat16, True, None, None, None)
    assert not bool(((wrong.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-38).all())
    gated = fo.gemm_epilogue_reference(y, torch.bfloat16, False, res, gate, rows)
    assert torch.equal(gated, res + gate[rows.long()] * yb)


def test_epilogue_argument_checks():
    q, s, w, ws, bias, res, gate, rows = _gemm_case("w8a8-int8", m=8, k=64, n=32)
    with pytest.raises(InputError, match="gelu or a gated residual"):
        kt.int8_gemm(q, s, w, ws, bias, torch.bfloat16, True, res, gate, rows)
    with pytest.raises(InputError, match="residual, gate and gate_rows"):
        kt.int8_gemm(q, s, w, ws, bias, torch.bfloat16, False, res, None, rows)
    with pytest.raises(InputError, match="gate_rows must be int32"):
        kt.int8_gemm(q, s, w, ws, bias, torch.bfloat16, False, res, gate, rows.long())
    with pytest.raises(InputError, match="residual must be"):
        kt.int8_gemm(q, s, w, ws, bias, torch.bfloat16, False, res.float(), gate, rows)


# --------------------------------------------------------------------------------------------
# LayerNorm + modulate + quant


def _lmq_case(m=37, k=192, g=2, dtype=torch.bfloat16):
    x = (torch.randn(m, k, device=DEV) * 3 + 0.5).to(dtype)
    x[3, 5] = 40.0  # an outlier token
    mod = (torch.randn(g, 6 * k, device=DEV) * 0.5).to(dtype)
    rows = torch.randint(0, g, (m,), dtype=torch.int32, device=DEV)
    return x, mod[:, :k], mod[:, k:2 * k], rows


def test_row_chunks_cover_a_row_with_the_fewest_padding_lanes():
    from qkernels.triton.fused import row_chunks

    assert row_chunks(3072) == (3, 1024)  # Qwen-Image's width: no padding (a 4096 tile pads 1024)
    assert row_chunks(12288) == (3, 4096)  # its MLP
    assert row_chunks(8192) == (2, 4096) and row_chunks(16000) == (4, 4096)
    assert row_chunks(203) == (1, 256) and row_chunks(320) == (3, 128)
    assert row_chunks(16500) == (0, 4096)  # past four 4096-wide chunks: the kernel refuses it
    assert row_chunks(3072, chunked=False) == (1, 4096)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
# the row as 3 exact chunks (192 = 3 x 64), 3 with padding lanes, 2 exact, 4 with padding
@pytest.mark.parametrize("k", [192, 320, 8192, 16000])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunks", "one-tile"])
def test_layernorm_modulate_quant_equals_reference(fmt, dtype, k, chunked, monkeypatch):
    from qkernels.triton import fused as tfused

    monkeypatch.setitem(tfused.TUNING, "lmq_chunked", chunked)
    fp8 = fmt == "w8a8-fp8"
    x, shift, scale, rows = _lmq_case(m=37 if k < 1000 else 6, k=k, dtype=dtype)
    x[1, k - 1] = -50.0  # a row whose largest value is in its last chunk's last column
    q, s = kt.layernorm_modulate_quant(x, shift, scale, rows, 1e-6, fp8)
    qr, sr = fo._lmq_ref(x, shift, scale, rows, 1e-6, fp8)
    # bf16: the roundings to bf16 hide the LayerNorm's reduction order (bit-exact on CPU); fp32
    # activations have no such grid, so the mean/variance's last-ulp differences can move a value
    # across a quantization boundary: one step, in under 1% of the entries, scales within 1e-6.
    exact = dtype == torch.bfloat16
    _exact_or_one_step(q, qr, frac=1e-3 if exact else 1e-2, exact=exact)
    torch.testing.assert_close(s, sr, rtol=2**-7 if DEV.type == "cuda" else (0 if exact else 1e-6), atol=0)
    # the check catches a wrong shift (scale given as shift): most quantized values move
    qb, _ = fo._lmq_ref(x, scale, scale, rows, 1e-6, fp8)
    assert (qb.float() != qr.float()).float().mean() > 0.3


def test_layernorm_modulate_reference_is_diffusers_modulate():
    """The reference's modulation is the Qwen-Image block's own _modulate (per-sample and with the
    Edit-2511 modulate_index) after its LayerNorm, bit for bit."""
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    block = QwenImageTransformerBlock(64, 2, 32)
    b, l_img, d = 2, 12, 64
    x = torch.randn(b, l_img, d).bfloat16()
    mod1 = torch.randn(2 * b, 3 * d).bfloat16()  # zero_cond_t: 2B modulation rows
    index = torch.randint(0, 2, (b, l_img), dtype=torch.int32)
    want, _ = block._modulate(torch.nn.functional.layer_norm(x, (d,), eps=1e-6), mod1, index)
    rows = (torch.arange(b, dtype=torch.int32)[:, None] + b * index).reshape(-1)
    got = fo.modulate_reference(x.reshape(-1, d), mod1[:, :d], mod1[:, d:2 * d], rows, 1e-6)
    assert torch.equal(got, want.reshape(-1, d))
    # a broken modulation index (reference tokens given the noisy tokens' row) is caught
    bad = fo.modulate_reference(x.reshape(-1, d), mod1[:, :d], mod1[:, d:2 * d], rows % b, 1e-6)
    assert not torch.equal(bad, want.reshape(-1, d))


# --------------------------------------------------------------------------------------------
# q/k RMSNorm + RoPE


def _rope(n, half, device=DEV):
    ang = torch.randn(n, half, device=device) * 3
    return torch.stack([ang.cos(), ang.sin()], -1).contiguous()


@pytest.mark.parametrize("batch,split", [(1, False), (2, False), (2, True)], ids=["B1", "B2", "B2-split"])
def test_qk_norm_rope_equals_reference(batch, split, monkeypatch):
    from qkernels.triton import fused as tfused

    monkeypatch.setitem(tfused.TUNING, "qk_split", split)  # pairs read apart, or split in registers
    heads, d, lt, li = 3, 64, 5, 11
    qt = torch.randn(batch * lt, 3 * heads * d, device=DEV).bfloat16()
    qi = torch.randn(batch * li, 3 * heads * d, device=DEV).bfloat16()
    w = [torch.randn(d, device=DEV).bfloat16() for _ in range(4)]
    ct, ci = _rope(lt, d // 2), _rope(li, d // 2)
    out = kt.qk_norm_rope(qt, qi, batch, heads, *w, ct, ci, 1e-6)
    ref = fo._qk_ref(qt, qi, batch, heads, *w, ct, ci, 1e-6)
    for a, b in zip(out, ref):
        assert a.shape == (batch, lt + li, heads, d)
        _exact_or_one_step(a, b, frac=2e-2)
    # the check catches RoPE of the wrong stream (text frequencies on the image tokens)
    bad = fo._qk_ref(qt, qi, batch, heads, *w, ct, _rope(li, d // 2), 1e-6)
    assert not torch.equal(bad[0], ref[0])


def test_qk_reference_is_diffusers_norm_rope_and_concat():
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    heads, d, lt, li = 2, 32, 4, 9
    qt, qi = torch.randn(lt, 3 * heads * d).bfloat16(), torch.randn(li, 3 * heads * d).bfloat16()
    norms = [RMSNorm(d, eps=1e-6).bfloat16() for _ in range(4)]
    for n in norms:
        n.weight.data = torch.randn(d).bfloat16()
    ft = torch.polar(torch.ones(lt, d // 2), torch.randn(lt, d // 2))
    fi = torch.polar(torch.ones(li, d // 2), torch.randn(li, d // 2))
    want = []
    for qkv, nq, nk, f in ((qt, norms[0], norms[1], ft), (qi, norms[2], norms[3], fi)):
        q, k, v = qkv.reshape(1, -1, 3, heads, d).unbind(2)
        want.append((apply_rotary_emb_qwen(nq(q), f, use_real=False), apply_rotary_emb_qwen(nk(k), f, use_real=False), v))
    want = [torch.cat([a, b], 1) for a, b in zip(*want)]
    got = fo._qk_ref(qt, qi, 1, heads, *(n.weight for n in norms), torch.view_as_real(ft), torch.view_as_real(fi), 1e-6)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# QuantizedActivation into QuantLinear


@pytest.mark.parametrize("backend", ["int8-torch", "fp8-scaled-mm", "int8-triton", "fp8-triton"])
def test_quantlinear_takes_a_quantized_activation(backend):
    lin = torch.nn.Linear(96, 80).bfloat16().to(DEV)
    try:
        layer = QuantLinear.from_linear(lin, backend)
    except Exception as exc:  # a backend this machine cannot run
        pytest.skip(f"{backend}: {exc}")
    x = torch.randn(3, 7, 96, device=DEV).bfloat16()
    q, s = formats.quantize_per_token(x.reshape(-1, 96), layer.format)
    got = layer(QuantizedActivation(q.reshape(3, 7, 96), s, x.dtype))
    want = layer(x)
    assert got.shape == want.shape == (3, 7, 80)
    assert torch.equal(got, want) if backend != "fp8-scaled-mm" or DEV.type == "cuda" else \
        torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0)  # CPU: fp32 out, then one rounding
    other = formats.quantize_per_token(x.reshape(-1, 96), "w8a8-fp8" if layer.format == "w8a8-int8" else "w8a8-int8")
    with pytest.raises(InputError, match="cannot feed"):
        layer(QuantizedActivation(other[0], other[1], x.dtype))


# --------------------------------------------------------------------------------------------
# the fused block


def _tiny(zero_cond_t=False, seed=0):
    from qpipeline.demo import build_demo_transformer

    return build_demo_transformer("tiny", seed=seed, zero_cond_t=zero_cond_t, device=DEV)


def _inputs(model, mask=True):
    from qpipeline.demo import demo_inputs

    inp = demo_inputs(model, image_hw=(4, 4), reference_hw=(4, 4), text_tokens=7)
    if mask:
        inp["encoder_hidden_states_mask"][0, 5:] = 0  # padding: the mask is honored
    else:
        inp["encoder_hidden_states_mask"] = None
    return inp


@pytest.mark.parametrize("backend,zero_cond_t,mask", [
    ("int8-torch", False, True), ("int8-torch", True, False), ("fp8-triton", True, True), ("int8-triton", False, False)])
@torch.no_grad()
def test_fused_block_equals_unfused(backend, zero_cond_t, mask):
    from qpipeline import quantize_model
    from qpipeline.blocks import fuse_model, unfuse_model

    model = _tiny(zero_cond_t)
    inp = _inputs(model, mask)
    try:
        quantize_model(model, backend)
    except Exception as exc:
        pytest.skip(f"{backend}: {exc}")
    unfused = model(**inp)[0]
    report = fuse_model(model)
    assert len(report.fused) == 2 and not report.kept
    fused = model(**inp)[0]
    if DEV.type == "cpu":
        assert torch.equal(fused, unfused)
    else:  # reductions in another order: one bf16 step before some quantizations
        rel = (fused.float() - unfused.float()).norm() / unfused.float().norm()
        assert rel < 2e-2
    assert unfuse_model(model) == 2
    assert torch.equal(model(**inp)[0], unfused)


def _as_diffusers_037(model):
    """Make the blocks receive the text mask as diffusers <= 0.37 sends it: no
    encoder_hidden_states_mask, the joint key mask [B, S_txt + S_img] (built once per forward) in
    joint_attention_kwargs["attention_mask"]. Returns the hook handles."""
    built = {}

    def hook(block, args, kwargs):
        mask = kwargs.get("encoder_hidden_states_mask")
        if mask is None:
            return None
        if built.get("src") is not mask:  # one joint tensor for every block, as 0.37 builds it
            ones = torch.ones(mask.shape[0], kwargs["hidden_states"].shape[1], dtype=torch.bool, device=mask.device)
            built.update(src=mask, joint=torch.cat([mask.to(torch.bool), ones], dim=1))
        return args, {**kwargs, "encoder_hidden_states_mask": None,
                      "joint_attention_kwargs": {"attention_mask": built["joint"]}}

    return [b.register_forward_pre_hook(hook, with_kwargs=True) for b in model.transformer_blocks]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-block", "qkernels-processor"])
@torch.no_grad()
def test_the_joint_mask_of_older_diffusers_is_honored(fused):
    """diffusers 0.37 hands the blocks the joint attention_mask instead of the text mask: the
    fused block and qkernels' processor take it (the fused path, not the fallback) and give what
    the text-mask form gives; the mask matters here (without it the output differs)."""
    from qkernels.attention.diffusers_plugin import set_attention
    from qpipeline import quantize_model
    from qpipeline.blocks import fuse_model, qwen_image

    model = _tiny(zero_cond_t=True)
    inp = _inputs(model, mask=True)
    quantize_model(model, "int8-torch")
    if fused:
        fuse_model(model)
    else:
        set_attention(model, "bf16")
    want = model(**inp)[0]
    unmasked = model(**{**inp, "encoder_hidden_states_mask": None})[0]
    assert not torch.allclose(want.float(), unmasked.float(), rtol=1e-2, atol=1e-2)
    handles = _as_diffusers_037(model)
    calls = []
    original = qwen_image._prepare
    qwen_image._prepare = lambda *a, **k: calls.append(k.get("joint")) or original(*a, **k)
    try:
        got = model(**inp)[0]
    finally:
        qwen_image._prepare = original
        for h in handles:
            h.remove()
    assert torch.equal(got, want)
    if fused:
        assert calls == [True] * len(model.transformer_blocks)  # the fused forward ran in every block


@pytest.mark.parametrize("diffusers_037", [False, True], ids=["text-mask", "joint-mask"])
@torch.no_grad()
def test_padded_keys_sliced_out_equal_the_masked_attention(monkeypatch, diffusers_037):
    """The CUDA form of a text padding mask (each sample attends alone to its unpadded keys, no
    mask) against the masked attention, on a batch of two whose second prompt is padded as
    batched CFG pads it: equal within bf16 attention rounding; the padded tokens' content cannot
    reach the image tokens (bit-equal when it changes); slicing one token too few is caught."""
    from qpipeline import quantize_model
    from qpipeline.blocks import fuse_model, qwen_image

    model = _tiny(zero_cond_t=True)
    inp = demo_inputs_padded(model)
    quantize_model(model, "int8-torch")
    fuse_model(model)
    handles = _as_diffusers_037(model) if diffusers_037 else []
    try:
        masked = model(**inp)[0]
        monkeypatch.setitem(qwen_image.SLICE_PADDED_KEYS, "cpu", True)
        qwen_image._LAST = None
        sliced = model(**inp)[0]
        assert qwen_image._LAST.lengths == [7, 4] and qwen_image._LAST.mask is not None
        rel = ((sliced.float() - masked.float()).norm() / masked.float().norm()).item()
        # the two forms differ only in the order of fp32 sums before bf16 outputs: within one bf16
        # rounding (2^-9 relative; measured 8.5e-4), where one text token too few moves it 7.7e-3
        assert rel < 2**-9, rel
        other = {**inp, "encoder_hidden_states": inp["encoder_hidden_states"].clone()}
        other["encoder_hidden_states"][1, 4:] = 5.0  # the padding's content
        assert torch.equal(model(**other)[0], sliced)
        original = qwen_image._prefix_lengths
        monkeypatch.setattr(qwen_image, "_prefix_lengths", lambda *a: [n - 1 for n in original(*a)])
        qwen_image._LAST = None
        broken = model(**inp)[0]
        assert ((broken.float() - masked.float()).norm() / masked.float().norm()).item() > 2**-9
    finally:
        for h in handles:
            h.remove()
        qwen_image._LAST = None


def demo_inputs_padded(model):
    from qpipeline.demo import demo_inputs

    inp = demo_inputs(model, image_hw=(4, 4), reference_hw=(4, 4), text_tokens=7, batch=2)
    inp["encoder_hidden_states_mask"][1, 4:] = 0  # the shorter prompt, right-padded
    return inp


@torch.no_grad()
def test_fused_block_catches_a_broken_modulation_index():
    """Edit-2511's per-token modulation matters: the fused block given the wrong tokens' rows
    (every token the noisy image's) computes something else, and the comparison says so."""
    from qpipeline import quantize_model
    from qpipeline.blocks import fuse_model
    from qpipeline.blocks import qwen_image

    model = _tiny(zero_cond_t=True)
    inp = _inputs(model, mask=False)
    quantize_model(model, "int8-torch")
    fuse_model(model)
    good = model(**inp)[0]
    original = qwen_image._prepare

    def broken(batch, l_img, l_txt, modulate_index, rope, mask, device, joint=False):
        p = original(batch, l_img, l_txt, None, rope, mask, device, joint)  # index dropped
        qwen_image._LAST = None
        return p

    qwen_image._prepare = broken
    try:
        bad = model(**inp)[0]
    finally:
        qwen_image._prepare = original
    assert not torch.allclose(bad.float(), good.float(), rtol=1e-2, atol=1e-2)


@torch.no_grad()
def test_blocks_that_cannot_be_fused_say_why():
    from qpipeline import Recipe, quantize_model
    from qpipeline.blocks import fuse_model

    model = _tiny()
    inp = _inputs(model)
    recipe = Recipe(backend="int8-torch", rules=[("transformer_blocks.0.img_mlp.net.2", "skip"),
                                                  ("transformer_blocks.1.attn.to_q", "int8-layerwise")])
    quantize_model(model, recipe)
    before = model(**inp)[0]
    report = fuse_model(model)
    assert report.fused == []
    why = dict(report.kept)
    assert why["transformer_blocks.0"] == "img_mlp.net.2 is not quantized"
    assert "weight-only" in why["transformer_blocks.1"]
    assert "not fused (img_mlp.net.2 is not quantized): transformer_blocks.0" in report.format()
    assert torch.equal(model(**inp)[0], before)


@torch.no_grad()
def test_fused_qkv_holds_no_second_copy_and_survives_a_move():
    from qpipeline import quantize_model
    from qpipeline.quantize import model_bytes

    model = _tiny()
    report = quantize_model(model, "int8-torch", fuse=True)
    assert len(report.fuse["fused"]) == 2
    block = model.transformer_blocks[0]
    st = block._qk_fused
    assert block.attn.to_k.weight.untyped_storage().data_ptr() == st.qkv_img.weight.untyped_storage().data_ptr()
    assert model_bytes(model) == report.model_bytes_after
    inp = _inputs(model)
    y = model(**inp)[0]
    # a move/cast re-joins the q/k/v weights (nn.Module.to: diffusers' own .to refuses a dtype
    # cast of a quantized model, as it does for every quantization backend)
    nn.Module.to(model, torch.float32).to(DEV)
    assert block.attn.to_k.weight.untyped_storage().data_ptr() == block._qk_fused.qkv_img.weight.untyped_storage().data_ptr()
    nn.Module.to(model, torch.bfloat16)
    assert torch.equal(model(**inp)[0], y)


@torch.no_grad()
def test_fuse_from_the_recipe_round_trips_through_a_checkpoint(tmp_path):
    from qpipeline import Recipe, load_quantized, quantize_model, save_quantized

    model = _tiny()
    inp = _inputs(model)
    report = quantize_model(model, Recipe(backend="int8-torch", fuse=True))
    y = model(**inp)[0]
    save_quantized(model, tmp_path / "q", report)
    loaded = load_quantized(tmp_path / "q", device=DEV)
    assert len(loaded.fuse_report.fused) == 2
    assert torch.equal(loaded(**inp)[0], y)
    plain = load_quantized(tmp_path / "q", device=DEV, fuse=False)
    assert not hasattr(plain, "fuse_report") and torch.equal(plain(**inp)[0], y)
    assert Recipe.from_dict(Recipe(fuse=True).to_dict()).fuse is True
    with pytest.raises(Exception, match="fuse must be true or false"):
        Recipe(fuse="yes")


@pytest.mark.gpu
@torch.no_grad()
def test_fused_full_width_block_on_gpu():
    """Qwen-Image's real width (24 heads of 128, MLP 12288) at ~1,100 tokens, fp8-triton."""
    from qpipeline import quantize_model
    from qpipeline.demo import build_demo_transformer, demo_inputs

    model = build_demo_transformer("full-width", num_layers=2, zero_cond_t=True, device="cuda")
    inp = demo_inputs(model, image_hw=(24, 24), reference_hw=(24, 24), text_tokens=77)
    inp["encoder_hidden_states_mask"] = None
    ref = model(**inp)[0]
    quantize_model(model, "fp8-triton")
    unfused = model(**inp)[0]
    from qpipeline.blocks import fuse_model

    assert len(fuse_model(model).fused) == 2
    fused = model(**inp)[0]
    e_unfused = ((unfused.float() - ref.float()).norm() / ref.float().norm()).item()
    e_fused = ((fused.float() - ref.float()).norm() / ref.float().norm()).item()
    # the same quantization decisions: the fused error is the unfused one to within 10%
    assert e_fused < 1.1 * e_unfused + 1e-3
    assert ((fused.float() - unfused.float()).norm() / unfused.float().norm()).item() < 0.25 * e_unfused + 1e-3


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_replay_equals_eager():
    """The block loop replayed from a CUDA graph gives the eager output bit for bit, for the fused
    fp8 blocks, across two shapes and new inputs of a captured shape."""
    from qpipeline import quantize_model
    from qpipeline.demo import build_demo_transformer, demo_inputs
    from qpipeline.graphs import GraphedBlockList, disable_cuda_graphs, enable_cuda_graphs

    model = build_demo_transformer("small", num_layers=2, zero_cond_t=True, device="cuda")
    quantize_model(model, "fp8-triton", fuse=True)
    cases = [demo_inputs(model, image_hw=hw, reference_hw=hw, text_tokens=20, seed=s)
             for hw, s in (((8, 8), 0), ((8, 8), 1), ((12, 8), 2), ((8, 8), 3))]
    cases[-1]["encoder_hidden_states_mask"][0, 15:] = 0  # real padding: runs eagerly (sliced keys)
    eager = [model(**inp)[0].clone() for inp in cases]
    enable_cuda_graphs(model)
    assert isinstance(model.transformer_blocks, GraphedBlockList)
    for _ in range(2):
        for inp, want in zip(cases, eager):
            assert torch.equal(model(**inp)[0], want)
    assert len(model.transformer_blocks._graphs) == 2  # two shapes (all-ones masks dropped); padding eager
    disable_cuda_graphs(model)
    assert torch.equal(model(**cases[0])[0], eager[0])


@pytest.mark.gpu
@torch.no_grad()
def test_replayed_fused_forward_equals_the_direct_one(monkeypatch):
    """On CUDA the fused blocks' calls are replayed (each layer's GEMM per (M, epilogue), the
    norm / quant / RoPE ops per call signature: qkernels.backends.triton_backends): a replayed
    forward equals the one through the ops and launchers bit for bit, for new inputs of a
    recorded shape and a second shape, every earlier output kept intact."""
    from qkernels.backends.triton_backends import _TritonW8A8
    from qpipeline import quantize_model
    from qpipeline.demo import build_demo_transformer, demo_inputs

    model = build_demo_transformer("small", num_layers=2, zero_cond_t=True, device="cuda")
    quantize_model(model, "fp8-triton", fuse=True)
    cases = [demo_inputs(model, image_hw=hw, reference_hw=hw, text_tokens=20, seed=s)
             for hw, s in (((8, 8), 0), ((8, 8), 1), ((12, 8), 2), ((8, 8), 3), ((12, 8), 4))]
    monkeypatch.setattr(_TritonW8A8, "REPLAY", False)
    direct = [model(**inp)[0].clone() for inp in cases]
    monkeypatch.setattr(_TritonW8A8, "REPLAY", True)
    for _ in range(2):  # record
        for inp in cases:
            model(**inp)
    got = [model(**inp)[0] for inp in cases]
    for i, (a, b) in enumerate(zip(got, direct)):
        assert torch.equal(a, b), i


@torch.no_grad()
def test_graphed_blocks_run_padded_inputs_eagerly(monkeypatch):
    """Where the eager fused blocks slice padded text keys out (CUDA), a graph keyed by shape could
    not: a padded forward runs the plain loop, equal to the unwrapped model, and captures nothing."""
    from qpipeline import quantize_model
    from qpipeline.blocks import qwen_image
    from qpipeline.graphs import GraphedBlockList, _Graph, disable_cuda_graphs, enable_cuda_graphs

    model = _tiny(zero_cond_t=True)
    inp = demo_inputs_padded(model)
    quantize_model(model, "int8-torch", fuse=True)
    monkeypatch.setitem(qwen_image.SLICE_PADDED_KEYS, "cuda", True)
    want = model(**inp)[0]
    enable_cuda_graphs(model)
    monkeypatch.setattr(GraphedBlockList, "_cuda", lambda self: True)  # the runner path, on the CPU
    monkeypatch.setattr(_Graph, "__init__", lambda *a: pytest.fail("a padded forward was captured"))
    assert torch.equal(model(**inp)[0], want)
    assert not model.transformer_blocks._graphs
    disable_cuda_graphs(model)


def test_graph_keys_drop_masks_that_mask_nothing():
    """What eager attention drops (an all-ones text mask) is dropped before a CUDA graph is keyed
    and captured; a real padding mask is kept; diffusers 0.37's joint mask likewise."""
    from qpipeline.graphs import _without_all_ones_masks

    ones, pad = torch.ones(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)
    pad[0, 4:] = 0
    assert _without_all_ones_masks({"encoder_hidden_states_mask": ones})["encoder_hidden_states_mask"] is None
    assert _without_all_ones_masks({"encoder_hidden_states_mask": pad})["encoder_hidden_states_mask"] is pad
    joint = {"attention_mask": torch.ones(1, 10, dtype=torch.bool)}
    assert _without_all_ones_masks({"joint_attention_kwargs": joint})["joint_attention_kwargs"] is None
    joint_pad = {"attention_mask": torch.cat([pad.bool(), torch.ones(1, 4, dtype=torch.bool)], 1)}
    assert _without_all_ones_masks({"joint_attention_kwargs": joint_pad})["joint_attention_kwargs"] is joint_pad
