"""Triton backends: ``int8-triton`` (w8a8-int8) and ``fp8-triton`` (w8a8-fp8).

Importing this module never imports triton. It registers the Triton launchers as the "cuda"
implementations of the shared ops (activation quantization, and the Triton GEMM ops, including
the weight-only GEMM the layerwise backends use on CUDA) behind a one-time lazy import: the
first CUDA call imports ``qkernels.triton``; if that fails the op keeps its PyTorch reference.

On CPU these backends run only under ``TRITON_INTERPRET=1`` (tests), calling the launchers
directly so that the Triton code itself is what the CPU tests exercise.
"""

from __future__ import annotations

import importlib.util
import logging
from types import SimpleNamespace

import torch

from .. import ops
from ..capabilities import cuda_capability, fp8_gemm_reason, triton_import_reason, triton_reason
from ..ops import fused, gemms
from ..registry import Backend, register_backend

log = logging.getLogger("qkernels")

# op -> name of its launcher in qkernels.triton (a fused-epilogue GEMM op shares its plain op's
# launcher, whose epilogue arguments are optional)
_CUDA_KERNELS = {
    ops.quantize_per_token: "quantize_per_token",
    ops.quantize_per_tensor: "quantize_per_tensor",
    gemms.int8_gemm: "int8_gemm",
    gemms.int8_static_gemm: "int8_static_gemm",
    gemms.fp8_gemm: "fp8_gemm",
    gemms.fp8_gemm_tma: "fp8_gemm_tma",
    gemms.weight_only_gemm: "weight_only_gemm",
    gemms.dequantize_weight: "dequantize_weight",
    fused.int8_gemm_fused: "int8_gemm",
    fused.fp8_gemm_fused: "fp8_gemm",
    fused.fp8_gemm_tma_fused: "fp8_gemm_tma",
    fused.gemm_epilogue: "gemm_epilogue",
    fused.layernorm_modulate_quant: "layernorm_modulate_quant",
    fused.qk_norm_rope: "qk_norm_rope",
}
# The ops the fused blocks call directly, replayed per call signature on CUDA (cuda_impl).
_REPLAYED_OPS = (ops.quantize_per_token, ops.quantize_per_tensor, fused.layernorm_modulate_quant,
                 fused.qk_norm_rope, fused.gemm_epilogue)


def cuda_impl(op):
    """``op``'s CUDA implementation: its Triton launcher; for the ops the fused blocks call
    directly (not through a layer, whose calls are replayed per layer) a replaying wrapper of it
    (see _replaying). Imports qkernels.triton."""
    from .. import triton as kernels

    impl = getattr(kernels, _CUDA_KERNELS[op])
    return _replaying(impl) if op in _REPLAYED_OPS else impl


def _lazy_cuda_impl(op):
    def first_call(*args):
        reason = triton_import_reason()  # e.g. a Triton older than the kernels need
        if reason is None:
            try:
                impl = cuda_impl(op)
            except Exception as exc:  # a broken triton install must not break CUDA inference
                reason = str(exc)
        if reason is not None:
            log.warning("Triton kernels unavailable (%s): %s runs its PyTorch reference on CUDA", reason, op.name)
            impl = op.reference
        op.register("cuda", impl)
        return impl(*args)

    return first_call


if importlib.util.find_spec("triton") is not None:
    for _op in _CUDA_KERNELS:
        _op.register("cuda", _lazy_cuda_impl(_op))

# The ops by their names (dispatching to the Triton launchers on CUDA and working under
# torch.compile(fullgraph=True)), and the same names bound straight to the launchers for the CPU
# interpreter (where the ops would run their PyTorch references).
_OPS = SimpleNamespace(**{op.name: op for op in _CUDA_KERNELS})
_INTERPRETED = None


def kernels_for(x: torch.Tensor) -> SimpleNamespace:
    """The Triton backends' kernels by op name for ``x``'s device: the ops on CUDA, the
    interpreted launchers on CPU (TRITON_INTERPRET=1)."""
    return _kernels(x)


def _kernels(x: torch.Tensor):
    global _INTERPRETED
    if x.is_cuda:
        return _OPS
    if _INTERPRETED is None:
        _INTERPRETED = _Launchers()
    return _INTERPRETED


class _Launchers:
    """The Triton launchers by op name, looked up at call time (CPU, interpreter: tests)."""

    _names = {op.name: name for op, name in _CUDA_KERNELS.items()}

    def __getattr__(self, op_name):
        from .. import triton as kernels  # CPU: interpreter (the backend is unavailable otherwise)

        return getattr(kernels, self._names[op_name])


def _replayed(layer, key, call, args: tuple):
    """``call()`` on CUDA, replayed after its first calls for this ``key`` (everything about
    the call that is not a tensor: M, dtypes, epilogue flags).

    A layer's forward is two launches (one for int8 static at small M), its GEMM on an already
    quantized activation one, whose arguments depend only on the key and the tensors; everything
    else it does per call (the op dispatch, the launchers' checks and launch-shape choices, the
    autotuner and specialization keys: a forward cost 49 us of host time on the H200 machine of
    results/h200, against 13.6 us for a bf16 ``F.linear``) is replayed from a recording
    (``qkernels.triton._launch.Replay``), per layer and key, with ``args`` as the varying tensors
    and the layer's own as held ones, and the quantized activation of a forward in the replay's
    per-stream scratch. The recordings are dropped whenever the layer resolves its backend again
    (a move, a load, set_backend). A launch choice read while recording (the kernels' ``TUNING``,
    ``FP8Triton.TMA_MIN_M``) is fixed in the recording: change one before a layer's first calls,
    or with ``REPLAY = False``."""
    b = layer._buffers
    held = (b["weight"], b["weight_scale"], b["bias"], b["input_scale"], b["input_smooth"])
    return _replay_call(layer._plans, key, call, args, held)


def _replay_call(plans: dict, key, call, args: tuple, held: tuple, max_plans: int = 32):
    """``call()``, from the recording in ``plans[key]`` once there is one (see _replayed)."""
    plan = plans.get(key)
    if type(plan) is int:  # recording failed that many times (first calls compile or tune)
        if plan >= _RECORD_TRIES:
            return call()
    elif plan is not None:
        y = plan(args, held)
        return y if y is not None else call()
    if len(plans) >= max_plans:
        return call()
    from ..triton._launch import Replay

    y, plan = Replay.record(lambda *_: call(), args, held)
    plans[key] = plan if plan is not None else plans.get(key, 0) + 1
    return y


def _op_key(args: tuple) -> tuple:
    """A replayed op's call signature: each tensor's dtype and shape, every other argument itself."""
    return tuple((a.dtype, a.shape) if isinstance(a, torch.Tensor) else a for a in args)


def _replaying(impl):
    """``impl`` (a launcher), replayed per call signature: every non-tensor argument and each
    tensor's dtype and shape (two models of different widths, or the text and image streams, get
    recordings of their own). Only in eager calls where a layer's replay is on
    (``_TritonW8A8.REPLAY``) and no layer's call is being recorded (its launches belong to that
    recording); torch.compile'd code calls the op's custom op, which runs ``impl`` itself
    (``compiled_impl``)."""
    from ..triton import _launch

    plans: dict = {}
    recorder = _launch._recorder

    def call(*args):
        if not _TritonW8A8.REPLAY or recorder.launches is not None or torch.compiler.is_compiling():
            return impl(*args)
        tensors = tuple(a for a in args if a is None or isinstance(a, torch.Tensor))
        return _replay_call(plans, _op_key(args), lambda: impl(*args), tensors, (), _MAX_OP_PLANS)

    call.__name__ = call.__qualname__ = getattr(impl, "__name__", "launcher")
    call.__doc__ = impl.__doc__
    call.plans = plans
    call.compiled_impl = impl  # what torch.compile'd code runs (KernelOp's custom op): no replay
    return call


def _gemm_key(q, out_dtype, gelu, residual, gate, gate_rows) -> tuple:
    """What a GEMM's launches depend on besides its tensors' own specs (see _replayed)."""
    return (q.shape[0], out_dtype, gelu, residual is None, gate is None, gate_rows is None)


def _replays(x: torch.Tensor) -> bool:
    """Whether this call may be replayed: CUDA (the launchers' path), not under torch.compile
    (which traces the ops)."""
    return x.is_cuda and not torch.compiler.is_compiling()


_RECORD_TRIES = 3  # the first call of a shape compiles (Triton's own path): not recordable
_MAX_OP_PLANS = 256  # recordings kept per replayed op (_replaying): all layers' call signatures


class _TritonW8A8(Backend):
    devices = ("cpu", "cuda")
    # Replay each layer's CUDA forward, and its GEMM on a quantized activation, from a recording
    # (see _replayed); False: every call goes through the ops and launchers (tests compare the two).
    REPLAY = True

    def unavailable_reason(self, device):
        return super().unavailable_reason(device) or triton_reason(device)

    def forward(self, layer, x):
        if self.REPLAY and _replays(x):
            return _replayed(layer, (x.shape[0], x.dtype), lambda: self._forward(layer, x), (x,))
        return self._forward(layer, x)

    def gemm(self, layer, q, s, out_dtype, gelu=False, residual=None, gate=None, gate_rows=None):
        if self.REPLAY and _replays(q):
            key = _gemm_key(q, out_dtype, gelu, residual, gate, gate_rows)
            return _replayed(layer, key, lambda: self._gemm(layer, q, s, out_dtype, gelu, residual, gate, gate_rows),
                             (q, s, residual, gate, gate_rows))
        return self._gemm(layer, q, s, out_dtype, gelu, residual, gate, gate_rows)

    def _forward(self, layer, x):
        """The forward through the ops and launchers (each subclass's)."""
        raise NotImplementedError

    def _gemm(self, layer, q, s, out_dtype, gelu, residual, gate, gate_rows):
        """The GEMM on a quantized activation (with its epilogue) through the ops (each subclass's)."""
        raise NotImplementedError

    def prepare(self, layer) -> None:
        # The stored row-major [N, K] weight is the layout the kernels read (K-major B tiles), so
        # there is nothing to re-lay; importing here surfaces a broken install when the layer is
        # built rather than in its first forward. Compilation happens on the first call per shape.
        if layer.weight.device.type != "meta":
            from .. import triton  # noqa: F401


@register_backend
class Int8Triton(_TritonW8A8):
    name = "int8-triton"
    format = "w8a8-int8"
    description = ("Triton: per-token quant kernel + int8 GEMM with fused dequant epilogue; static "
                   "scale: one kernel quantizing in the A-tile load")

    # The one-launch static kernel (quantize inside the A-tile load) measured 3.8x slower than
    # quant kernel + int8 GEMM on H100 (M=8192, K=3072, N=12288: 2524 us vs 656 us; 3072x3072:
    # 658 vs 204 us): the IEEE divisions redone for every N tile and the register-staged A tile
    # stall the wgmma pipeline. It wins only at tiny M (M=16: 103 vs 193 us), so it is kept as
    # an op (gemms.int8_static_gemm) and used below this many tokens.
    FUSED_STATIC_MAX_M = 64

    def _forward(self, layer, x):
        k = _kernels(x)
        if layer.input_scale is not None:
            if x.shape[0] <= self.FUSED_STATIC_MAX_M:
                return k.int8_static_gemm(x, layer.input_scale, layer.input_smooth, layer.weight,
                                          layer.weight_scale, layer.bias)
            q, s = k.quantize_per_tensor(x, layer.input_scale, layer.input_smooth, False)
            return k.int8_gemm(q, s, layer.weight, layer.weight_scale, layer.bias, x.dtype)
        q, s = k.quantize_per_token(x, layer.input_smooth, False)
        return k.int8_gemm(q, s, layer.weight, layer.weight_scale, layer.bias, x.dtype)

    def _gemm(self, layer, q, s, out_dtype, gelu, residual, gate, gate_rows):
        return _kernels(q).int8_gemm_fused(q, s, layer.weight, layer.weight_scale, layer.bias, out_dtype, gelu,
                                           residual, gate, gate_rows)


@register_backend
class FP8Triton(_TritonW8A8):
    name = "fp8-triton"
    format = "w8a8-fp8"
    description = "Triton: e4m3 quant kernel + e4m3 GEMM with rowwise scales in the epilogue"

    def unavailable_reason(self, device):
        reason = super().unavailable_reason(device)
        if reason is None and device.type == "cuda":
            reason = fp8_gemm_reason(device)  # e4m3 tensor cores: sm89+
        return reason

    # From this many tokens on, the persistent TMA GEMM (qkernels.triton.fp8_gemm_tma) instead of
    # fp8_gemm; None: never. It needs in_features % 16 == 0 (TMA row strides). H200
    # (benchmarks/results/h200): bare 3072x3072 GEMM 1.82x bf16 against 1.68x at M >= 4096, but
    # 0.70x at M <= 256; 6 fused blocks at 8,400 tokens (image M = 8,192) 28.4 ms with it from
    # M >= 1024 against 29.1 ms without, at 2,256 tokens (image M = 2,048) 16.0 against 13.0 ms.
    # Hopper only: TMA is sm90 hardware; for sm89 (Ada, fp8 too) Triton lowers the descriptors to
    # plain loads and mma.sync with 48 KB of shared memory (benchmarks.simulated_gpu, arch=89), a
    # kernel never measured there, where the pointer GEMM is the tuned one.
    TMA_MIN_M: int | None = 4096

    def _tma(self, a) -> bool:
        """Whether the [M, K] activation ``a`` goes to the TMA GEMM (TMA_MIN_M; rows of 16 bytes;
        on CUDA, compute capability 9.0+)."""
        return (self.TMA_MIN_M is not None and a.shape[0] >= self.TMA_MIN_M and a.shape[1] % 16 == 0
                and (a.device.type != "cuda" or cuda_capability(a.device.index or 0) >= (9, 0)))

    def _forward(self, layer, x):
        k = _kernels(x)
        if layer.input_scale is not None:
            q, s = k.quantize_per_tensor(x, layer.input_scale, layer.input_smooth, True)
        else:
            q, s = k.quantize_per_token(x, layer.input_smooth, True)
        if self._tma(x):
            return k.fp8_gemm_tma(q, s, layer.weight, layer.weight_scale, layer.bias, x.dtype)
        return k.fp8_gemm(q, s, layer.weight, layer.weight_scale, layer.bias, x.dtype)

    def _gemm(self, layer, q, s, out_dtype, gelu, residual, gate, gate_rows):
        k = _kernels(q)
        op = k.fp8_gemm_tma_fused if self._tma(q) else k.fp8_gemm_fused
        return op(q, s, layer.weight, layer.weight_scale, layer.bias, out_dtype, gelu, residual, gate, gate_rows)
