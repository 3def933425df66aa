"""Backend registry: names, formats, availability, and ``auto`` resolution.

Adding a backend is one new module under ``qkernels/backends`` with one ``@register_backend``
class. An explicit backend that cannot run raises :class:`BackendUnavailableError` naming the
reason and the backends that can; ``auto`` falls back quietly and records what it chose.
"""

from __future__ import annotations

import logging
from typing import ClassVar, NamedTuple

import torch

from .capabilities import as_device, device_reason
from .errors import BackendUnavailableError, InputError, UnsupportedShapeError
from .ops.fused import gemm_epilogue

__all__ = [
    "Backend",
    "BackendRow",
    "register_backend",
    "get_backend",
    "list_backends",
    "resolve_backend",
    "AUTO_PREFERENCE",
    "apply_epilogue",
]

log = logging.getLogger("qkernels")


class Backend:
    """One way to compute with one format. Subclasses are stateless singletons.

    ``prepare`` runs once when a layer is built, loaded or switched to this backend (weight
    layout, kernel caches); ``forward`` runs per call on a contiguous [M, K] input with M >= 1 and
    must not sync the host.
    """

    name: ClassVar[str]
    format: ClassVar[str]  # a name in qkernels.formats.FORMATS, or "none" for bf16
    devices: ClassVar[tuple[str, ...]]
    description: ClassVar[str] = ""

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None if this backend can run on ``device``, else why not."""
        if device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {device.type}"
        return None

    def unsupported_shape_reason(self, in_features: int, out_features: int) -> str | None:
        return None

    def prepare(self, layer) -> None:
        pass

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scaled_mm(self, layer, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """fp32 ``(q @ W.T) * s[m] * w_scale[n] (+ bias)`` for an activation already quantized to
        the layer's format (8-bit ``q`` [M, K], row scales ``s`` [M]). Weight-only and bf16
        backends take no quantized activation."""
        raise InputError(f"backend {self.name!r} ({self.format}) does not take a quantized activation")

    def gemm(self, layer, q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype, gelu: bool = False,
             residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
             gate_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's GEMM on a quantized activation, with an optional epilogue (GELU-tanh, or
        ``residual + gate[gate_rows] * y``; ``qkernels.ops.fused.gemm_epilogue_reference``), out in
        ``out_dtype``. Backends with a fused-epilogue kernel override this; the default runs
        :meth:`scaled_mm` and then the epilogue as its own op (one Triton pass on CUDA)."""
        return apply_epilogue(self.scaled_mm(layer, q, s), out_dtype, gelu, residual, gate, gate_rows)

    def __repr__(self) -> str:
        return f"<backend {self.name} ({self.format})>"


def apply_epilogue(y, out_dtype, gelu, residual, gate, gate_rows):
    """``qkernels.ops.fused.gemm_epilogue`` on a GEMM output; none asked: only the rounding."""
    if not gelu and residual is None and gate is None and gate_rows is None:
        return y.to(out_dtype)
    return gemm_epilogue(y, out_dtype, gelu, residual, gate, gate_rows)


_BACKENDS: dict[str, Backend] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.name in _BACKENDS or cls.name == "auto":
        raise ValueError(f"backend name {cls.name!r} is already taken")
    _BACKENDS[cls.name] = cls()
    return cls


class BackendRow(NamedTuple):
    name: str
    format: str
    available: bool
    reason: str


# `auto` takes the first available backend of the wanted format in this order. Measured, not
# guessed (benchmarks/results/):
# - CUDA, H100, eager, 6 full-width Qwen-Image blocks at 8,400 tokens: fp8-triton 41.7 ms,
#   fp8-scaled-mm 42.7, int8-triton 43.8, int8-cublaslt 46.3, int8-torch 70.0 (bf16 45.2).
# - CPU, 2 cores with AVX-512 VNNI, 512x3072x3072: int8-torch 5.3 ms; fp8-scaled-mm 83 ms (CPU
#   _scaled_mm is a reference loop); weight-only 25-44 ms (bf16 4.3 ms).
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("fp8-triton", "fp8-scaled-mm", "int8-triton", "int8-cublaslt", "int8-torch",
             "int8-layerwise", "fp8-layerwise"),
    # Triton on CPU is the interpreter (tests only): auto never picks it.
    "cpu": ("int8-torch", "fp8-scaled-mm", "int8-layerwise", "fp8-layerwise"),
}


def _unavailable(backend: Backend, device: torch.device) -> str | None:
    # the device itself first: a CUDA backend on a machine torch sees no CUDA on is unavailable,
    # whatever its own check says
    return device_reason(device) or backend.unavailable_reason(device)


def _ensure_loaded() -> None:
    from . import backends  # noqa: F401  (registers the built-in backends on first use)


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (not resolved for a device; see resolve_backend)."""
    _ensure_loaded()
    try:
        return _BACKENDS[name]
    except KeyError:
        known = ", ".join(["auto", *_BACKENDS])
        raise InputError(f"unknown backend {name!r}; known backends: {known}") from None


def list_backends(device: torch.device | str | None = None) -> list[BackendRow]:
    """One row per registered backend for ``device`` (default: CUDA if present, else CPU)."""
    _ensure_loaded()
    device = as_device(device)
    rows = []
    for backend in _BACKENDS.values():
        reason = _unavailable(backend, device)
        rows.append(BackendRow(backend.name, backend.format, reason is None, reason or ""))
    return rows


def resolve_backend(
    name: str,
    device: torch.device | str | None = None,
    *,
    format: str | None = None,
    shape: tuple[int, int] | None = None,
) -> Backend:
    """The backend to use for ``name`` on ``device``, for a layer of ``format`` and
    ``shape = (in_features, out_features)`` if given.

    An explicit name that cannot serve raises (BackendUnavailableError, UnsupportedShapeError or
    InputError for a format mismatch). ``auto`` returns the first suitable backend of
    AUTO_PREFERENCE and logs its choice.
    """
    _ensure_loaded()
    device = as_device(device)
    if name != "auto":
        backend = get_backend(name)
        if format is not None and backend.format != format:
            same = [b.name for b in _BACKENDS.values() if b.format == format]
            raise InputError(
                f"backend {name!r} computes format {backend.format!r}, not {format!r}; "
                f"backends of {format!r}: {', '.join(same) or 'none'}"
            )
        reason = _unavailable(backend, device)
        if reason:
            usable = [r.name for r in list_backends(device) if r.available and r.name != "bf16"
                      and (format is None or r.format == format)]
            raise BackendUnavailableError(
                f"backend {name!r} cannot run on {device}: {reason}. "
                f"Available here: {', '.join(usable) or 'none'}"
            )
        if shape is not None:
            reason = backend.unsupported_shape_reason(*shape)
            if reason:
                raise UnsupportedShapeError(f"backend {name!r} cannot take in={shape[0]}, out={shape[1]}: {reason}")
        return backend

    order = AUTO_PREFERENCE.get(device.type, AUTO_PREFERENCE["cpu"])
    skipped = []
    for candidate in order:
        backend = _BACKENDS.get(candidate)
        if backend is None or (format is not None and backend.format != format):
            continue
        reason = _unavailable(backend, device) or (shape and backend.unsupported_shape_reason(*shape))
        if reason:
            skipped.append(f"{candidate}: {reason}")
            continue
        log.debug("auto chose %s on %s (skipped: %s)", candidate, device, "; ".join(skipped) or "none")
        return backend
    what = f" for format {format!r}" if format else ""
    raise BackendUnavailableError(
        f"no backend{what} can run on {device}" + (f" ({'; '.join(skipped)})" if skipped else "")
    )
