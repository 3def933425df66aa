"""Kernel launches whose Python work is paid once per specialization, not once per call.

A Triton launch (``kernel[grid](...)``) runs, every call, the autotuner's key building, the
heuristics, the JIT's argument binding and specialization, its cache-key hashing, the grid
lambda and the launch-metadata hooks. Measured on this project's 2-core CPU with the driver
simulated (``benchmarks/simulated_gpu.py``; best of 10 x 2000 launches): 12 us for one plain
``JITFunction`` launch and 37 us for an autotuned one with Triton 3.6 (18 and 56 us with 3.9),
against ~1.5 us for the compiled kernel's own launcher. An 8-bit layer makes two launches; at the text stream's and the modulation layers' token counts (M = 1 to
~200) the GPU work takes a few microseconds, so that host time is what a step waits for.

:class:`KernelLauncher` goes through Triton once per (caller key, specialization) and keeps the
compiled kernel; later calls call the compiled kernel's launcher directly with the same argument
list Triton would pass. The specialization key holds every fact Triton specializes a
non-constexpr argument on (checked against Triton's own binder in ``tests/test_launch.py``):

* a tensor: its dtype and whether ``data_ptr() % 16 == 0``;
* an int: whether it equals 1 (then a constexpr), is divisible by 16, and fits in int32.

Everything else Triton keys on (constexprs, ``num_warps``/``num_stages``, the autotuned config,
the dtype of the output) is the caller's ``key``. A registered launch hook (a profiler such as
proton) sends every call through Triton's own path, so its hooks still see each launch.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["KernelLauncher", "Replay", "cdiv", "next_power_of_2", "recording"]

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


# ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr-function objects (Triton 3.6, 3.9):
# 2.9 us a host-side call on the CPU above, against ~0.1 us for plain integer arithmetic.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def specialization(args: tuple) -> tuple:
    """What Triton's binder specializes each positional argument on (see the module doc).
    A host-side TMA descriptor: its dtype, block shape and padding (Triton 3.5+; 3.4's descriptor
    has none and pads with zeros). Floats, bools and None: their type only (Triton does not
    specialize them further).
    One comprehension: 4.2 us for a GEMM's 16 arguments on the CPU above, 7.1 us as a loop."""
    return tuple([(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, torch.Tensor) else
                  (a == 1, a & 15 == 0, _I32_MIN <= a <= _I32_MAX) if type(a) is int else
                  (a.base.dtype, tuple(a.block_shape), getattr(a, "padding", "zero")) if isinstance(a, TensorDescriptor)
                  else type(a)
                  for a in args])


def _hooks_registered() -> bool:
    """Whether a launch hook is set. Triton 3.6+ keeps them in (usually empty) ``HookChain``s;
    a hook of another kind (older Triton) counts as set."""
    rt = knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class KernelLauncher:
    """Launch ``kernel`` (a ``@triton.jit`` function, optionally under ``@triton.heuristics``
    and ``@triton.autotune``) as ``launcher(grid, key, args, **meta)``.

    ``args`` are the kernel's positional (runtime) arguments and ``meta`` its constexpr and
    compile-option keyword arguments (hashable values, passed in the same order at a call site).
    ``grid`` is a tuple, or maps the meta-parameters (``meta`` + the tuned config) to one.
    ``key`` holds the values the autotuner keys on (e.g. ``(M_BUCKET, N, K)``; ``()`` for a kernel
    that is not autotuned): with ``meta``, the device and the specialization of ``args`` it
    determines the compiled kernel. ``fp_fusion`` (if not ``None``) is the ``enable_fp_fusion``
    of a call that does not pass its own: fixed per launcher, so only Triton's path (``_slow``)
    adds it, and the fast path's key needs no entry for it.
    """

    def __init__(self, kernel, fp_fusion: bool | None = None):
        self.kernel = kernel
        self.fp_fusion = fp_fusion
        self.autotuner = kernel if isinstance(kernel, Autotuner) else None
        fn = kernel.fn if self.autotuner is not None else kernel
        self.heuristics = fn if isinstance(fn, Heuristics) else None
        self.jit: JITFunction = fn.fn if self.heuristics is not None else fn
        if not isinstance(self.jit, JITFunction):
            raise TypeError(f"KernelLauncher needs a compiled Triton kernel, got {type(self.jit).__name__} "
                            "(under TRITON_INTERPRET=1 launch the kernel directly)")
        # full key -> (compiled kernel, constexpr tail of the argument list, full meta)
        self._compiled: dict[tuple, tuple] = {}

    def __call__(self, grid, key: tuple, args: tuple, **meta) -> None:
        # The current device, as Triton launches on it (its kernels are loaded per device).
        device = driver.active.get_current_device()
        full_key = (key, tuple(meta.values()), device, specialization(args))
        hit = self._compiled.get(full_key)
        if hit is None or _hooks_registered():
            self._slow(grid, full_key, args, meta)
            return
        kernel, tail, full_meta = hit
        g = grid(full_meta) if callable(grid) else grid
        g = (g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)
        stream = driver.active.get_current_stream(device)
        # No hooks registered: no launch metadata, and the launcher skips None hooks.
        kernel.run(*g, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
        if _recorder.launches is not None:
            _recorder.launches.append((kernel, g, args, tail, device))

    def _slow(self, grid, full_key, args, meta) -> None:
        """Through Triton (it tunes on a new autotuner key, compiles on a new specialization, and
        launches), then record what the fast path needs to repeat that launch."""
        if self.fp_fusion is not None and "enable_fp_fusion" not in meta:
            meta = {**meta, "enable_fp_fusion": self.fp_fusion}
        kernel = self.kernel.run(*args, grid=grid, warmup=False, **meta)
        if _recorder.launches is not None:
            _recorder.launches.append(None)  # Triton's own path: not repeatable by a Replay
        config = {}
        if self.autotuner is not None:
            best = self.autotuner.best_config
            if best.pre_hook is not None:  # a pre-hook must run every call: keep Triton's path
                return
            config = best.all_kwargs()
        if kernel is None or not hasattr(kernel, "packed_metadata"):
            return
        kwargs = {**meta, **config}
        if self.heuristics is not None:
            named = {**dict(zip(self.jit.arg_names, args)), **kwargs}
            for name, rule in self.heuristics.values.items():
                kwargs[name] = named[name] = rule(named)
        binder = self.jit.device_caches[full_key[2]][-1]  # last of 4 (Triton 3.4) or 5 (3.5+)
        bound, _, _ = binder(*args, **kwargs)
        self._compiled[full_key] = (kernel, tuple(bound.values())[len(args):], kwargs)


# --------------------------------------------------------------------------------------------
# Record once, replay many: a layer's whole forward without its per-call Python


class _Recorder(threading.local):
    launches: list | None = None


_recorder = _Recorder()


class _FactoryOnly(TorchDispatchMode):
    """Notes every aten op but the allocations a recorded call may make: a call that computes
    anything outside the recorded launches cannot be replayed by them."""

    ALLOWED = frozenset({torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default})

    def __init__(self):
        super().__init__()
        self.other: list[str] = []
        # what the call allocated, as weak references (a strong one here makes torch hand the
        # caller a detached alias instead of the tensor itself)
        self.created: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in self.ALLOWED:
            self.other.append(str(func))
        else:
            self.created.append(weakref.ref(out))
        return out


@contextlib.contextmanager
def recording():
    """The direct launches (``KernelLauncher`` fast path) made in this thread inside the block,
    as a list; a launch through Triton's own path (a first call, a hook) is recorded as None."""
    previous, _recorder.launches = _recorder.launches, []
    try:
        yield _recorder.launches
    finally:
        _recorder.launches = previous


class Replay:
    """A call that is nothing but direct kernel launches, repeated with new tensors in the same
    places and none of the call's Python: its checks, launch-shape choices, autotuner keys,
    specialization keys and the launcher's lookups, paid once.

    Built by :meth:`record` from one real call of ``fn(*args, *held)``. ``args`` are what changes
    per call (a layer's input), ``held`` what a caller passes again each call (the layer's own
    tensors). A tensor argument of a launch is, each replay:

    * one of ``args`` / ``held``: read from the replay's;
    * allocated by the call and returned (a tensor, or a tuple of them): allocated anew (never
      reused: a result may outlive the next call);
    * allocated by the call and not returned: a temporary (the quantized activation and its
      scales; the call may not keep them). Up to :data:`SCRATCH_MAX_BYTES` in all they live in a
      scratch buffer kept per thread, device and stream: work on one stream runs in order, so the
      next call's launches write it only after this call's have read it. Under CUDA-graph capture
      they are allocated as the call allocated them (a graph keeps the addresses it captured);
    * none of these (a launcher's cached constant, e.g. a vector of ones): the recorded tensor,
      kept alive by the replay.

    Everything else (ints, floats, the grid, the compiled kernel) is what the recorded call
    launched with, so a Replay is only valid for the inputs it was recorded on: the same
    non-tensor arguments (the caller's key); per ``args`` tensor the same None-ness, dtype, shape,
    strides and 16-byte alignment; per ``held`` tensor the same tensor object at the same address
    (a replaced or re-pointed weight is a mismatch). Checked each call: the launches were sized
    and specialized on them. Tensors reach the launches as device addresses (Triton's launcher,
    3.4 to 3.9, takes an int as a pointer and skips its per-tensor ``data_ptr`` call and driver
    query).
    ``__call__`` returns None where it cannot replay (another device, a launch hook such as a
    profiler registered, an input that differs): call ``fn`` then.
    """

    __slots__ = ("device", "specs", "held", "fresh", "scratch", "scratch_bytes", "launches", "results", "single",
                 "constants", "cuda")

    @classmethod
    def record(cls, fn, args: tuple, held: tuple = ()):
        """``(fn(*args, *held), replay or None)``: None where the call is not replayable (it
        launched through Triton's own path, ran other aten ops, returned something not launched
        into, ...)."""
        mode = _FactoryOnly()
        with recording() as launches, mode:
            result = fn(*args, *held)
        return result, cls._build(launches, args, held, result, mode)

    @classmethod
    def _build(cls, launches, args, held, result, mode):
        single = isinstance(result, torch.Tensor)
        results = (result,) if single else result
        if not launches or None in launches or mode.other or not isinstance(results, tuple) or not results or \
                not all(isinstance(r, torch.Tensor) for r in results):
            return None
        devices = {launch[4] for launch in launches}
        if len(devices) != 1:
            return None
        inputs = (*args, *held)
        ids = {id(t): i for i, t in enumerate(inputs) if t is not None}
        created = {id(t) for t in (ref() for ref in mode.created) if t is not None}
        fresh: dict[int, int] = {}  # id -> index in the replay's value list
        fresh_tensors, constants = [], []
        plan = []
        for kernel, grid, launch_args, tail, _ in launches:
            template, slots = list(launch_args), []
            for pos, a in enumerate(launch_args):
                if isinstance(a, torch.Tensor):
                    if id(a) in ids:
                        slots.append((pos, ids[id(a)]))
                    elif id(a) in created:
                        if id(a) not in fresh:
                            if a.storage_offset() != 0 or not a.is_contiguous() or a.data_ptr() & 15:
                                return None  # a view: not something a replay can allocate
                            fresh[id(a)] = len(inputs) + len(fresh_tensors)
                            fresh_tensors.append(a)
                        slots.append((pos, fresh[id(a)]))
                    else:  # made before the call (a launcher's cache): a constant of the replay
                        constants.append(a)
                        template[pos] = a.data_ptr()
                        continue
                    template[pos] = None  # the replay fills it; hold no tensor of this call
                elif not (a is None or type(a) in (int, float, bool)):
                    return None  # a host-side object built per call (a TMA descriptor)
            plan.append((kernel.run, grid, kernel.function, kernel.packed_metadata, template, slots, tail))
        if any(id(r) not in fresh for r in results) or len({id(r) for r in results}) != len(results):
            return None  # returns an input, a constant, a view, or one tensor twice
        self = cls.__new__(cls)
        self.device = devices.pop()
        self.specs = cls._specs(args)
        self.held = tuple(None if t is None else (weakref.ref(t), t.data_ptr()) for t in held)
        self.fresh = tuple((tuple(t.shape), t.dtype, t.device) for t in fresh_tensors)
        self.results = tuple(fresh[id(r)] for r in results)
        self.single = single
        self.constants = tuple(constants)
        # the temporaries' places in one scratch buffer: (index in the value list, byte offset)
        returned = {id(r) for r in results}
        scratch, offset = [], 0
        for i, t in enumerate(fresh_tensors):
            if id(t) not in returned:
                scratch.append((len(inputs) + i, offset))
                offset += -(-t.numel() * t.element_size() // _SCRATCH_ALIGN) * _SCRATCH_ALIGN
        self.scratch = tuple(scratch)
        self.scratch_bytes = offset if 0 < offset <= SCRATCH_MAX_BYTES else 0
        self.cuda = results[0].device.type == "cuda"
        self.launches = tuple(plan)
        return self

    @staticmethod
    def _specs(args) -> tuple:
        # What a launch was specialized or sized on, per varying input (~0.4 us each).
        return tuple(None if t is None else (t.dtype, t.shape, t.stride(), t.data_ptr() & 15 == 0) for t in args)

    def matches(self, args: tuple, held: tuple) -> bool:
        """``args`` as recorded (None-ness, dtype, shape, strides, 16-byte alignment) and ``held``
        the recorded tensors at their recorded addresses."""
        if self._specs(args) != self.specs or len(held) != len(self.held):
            return False
        for t, h in zip(held, self.held):
            if t is None or h is None:
                if t is not h:
                    return False
            elif h[0]() is not t or t.data_ptr() != h[1]:
                return False
        return True

    def __call__(self, args: tuple, held: tuple = ()):
        """The replayed result, or None (see the class doc). Not under torch.compile: the caller
        checks that, once, before it looks a replay up."""
        if not self.matches(args, held) or _hooks_registered() or driver.active.get_current_device() != self.device:
            return None
        stream = driver.active.get_current_stream(self.device)
        # the value list: args, held, then the call's allocations in the order it made them
        values = [None if t is None else t.data_ptr() for t in args]
        values += [None if h is None else h[1] for h in self.held]
        n = len(values)
        if self.scratch_bytes and not (self.cuda and torch.cuda.is_current_stream_capturing()):
            values += [0] * len(self.fresh)
            base = _scratch(self.fresh[0][2], stream, self.scratch_bytes)
            for i, offset in self.scratch:
                values[i] = base + offset
            out = []
            for i in self.results:
                shape, dtype, device = self.fresh[i - n]
                t = values[i] = torch.empty(shape, dtype=dtype, device=device)
                out.append(t)
        else:
            values += [torch.empty(s, dtype=d, device=dev) for s, d, dev in self.fresh]
            out = [values[i] for i in self.results]
        for run, grid, function, packed, template, slots, tail in self.launches:
            launch_args = template.copy()
            for pos, i in slots:
                launch_args[pos] = values[i]
            run(*grid, stream, function, packed, None, None, None, *launch_args, *tail)
        return out[0] if self.single else tuple(out)


# A replay's temporaries (see Replay) up to this many bytes go in the scratch buffer: at the
# small token counts where host time matters (a [2048, 12288] fp8 activation is 24 MiB) and not
# past them, where one allocation is noise beside the GEMM and a buffer that size would be kept.
SCRATCH_MAX_BYTES = 32 << 20
_SCRATCH_ALIGN = 256  # each temporary's offset: past any kernel's alignment assumption (16)


class _Scratch(threading.local):
    buffers: dict | None = None


_scratch_buffers = _Scratch()


def _scratch(device: torch.device, stream: int, nbytes: int) -> int:
    """The address of this thread's scratch buffer for ``device`` and ``stream``, at least
    ``nbytes`` long (grown by reallocation: the old buffer goes back to the caching allocator,
    which hands it out again only in this stream's order)."""
    buffers = _scratch_buffers.buffers
    if buffers is None:
        buffers = _scratch_buffers.buffers = {}
    key = (device, stream)
    buf = buffers.get(key)
    if buf is None or buf.numel() < nbytes:
        size = max(nbytes, 2 * buf.numel() if buf is not None else 0)
        buf = buffers[key] = torch.empty(min(size, SCRATCH_MAX_BYTES), dtype=torch.uint8, device=device)
    return buf.data_ptr()
