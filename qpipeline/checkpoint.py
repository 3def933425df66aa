"""Quantized checkpoints: safetensors weights + ``quantization_config.json``.

    save_quantized(model, "q/", report)                  # atomic: a temp folder renamed into place
    model = load_quantized("q/", device="cuda")           # meta skeleton + tensors straight from the file

Layout (HF-style)::

    q/model.safetensors                       one file up to max_shard_bytes, else
    q/model-00001-of-00003.safetensors ...    shards + model.safetensors.index.json
    q/quantization_config.json                format version, toolkit version, model class and config,
                                              per-layer formats, tensor manifest, shard sizes + sha256

Loading never builds a high-precision copy of the model: the skeleton's parameters live on the
meta device (buffers and plain tensor attributes, e.g. rotary tables, are computed normally so
they are correct), quantized layers are built empty on meta, then each tensor is read from the
memory-mapped file onto the target device and assigned (``load_state_dict(assign=True)``).

Trust: a checkpoint is data, never code. The model class it names is looked up among diffusers'
and transformers' own model classes (or those registered with :func:`register_model_class`),
checked to be an ``nn.Module`` subclass before anything is called; no module is ever imported by
a name read from the file, so a ``.py`` shipped beside the weights never runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
import uuid
from pathlib import Path

import torch
import torch.nn as nn

import qkernels
from qkernels import QuantLinear
from qkernels.errors import CheckpointError, QKernelsError
from qkernels.registry import get_backend

__all__ = ["save_quantized", "load_quantized", "load_pretrained", "register_model_class", "check_destination",
           "CHECKPOINT_FORMAT_VERSION", "DEFAULT_MAX_SHARD_BYTES", "params_on_meta"]

log = logging.getLogger("qpipeline")

CHECKPOINT_FORMAT_VERSION = 1
CONFIG_NAME = "quantization_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# 5 GiB, as transformers' default: a 20 GB int8 Qwen-Image transformer is 4 shards.
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_ST_DTYPES = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
    torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ST_TO_TORCH = {v: k for k, v in _ST_DTYPES.items()}
_QUANT_BUFFERS = ("weight", "weight_scale", "input_scale", "input_smooth")


def _usable_device(device) -> torch.device:
    """``device`` as a torch.device, refused with the reason when torch cannot use it here."""
    from qkernels.capabilities import device_reason
    from qkernels.errors import BackendUnavailableError

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"device {device!r} is not a device (cpu, cuda, cuda:1)") from None
    reason = device_reason(device)
    if reason:
        raise BackendUnavailableError(f"device {device}: {reason}")
    return device


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in {CONFIG_NAME}")
    return dtype


# ==============================================================================================
# safetensors, streamed one tensor at a time (no second copy of a shard in host memory)


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict | None = None) -> str:
    """Write ``tensors`` to ``path`` in the safetensors format; returns the file's sha256."""
    header, offset = {}, 0
    for key, t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{key}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            sha.update(chunk)
        for key, t in tensors:
            data = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
            f.write(data)
            sha.update(data)
        f.flush()
        os.fsync(f.fileno())
    return sha.hexdigest()


def _read_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file, checked against the file's size: every tensor's
    bytes must lie inside the file and the entries must tile the data section exactly, so a
    truncated or padded file is refused before anything is read."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path.name} is not a valid safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    spans = []
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is not a valid safetensors file (its header is not a JSON object)")
    for key, e in header.items():
        if not isinstance(e, dict) or e.get("dtype") not in _ST_TO_TORCH:
            raise CheckpointError(f"{path.name}: tensor {key!r} has an unknown dtype {e.get('dtype') if isinstance(e, dict) else e!r}")
        offsets, shape = e.get("data_offsets"), e.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and isinstance(shape, list)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*offsets, *shape])):
            raise CheckpointError(f"{path.name}: tensor {key!r} has a malformed shape or data_offsets")
        b, end = offsets
        numel = 1
        for d in e["shape"]:
            numel *= d
        if end - b != numel * _ST_TO_TORCH[e["dtype"]].itemsize:
            raise CheckpointError(f"{path.name}: tensor {key!r} has {end - b} bytes for shape {e['shape']} {e['dtype']}")
        spans.append((b, end))
    spans.sort()
    data = size - 8 - n
    pos = 0
    for b, end in spans:
        if b != pos:
            raise CheckpointError(f"{path.name}: tensor data is not contiguous (a gap or overlap at byte {b})")
        pos = end
    if pos != data:
        what = "truncated" if pos > data else "longer than its header says"
        raise CheckpointError(f"{path.name} is {what}: the header describes {pos} data bytes, the file has {data}")
    return header


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


# ==============================================================================================
# model description


def _class_path(obj_or_cls) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}:{cls.__qualname__}"


# Plain nn.Module classes a checkpoint may name (diffusers / transformers models need no entry).
_MODEL_CLASSES: dict[str, type] = {}
# The libraries whose own model classes a checkpoint may name, and the base class each must derive from.
_LIBRARIES = {"diffusers": ("diffusers", "ModelMixin"), "transformers": ("transformers", "PreTrainedModel")}


def register_model_class(cls: type) -> type:
    """Let checkpoints name ``cls`` (an ``nn.Module`` subclass; usable as a class decorator).

    ``load_quantized`` builds only diffusers and transformers model classes and the classes
    registered here: a checkpoint is data and cannot make it import or call anything else.
    A plain module is rebuilt with ``cls()``; a diffusers-style one with ``cls.from_config``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"register_model_class takes an nn.Module subclass, got {cls!r}")
    _MODEL_CLASSES[_class_path(cls)] = cls
    return cls


def _library_base(library: str) -> type:
    module, base = _LIBRARIES[library]
    return getattr(importlib.import_module(module), base)


def _safe_model_class(path, kind: str, ckpt: Path | None = None) -> type:
    """The class a checkpoint's ``model.class`` names, resolved without importing any module the
    file names: a registered class, or a model class that diffusers / transformers export by that
    name (``getattr`` on the installed library), checked to be an nn.Module subclass of the
    library's model base class before anything is called."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise CheckpointError(f"{CONFIG_NAME}: model class must be 'module:Class', got {path!r}")
    cls = _MODEL_CLASSES.get(path)
    if cls is None:
        module, qualname = path.split(":")
        library = module.partition(".")[0]
        if kind not in _LIBRARIES or library != kind or not qualname.isidentifier():
            raise CheckpointError(
                f"{CONFIG_NAME} names model class {path!r} ({kind}); only diffusers and transformers model "
                f"classes, and classes registered with qpipeline.checkpoint.register_model_class, are built "
                f"from a checkpoint (it is data: nothing it names is imported or called). Register the class, "
                f"or pass skeleton=<callable returning the model>")
        try:
            cls = getattr(importlib.import_module(library), qualname, None)
        except ImportError as exc:
            raise CheckpointError(f"{path} needs {library}, which cannot be imported: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, _library_base(library))):
            raise CheckpointError(f"{CONFIG_NAME} names {path!r}, which is not a {library} model class "
                                  f"(this {library} has no model class {qualname!r})")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{path} is not an nn.Module subclass")
    if ckpt is not None:
        # a registered class defined in a file inside the checkpoint folder is still code from the checkpoint
        try:
            src = Path(inspect.getfile(cls)).resolve()
        except (TypeError, OSError):
            src = None
        if src is not None and src.is_relative_to(ckpt.resolve()):
            raise CheckpointError(f"{path} is defined in {src}, inside the checkpoint folder: refusing to run it")
    return cls


def _json_value(v):
    if isinstance(v, torch.dtype):
        return _dtype_name(v)
    if isinstance(v, (tuple, set)):
        return list(v)
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def _model_kind(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(type(model), "config_class"):
        return "transformers"
    if isinstance(config, dict) and hasattr(type(model), "from_config"):
        return "diffusers"
    return "module"


def _describe_model(model: nn.Module) -> dict:
    kind = _model_kind(model)
    d = {"kind": kind, "class": _class_path(model), "config": None}
    if kind == "transformers":
        d["config"] = model.config.to_dict()
        d["config_class"] = _class_path(model.config)
    elif kind == "diffusers":
        d["config"] = dict(model.config)
    if d["config"] is not None:  # the quantization block is rebuilt from "layers" on load
        d["config"].pop("quantization_config", None)
        d["config"].pop("_pre_quantization_dtype", None)
    # through JSON now, so that an unserializable config fails the save, not a later load
    d["config"] = json.loads(json.dumps(d["config"], default=_json_value))
    return d


@contextlib.contextmanager
def params_on_meta():
    """Build modules with their parameters on the meta device (no memory, no init compute),
    while buffers and plain tensor attributes (rotary tables, position ids) are computed on the
    CPU as usual: they are not in a state dict, so they must be real after loading."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def _build_skeleton(desc: dict, skeleton=None, ckpt: Path | None = None) -> nn.Module:
    if skeleton is not None:
        with params_on_meta():
            return skeleton()
    kind, config = desc["kind"], desc["config"]
    cls = _safe_model_class(desc["class"], kind, ckpt)
    try:
        with params_on_meta():
            if kind == "diffusers":
                return cls.from_config(config)
            if kind == "transformers":
                # the model class's own config class: nothing named by the file is imported
                return cls(cls.config_class.from_dict(config))
            return cls()
    except QKernelsError:
        raise
    except Exception as exc:
        hint = " (a plain nn.Module without a config: pass skeleton=<callable returning the model>)" if kind == "module" else ""
        raise CheckpointError(f"cannot build {desc['class']} from its saved config: {type(exc).__name__}: {exc}{hint}") from None


# ==============================================================================================
# save


def _non_persistent_buffers(model: nn.Module) -> dict[str, str]:
    out = {}
    for mname, m in model.named_modules():
        for b in m._non_persistent_buffers_set:
            t = m._buffers.get(b)
            if t is not None:
                out[f"{mname}.{b}" if mname else b] = _dtype_name(t.dtype)
    return out


def _weights_name(model: nn.Module) -> str:
    """The weights file name the model's library reads: diffusers' for its models, else model.safetensors."""
    return "diffusion_pytorch_model.safetensors" if _model_kind(model) == "diffusers" else WEIGHTS_NAME


def _index_name(model: nn.Module) -> str:
    return _weights_name(model) + ".index.json"


def _plan_shards(model: nn.Module, tensors: list[tuple[str, torch.Tensor]], max_bytes: int):
    """(file names, [(key, tensor), ...] per file): huggingface_hub's split and names, as
    save_pretrained writes them, so from_pretrained reads the folder."""
    from huggingface_hub import split_torch_state_dict_into_shards

    pattern = _weights_name(model).replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(dict(tensors), filename_pattern=pattern, max_shard_size=max_bytes)
    order = {key: i for i, (key, _) in enumerate(tensors)}
    by_name = dict(tensors)
    names = list(split.filename_to_tensors)
    shards = [sorted(((k, by_name[k]) for k in split.filename_to_tensors[f]), key=lambda kv: order[kv[0]])
              for f in names]
    return names, shards


def _write_standard_layout(model: nn.Module, folder: Path) -> None:
    """config.json with a quantization_config block, written by the model's library, so that
    ``Model.from_pretrained(folder)`` rebuilds the same 8-bit model (a plain nn.Module has no
    standard config: it gets none)."""
    from .integrations import mark_quantized

    kind = _model_kind(model)
    if kind == "module":
        return
    mark_quantized(model)
    if kind == "diffusers":
        model.save_config(str(folder))
    else:
        from .integrations._common import model_dtype

        dtype = model_dtype(model)
        if dtype is not None:  # as save_pretrained does: from_pretrained's dtype="auto" reads it
            model.config.dtype = dtype
        model.config.save_pretrained(str(folder))
    if getattr(model, "hf_quantizer", None) is None:  # not marked: its library's integration cannot import
        _add_quantization_config(folder / "config.json", model)


def _add_quantization_config(path: Path, model: nn.Module) -> None:
    """The quantization_config block the integration would have written, added to a config.json
    its library wrote without one, so the folder reloads as the 8-bit model wherever the
    integration imports (``from_pretrained`` would otherwise read the codes as plain weights)."""
    from .integrations._common import QKernelsConfigFields, layer_specs, model_dtype

    layers = layer_specs(model)
    if not layers:  # nothing quantized: mark_quantized leaves such a model as it is, too
        return
    config = json.loads(path.read_text())
    config["quantization_config"] = QKernelsConfigFields(layers=layers, torch_dtype=model_dtype(model)).to_dict()
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _read_config_json(ckpt: Path) -> dict | None:
    """The quantization_config block of a folder's config.json when it says qkernels, else None."""
    path = ckpt / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    block = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if isinstance(block, dict) and block.get("quant_method") == "qkernels":
        return cfg
    return None


def _load_with_library(ckpt: Path, cfg: dict, device: torch.device, backend: str) -> nn.Module:
    """A folder written by save_pretrained (no manifest of ours): the library's from_pretrained,
    which our quantizer serves; the class is looked up in diffusers / transformers only."""
    if "_class_name" in cfg:
        import diffusers

        cls = getattr(diffusers, cfg["_class_name"], None)
    else:
        import transformers

        archs = cfg.get("architectures") or []
        cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise CheckpointError(f"{ckpt}/config.json names no diffusers or transformers model class this "
                              "installation has")
    model = cls.from_pretrained(str(ckpt), device_map=str(device))
    if backend != "auto":
        for m in model.modules():
            if isinstance(m, QuantLinear) and get_backend(backend).format == m.format:
                m.set_backend(backend)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# the destination: checked before anything is written (and by the CLI before quantizing)

# Files a checkpoint folder of ours may hold besides the shards its config names; anything else
# in it belongs to someone, and --overwrite must not delete it.
_OWN_FILE = re.compile(r"(model|diffusion_pytorch_model)(-\d{5}-of-\d{5})?\.safetensors|.+\.safetensors\.index\.json"
                       r"|config\.json|" + re.escape(CONFIG_NAME))
_STRAY = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}")


def _check_replaceable(out_dir: Path) -> None:
    """Raise unless ``out_dir`` is a folder holding a checkpoint written by save_quantized, and
    nothing else: the only folder ``overwrite=True`` may replace."""
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a folder; overwrite replaces only a checkpoint folder")
    try:
        config = json.loads((out_dir / CONFIG_NAME).read_text())
        ours = isinstance(config, dict) and "format_version" in config and isinstance(config.get("shards"), dict)
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise CheckpointError(f"{out_dir} exists and is not a checkpoint written by save_quantized (no readable "
                              f"{CONFIG_NAME}): overwrite replaces only such a folder. Choose another output folder")
    others = sorted(p.name for p in out_dir.iterdir()
                    if not (p.is_file() and not p.is_symlink() and (p.name in config["shards"] or _OWN_FILE.fullmatch(p.name))))
    if others:
        raise CheckpointError(f"{out_dir} holds {len(others)} item(s) that are not part of its checkpoint "
                              f"({', '.join(others[:5])}): replacing it would delete them. Move them out first")


def check_destination(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Raise CheckpointError unless a checkpoint can be written to ``out_dir``: it does not exist
    (or, with ``overwrite``, holds a checkpoint of ours and nothing else), no part of its path is
    a file, and its file system takes a write. Nothing is left behind by the check."""
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
        _check_replaceable(out_dir)
    check_writable(out_dir)
    return out_dir


def check_writable(path: str | Path) -> None:
    """Raise CheckpointError unless ``path`` can be created: no part of its folder path is a
    file, and the nearest existing folder takes a write (a real one, removed at once: os.access
    cannot see a read-only mount under every user, nor a quota)."""
    path = Path(path)
    anc = path.absolute().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise CheckpointError(f"cannot write {path}: {anc} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=anc))
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {anc} is not writable ({exc.strerror or exc})") from None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stray(out_dir: Path) -> list[Path]:
    """Delete the temporary folders a killed save left beside ``out_dir`` (their process is gone);
    if ``out_dir`` itself is missing, a complete previous checkpoint left by the two-rename
    fallback of :func:`_atomic_swap` is put back first. Returns what was removed."""
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    stray = []
    for p in parent.iterdir():
        m = _STRAY.fullmatch(p.name)
        if m and m["name"] == out_dir.name and p.is_dir() and not _pid_alive(int(m["pid"])):
            stray.append((m["what"], p))
    if not out_dir.exists():
        for what, p in sorted(stray, key=lambda wp: wp[1].stat().st_mtime, reverse=True):
            if what == "old" and (p / CONFIG_NAME).is_file():
                os.rename(p, out_dir)
                log.warning("restored %s from %s, left by an interrupted save", out_dir, p.name)
                stray.remove((what, p))
                break
    for _, p in stray:
        shutil.rmtree(p, ignore_errors=True)
    return [p for _, p in stray]


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``, glibc
    2.28+); False where the OS or the file system has no such call."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _atomic_swap(new: Path, out_dir: Path) -> None:
    """Put the complete folder ``new`` at ``out_dir``; an earlier ``out_dir`` is deleted after.

    One step wherever the file system can: a rename onto a free name, or an exchange of the two
    folders. A kill at any point leaves ``out_dir`` the old checkpoint or the new one, whole;
    what remains under the temporary name is removed by the next save (:func:`_clean_stray`).
    Without an exchange call, two renames: a kill between them leaves ``out_dir`` missing and
    the old checkpoint complete beside it, which the next save puts back."""
    if not out_dir.exists():
        os.rename(new, out_dir)
    elif _exchange(new, out_dir):
        shutil.rmtree(new, ignore_errors=True)  # `new` is the old checkpoint now
    else:
        old = new.with_name(new.name.replace(".tmp-", ".old-", 1))
        os.rename(out_dir, old)
        try:
            os.rename(new, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _config_digest(config: dict) -> str:
    """sha256 of the config without its own checksum, in a canonical JSON form."""
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_quantized(model: nn.Module, out_dir: str | Path, report=None, *, overwrite: bool = False,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``model`` (quantized in place by ``quantize_model``) to ``out_dir``; returns its path.

    Everything is written to a temporary folder beside ``out_dir`` and swapped into place in one
    step (:func:`_atomic_swap`), so a failure or a kill leaves ``out_dir`` the earlier checkpoint
    or the new one, complete. An existing ``out_dir`` is refused unless ``overwrite=True``, and
    even then replaced only if it holds a checkpoint of ours and nothing else. Temporary folders
    left by a killed save are removed first.
    """
    out_dir = Path(out_dir)
    _clean_stray(out_dir)
    check_destination(out_dir, overwrite)
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")

    desc = _describe_model(model)
    state = model.state_dict(keep_vars=True)
    tensors, aliases, first = [], {}, {}
    for key, t in state.items():
        if t is None:
            continue
        if t.device.type == "meta":
            raise CheckpointError(f"{key} is on the meta device: the model's weights are not loaded")
        # safetensors cannot hold two names for one storage (tied embeddings): keep one, alias the rest
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
                 t.device) if t.numel() else None
        if ident is not None and ident in first:
            aliases[key] = first[ident]
            continue
        if ident is not None:
            first[ident] = key
        tensors.append((key, t.detach()))

    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            layers[name] = {"format": m.format, "static": m.input_scale is not None,
                            "smooth": m.input_smooth is not None,
                            "bias_dtype": _dtype_name(m.bias.dtype) if m.bias is not None else None,
                            "in_features": m.in_features, "out_features": m.out_features, "backend": m.backend}

    names, shards = _plan_shards(model, tensors, max_shard_bytes)

    needed = sum(t.numel() * t.element_size() for _, t in tensors)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out_dir.parent).free
    except OSError as exc:
        raise CheckpointError(f"cannot write {out_dir}: {exc.strerror or exc}") from None
    if needed + 2**20 > free:  # + 1 MiB: headers and the config
        raise CheckpointError(f"{out_dir} needs {needed / 2**20:.1f} MiB, its file system has {free / 2**20:.1f} MiB free")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shard_info = {}
        for fname, shard in zip(names, shards):
            sha = _write_safetensors(tmp / fname, shard, {"format": "pt"})
            shard_info[fname] = {"bytes": (tmp / fname).stat().st_size, "sha256": sha}
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for _, t in tensors)},
                     "weight_map": {k: f for f, shard in zip(names, shards) for k, _ in shard}}
            (tmp / _index_name(model)).write_text(json.dumps(index, indent=2) + "\n")
        _write_standard_layout(model, tmp)
        config = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "qkernels_version": qkernels.__version__,
            "torch_version": torch.__version__,
            "model": desc,
            "layers": layers,
            "tensors": {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for k, t in tensors},
            "aliases": aliases,
            "non_persistent_buffers": _non_persistent_buffers(model),
            "shards": shard_info,
            "report": report.to_dict()["totals"] if report is not None else None,
            "recipe": report.recipe if report is not None else None,
        }
        config = json.loads(json.dumps(config, default=_json_value))  # the form a reader sees
        config["config_sha256"] = _config_digest(config)
        with open(tmp / CONFIG_NAME, "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _atomic_swap(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, QKernelsError):
            raise
        raise CheckpointError(f"saving {out_dir} failed, it is unchanged: {exc.strerror or exc}"
                              + (f" ({exc.filename})" if exc.filename else "")) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ==============================================================================================
# load


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name} is a pickle file; only safetensors checkpoints are accepted (pickle can run "
            f"code when loaded). Convert it with safetensors.torch.save_file, or re-quantize"
        )


def _read_config(ckpt: Path) -> dict:
    if ckpt.is_file():
        _refuse_pickle(ckpt)
        raise CheckpointError(f"{ckpt} is a file; load_quantized takes the folder written by save_quantized")
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint folder")
    cfg_path = ckpt / CONFIG_NAME
    if not cfg_path.is_file():
        for p in ckpt.iterdir():
            _refuse_pickle(p)
        raise CheckpointError(f"{ckpt} has no {CONFIG_NAME}: not a checkpoint written by save_quantized")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path.name} has checkpoint format version {version!r}; this qkernels "
            f"{qkernels.__version__} reads version {CHECKPOINT_FORMAT_VERSION}. Load it with the qkernels "
            f"version that wrote it ({config.get('qkernels_version', 'unknown') if isinstance(config, dict) else 'unknown'}), "
            f"or re-quantize the model"
        )
    for key in ("model", "layers", "tensors", "shards"):
        if key not in config:
            raise CheckpointError(f"{cfg_path.name} has no {key!r} entry")
    return config


def _check_files(ckpt: Path, config: dict) -> dict[str, tuple[str, dict]]:
    """key -> (shard file, header entry), after checking each shard's name, size and header."""
    shards = config["shards"]
    for fname, info in shards.items():
        path = ckpt / fname
        if Path(fname).name != fname or not fname.endswith(".safetensors"):
            raise CheckpointError(f"{CONFIG_NAME} names an unexpected shard {fname!r}")
        if not path.is_file():
            raise CheckpointError(f"{fname} is missing from {ckpt}")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{fname} has {size} bytes, {CONFIG_NAME} says {info['bytes']}: "
                                  f"the file is truncated or was replaced")
    where = {}
    for fname in shards:
        for key, entry in _read_header(ckpt / fname).items():
            if key in where:
                raise CheckpointError(f"tensor {key!r} is stored twice ({where[key][0]} and {fname})")
            where[key] = (fname, entry)
    return where


class _Verification:
    """Every shard's sha256, computed in background threads while the load reads the same bytes
    (one thread per shard: hashlib releases the GIL and hashes ~1.1 GB/s per core): on a host
    with cores to spare a verified load should cost about the longer of the two, not their sum
    (H200 host, 20.5 GB in 5 shards, hashing first: 4.9 s to load, 10.2 s verified; the overlap
    is not measured there yet; a 2-core VM has none to spare: 1.05 s against 1.02 s in series
    for 1.1 GB). :meth:`check` waits for them: the model is returned only once every shard
    matched."""

    def __init__(self, ckpt: Path, shards: dict):
        from concurrent.futures import ThreadPoolExecutor

        self.shards = shards
        pool = ThreadPoolExecutor(max_workers=max(1, min(len(shards), os.cpu_count() or 1)),
                                  thread_name_prefix="qk-sha256")
        self.digests = {fname: pool.submit(_sha256, ckpt / fname) for fname in shards}
        pool.shutdown(wait=False)  # the threads finish their shards, then exit

    def check(self) -> None:
        for fname, digest in self.digests.items():
            if digest.result() != self.shards[fname]["sha256"]:
                raise CheckpointError(f"{fname}: sha256 differs from {CONFIG_NAME}: the file was modified or corrupted")


def _check_config(config: dict, verify: bool) -> None:
    """Types of every entry load_quantized reads, and the config's own checksum: a malformed or
    edited config is refused naming what is wrong, before any of it is used."""

    def need(ok, what):
        if not ok:
            raise CheckpointError(f"{CONFIG_NAME}: {what}")

    def is_int(v, lo=0):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    model = config["model"]
    need(isinstance(model, dict) and isinstance(model.get("class"), str)
         and model.get("kind") in ("diffusers", "transformers", "module"),
         "'model' must be an object with a 'class' string and a 'kind' of diffusers, transformers or module")
    need(model.get("config") is None or isinstance(model["config"], dict), "model.config must be an object or null")
    need(model["kind"] == "module" or isinstance(model.get("config"), dict), f"a {model['kind']} model needs its config")
    need(isinstance(config["layers"], dict), "'layers' must be an object")
    for name, spec in config["layers"].items():
        need(isinstance(spec, dict), f"layer {name!r} must be an object")
        for key, ok in (("format", isinstance(spec.get("format"), str)),
                        ("static", isinstance(spec.get("static"), bool)), ("smooth", isinstance(spec.get("smooth"), bool)),
                        ("bias_dtype", spec.get("bias_dtype") is None or isinstance(spec.get("bias_dtype"), str)),
                        ("in_features", is_int(spec.get("in_features"), 1)),
                        ("out_features", is_int(spec.get("out_features"), 1))):
            need(key in spec and ok, f"layer {name!r}: {key!r} is missing or of the wrong type ({spec.get(key)!r})")
    need(isinstance(config["tensors"], dict), "'tensors' must be an object")
    for key, t in config["tensors"].items():
        need(isinstance(t, dict) and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)
             and all(is_int(d) for d in t["shape"]), f"tensor {key!r} needs a 'dtype' string and a 'shape' list of ints")
    aliases = config.get("aliases", {})
    need(isinstance(aliases, dict) and all(isinstance(v, str) and v in config["tensors"] for v in aliases.values()),
         "'aliases' must map names to stored tensors")
    need(isinstance(config.get("non_persistent_buffers", {}), dict), "'non_persistent_buffers' must be an object")
    need(isinstance(config["shards"], dict) and config["shards"], "'shards' must be a non-empty object")
    for fname, info in config["shards"].items():
        need(isinstance(info, dict) and is_int(info.get("bytes")) and isinstance(info.get("sha256"), str),
             f"shard {fname!r} needs 'bytes' (int) and 'sha256' (string)")
    if not verify:
        return
    digest = config.get("config_sha256")
    if digest is None:
        raise CheckpointError(f"{CONFIG_NAME} has no config_sha256 (written before configs were checksummed, or the "
                              f"entry was removed): re-save the checkpoint, or load it with verify=False")
    if digest != _config_digest(config):
        raise CheckpointError(f"{CONFIG_NAME} differs from its config_sha256: the file was edited or corrupted "
                              f"(layer formats or the model config would load silently wrong)")


def _read_tensors(path: Path, entries: dict[str, dict], keys) -> dict[str, torch.Tensor]:
    """``keys`` of one safetensors file read into fresh CPU memory (plain reads, no memory map):
    the tensors own their bytes, so replacing, truncating or editing the file later changes
    nothing (a mapped tensor would change silently, or kill the process with SIGBUS)."""
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for key in keys:
            e = entries[key]
            b, end = e["data_offsets"]
            buf = torch.empty(end - b, dtype=torch.uint8)
            f.seek(8 + n + b)
            if end > b and f.readinto(memoryview(buf.numpy())) != end - b:
                raise CheckpointError(f"{path.name} ended while reading {key}: the file is truncated or was replaced")
            out[key] = buf.view(_ST_TO_TORCH[e["dtype"]]).reshape(e["shape"])
    return out


def load_quantized(out_dir: str | Path, device: torch.device | str = "cpu", backend: str = "auto", *,
                   verify: bool = True, skeleton=None, mmap: bool = False, fuse: bool | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` onto ``device``.

    ``backend``: ``auto`` or any backend of the saved format (layers of another format use
    ``auto``). ``verify``: check each shard's sha256 (every byte read once more, in background
    threads while the tensors load; the model is returned only once every shard matched; sizes
    and the safetensors headers are always checked; also the config's own checksum). ``skeleton``: a
    callable returning the model, for a plain ``nn.Module`` whose class cannot be built without
    arguments (or register the class: :func:`register_model_class`).
    ``mmap``: on the CPU, tensors are read into memory the model owns by default, so the files
    may be replaced or deleted while it lives. ``mmap=True`` keeps them as views of the files'
    memory maps instead (no copy, pages read on first use); then the files must not change while
    the model lives: editing one silently changes the weights, truncating one kills the process
    with SIGBUS. ``fuse``: rewire the blocks to the fused kernels (``qpipeline.blocks``; default:
    as the checkpoint's recipe says); ``model.fuse_report`` then says which blocks were fused.

    The model comes back in eval mode; ``model.load_seconds`` holds the time taken.
    """
    t0 = time.perf_counter()
    ckpt = Path(out_dir)
    device = _usable_device(device)
    if ckpt.is_dir() and not (ckpt / CONFIG_NAME).is_file() and (hf := _read_config_json(ckpt)) is not None:
        model = _load_with_library(ckpt, hf, device, backend)
        model.load_seconds = time.perf_counter() - t0
        return model
    config = _read_config(ckpt)
    _check_config(config, verify)
    where = _check_files(ckpt, config)
    verification = _Verification(ckpt, config["shards"]) if verify else None
    try:
        model = _load_checked(ckpt, config, where, device, skeleton, mmap)
    except Exception:
        if verification is not None:  # a tampered shard says so, not what its bytes broke on the way
            verification.check()
        raise
    if verification is not None:
        verification.check()
    return _finish_load(model, ckpt, config, backend, fuse, t0)


def _load_checked(ckpt: Path, config: dict, where: dict, device: torch.device, skeleton, mmap: bool) -> nn.Module:
    """The model with every tensor of the checkpoint in place, each key, dtype and shape checked
    against the config before a byte of tensor data is read."""
    manifest, aliases = config["tensors"], config.get("aliases", {})

    missing = sorted(set(manifest) - set(where))
    unexpected = sorted(set(where) - set(manifest))
    if missing:
        raise CheckpointError(f"tensor(s) missing from the safetensors files: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in the safetensors files: {', '.join(unexpected[:5])}")
    for key, (fname, e) in where.items():
        want = manifest[key]
        if _ST_TO_TORCH[e["dtype"]] != _dtype_from_name(want["dtype"]) or list(e["shape"]) != list(want["shape"]):
            raise CheckpointError(f"{key} in {fname} is {_dtype_name(_ST_TO_TORCH[e['dtype']])} {e['shape']}, "
                                  f"{CONFIG_NAME} says {want['dtype']} {want['shape']}")

    from .integrations._common import replace_on_meta

    model = _build_skeleton(config["model"], skeleton, ckpt)
    # each listed Linear becomes an empty QuantLinear on the meta device (its backend is set once
    # loaded); the same swap as a diffusers / transformers load of a quantization_config
    replace_on_meta(model, {name: {k: v for k, v in spec.items() if k != "backend"}
                            for name, spec in config["layers"].items()}, CONFIG_NAME)

    # every key, dtype and shape is checked before a byte of tensor data is read
    expected = model.state_dict(keep_vars=True)
    stored = set(manifest) | set(aliases)
    missing = sorted(k for k, t in expected.items() if t is not None and k not in stored)
    unexpected = sorted(stored - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor(s) the model needs: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        raise CheckpointError(f"checkpoint has tensor(s) the model does not: {', '.join(unexpected[:5])}")
    quant_fixed = {f"{n}.{b}" for n in config["layers"] for b in _QUANT_BUFFERS}
    for key, t in expected.items():
        if t is None:
            continue
        src = aliases.get(key, key)
        e = where[src][1]
        dtype, shape = _ST_TO_TORCH[e["dtype"]], list(e["shape"])
        if shape != list(t.shape):
            raise CheckpointError(f"{key}: the model expects shape {list(t.shape)}, the checkpoint has {shape}")
        if key in quant_fixed and dtype != t.dtype:
            raise CheckpointError(f"{key}: format {config['layers'][key.rpartition('.')[0]]['format']} stores "
                                  f"{_dtype_name(t.dtype)}, the checkpoint has {_dtype_name(dtype)}")
        if t.is_floating_point() != dtype.is_floating_point:
            raise CheckpointError(f"{key}: the model expects a {'floating-point' if t.is_floating_point() else 'integer'} "
                                  f"tensor, the checkpoint has {_dtype_name(dtype)}")

    from safetensors import safe_open

    state = {}
    target = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
    by_file: dict[str, list[str]] = {}
    for key, (fname, _) in where.items():
        by_file.setdefault(fname, []).append(key)
    for fname, keys in by_file.items():
        if device.type == "cpu" and not mmap:
            state.update(_read_tensors(ckpt / fname, {k: where[k][1] for k in keys}, keys))
            continue
        with safe_open(str(ckpt / fname), framework="pt", device=target) as f:
            for key in keys:
                state[key] = f.get_tensor(key)
    for alias, src in aliases.items():
        state[alias] = state[src]
    model.load_state_dict(state, strict=True, assign=True)
    del state

    # Buffers outside the state dict were computed at construction, on the CPU: move them, in
    # the dtype they had when saved (a model cast to bf16 casts its float buffers too).
    saved_buffers = config.get("non_persistent_buffers", {})
    for mname, m in model.named_modules():
        for b in list(m._non_persistent_buffers_set):
            t = m._buffers.get(b)
            if t is None:
                continue
            full = f"{mname}.{b}" if mname else b
            dtype = _dtype_from_name(saved_buffers[full]) if full in saved_buffers else t.dtype
            if t.device.type == "meta":
                raise CheckpointError(f"buffer {full} is on the meta device and not in the checkpoint")
            m._buffers[b] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"tensor(s) not loaded (still on the meta device): {', '.join(left[:5])}")
    return model


def _finish_load(model: nn.Module, ckpt: Path, config: dict, backend: str, fuse: bool | None, t0: float) -> nn.Module:
    """Backends, eval mode, the recipe's attention kernel and fusing, on a verified model."""
    formats_present = {spec["format"] for spec in config["layers"].values()}
    if backend != "auto":
        wanted = get_backend(backend).format
        if wanted not in formats_present:
            raise CheckpointError(f"backend {backend!r} computes {wanted}; this checkpoint holds "
                                  f"{', '.join(sorted(formats_present)) or 'no quantized layers'}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_backend(backend if backend != "auto" and get_backend(backend).format == m.format else "auto")
    model.eval().requires_grad_(False)
    from .integrations import mark_quantized

    mark_quantized(model)  # save_pretrained of the loaded model writes a quantized folder
    recipe = config.get("recipe") or {}
    if recipe.get("attention"):  # the joint attention's kernel the checkpoint was made for
        from qkernels.attention.diffusers_plugin import set_attention

        set_attention(model, recipe["attention"])
    if fuse if fuse is not None else bool(recipe.get("fuse")):
        from .blocks import fuse_model

        model.fuse_report = fuse_model(model)
    model.load_seconds = time.perf_counter() - t0
    log.info("loaded %s from %s in %.2f s", type(model).__name__, ckpt, model.load_seconds)
    return model


# ==============================================================================================
# plain (unquantized) models from local files, for the CLI


def _weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of one checkpoint in ``folder``, as from_pretrained picks them: the
    index's files when there is an index, else ``<name>.safetensors`` / ``<name>-0000i-of-0000n``
    without a variant infix (or with ``.<variant>``), never both a file and its variant copy
    (``model.safetensors`` beside ``model.fp16.safetensors``)."""
    import re

    infix = rf"\.{re.escape(variant)}" if variant else ""
    indexes = sorted(p for p in folder.glob("*.safetensors.index.json")
                     if re.fullmatch(rf"[^.]+{infix}\.safetensors\.index\.json", p.name))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder} holds several checkpoints ({', '.join(p.name for p in indexes)}); keep one")
    if indexes:
        try:
            names = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{indexes[0]} is not a safetensors index ({exc})") from None
        if any(Path(n).name != n for n in names):
            raise CheckpointError(f"{indexes[0].name} names files outside {folder}")
        return [folder / n for n in names]
    pattern = re.compile(rf"[^.]+?(-\d{{5}}-of-\d{{5}})?{infix}\.safetensors")
    files = sorted(p for p in folder.glob("*.safetensors") if pattern.fullmatch(p.name))
    stems = {re.sub(r"-\d{5}-of-\d{5}", "", p.name) for p in files}
    if len(stems) > 1:
        raise CheckpointError(f"{folder} holds several checkpoints ({', '.join(sorted(stems))}); keep one")
    return files


def load_pretrained(path: str | Path, config: str | Path | None = None, dtype: torch.dtype = torch.bfloat16,
                    variant: str | None = None) -> nn.Module:
    """A diffusers or transformers model from a local folder (``config.json`` + ``*.safetensors``,
    or a diffusers pipeline folder, whose ``transformer/`` is used) or one ``.safetensors`` file with
    ``config``. Parameters are built on meta and assigned from the files in ``dtype``: the model is
    never held twice. Nothing is downloaded."""
    path = Path(path)
    if path.is_dir():
        if (path / "transformer").is_dir():
            path = path / "transformer"
        cfg_path = Path(config) if config else path / "config.json"
        files = _weight_files(path, variant)
        if not files:
            for p in path.iterdir():
                _refuse_pickle(p)
            raise CheckpointError(f"{path} holds no .safetensors files")
    else:
        _refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path.name}: expected a .safetensors file or a model folder")
        if config is None:
            raise CheckpointError(f"{path.name} is a single weights file: pass its config.json with --config")
        cfg_path, files = Path(config), [path]
    if not cfg_path.is_file():
        raise CheckpointError(f"no config.json at {cfg_path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object, not a {type(cfg).__name__}")

    # the class is looked up in the installed library by name and must be one of its model
    # classes: a config names data, never code to run
    if "_class_name" in cfg:
        name, library = cfg["_class_name"], "diffusers"
    elif cfg.get("architectures") and cfg.get("model_type"):
        archs, library = cfg["architectures"], "transformers"
        name = archs[0] if isinstance(archs, list) else archs
    else:
        raise CheckpointError(f"{cfg_path} names neither a diffusers _class_name nor transformers architectures")
    if not isinstance(name, str) or not name.isidentifier():
        raise CheckpointError(f"{cfg_path}: the model class must be a class name, got {name!r}")
    lib = importlib.import_module(library)
    cls = getattr(lib, name, None)
    if not (isinstance(cls, type) and issubclass(cls, _library_base(library))):
        raise CheckpointError(f"{library} has no model class {name!r} ({library} {lib.__version__})")
    try:
        if library == "diffusers":
            build = lambda: cls.from_config(cfg)  # noqa: E731
        else:
            conf = lib.AutoConfig.for_model(**cfg)
            build = lambda: cls(conf)  # noqa: E731
        with params_on_meta():
            model = build()
    except QKernelsError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot build {name} from {cfg_path}: {type(exc).__name__}: {exc}") from None

    expected = model.state_dict(keep_vars=True)
    state = {}
    for file in files:
        entries = _read_header(file)  # truncated, padded or mis-typed files are refused here
        for key in entries:
            if key not in expected:
                log.warning("ignoring %s in %s: the model has no such tensor", key, file.name)
                continue
            want, e = expected[key], entries[key]
            if list(e["shape"]) != list(want.shape):
                raise CheckpointError(f"{key} in {file.name} has shape {list(e['shape'])}, "
                                      f"{cls.__name__} expects {list(want.shape)}")
            if _ST_TO_TORCH[e["dtype"]].is_floating_point != want.is_floating_point():
                raise CheckpointError(f"{key} in {file.name} is {e['dtype']}, {cls.__name__} expects "
                                      f"{'a floating-point' if want.is_floating_point() else 'an integer'} tensor")
        keys = [k for k in entries if k in expected]
        # read into memory the model owns (no memory map: see load_quantized's mmap)
        for key, t in _read_tensors(file, entries, keys).items():
            state[key] = t.to(dtype) if t.is_floating_point() else t
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied embeddings are stored once (transformers)
    missing = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise CheckpointError(f"the weights in {path} lack {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    # buffers outside the state dict (rotary tables) stay as the model computed them
    return model.eval().requires_grad_(False)
