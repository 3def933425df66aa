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
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import struct
import time
import uuid
from pathlib import Path

import torch
import torch.nn as nn

import qkernels
from qkernels import QuantLinear
from qkernels.errors import CheckpointError, QKernelsError
from qkernels.registry import get_backend

__all__ = ["save_quantized", "load_quantized", "load_pretrained", "CHECKPOINT_FORMAT_VERSION",
           "DEFAULT_MAX_SHARD_BYTES", "params_on_meta"]

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
    for key, e in header.items():
        if not isinstance(e, dict) or e.get("dtype") not in _ST_TO_TORCH:
            raise CheckpointError(f"{path.name}: tensor {key!r} has an unknown dtype {e.get('dtype') if isinstance(e, dict) else e!r}")
        b, end = e["data_offsets"]
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


def _import_class(path: str):
    module, _, qualname = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"cannot import model class {path} named in {CONFIG_NAME}: {exc}") from None
    return obj


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


def _build_skeleton(desc: dict, skeleton=None) -> nn.Module:
    if skeleton is not None:
        with params_on_meta():
            return skeleton()
    cls = _import_class(desc["class"])
    kind, config = desc["kind"], desc["config"]
    try:
        with params_on_meta():
            if kind == "diffusers":
                return cls.from_config(config)
            if kind == "transformers":
                config_cls = _import_class(desc["config_class"])
                return cls(config_cls.from_dict(config))
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


def save_quantized(model: nn.Module, out_dir: str | Path, report=None, *, overwrite: bool = False,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``model`` (quantized in place by ``quantize_model``) to ``out_dir``; returns its path.

    Everything is written to a temporary folder beside ``out_dir`` and renamed into place, so a
    failure leaves an earlier checkpoint as it was. An existing ``out_dir`` is refused unless
    ``overwrite=True``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a folder")
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

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
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
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=_json_value) + "\n")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
            try:
                tmp.rename(out_dir)
            except BaseException:
                old.rename(out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
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


def _check_files(ckpt: Path, config: dict, verify: bool) -> dict[str, tuple[str, dict]]:
    """key -> (shard file, header entry), after checking each shard's size (and sha256)."""
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
    if verify:
        # one thread per shard: hashlib releases the GIL, and sha256 runs ~1.1 GB/s per core,
        # so a 20 GB checkpoint in 4-5 shards hashes in ~4-5 s instead of ~18 s
        from concurrent.futures import ThreadPoolExecutor

        names = list(shards)
        with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1) or 1) as pool:
            digests = list(pool.map(lambda f: _sha256(ckpt / f), names))
        for fname, digest in zip(names, digests):
            if digest != shards[fname]["sha256"]:
                raise CheckpointError(f"{fname}: sha256 differs from {CONFIG_NAME}: the file was modified or corrupted")
    where = {}
    for fname in shards:
        for key, entry in _read_header(ckpt / fname).items():
            if key in where:
                raise CheckpointError(f"tensor {key!r} is stored twice ({where[key][0]} and {fname})")
            where[key] = (fname, entry)
    return where


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[attr] = module


def load_quantized(out_dir: str | Path, device: torch.device | str = "cpu", backend: str = "auto", *,
                   verify: bool = True, skeleton=None) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` onto ``device``.

    ``backend``: ``auto`` or any backend of the saved format (layers of another format use
    ``auto``). ``verify``: check each shard's sha256 (reads every byte once more; sizes and the
    safetensors headers are always checked). ``skeleton``: a callable returning the model, for a
    plain ``nn.Module`` whose class cannot be built without arguments.

    The model comes back in eval mode; ``model.load_seconds`` holds the time taken.
    """
    t0 = time.perf_counter()
    ckpt = Path(out_dir)
    device = torch.device(device)
    if ckpt.is_dir() and not (ckpt / CONFIG_NAME).is_file() and (hf := _read_config_json(ckpt)) is not None:
        model = _load_with_library(ckpt, hf, device, backend)
        model.load_seconds = time.perf_counter() - t0
        return model
    config = _read_config(ckpt)
    where = _check_files(ckpt, config, verify)
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

    model = _build_skeleton(config["model"], skeleton)
    for name, spec in config["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantized layer {name} does not exist in {config['model']['class']}") from None
        if not isinstance(old, (nn.Linear, QuantLinear)) or (old.in_features, old.out_features) != (
                spec["in_features"], spec["out_features"]):
            raise CheckpointError(f"{name}: the model has {old!r} there, the checkpoint a "
                                  f"{spec['in_features']}->{spec['out_features']} Linear")
        bias_dtype = spec["bias_dtype"]
        _set_module(model, name, QuantLinear(
            spec["in_features"], spec["out_features"], bias_dtype is not None, format=spec["format"],
            static=spec["static"], smooth=spec["smooth"],
            bias_dtype=_dtype_from_name(bias_dtype) if bias_dtype else torch.bfloat16, device="meta"))

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
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc.msg})") from None

    if "_class_name" in cfg:
        import diffusers

        cls = getattr(diffusers, cfg["_class_name"], None)
        if cls is None:
            raise CheckpointError(f"diffusers has no model class {cfg['_class_name']!r} (diffusers {diffusers.__version__})")
        build = lambda: cls.from_config(cfg)  # noqa: E731
    elif cfg.get("architectures") and cfg.get("model_type"):
        import transformers

        cls = getattr(transformers, cfg["architectures"][0], None)
        if cls is None:
            raise CheckpointError(f"transformers has no model class {cfg['architectures'][0]!r}")
        conf = transformers.AutoConfig.for_model(**cfg)
        build = lambda: cls(conf)  # noqa: E731
    else:
        raise CheckpointError(f"{cfg_path} names neither a diffusers _class_name nor transformers architectures")

    with params_on_meta():
        model = build()
    from safetensors import safe_open

    expected = model.state_dict(keep_vars=True)
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in expected:
                    log.warning("ignoring %s in %s: the model has no such tensor", key, file.name)
                    continue
                t = f.get_tensor(key)
                if list(t.shape) != list(expected[key].shape):
                    raise CheckpointError(f"{key} in {file.name} has shape {list(t.shape)}, "
                                          f"{cls.__name__} expects {list(expected[key].shape)}")
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
