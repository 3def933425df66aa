"""QuantLinear: a drop-in ``nn.Linear`` replacement that stores a format and computes with a backend."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from . import formats
from .capabilities import device_reason
from .errors import BackendUnavailableError, CheckpointError, InputError
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
        self._backend: Backend
        if device.type == "meta":
            # Tensors arrive later (load_quantized); the backend is chosen for the real device then.
            self._backend = resolve_backend(backend, "cpu", format=fmt.name) if backend == "auto" else get_backend(backend)
        else:
            self._backend = resolve_backend(backend, device, format=fmt.name, shape=(in_features, out_features))

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
        chosen = resolve_backend(backend, w.device, format=format, shape=(k, n))
        if chosen.name == "bf16":
            raise InputError("backend 'bf16' is the unquantized reference: keep the nn.Linear as it is")
        smooth = None
        if input_smooth is not None:
            smooth = torch.as_tensor(input_smooth, dtype=torch.float32, device=w.device)
            if smooth.shape != (k,) or not torch.isfinite(smooth).all() or (smooth <= 0).any():
                raise InputError(f"input_smooth must be {k} finite positive values, got shape {tuple(smooth.shape)}")

        layer = cls(
            k, n, linear.bias is not None, format=chosen.format, backend=chosen.name,
            static=input_scale is not None, smooth=smooth is not None,
            bias_dtype=linear.bias.dtype if linear.bias is not None else torch.bfloat16, device="meta",
        )
        q, scale = formats.quantize_weight(w, chosen.format, smooth)
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
        layer._backend = chosen
        chosen.prepare(layer)
        return layer

    def set_backend(self, name: str) -> "QuantLinear":
        """Compute with another backend of the same format (never re-quantizes)."""
        backend = resolve_backend(name, self.weight.device, format=self.format,
                                  shape=(self.in_features, self.out_features))
        backend.prepare(self)
        self._backend = backend
        return self

    @property
    def backend(self) -> str:
        return self._backend.name

    # ----------------------------------------------------------------------------------------
    # compute

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        if type(x) is QuantizedActivation:
            return self.forward_quantized(x)
        if x.device != self.weight.device:
            raise InputError(f"input on {x.device}, layer on {self.weight.device}: move one of them")
        if x.dtype not in _INPUT_DTYPES:
            raise InputError(f"input dtype {x.dtype} not supported; use bfloat16, float16 or float32")
        if x.shape[-1] != self.in_features:
            raise InputError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        if x2d.shape[0] == 0:
            return x.new_empty((*lead, self.out_features))
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        # one flag test per call: the autograd wrapper exists only where a graph is being built
        y = (_InferenceOnly.apply(x2d, self) if torch.is_grad_enabled() and x2d.requires_grad
             else self._backend.forward(self, x2d))
        if self._loras:
            y = self._add_loras(x2d, y)
        return y.reshape(*lead, self.out_features)

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
        if q.shape[-1] != self.in_features or q.device != self.weight.device:
            raise InputError(f"quantized input {tuple(q.shape)} on {q.device}; layer expects {self.in_features} "
                             f"features on {self.weight.device}")
        lead = q.shape[:-1]
        q2d = q.reshape(-1, self.in_features)
        if scale.shape != (q2d.shape[0],):
            raise InputError(f"scale must have one value per row ({q2d.shape[0]}), got {tuple(scale.shape)}")
        y = self._backend.gemm(self, q2d, scale, x.dtype, gelu, residual, gate, gate_rows)
        return y.reshape(*lead, self.out_features)

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
            # `.to` is a no-op when the branch is already in the input dtype (the usual case).
            h = x @ A.to(x.dtype).t()
            y = torch.addmm(y, h, B.to(x.dtype).t(), alpha=scale)  # y + scale * h @ B.T, one pass
        return y

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

    def extra_repr(self) -> str:
        act = "weight-only" if not formats.get_format(self.format).quantizes_activations else (
            "static" if self.input_scale is not None else "dynamic")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}, backend={self.backend}, "
                f"activation={act}" + (", smoothed" if self.input_smooth is not None else "")
                + (f", loras={list(self._loras)}" if self._loras else ""))

    def nbytes(self) -> int:
        """Bytes of the layer's tensors (what it costs in memory and on disk)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)
