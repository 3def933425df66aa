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

CHECKS = Path(__file__).resolve().parent / "simulated_launch_checks.py"


def _run(*flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(CHECKS), *flags], capture_output=True, text=True, env=env,
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
