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

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["KernelLauncher", "cdiv", "next_power_of_2"]

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


# ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr-function objects (Triton 3.6, 3.9):
# 2.9 us a host-side call on the CPU above, against ~0.1 us for plain integer arithmetic.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def specialization(args: tuple) -> tuple:
    """What Triton's binder specializes each positional argument on (see the module doc).
    A host-side TMA descriptor: its dtype, block shape and padding. Floats, bools and None:
    their type only (Triton does not specialize them further).
    One comprehension: 4.2 us for a GEMM's 16 arguments on the CPU above, 7.1 us as a loop."""
    return tuple([(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, torch.Tensor) else
                  (a == 1, a & 15 == 0, _I32_MIN <= a <= _I32_MAX) if type(a) is int else
                  (a.base.dtype, tuple(a.block_shape), a.padding) if isinstance(a, TensorDescriptor) else type(a)
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
    determines the compiled kernel.
    """

    def __init__(self, kernel):
        self.kernel = kernel
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
        stream = driver.active.get_current_stream(device)
        # No hooks registered: no launch metadata, and the launcher skips None hooks.
        kernel.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream, kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *tail)

    def _slow(self, grid, full_key, args, meta) -> None:
        """Through Triton (it tunes on a new autotuner key, compiles on a new specialization, and
        launches), then record what the fast path needs to repeat that launch."""
        kernel = self.kernel.run(*args, grid=grid, warmup=False, **meta)
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
        binder = self.jit.device_caches[full_key[2]][4]
        bound, _, _ = binder(*args, **kwargs)
        self._compiled[full_key] = (kernel, tuple(bound.values())[len(args):], kwargs)
