"""qkernels as a quantization backend of diffusers and transformers (one module per library).

``import qpipeline`` calls :func:`install`: the quantizers are registered with a library when
that library's quantizer registry is imported (at once if it already is), so importing
qpipeline never imports diffusers or transformers itself (``diffusers.quantizers`` alone takes
seconds to import), and ``Model.from_pretrained(folder)`` of a qkernels folder needs nothing
more than ``import qpipeline`` beforehand.

``ray_serve``: the edit app on Ray Serve replicas (the ``ray`` extra; imported only by whoever
uses it).
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import sys
import threading

__all__ = ["install", "mark_quantized"]

# the library's registry module -> our module that registers with it
_TARGETS = {
    "diffusers.quantizers.auto": "qpipeline.integrations.diffusers",
    "transformers.quantizers.auto": "qpipeline.integrations.transformers",
    "peft.tuners.lora.model": "qpipeline.integrations.peft",
}
_lock = threading.Lock()
_registered: set[str] = set()


def _register(target: str) -> None:
    with _lock:
        if target in _registered:
            return
        _registered.add(target)
    ours = sys.modules.get(_TARGETS[target])
    if ours is not None and not hasattr(ours, "register"):
        return  # our module is being imported (it imported the library): it registers at its end
    try:
        importlib.import_module(_TARGETS[target]).register()
    except Exception as exc:  # our failure must not break the library's own import
        logging.getLogger("qpipeline").warning("qkernels could not register with %s: %s", target.split(".")[0], exc)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, target):
        self._loader, self._target = loader, target

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register(self._target)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Registers our quantizer right after a library's quantizer registry module is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS or fullname in _registered:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Register with every library whose registry is imported; hook the others' import."""
    for target in _TARGETS:
        if target in sys.modules:
            _register(target)
    if not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook())


def mark_quantized(model) -> None:
    """Make a model quantized by ``quantize_model`` / loaded by ``load_quantized`` a quantized
    model for its library: ``save_pretrained`` then writes ``config.json`` with a
    ``quantization_config`` block, and ``from_pretrained`` rebuilds the 8-bit layers (without it a
    diffusers save reloads the int8 codes as bf16 weights). A no-op for plain modules. Where the
    library's integration cannot be imported (a version it does not support), the model still runs
    and only its ``save_pretrained`` raises, with the reason."""
    for cls in type(model).__mro__:
        library = cls.__module__.split(".")[0]
        if (library, cls.__name__) in (("diffusers", "ModelMixin"), ("transformers", "PreTrainedModel")):
            try:
                integration = importlib.import_module(f"qpipeline.integrations.{library}")
            except ImportError as exc:  # e.g. a transformers older than the quantizer's floor
                return _refuse_save_pretrained(model, exc)
            return integration.mark_quantized(model)


def _refuse_save_pretrained(model, reason: Exception) -> None:
    """The quantized model still runs, but its library cannot save it as a quantized model: its
    ``save_pretrained`` raises (the 8-bit codes written as plain weights would reload as garbage)."""
    from qkernels.errors import CheckpointError

    message = (f"{type(model).__name__}.save_pretrained cannot write this model's qkernels 8-bit layers: {reason}. "
               "qpipeline.save_quantized writes a qkernels folder without it")

    def save_pretrained(*args, **kwargs):
        raise CheckpointError(message)

    model.save_pretrained = save_pretrained  # an instance attribute: push_to_hub calls it too
