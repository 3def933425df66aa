"""Exceptions raised by qkernels, qpipeline and calibration.

Every error a user can cause derives from :class:`QKernelsError`, so a CLI can catch one type
and print one line. Each subclass also derives from the builtin it refines, so generic
``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = [
    "QKernelsError",
    "BackendUnavailableError",
    "UnsupportedShapeError",
    "InputError",
    "CheckpointError",
    "CalibrationError",
    "RecipeError",
    "LoRAError",
]


class QKernelsError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class BackendUnavailableError(QKernelsError, RuntimeError):
    """A backend was asked for by name but cannot run here (device, library, capability)."""


class UnsupportedShapeError(QKernelsError, ValueError):
    """A layer's shape does not meet a backend's kernel constraints (e.g. K % 8 != 0)."""


class InputError(QKernelsError, ValueError):
    """A forward input the layer cannot take: wrong device, dtype or feature size."""


class CheckpointError(QKernelsError, OSError):
    """A checkpoint is missing, truncated, tampered with, of an unknown version, or unsafe."""


class CalibrationError(QKernelsError, ValueError):
    """Calibration statistics that do not match the model or are unusable."""


class RecipeError(QKernelsError, ValueError):
    """A recipe that cannot be parsed or applied."""


class LoRAError(QKernelsError, ValueError):
    """A LoRA that does not fit the model: keys matching no layer, wrong shapes, or a merge into
    an already-quantized layer."""
