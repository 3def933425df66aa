"""The Triton fast launch path (qkernels.triton._launch) launches exactly what Triton's own path
would, under the simulated driver (kernels compiled for sm90 by Triton, launches recorded).

The checks run in a subprocess without TRITON_INTERPRET (this session interprets Triton kernels,
and KernelLauncher needs real JIT functions): tests/simulated_launch_checks.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECKS = Path(__file__).resolve().parent / "simulated_launch_checks.py"


def _run(*flags: str, script: Path = CHECKS) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_fast_launch_matches_triton_launches():
    """Quant kernel (plain JIT) and int8 GEMM (autotuned): for aligned and misaligned inputs,
    M = 1 (a constexpr in Triton), 17 and 16/32 (divisible by 16), the direct launch passes the same
    compiled kernel, grid and arguments as Triton; a layer's warm forward is its two kernels."""
    out = _run()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all launch checks passed" in out.stdout
    assert "FAIL" not in out.stdout


@pytest.mark.slow
def test_launch_checks_catch_a_key_without_alignment():
    """The same checks fail when the launcher's key leaves out pointer alignment."""
    out = _run("--break-spec", "--no-layer", "--no-replay")
    assert out.returncode != 0
    assert "FAIL quant m=16 misaligned x" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
def test_replay_checks_catch_a_replay_that_ignores_its_inputs():
    """The replay checks fail when a recorded forward replays for an input it was not recorded
    for (a misaligned x: Triton compiled another kernel for it)."""
    out = _run("--break-replay", "--no-layer")
    assert out.returncode != 0
    assert "FAIL replay int8-triton dynamic m=16 misaligned x" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
def test_replay_checks_catch_a_gemm_key_without_its_epilogue():
    """The GEMM replay checks fail when the replay's key leaves out the GELU flag (a recorded
    plain GEMM would then be replayed for a GELU call)."""
    out = _run("--break-gemm-key", "--no-layer")
    assert out.returncode != 0
    assert "FAIL replay int8-triton gemm gelu m=16" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
def test_op_replay_checks_catch_a_key_without_the_scalar_arguments():
    """The op replay checks fail when an op's replay is keyed on its tensors only (an int8
    recording would then be replayed for an fp8 call)."""
    out = _run("--break-op-key", "--no-layer")
    assert out.returncode != 0
    assert "FAIL op replay quantize_per_token fp8=True" in out.stdout, out.stdout + out.stderr


def test_replay_scratch_is_per_stream_and_thread_grows_and_is_capped(monkeypatch):
    """The replay's scratch buffer (qkernels.triton._launch._scratch): one per (device, stream)
    and per thread (two threads issuing on one stream must not share temporaries), grown to
    the largest request and never past SCRATCH_MAX_BYTES."""
    import threading

    pytest.importorskip("triton")
    from qkernels.triton import _launch

    monkeypatch.setattr(_launch._scratch_buffers, "buffers", None)  # this test's own, handed back after
    cpu = torch.device("cpu")
    a = _launch._scratch(cpu, 1, 1000)
    assert _launch._scratch(cpu, 1, 1000) == a  # kept
    assert _launch._scratch(cpu, 2, 1000) != a  # another stream: another buffer
    grown = _launch._scratch(cpu, 1, 5000)
    assert _launch._scratch_buffers.buffers[(cpu, 1)].numel() >= 5000
    assert _launch._scratch(cpu, 1, 100) == grown  # a smaller request keeps the grown buffer
    _launch._scratch(cpu, 3, _launch.SCRATCH_MAX_BYTES - 1)
    _launch._scratch(cpu, 3, _launch.SCRATCH_MAX_BYTES)
    assert _launch._scratch_buffers.buffers[(cpu, 3)].numel() == _launch.SCRATCH_MAX_BYTES
    other = []
    t = threading.Thread(target=lambda: other.append(_launch._scratch(cpu, 1, 1000)))
    t.start()
    t.join()
    assert other and other[0] != grown


CONTRACTION = Path(__file__).resolve().parent / "contraction_checks.py"


@pytest.mark.slow
def test_kernels_compile_without_fma_contraction():
    """Each kernel but the attention's, launched as its entry launches it, compiles for sm90
    without FMA contraction: the references round every product (run 11 found the epilogue pass's
    gated residual contracted into one fma, a bf16 step off in 27% of its entries on the H100)."""
    out = _run(script=CONTRACTION)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all contraction checks passed" in out.stdout
    for kernel in ("_epilogue_kernel", "_quantize_per_token_kernel", "_quantize_per_tensor_kernel",
                   "_dequantize_weight_kernel", "_layernorm_modulate_quant_kernel", "_qk_norm_rope_kernel",
                   "_int8_gemm_kernel", "_fp8_gemm_kernel", "_fp8_gemm_tma_kernel", "_int8_static_gemm_kernel",
                   "_weight_only_gemm_kernel"):
        assert f"ok   {kernel}: compiled without FMA contraction" in out.stdout, (kernel, out.stdout)


@pytest.mark.slow
def test_contraction_checks_catch_the_epilogue_pass_launched_with_contraction():
    """The same check fails on the defect it is for: the epilogue pass with contraction allowed."""
    out = _run("--break-fusion", script=CONTRACTION)
    assert out.returncode != 0
    assert "FAIL _epilogue_kernel: compiled without FMA contraction (enable_fp_fusion=True" in out.stdout, (
        out.stdout + out.stderr)
