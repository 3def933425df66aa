"""Checks of ``qkernels.triton._launch.KernelLauncher`` against Triton's own launch path, under
``benchmarks.simulated_gpu`` (kernels compile for sm90; launches are recorded, not run).

Run by ``tests/test_launch.py`` in a subprocess: it needs a real ``triton.jit``, and the test
session sets ``TRITON_INTERPRET=1``. ``python tests/simulated_launch_checks.py [--break-spec]``
prints one line per check and exits non-zero on the first mismatch; ``--break-spec`` makes the
launcher ignore pointer alignment, which the checks must catch.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.simulated_gpu import cuda_path_on_cpu, simulated_driver  # noqa: E402
from qkernels.triton import _launch  # noqa: E402
from qkernels.triton._common import AUTOTUNE_KEY, cfg, gemm_grid, m_bucket  # noqa: E402
from qkernels.triton._launch import KernelLauncher  # noqa: E402


def same_launch(a, b) -> bool:
    def arg(v):
        return ("tensor", v.data_ptr(), v.dtype) if isinstance(v, torch.Tensor) else v

    return (a.kernel_hash, a.grid, tuple(map(arg, a.args))) == (b.kernel_hash, b.grid, tuple(map(arg, b.args)))


def check(name: str, ok: bool) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
        sys.exit(1)


def aligned(shape, dtype):
    return torch.empty(shape, dtype=dtype)


def misaligned(shape, dtype):
    """A contiguous tensor whose data pointer is 1 element past a 16-byte boundary."""
    flat = torch.empty(shape[0] * shape[1] + 1, dtype=dtype)
    return flat[1:].view(shape)


def quant_checks(sim) -> None:
    quant = importlib.import_module("qkernels.triton.quant")
    kernel = quant._quantize_per_token_kernel
    k = 96
    launcher = KernelLauncher(kernel)  # one launcher: a reused entry must not serve another specialization
    for m, make in ((16, aligned), (1, aligned), (17, aligned), (16, misaligned)):
        x = make((m, k), torch.bfloat16)
        q = torch.empty(m, k, dtype=torch.int8)
        s = torch.empty(m, dtype=torch.float32)
        args, grid = (x, s, q, s, m, k, x.stride(0), q.stride(0)), (m,)
        meta = dict(QMAX=127.0, HAS_SMOOTH=False, FP8=False, SOFT_FP8=False, ROWS=1, BLOCK_K=128,
                    SINGLE_PASS=True, num_warps=4)
        launcher(grid, (), args, **meta)  # through Triton: compiles, records
        launcher(grid, (), args, **meta)  # fast path
        kernel[grid](*args, **meta)  # Triton's own launch, for comparison
        slow, fast, ref = sim.launches[-3:]
        what = f"quant m={m} {'misaligned' if make is misaligned else 'aligned'} x"
        check(f"{what}: fast path launches what Triton launches", same_launch(fast, ref) and same_launch(slow, ref))


def gemm_checks(sim) -> None:
    gemm = importlib.import_module("qkernels.triton.int8_gemm")
    heuristic = gemm._int8_gemm_kernel.fn  # the @heuristics(EVEN_K) wrapper of the JIT function
    # A small autotuner over the same kernel: two small-tile configs keep the compile count low.
    tuned = triton.autotune(configs=[cfg(16, 64, 64, 2, 4), cfg(32, 64, 64, 2, 4)], key=AUTOTUNE_KEY)(heuristic)
    launcher = KernelLauncher(tuned)
    n, k = 128, 96
    w = torch.empty(n, k, dtype=torch.int8)
    ws = torch.empty(n, dtype=torch.float32)
    bias = torch.empty(n, dtype=torch.bfloat16)
    hashes = {}
    for m, make in ((32, aligned), (17, aligned), (32, misaligned), (1, aligned)):
        a = make((m, k), torch.int8)
        sa = torch.empty(m, dtype=torch.float32)
        c = torch.empty(m, n, dtype=torch.bfloat16)
        mb = m_bucket(m)
        args = (a, w, c, sa, ws, bias, ws, ws, ws, m, n, k, mb, a.stride(0), a.stride(1), w.stride(0), w.stride(1),
                c.stride(0), c.stride(1), 0)
        meta = dict(HAS_BIAS=True, EPILOGUE=0, enable_fp_fusion=False)
        grid = gemm_grid(m, n)
        launcher(grid, (mb, n, k), args, **meta)
        launcher(grid, (mb, n, k), args, **meta)
        tuned[grid](*args, **meta)
        slow, fast, ref = sim.launches[-3:]
        what = f"int8 gemm m={m} {'misaligned' if make is misaligned else 'aligned'} A"
        check(f"{what}: fast path launches what the autotuner launches", same_launch(fast, ref) and same_launch(slow, ref))
        hashes[(m, make is misaligned)] = fast.kernel_hash
    check("m=17 and m=32 (one autotune bucket) are compiled separately", hashes[(17, False)] != hashes[(32, False)])
    check("a misaligned A gets its own kernel", hashes[(32, True)] != hashes[(32, False)])


def tma_checks(sim) -> None:
    """The TMA GEMM (host-side descriptors as arguments, a persistent grid): the direct launch
    passes what Triton's own path passed. Triton 3.4's descriptor has no ``padding`` (3.5+ does):
    the launcher's specialization key read it and raised there."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    fp8 = importlib.import_module("qkernels.triton.fp8_gemm")
    m, k, n = 256, 256, 256
    e4 = torch.float8_e4m3fn
    a, w = torch.empty(m, k, dtype=e4), torch.empty(n, k, dtype=e4)
    ws, sa, bias = torch.empty(n), torch.empty(m), torch.empty(n, dtype=torch.bfloat16)
    before = len(sim.launches)
    with cuda_path_on_cpu():
        for _ in range(2):  # Triton's own path (first call: compiles), then the direct launch
            fp8.fp8_gemm_tma(a, sa, w, ws, bias, torch.bfloat16, False, None, None, None)
    slow, fast = sim.launches[before:]

    inputs = {t.data_ptr() for t in (a, w, ws, sa, bias)}

    def arg(v):  # each call's own output tensor: its dtype only
        if isinstance(v, TensorDescriptor):
            return ("desc", v.base.data_ptr(), tuple(v.shape), tuple(v.strides), tuple(v.block_shape))
        if isinstance(v, torch.Tensor):
            return ("tensor", v.data_ptr() if v.data_ptr() in inputs else "output", v.dtype)
        return v

    check("fp8 TMA gemm m=256: the direct launch passes what Triton's path passed",
          (slow.kernel_hash, slow.grid, tuple(map(arg, slow.args))) == (fast.kernel_hash, fast.grid,
                                                                         tuple(map(arg, fast.args))))


def layer_checks(sim) -> None:
    """A QuantLinear forward after its first call: one launch per kernel, no tuning, no compile."""
    from qkernels import QuantLinear

    lin = torch.nn.Linear(96, 128, dtype=torch.bfloat16)
    with cuda_path_on_cpu(), torch.no_grad():
        for backend, kernels in (("int8-triton", ["_quantize_per_token_kernel", "_int8_gemm_kernel"]),
                                 ("fp8-triton", ["_quantize_per_token_kernel", "_fp8_gemm_kernel"])):
            layer = QuantLinear.from_linear(lin, backend)
            x = torch.randn(16, 96, dtype=torch.bfloat16)
            layer(x)
            before = len(sim.launches)
            layer(x)
            names = [launch.kernel for launch in sim.launches[before:]]
            check(f"{backend} forward: {names} after warm-up", names == kernels)


def _launched(sim, fn, replay: bool):
    """``(fn(), the launches it made)`` with the Triton backends' replay on or off."""
    from qkernels.backends import triton_backends as tb

    tb._TritonW8A8.REPLAY = replay
    try:
        before = len(sim.launches)
        out = fn()
        return out, sim.launches[before:]
    finally:
        tb._TritonW8A8.REPLAY = True


def replay_checks(sim) -> None:
    """A layer's replayed forward (``Replay``, the Triton backends' default on CUDA) launches the
    same compiled kernels, grids and arguments as its forward through the ops and launchers, with
    the layer's tensors and the input in the same places and new outputs of the same dtype and
    shape; an input it was not recorded for (misaligned) goes through the launchers instead."""
    from qkernels import QuantLinear

    def same(replayed, direct, known, new) -> bool:
        """One replayed launch against the direct one: same kernel, grid and non-tensor arguments;
        where the direct launch passed a tensor, the replay passes the same tensor's address (the
        layer's tensors, the input) or a new address (a new output, a scratch temporary); ``new``
        collects those as address -> byte length of the direct launch's tensor there."""
        if (replayed.kernel_hash, replayed.grid, len(replayed.args)) != (direct.kernel_hash, direct.grid,
                                                                         len(direct.args)):
            return False
        for r, d in zip(replayed.args, direct.args):
            if not isinstance(d, torch.Tensor):
                if r != d or type(r) is not type(d):
                    return False
                continue
            ptr = r.data_ptr() if isinstance(r, torch.Tensor) else r
            if type(ptr) is not int:
                return False
            if d.data_ptr() in known:
                if ptr != d.data_ptr():
                    return False
            elif ptr in known:
                return False
            else:
                new[ptr] = max(new.get(ptr, 0), d.numel() * d.element_size())
        return True

    def disjoint(new: dict) -> bool:
        spans = sorted(new.items())
        return all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 128, dtype=torch.bfloat16)
    no_bias = torch.nn.Linear(96, 128, bias=False, dtype=torch.bfloat16)
    with cuda_path_on_cpu(), torch.no_grad():
        for backend in ("int8-triton", "fp8-triton"):
            for what, base, kw in (("dynamic", lin, {}), ("no bias", no_bias, {}),
                                   ("static", lin, dict(activation="static", input_scale=0.05)),
                                   ("smoothed", lin, dict(input_smooth=torch.rand(96) + 0.5))):
                layer = QuantLinear.from_linear(base, backend, **kw)
                for m, make in ((16, aligned), (1, aligned), (17, aligned), (16, misaligned)):
                    x = make((m, 96), torch.bfloat16)
                    for _ in range(3):  # compile, record, replay
                        y, replayed = _launched(sim, lambda: layer(x), True)
                    y_ref, direct = _launched(sim, lambda: layer(x), False)
                    known = {t.data_ptr() for t in (x, *layer._buffers.values()) if t is not None}
                    name = f"replay {backend} {what} m={m}{' misaligned x' if make is misaligned else ''}"
                    new = {}
                    check(f"{name}: {[launch.kernel for launch in replayed]} as launched directly",
                          len(replayed) == len(direct) and all(same(a, b, known, new) for a, b in zip(replayed, direct))
                          and y.shape == y_ref.shape and y.dtype == y_ref.dtype and y.data_ptr() != y_ref.data_ptr())
                    check(f"{name}: the new output and temporaries do not overlap ({len(new)})",
                          disjoint(new) and y.data_ptr() in new and len(new) == len(
                              {a.data_ptr() for d in direct for a in d.args
                               if isinstance(a, torch.Tensor) and a.data_ptr() not in known}))
                    replays = layer._plans.get((m, x.dtype))
                    check(f"{name}: a recording is kept", replays is not None and not isinstance(replays, int))
                layer.to(torch.float32)  # the bias is cast: recordings of the bf16 bias go
                check(f"replay {backend} {what}: a cast drops the recordings", layer._plans == {})

        # the GEMM on an already-quantized activation (the fused blocks' path), with each epilogue
        from qkernels import ops
        from qkernels.linear import QuantizedActivation

        for backend in ("int8-triton", "fp8-triton"):
            layer = QuantLinear.from_linear(lin, backend)
            for m in (16, 1, 17):
                x = aligned((m, 96), torch.bfloat16)
                q, s = ops.quantize_per_token(x, None, backend == "fp8-triton")
                act = QuantizedActivation(q, s, x.dtype)
                residual = aligned((m, 128), torch.bfloat16)
                mod = aligned((2, 3 * 128), torch.bfloat16)
                gate = mod[:, 128:256]  # a strided view, as the block's gate slice of img_mod
                rows = torch.zeros(m, dtype=torch.int32)
                for what, kw in (("plain", {}), ("gelu", dict(gelu=True)),
                                 ("gated residual", dict(residual=residual, gate=gate, gate_rows=rows))):
                    def fn():
                        return layer.forward_quantized(act, **kw)

                    for _ in range(3):  # compile, record, replay
                        y, replayed = _launched(sim, fn, True)
                    y_ref, direct = _launched(sim, fn, False)
                    known = {t.data_ptr() for t in (q, s, residual, gate, rows, *layer._buffers.values())
                             if t is not None}
                    new = {}
                    name = f"replay {backend} gemm {what} m={m}"
                    check(f"{name}: {[launch.kernel for launch in replayed]} as launched directly",
                          len(replayed) == len(direct) == 1 and same(replayed[0], direct[0], known, new)
                          and y.shape == y_ref.shape and y.dtype == y_ref.dtype and list(new) == [y.data_ptr()])
            check(f"replay {backend} gemm: one recording per (M, epilogue)",
                  sum(type(p) is not int for p in layer._plans.values()) == 9)


def op_replay_checks(sim) -> None:
    """The ops the fused blocks call directly are replayed per call signature on CUDA
    (``triton_backends._replaying``): a replayed call launches what the direct call launches
    (same kernel, grid, scalars; the input at the input's address, new outputs), and a call that
    differs only in a non-tensor argument (fp8 vs int8) gets its own recording. Then a whole
    fused Qwen-Image forward, replayed, launches the same kernels, grids and scalars as direct."""
    from qkernels import ops
    from qkernels.backends import triton_backends as tb

    def scalars(launch):
        return launch.kernel_hash, launch.grid, tuple(a if not isinstance(a, (torch.Tensor, int)) or type(a) is bool
                                                      else "ptr" if isinstance(a, torch.Tensor) or a > 1 << 32 else a
                                                      for a in launch.args)

    with cuda_path_on_cpu(), torch.no_grad():
        x = aligned((16, 96), torch.bfloat16)
        for fp8 in (False, True, False, True):
            fn = lambda: ops.quantize_per_token(x, None, fp8)  # noqa: E731
            for _ in range(3):
                (q, s), replayed = _launched(sim, fn, True)
            _, direct = _launched(sim, fn, False)
            check(f"op replay quantize_per_token fp8={fp8}: {[l.kernel for l in replayed]} as launched directly",
                  len(replayed) == len(direct) == 1 and replayed[0].kernel_hash == direct[0].kernel_hash
                  and replayed[0].args[0] == x.data_ptr() and q.dtype == (torch.float8_e4m3fn if fp8 else torch.int8))
        plans = tb.cuda_impl(ops.quantize_per_token)  # a new wrapper: its own (empty) recordings
        check("op replay: each wrapper keeps its own recordings", plans.plans == {})
        wrapper = ops.quantize_per_token.impl_for("cpu")  # what "CUDA" (here: these CPU tensors) runs
        y = aligned((24, 96), torch.bfloat16)  # a signature not seen before
        for _ in range(4):
            ops.quantize_per_token.torch_op(y, None, True)  # the custom op: what compiled code calls
        check("op replay: the custom op (compiled code) runs the plain launcher, never a replay",
              all(k[0] != (y.dtype, y.shape) for k in wrapper.plans))

        from qpipeline.demo import build_demo_transformer, demo_inputs
        from qpipeline.quantize import quantize_model

        model = build_demo_transformer("tiny", num_layers=2)
        quantize_model(model, "fp8-triton", fuse=True)
        inputs = demo_inputs(model, image_hw=(4, 4), reference_hw=(4, 4), text_tokens=8)
        for _ in range(3):
            _, replayed = _launched(sim, lambda: model(**inputs), True)
        _, direct = _launched(sim, lambda: model(**inputs), False)
        check(f"op replay: a fused forward, replayed, launches what it launches directly ({len(direct)} launches)",
              len(replayed) == len(direct) > 0 and all(scalars(a) == scalars(b) for a, b in zip(replayed, direct)))


def record_checks(sim) -> None:
    """What ``Replay.record`` refuses: a call that runs an aten op besides allocating, one whose
    launch went through Triton's own path (a first call), one that returns an input."""
    from qkernels.triton._launch import Replay

    quant = importlib.import_module("qkernels.triton.quant")
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    with cuda_path_on_cpu():
        _record_checks(quant, Replay, x)


def _record_checks(quant, Replay, x) -> None:
    quant.quantize_per_token(x, None, False)  # compile
    _, plan = Replay.record(lambda x: quant.quantize_per_token(x, None, False)[0], (x,))
    check("record: a call that only allocates and launches is replayable", plan is not None)
    _, plan = Replay.record(lambda x: quant.quantize_per_token(x * 2, None, False)[0], (x,))
    check("record: a call that also runs an aten op (x * 2) is not", plan is None)
    y = torch.randn(8, 96, dtype=torch.bfloat16)  # a new M: the launcher's first call compiles
    _, plan = Replay.record(lambda x: quant.quantize_per_token(x, None, False)[0], (y,))
    check("record: a first call (Triton's own path) is not", plan is None)
    _, plan = Replay.record(lambda x: (quant.quantize_per_token(x, None, False), x)[1], (x,))
    check("record: a call returning its input is not", plan is None)
    (q, s), plan = Replay.record(lambda x: quant.quantize_per_token(x, None, False), (x,))
    out = plan((x,)) if plan is not None else None
    check("record: a call returning a tuple of its outputs is replayed into new ones",
          isinstance(out, tuple) and len(out) == 2 and [(t.shape, t.dtype) for t in out] ==
          [(q.shape, q.dtype), (s.shape, s.dtype)] and out[0].data_ptr() != q.data_ptr())
    smooth = torch.rand(96) + 0.5  # made before the call, not passed as an input: a constant
    quant.quantize_per_token(x, smooth, False)  # compile the smoothed kernel
    _, plan = Replay.record(lambda x: quant.quantize_per_token(x, smooth, False)[0], (x,))
    check("record: a tensor made before the call is a constant of the replay",
          plan is not None and any(c is smooth for c in plan.constants))
    _, plan = Replay.record(lambda x: (lambda qs: (qs[0], qs[0]))(quant.quantize_per_token(x, None, False)), (x,))
    check("record: a call returning one tensor twice is not", plan is None)


def main(argv: list[str]) -> int:
    if "--break-spec" in argv:
        original = _launch.specialization

        def no_alignment(args):  # the bug the checks must catch: alignment left out of the key
            return tuple(s[:1] if isinstance(a, torch.Tensor) else s for a, s in zip(args, original(args)))

        _launch.specialization = no_alignment
    if "--break-replay" in argv:  # the bug the replay checks must catch: inputs never checked
        _launch.Replay.matches = lambda self, args, held: True
    if "--break-gemm-key" in argv:  # the bug the GEMM replay checks must catch: gelu not in the key
        from qkernels.backends import triton_backends as tb

        tb._gemm_key = lambda q, out_dtype, gelu, residual, gate, gate_rows: (q.shape[0], out_dtype)
    if "--break-op-key" in argv:  # the bug the op replay checks must catch: scalars not in the key
        from qkernels.backends import triton_backends as tb

        tb._op_key = lambda args: tuple((a.dtype, a.shape) for a in args if isinstance(a, torch.Tensor))
    with simulated_driver() as sim:
        quant_checks(sim)
        gemm_checks(sim)
        tma_checks(sim)
        if "--no-layer" not in argv:
            layer_checks(sim)
        if "--no-replay" not in argv:
            record_checks(sim)
            op_replay_checks(sim)
            replay_checks(sim)
    print("all launch checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
