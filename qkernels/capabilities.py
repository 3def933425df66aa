"""Every capability check in one place: what this machine can run, and why not.

Each function returns ``None`` when the capability is present, or a one-line reason a person can
act on. Results that cannot change during a process are cached.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import torch

__all__ = [
    "default_device",
    "cuda_reason",
    "device_reason",
    "cuda_capability",
    "fp8_gemm_reason",
    "triton_reason",
    "triton_import_reason",
    "triton_version_reason",
    "major_minor",
    "cupy_reason",
    "cublaslt_reason",
]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def cuda_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA device (got {device.type})"
    if not torch.cuda.is_available():
        return "torch reports no usable CUDA device (CPU build of torch, or no driver)"
    return None


def device_reason(device: torch.device) -> str | None:
    """None if torch can place tensors on ``device`` on this machine, else why not (checked
    before anything is built there, so that a CPU-only machine says so instead of failing deep
    inside a kernel with an AssertionError)."""
    if device.type != "cuda":
        return None
    reason = cuda_reason(device)
    if reason:
        return reason
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"{device} does not exist: this machine has {count} CUDA device(s)"
    return None


@functools.lru_cache(maxsize=None)
def cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_gemm_reason(device: torch.device) -> str | None:
    """``torch._scaled_mm`` with e4m3 operands and rowwise scales."""
    if device.type == "cpu":
        return None
    reason = cuda_reason(device)
    if reason:
        return reason
    major, minor = cuda_capability(device.index or 0)
    if (major, minor) < (8, 9):
        return f"fp8 tensor cores need compute capability 8.9+ (Ada/Hopper), this GPU is {major}.{minor}"
    return None


@functools.lru_cache(maxsize=None)
def _cpu_rowwise_scaled_mm_reason() -> str | None:
    # CPU rowwise _scaled_mm exists in some torch releases only (2.13 has it; 2.11 says "only
    # supports per-tensor scaling for CPU backend"), so ask torch once with a 16x16 product.
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"this torch ({torch.__version__}) has no rowwise-scaled fp8 _scaled_mm on CPU: {first}"
    return None


def scaled_mm_rowwise_reason(device: torch.device) -> str | None:
    """``torch._scaled_mm`` with e4m3 operands and rowwise (per-token x per-channel) scales."""
    if device.type == "cpu":
        return _cpu_rowwise_scaled_mm_reason()
    return fp8_gemm_reason(device)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The oldest Triton the kernels and their launcher run with: 3.4 (torch 2.8) brought
# ``triton.knobs`` and host-side TMA descriptors (``triton.tools.tensor_descriptor``), which
# ``qkernels.triton`` imports. The launcher's fast path (``qkernels.triton._launch``) reads
# Triton's compiled-kernel internals; ``tests/simulated_launch_checks.py`` passes on 3.4 to 3.9.
TRITON_MIN_VERSION = (3, 4)


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.4.0+git1234' or '5.0.0rc1'; (0, 0) if none."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


@functools.lru_cache(maxsize=None)
def triton_import_reason() -> str | None:
    """Why ``qkernels.triton`` cannot be used on any device: Triton missing, broken or too old."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'qkernels[triton]')"
    try:
        import triton
    except Exception as exc:  # a broken install must not break `import qkernels`
        return f"triton failed to import: {exc}"
    return triton_version_reason(getattr(triton, "__version__", "0"))


def triton_version_reason(version: str) -> str | None:
    """Why Triton ``version`` cannot run these kernels (None: it can)."""
    if major_minor(version) < TRITON_MIN_VERSION:
        need = ".".join(map(str, TRITON_MIN_VERSION))
        return (f"triton {version} is older than {need}, the oldest these kernels run with (torch >= 2.8 "
                f"ships triton >= {need}: upgrade torch, which brings the triton it was built with)")
    return None


def triton_reason(device: torch.device) -> str | None:
    reason = triton_import_reason()
    if reason:
        return reason
    if device.type == "cpu":
        if triton_interpret():
            return None
        return "Triton kernels need CUDA (on CPU only under TRITON_INTERPRET=1, for tests)"
    return cuda_reason(device)


@functools.lru_cache(maxsize=None)
def cupy_reason() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return ("CuPy is not installed (pip install 'qkernels[cublaslt]', or cupy-cuda12x / "
                "cupy-cuda13x to match the driver)")
    try:
        import cupy  # noqa: F401
    except Exception as exc:
        return f"CuPy failed to import: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _cublaslt_library_reason() -> str | None:
    from .cublaslt import _lib  # ctypes only; loads nothing until asked

    reason = _lib.library_reason()
    if reason:
        return (f"{reason}; it ships with torch's CUDA wheels (nvidia-cublas) and the CUDA toolkit "
                "(pip install 'qkernels[cublaslt]' installs CuPy, not cuBLAS)")
    return None


def cublaslt_reason(device: torch.device) -> str | None:
    """The ``int8-cublaslt`` backend: a CUDA device with int8 tensor cores, CuPy (for the
    epilogue kernel) and a loadable libcublasLt."""
    reason = cuda_reason(device)
    if reason:
        return reason
    major, minor = cuda_capability(device.index or 0)
    if (major, minor) < (7, 5):
        return f"cuBLASLt int8 IMMA kernels need compute capability 7.5+, this GPU is {major}.{minor}"
    return cupy_reason() or _cublaslt_library_reason()
