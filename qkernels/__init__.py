"""qkernels: 8-bit Linear layers (int8 / fp8, weight-only or W8A8) with pluggable backends.

    >>> from qkernels import QuantLinear, list_backends
    >>> layer = QuantLinear.from_linear(linear, backend="auto")

Importing qkernels imports torch only; Triton and CuPy are imported when a backend needs them.
"""

from . import errors, formats
from .errors import (
    BackendUnavailableError,
    CalibrationError,
    CheckpointError,
    InputError,
    LoRAError,
    QKernelsError,
    RecipeError,
    UnsupportedShapeError,
)
from .linear import QuantizedActivation, QuantLinear
from .registry import Backend, BackendRow, get_backend, list_backends, register_backend, resolve_backend

__version__ = "0.1.0"

__all__ = [
    "QuantLinear",
    "QuantizedActivation",
    "Backend",
    "BackendRow",
    "register_backend",
    "get_backend",
    "list_backends",
    "resolve_backend",
    "formats",
    "errors",
    "QKernelsError",
    "BackendUnavailableError",
    "UnsupportedShapeError",
    "InputError",
    "CheckpointError",
    "CalibrationError",
    "RecipeError",
    "LoRAError",
    "__version__",
]
