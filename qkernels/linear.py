"""QuantLinear: a drop-in ``nn.Linear`` replacement that stores a format and computes with a backend."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn as nn

from . import formats
from .capabilities import device_reason
from .errors import BackendUnavailableError, CheckpointError, InputError, UnsupportedShapeError
from .registry import Backend, get_backend, resolve_backend

__all__ = ["QuantLinear", "QuantizedActivation"]


class QuantizedActivation(NamedTuple):
    """An activation already quantized for a W8A8 format, so that one quant pass (or a fused
    norm + quant kernel) feeds every GEMM that reads the same tensor.

    ``q`` [..., K] int8 or e4m3; ``scale`` [prod(leading dims)] fp32 per-row scales (a static
    per-tensor scale is the same value in every row); ``dtype`` the activation's own dtype,
    which the layer's output takes."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

log = logging.getLogger("qkernels")

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Buffers whose dtype is part of the format: `model.to(torch.bfloat16)` moves them but must not
# cast them (e4m3 and fp32 scales are floating point, so Module.to would).
_FIXED_DTYPE = ("weight", "weight_scale", "input_scale", "input_smooth")


def _apply_float(fn, t: torch.Tensor) -> torch.Tensor:
    moved = fn(t)
    return moved if moved.dtype in _INPUT_DTYPES else t.to(moved.device)


class _InferenceOnly(torch.autograd.Function):
    """A QuantLinear output that autograd would differentiate: computed by the layer's backend
    as always, with a backward that refuses. The 8-bit kernels have no derivative (int8 _int_mm,
    rounding): autograd through them returned a gradient with cosine 0.03 to the true one."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.what = f"format {layer.format}, backend {layer.backend}"
        return layer._backend.forward(layer, x)

    @staticmethod
    def backward(ctx, grad):
        raise InputError(f"QuantLinear ({ctx.what}) is inference-only: it has no backward, and a gradient "
                         "through 8-bit kernels would be wrong. Run it under torch.no_grad() / "
                         "torch.inference_mode(), or keep the layers to train through as nn.Linear")


class _NoBackend(Backend):
    """Stands in for the backend of a layer on a device where none can compute it (its tensors are
    on the meta device, or the chosen backend / every backend of the format cannot run there).
    A forward raises the reason; moving the layer resolves again. Not registered."""

    devices = ()

    def __init__(self, requested: str, format: str, reason: str):
        self.name, self.format, self.reason = requested, format, reason

    def forward(self, layer, x):
        raise BackendUnavailableError(self.reason)

    def gemm(self, layer, q, scale, out_dtype, gelu=False, residual=None, gate=None, gate_rows=None):
        raise BackendUnavailableError(self.reason)


def _check_request(name: str, format: str, shape: tuple[int, int] | None) -> None:
    """What does not depend on the device: the name exists, computes ``format`` and takes ``shape``."""
    if name == "auto":
        return
    backend = get_backend(name)
    if backend.format != format:
        # the registry words the format mismatch (and lists the format's backends)
        resolve_backend(name, "cpu", format=format)
    reason = backend.unsupported_shape_reason(*shape) if shape is not None else None
    if reason:
        raise UnsupportedShapeError(f"backend {name!r} cannot take in={shape[0]}, out={shape[1]}: {reason}")


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in an 8-bit format.

    State-dict keys (every backend of a format loads the same file): ``weight`` [N, K] int8/e4m3,
    ``weight_scale`` [N] fp32, ``bias`` [N] (if any, in the original dtype), ``input_scale`` []
    fp32 (static activation scale only), ``input_smooth`` [K] fp32 (SmoothQuant only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        format: str,
        backend: str = "auto",
        static: bool = False,
        smooth: bool = False,
        bias_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        fmt = formats.get_format(format)
        if (static or smooth) and not fmt.quantizes_activations:
            raise InputError(f"format {fmt.name} is weight-only: it takes no input_scale or input_smooth")
        self.in_features, self.out_features, self.format = in_features, out_features, fmt.name
        device = torch.device(device) if device is not None else torch.device("cpu")
        if reason := device_reason(device):  # before torch's own AssertionError on a CPU-only build
            raise BackendUnavailableError(f"QuantLinear on {device}: {reason}")
        empty = dict(device=device)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=fmt.dtype, **empty))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, **empty))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, **empty) if bias else None)
        self.register_buffer("input_scale", torch.empty((), dtype=torch.float32, **empty) if static else None)
        self.register_buffer("input_smooth", torch.empty(in_features, dtype=torch.float32, **empty) if smooth else None)
        # Run-time low-rank branches: name -> (A [r, K], B [N, r], scale), in a compute dtype and
        # never in the state dict, so a checkpoint stays format-pure (see add_lora).
        self._loras: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        # The backend follows the device (see set_backend): `_requested` is what was asked for
        # ("auto" or a name), `_backend` what computes on `_device`, the device it was resolved for.
        _check_request(backend, fmt.name, (in_features, out_features))
        self._requested = backend
        self._backend: Backend
        self._device: torch.device
        # What a backend keeps per input shape to make later calls cheaper (the Triton backends'
        # recorded launches); dropped whenever the backend is resolved again.
        self._plans: dict = {}
        self._resolve()

    # ----------------------------------------------------------------------------------------
    # construction

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        backend: str = "auto",
        *,
        format: str | None = None,
        activation: str = "dynamic",
        input_scale: torch.Tensor | float | None = None,
        input_smooth: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Quantize ``linear``'s weight for ``backend`` (a name, or ``auto``).

        ``format`` narrows ``auto`` (e.g. ``auto`` + ``w8a8-fp8``); with an explicit backend it
        must match the backend's format. ``activation="static"`` needs ``input_scale`` (the
        per-tensor activation scale, i.e. calibrated abs-max / qmax); ``input_smooth`` [K] is
        folded into the weight here and divided out of the activation in the quant kernel.
        The weight is quantized in row chunks, so no second full-precision copy is ever made.
        """
        if not isinstance(linear, nn.Linear):
            raise InputError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        if activation not in ("dynamic", "static"):
            raise InputError(f"activation must be 'dynamic' or 'static', got {activation!r}")
        if activation == "static" and input_scale is None:
            raise InputError("activation='static' needs input_scale (from calibration)")
        if activation == "dynamic" and input_scale is not None:
            raise InputError("input_scale given with activation='dynamic'; use activation='static'")
        w = linear.weight
        if w.device.type == "meta":
            raise InputError("cannot quantize a Linear on the meta device: its weights are not loaded")
        n, k = w.shape
        if backend == "bf16":
            raise InputError("backend 'bf16' is the unquantized reference: keep the nn.Linear as it is")
        fmt_name = cls.format_for(backend, w.device, format=format, shape=(k, n))
        if backend != "auto" and w.device.type == "cuda":
            resolve_backend(backend, w.device, format=fmt_name)  # a GPU that cannot run it: say so before quantizing
        smooth = None
        if input_smooth is not None:
            smooth = torch.as_tensor(input_smooth, dtype=torch.float32, device=w.device)
            if smooth.shape != (k,) or not torch.isfinite(smooth).all() or (smooth <= 0).any():
                raise InputError(f"input_smooth must be {k} finite positive values, got shape {tuple(smooth.shape)}")

        layer = cls(
            k, n, linear.bias is not None, format=fmt_name, backend=backend,
            static=input_scale is not None, smooth=smooth is not None,
            bias_dtype=linear.bias.dtype if linear.bias is not None else torch.bfloat16, device="meta",
        )
        q, scale = formats.quantize_weight(w, fmt_name, smooth)
        layer.weight, layer.weight_scale = q, scale
        if linear.bias is not None:
            layer.bias = linear.bias.detach()
        if input_scale is not None:
            s = torch.as_tensor(input_scale, dtype=torch.float32, device=w.device).reshape(())
            if not torch.isfinite(s) or s <= 0:
                raise InputError(f"input_scale must be finite and positive, got {s.item()}")
            layer.input_scale = s
        if smooth is not None:
            layer.input_smooth = smooth
        layer._resolve(strict=True)
        return layer

    @staticmethod
    def format_for(backend: str, device: torch.device | str, *, format: str | None = None,
                   shape: tuple[int, int] | None = None) -> str:
        """The format ``from_linear(linear, backend, format=format)`` gives a layer of
        ``shape = (in_features, out_features)`` on ``device``.

        An explicit backend brings its format (``format`` must agree). ``auto`` without ``format``
        takes the format of the fastest backend that runs on ``device``; with ``format`` the
        format is that, whether or not anything can compute it on this machine (a checkpoint for
        a Hopper GPU can be written on a CPU box). Raises UnsupportedShapeError /
        BackendUnavailableError for a shape no backend of the format takes here.
        """
        if format is not None:
            formats.get_format(format)  # a clear error for an unknown name
        if backend != "auto":
            fmt = get_backend(backend).format
            if format is not None and format != fmt:
                resolve_backend(backend, "cpu", format=format)  # raises the mismatch, worded once
            _check_request(backend, fmt, shape)
            return fmt
        try:
            return resolve_backend("auto", device, format=format, shape=shape).format
        except BackendUnavailableError:
            if format is None:
                raise
            try:  # does anything run the format here? then the shape is what no backend takes
                resolve_backend("auto", device, format=format)
            except BackendUnavailableError:
                return format  # nothing computes it on this device: it resolves where the layer goes
            raise

    def set_backend(self, name: str) -> "QuantLinear":
        """Compute with ``name`` (``auto`` or a backend of the layer's format; never re-quantizes).

        The choice is recorded and follows the layer: whenever its tensors move to another device
        (``.to``, ``.cuda()``, offload hooks) it is resolved again for that device, never per call.
        ``auto`` picks the fastest backend of the format there. On a CUDA device that cannot run
        an explicit backend this raises BackendUnavailableError at once; on the CPU or the meta
        device the choice is kept for the device the layer moves to, and a forward where it cannot
        run raises BackendUnavailableError with the reason and the backends that can. An unknown
        name, another format or a shape the backend cannot take raise at once wherever the layer is.
        """
        _check_request(name, self.format, (self.in_features, self.out_features))
        previous = self._requested
        self._requested = name
        try:
            self._resolve(strict=True)
        except BaseException:
            self._requested = previous
            self._resolve()
            raise
        return self

    @property
    def backend(self) -> str:
        """The backend computing on the layer's device; where none can, the requested name."""
        return self._backend.name

    @property
    def backend_requested(self) -> str:
        """What ``set_backend`` / ``from_linear`` was asked for: ``auto`` or a backend name."""
        return self._requested

    @property
    def backend_unavailable_reason(self) -> str | None:
        """None when a backend computes on the layer's device, else why none can."""
        return self._backend.reason if isinstance(self._backend, _NoBackend) else None

    def _resolve(self, strict: bool = False) -> None:
        """Choose the backend for the device the tensors are on (construction, a move, a load)."""
        self._plans = {}
        device = self.weight.device
        self._device = device
        if device.type == "meta":
            self._backend = _NoBackend(self._requested, self.format, (
                f"this {self.format} layer is on the meta device (its tensors are not loaded): "
                "load them or move it to a device first"))
            return
        try:
            backend = resolve_backend(self._requested, device, format=self.format,
                                      shape=(self.in_features, self.out_features))
        except BackendUnavailableError as exc:
            if strict and device.type == "cuda" and self._requested != "auto":
                raise
            where = "another device" if device.type != "cuda" else "a device that can run it"
            self._backend = _NoBackend(self._requested, self.format, (
                f"{exc}. The layer ({self.format}, backend {self._requested!r}) keeps its choice and resolves "
                f"again when moved to {where}; to compute here, set_backend() one that runs on {device}"))
            log.debug("no backend for a %s layer on %s: %s", self.format, device, exc)
            return
        backend.prepare(self)
        self._backend = backend

    def _moved(self, x: torch.Tensor) -> None:
        # Off the hot path: the input is not on the device the backend was resolved for. Either
        # the tensors were moved without Module._apply (accelerate's set_module_tensor_to_device,
        # `buffer.data = ...` in group offload): resolve for where they are now, once; or the
        # input is on the wrong device.
        if self.weight.device != self._device:
            self._resolve()
        if x.device != self._device:
            raise InputError(f"input on {x.device}, layer on {self.weight.device}: move one of them")

    # ----------------------------------------------------------------------------------------
    # compute

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        if type(x) is QuantizedActivation:
            return self.forward_quantized(x)
        if x.device != self._device:
            self._moved(x)
        if x.dtype not in _INPUT_DTYPES:
            raise InputError(f"input dtype {x.dtype} not supported; use bfloat16, float16 or float32")
        if x.shape[-1] != self.in_features:
            raise InputError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        flat = x.dim() == 2  # [M, K] already: no reshape in, none out (~1 us of host time each)
        x2d = x if flat else x.reshape(-1, self.in_features)
        if x2d.shape[0] == 0:
            return x.new_empty((*x.shape[:-1], self.out_features))
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        # one flag test per call: the autograd wrapper exists only where a graph is being built
        y = (_InferenceOnly.apply(x2d, self) if torch.is_grad_enabled() and x2d.requires_grad
             else self._backend.forward(self, x2d))
        if self._loras:
            y = self._add_loras(x2d, y)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def forward_quantized(self, x: QuantizedActivation, *, gelu: bool = False,
                          residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                          gate_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``y = x @ W.T + b`` for an already-quantized activation, with an optional epilogue:
        ``gelu=True`` gives ``gelu_tanh(y)``; ``residual`` [M, N] + ``gate`` [G, N] +
        ``gate_rows`` int32 [M] give ``residual + gate[gate_rows] * y`` (adaLN's gated residual).
        Fused into the GEMM on the Triton backends; in PyTorch after it elsewhere."""
        q, scale = x.q, x.scale
        fmt = formats.get_format(self.format)
        if not fmt.quantizes_activations or q.dtype != fmt.dtype:
            raise InputError(f"a {q.dtype} activation cannot feed a {self.format} layer")
        if self.input_smooth is not None:
            raise InputError("a smoothed layer divides its input by input_smooth inside its own quant pass: "
                             "give it the high-precision activation")
        if self._loras:
            raise InputError("run-time LoRA branches need the high-precision input: give the layer a plain tensor")
        if q.device != self._device:
            self._moved(q)
        if q.shape[-1] != self.in_features:
            raise InputError(f"quantized input {tuple(q.shape)} on {q.device}; layer expects {self.in_features} "
                             f"features on {self.weight.device}")
        flat = q.dim() == 2  # [M, K] already (the fused blocks' case): no reshape in or out
        q2d = q if flat else q.reshape(-1, self.in_features)
        if scale.shape != (q2d.shape[0],):
            raise InputError(f"scale must have one value per row ({q2d.shape[0]}), got {tuple(scale.shape)}")
        y = self._backend.gemm(self, q2d, scale, x.dtype, gelu, residual, gate, gate_rows)
        return y if flat else y.reshape(*q.shape[:-1], self.out_features)

    # ----------------------------------------------------------------------------------------
    # run-time LoRA

    def add_lora(self, name: str, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0,
                 dtype: torch.dtype = torch.bfloat16) -> "QuantLinear":
        """Attach ``y += scale * (x @ A.T) @ B.T`` (A [r, K], B [N, r]) beside the quantized GEMM.

        A and B are kept in ``dtype`` (a 16/32-bit float; default bf16), never in 8 bits: they
        follow ``model.to(dtype)`` like any float tensor but not a cast to an 8-bit type, and are
        not in ``state_dict()``. The branch is computed in the input's dtype: 2 * M * r * (K + N)
        extra FLOPs, ~1.3% of the layer's at r = 32, K = N = 3072. An always-on LoRA (Lightning)
        is better merged into the weights before quantizing (``qpipeline.lora.merge``).
        """
        if not isinstance(name, str) or not name:
            raise InputError(f"a LoRA name must be a non-empty string, got {name!r}")
        if name in self._loras:
            raise InputError(f"LoRA {name!r} is already attached; remove_lora({name!r}) first")
        if dtype not in _INPUT_DTYPES:
            raise InputError(f"LoRA dtype must be one of bfloat16, float16, float32, got {dtype}")
        for t, what in ((A, "A"), (B, "B")):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise InputError(f"LoRA {name!r}: {what} must be a 2-D tensor")
            if not t.is_floating_point() or t.element_size() < 2:
                raise InputError(f"LoRA {name!r}: {what} is {t.dtype}; LoRA weights must be 16/32-bit "
                                 "floats (a LoRA cast to 8 bits has lost most of its precision)")
        r = A.shape[0]
        if A.shape != (r, self.in_features) or B.shape != (self.out_features, r) or r == 0:
            raise InputError(f"LoRA {name!r}: expected A [r, {self.in_features}] and B [{self.out_features}, r], "
                             f"got A {tuple(A.shape)} and B {tuple(B.shape)}")
        device = self.weight.device
        self._loras[name] = (A.detach().to(device, dtype), B.detach().to(device, dtype), float(scale))
        return self

    def remove_lora(self, name: str) -> "QuantLinear":
        if name not in self._loras:
            raise InputError(f"no LoRA {name!r} on this layer; attached: {', '.join(self._loras) or 'none'}")
        del self._loras[name]
        return self

    @property
    def lora_names(self) -> tuple[str, ...]:
        return tuple(self._loras)

    def _add_loras(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for A, B, scale in self._loras.values():
            y = self.lora_branch(x, y, A, B, scale)
        return y

    @staticmethod
    def lora_branch(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        """``y + scale * (x @ A.T) @ B.T`` for x [M, K], y [M, N] in x's dtype: the run-time LoRA
        branch (add_lora, and PEFT's LoRA layers on a QuantLinear)."""
        # `.to` is a no-op when the branch is already in the input dtype (the usual case).
        h = x @ A.to(x.dtype).t()
        return torch.addmm(y, h, B.to(x.dtype).t(), alpha=scale)  # y + scale * h @ B.T, one pass

    # ----------------------------------------------------------------------------------------
    # nn.Module plumbing

    def _apply(self, fn, recurse=True):
        # Move the format's tensors with everything else, but never change their dtype.
        fixed = {}
        for name in _FIXED_DTYPE:
            t = self._buffers.get(name)
            if t is not None:
                moved = fn(t)
                fixed[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        for name in fixed:
            self._buffers[name] = None
        super()._apply(fn, recurse)
        self._buffers.update(fixed)
        # LoRA tensors follow device and compute dtype, but never an 8-bit dtype.
        for name, (A, B, scale) in self._loras.items():
            self._loras[name] = (_apply_float(fn, A), _apply_float(fn, B), scale)
        if self.weight.device != self._device:  # moved: the backend follows the device
            self._resolve()
        self._plans = {}  # recorded for the tensors as they were (a cast changes the bias dtype)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name, buf in self._buffers.items():
            t = state_dict.get(prefix + name)
            if buf is not None and t is not None and (t.dtype != buf.dtype or t.shape != buf.shape):
                raise CheckpointError(
                    f"{prefix}{name}: expected {buf.dtype} {tuple(buf.shape)} for format {self.format}, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.weight.device != self._device:  # load_state_dict(assign=True) onto a device
            self._resolve()
        self._plans = {}

    def extra_repr(self) -> str:
        act = "weight-only" if not formats.get_format(self.format).quantizes_activations else (
            "static" if self.input_scale is not None else "dynamic")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}, backend={self.backend}"
                + (" (none runs here)" if self.backend_unavailable_reason else "") + ", "
                f"activation={act}" + (", smoothed" if self.input_smooth is not None else "")
                + (f", loras={list(self._loras)}" if self._loras else ""))

    def nbytes(self) -> int:
        """Bytes of the layer's tensors (what it costs in memory and on disk)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)
