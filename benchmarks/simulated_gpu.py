"""A stand-in for Triton's CUDA driver: Triton's host-side launch path, on a machine with no GPU.

With :func:`simulated_driver` active, ``@triton.jit`` kernels compile for a real target (sm90
by default) with Triton's own compiler and ptxas, and each launch is recorded instead of run:
no kernel executes, and the output tensors keep whatever they held. What it is for:

* measuring the host-side (Python) cost of a quantized layer's forward on any machine
  (``benchmarks/host_overhead.py --simulate``), the part of a small-M step that no GPU speeds up;
* checking that ``qkernels.triton._launch.KernelLauncher`` makes the same launches, with the same
  arguments and compiled kernels, as Triton's own launch path (``tests/test_launch.py``).

It needs a real ``triton.jit`` (not ``TRITON_INTERPRET=1``, under which kernels are interpreted
functions), so the tests run it in a subprocess. :func:`cuda_path_on_cpu` sends CPU tensors
through the Triton backends' CUDA code path, so a whole ``QuantLinear`` forward can be driven.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field

import torch

__all__ = ["Launch", "SimulatedDriver", "simulated_driver", "cuda_path_on_cpu"]


@dataclass
class Launch:
    kernel: str  # the compiled kernel's name
    kernel_hash: str  # its compilation hash: equal hashes, same binary
    grid: tuple[int, int, int]
    args: tuple  # every argument the launcher received after the hooks, constexprs included


@dataclass
class SimulatedDriver:
    """Duck-types the parts of ``triton.backends.nvidia.driver.CudaDriver`` that compiling,
    autotuning and launching touch (Triton 3.4 to 3.9)."""

    arch: int = 90
    record_args: bool = True  # False: count launches only (timing: recording costs ~10 us a launch)
    launches: list[Launch] = field(default_factory=list)
    n_launches: int = 0
    max_shared_mem: int = 232448  # H100/H200: 227 KiB per block
    bench_ms: float = 1.0  # what the autotuner's benchmark reports for every config

    def __post_init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", self.arch, 32)
        driver = self

        class Utils:
            @staticmethod
            def load_binary(name, kernel, shared, device):
                return 1, 1, 0, 0, 1024  # module, function, n_regs, n_spills, max threads

            @staticmethod
            def get_device_properties(device):
                return {"max_shared_mem": driver.max_shared_mem, "multiprocessor_count": 132,
                        "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1980000,
                        "mem_clock_rate": 2619000, "mem_bus_width": 5120}

        class Launcher:
            def __init__(self, src, metadata):
                self.name = getattr(metadata, "name", "?")
                self.hash = getattr(metadata, "hash", "?")

            def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata,
                         enter_hook, exit_hook, *args):
                driver.n_launches += 1
                if driver.record_args:
                    driver.launches.append(Launch(self.name, self.hash, (gx, gy, gz), args))

        self.utils = Utils()
        self.launcher_cls = Launcher

    # the driver interface
    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **kwargs):
            fn()
            return [self.bench_ms] * len(quantiles) if quantiles else self.bench_ms

        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1)

    def clear_cache(self, cache):
        pass


@contextlib.contextmanager
def simulated_driver(arch: int = 90, record_args: bool = True):
    """Make Triton compile for ``sm_<arch>`` and record launches instead of running them.
    Autotuning "timings" made here never reach Triton's disk cache: they are keyed like a real
    sm_<arch> GPU's, and a GPU run sharing the cache directory would take them as measured."""
    from triton.runtime import autotuner
    from triton.runtime import driver as triton_driver

    def no_disk_cache(self, tuning_key, configs, bench_fn):
        bench_fn()
        return False

    sim = SimulatedDriver(arch=arch, record_args=record_args)
    # Triton 3.5+ keeps the driver in ``_active`` (``active`` a property over it); 3.4 in ``active``
    attr = "_active" if hasattr(triton_driver, "_active") else "active"
    previous = getattr(triton_driver, attr)
    previous_check = autotuner.Autotuner.check_disk_cache
    triton_driver.set_active(sim)
    autotuner.Autotuner.check_disk_cache = no_disk_cache
    try:
        yield sim
    finally:
        setattr(triton_driver, attr, previous)
        autotuner.Autotuner.check_disk_cache = previous_check


@contextlib.contextmanager
def cuda_path_on_cpu():
    """Let ``int8-triton`` / ``fp8-triton`` layers on CPU tensors take their CUDA code path (the
    Triton launchers, not the interpreter or the PyTorch references). Use with
    :func:`simulated_driver`: the launches are recorded, nothing computes."""
    from qkernels.backends import triton_backends as tb
    from qkernels.ops import KernelOp

    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    patch(tb, "triton_reason", lambda device: None)
    patch(tb, "fp8_gemm_reason", lambda device: None)
    patch(tb, "_kernels", lambda x: tb._OPS)
    patch(tb, "_replays", lambda x: not torch.compiler.is_compiling())
    for name in ("_common", "quant", "fused", "int8_gemm", "fp8_gemm", "weight_only_gemm"):
        module = importlib.import_module(f"qkernels.triton.{name}")
        if hasattr(module, "check_device"):  # each module's own binding of _common.check_device
            patch(module, "check_device", lambda *tensors: None)
    # the TMA GEMM's persistent grid: the SM count, from the (simulated) driver, not torch.cuda
    from triton.runtime import driver as triton_driver

    patch(importlib.import_module("qkernels.triton.fp8_gemm"), "_programs", lambda device_index:
          triton_driver.active.utils.get_device_properties(device_index)["multiprocessor_count"])
    ops: list[tuple[KernelOp, object]] = []
    for op in tb._CUDA_KERNELS:
        ops.append((op, op._impls.get("cpu")))
        op.register("cpu", tb.cuda_impl(op))  # what CUDA runs: the launcher, or its replaying wrapper
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        for op, impl in ops:
            if impl is None:
                op._impls.pop("cpu", None)
            else:
                op.register("cpu", impl)
