"""int8 x int8 -> int32 GEMM through cuBLASLt, with a per-shape algorithm search.

``torch._int_mm`` already calls cuBLASLt, with the first heuristic algorithm and no choice.
Here, per (device, M bucket, K, N), cublasLtMatmulAlgoGetHeuristic proposes up to
``CANDIDATES`` algorithms and each is timed once with CUDA events on the real operands; the
fastest is kept for the process. That first call synchronizes the host (the timing has to);
every later call only launches. An exact M that was not timed reuses its bucket's algorithm
after cublasLtMatmulAlgoCheck confirms it fits (a host-side check, no GPU work).

Everything runs on torch's current stream; buffers are torch tensors passed by device pointer.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from . import _lib
from .plan import GemmPlan, alignment_reason, imma_reason, m_bucket, plan_linear
from ..errors import InputError, UnsupportedShapeError

__all__ = ["int8_gemm", "cache_info", "clear_cache", "WORKSPACE_BYTES", "CANDIDATES"]

# cuBLAS's documented recommendation for Hopper is a 32 MiB workspace (4 MiB before sm90);
# split-K and stream-K algorithms use it.
WORKSPACE_BYTES = 32 * 1024 * 1024
CANDIDATES = 8
TIMED_RUNS = 2  # per candidate, after one untimed run (first-launch costs are not the algo's)

_ONE, _ZERO = ctypes.c_int32(1), ctypes.c_int32(0)  # alpha, beta for scale type CUDA_R_32I


@dataclass
class _DeviceState:
    handle: ctypes.c_void_p
    preference: ctypes.c_void_p
    workspaces: dict  # stream pointer -> uint8 tensor of WORKSPACE_BYTES


@dataclass
class _Prepared:
    desc: ctypes.c_void_p  # cublasLtMatmulDesc_t (shared by every shape of the same ops)
    layouts: tuple  # A, B, C/D cublasLtMatrixLayout_t
    algo: _lib.MatmulAlgo
    workspace_bytes: int
    swapped: bool  # cuBLAS A is the weight (row-major output)
    searched: bool  # this exact shape was the one timed


_lock = threading.Lock()
_devices: dict[int, _DeviceState] = {}
_descs: dict[tuple[int, int], ctypes.c_void_p] = {}  # (transa, transb) -> matmul desc
_algos: dict[tuple, tuple[_lib.MatmulAlgo, int]] = {}  # (device, bucket, K, N, layout) -> (algo, ws)
_prepared: dict[tuple, _Prepared] = {}  # (device, M, K, N, strides) -> descriptors + algo
_stats = {"searches": 0, "hits": 0, "checked_reuse": 0, "heuristic_fallback": 0}
# One entry per timed search: (problem, ms of each candidate in heuristic order, chosen index).
# For benchmarks and reports: how often the heuristic's first choice was not the fastest.
search_log: list[tuple[str, list[float], int]] = []


def stream_ptr(device_index: int) -> int:
    """torch's current CUDA stream on a device, as a raw pointer. The private binding costs
    0.2 us against 5.7 us for ``torch.cuda.current_stream(d).cuda_stream`` (H100 host,
    measured), which matters at ~850 GEMMs a step; the public call is the fallback."""
    return _raw_stream(device_index)


def _public_stream(device_index: int) -> int:
    return torch.cuda.current_stream(device_index).cuda_stream


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _public_stream


def _device_state(index: int) -> _DeviceState:
    state = _devices.get(index)
    if state is None:
        with torch.cuda.device(index):
            # A cuBLASLt handle binds to the device current at creation: one per device.
            state = _DeviceState(_lib.create_handle(), _lib.preference(WORKSPACE_BYTES), {})
        _devices[index] = state
    return state


def _workspace(state: _DeviceState, device: torch.device, stream: int) -> torch.Tensor:
    # One workspace per device and stream: algorithms write it, so two streams sharing one
    # would race. In the usual single-stream program that is one 32 MiB buffer per device.
    ws = state.workspaces.get(stream)
    if ws is None:
        ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        state.workspaces[stream] = ws
    return ws


def _desc(plan: GemmPlan) -> ctypes.c_void_p:
    key = (plan.a.op, plan.b.op)
    d = _descs.get(key)
    if d is None:
        d = _lib.matmul_desc(_lib.COMPUTE_32I, _lib.R_32I, *key)
        _descs[key] = d
    return d


def _launch(state, desc, layouts, algo, a_ptr, b_ptr, d_ptr, ws: torch.Tensor, ws_bytes: int, stream: int) -> int:
    return _lib.lib().cublasLtMatmul(
        state.handle, desc, ctypes.byref(_ONE), a_ptr, layouts[0], b_ptr, layouts[1],
        ctypes.byref(_ZERO), d_ptr, layouts[2], d_ptr, layouts[2],
        ctypes.byref(algo), ws.data_ptr() if ws_bytes else None, ws_bytes, stream,
    )


def _search(state, desc, layouts, ptrs, ws, stream, what: str) -> tuple[_lib.MatmulAlgo, int]:
    """Time each heuristic candidate once on the real operands; return the fastest."""
    found = _lib.heuristics(state.handle, desc, *layouts, layouts[2], state.preference, CANDIDATES)
    if not found:
        raise UnsupportedShapeError(f"cuBLASLt proposes no int8 algorithm for {what}")
    _stats["searches"] += 1
    if len(found) == 1:
        return _lib.MatmulAlgo.from_buffer_copy(found[0].algo), found[0].workspaceSize
    torch_stream = torch.cuda.current_stream()
    best, best_ms, timings = None, float("inf"), []
    for cand in found:
        algo, wsb = cand.algo, cand.workspaceSize
        if _launch(state, desc, layouts, algo, *ptrs, ws, wsb, stream) != _lib.STATUS_SUCCESS:
            timings.append(float("nan"))
            continue  # a proposed algorithm may still refuse at launch; skip it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(torch_stream)
        for _ in range(TIMED_RUNS):
            _launch(state, desc, layouts, algo, *ptrs, ws, wsb, stream)
        end.record(torch_stream)
        end.synchronize()
        ms = start.elapsed_time(end) / TIMED_RUNS
        timings.append(ms)
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is None:
        raise UnsupportedShapeError(f"every cuBLASLt int8 algorithm proposed for {what} failed to launch")
    if len(search_log) < 1000:
        search_log.append((what, timings, timings.index(best_ms)))
    return _lib.MatmulAlgo.from_buffer_copy(best.algo), best.workspaceSize


def _prepare(key, plan: GemmPlan, device: torch.device, ptrs, ws, stream) -> _Prepared:
    state = _device_state(device.index)
    desc = _desc(plan)
    layouts = tuple(_lib.matrix_layout(*spec) for spec in plan.layout_specs())
    what = f"M={key[1]} K={key[2]} N={key[3]} ({plan.ops})"
    search_key = (device.index, m_bucket(key[1]), key[2], key[3], key[4])
    known = _algos.get(search_key)
    if known is not None:
        checked = _lib.algo_check(state.handle, desc, *layouts, layouts[2], known[0])
        if checked is not None and checked.workspaceSize <= WORKSPACE_BYTES:
            _stats["checked_reuse"] += 1
            return _Prepared(desc, layouts, known[0], checked.workspaceSize, plan.swapped, searched=False)
        found = _lib.heuristics(state.handle, desc, *layouts, layouts[2], state.preference, 1)
        if not found:
            raise UnsupportedShapeError(f"cuBLASLt proposes no int8 algorithm for {what}")
        _stats["heuristic_fallback"] += 1
        return _Prepared(desc, layouts, _lib.MatmulAlgo.from_buffer_copy(found[0].algo), found[0].workspaceSize, plan.swapped, False)
    algo, wsb = _search(state, desc, layouts, ptrs, ws, stream, what)
    _algos[search_key] = (algo, wsb)
    return _Prepared(desc, layouts, algo, wsb, plan.swapped, searched=True)


def int8_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a [M, K] int8 @ w [N, K]^T int8 -> int32 [M, N]`` (row-major), exact.

    ``a`` and ``w`` need a unit stride in one dimension (row-major Linear tensors do) and K, N
    multiples of 4 (IMMA). ``out``, if given, must be an int32 [M, N] row-major tensor.
    """
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise InputError(f"int8_gemm takes int8 operands, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise InputError(f"int8_gemm needs a [M, K] and w [N, K], got {tuple(a.shape)} and {tuple(w.shape)}")
    if not a.is_cuda or a.device != w.device:
        raise InputError(f"int8_gemm runs on one CUDA device, got {a.device} and {w.device}")
    m, k = a.shape
    n = w.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=torch.int32, device=a.device)
    elif out.dtype != torch.int32 or out.shape != (m, n) or out.device != a.device:
        raise InputError(f"out must be int32 {(m, n)} on {a.device}, got {out.dtype} {tuple(out.shape)}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    device = a.device
    if device.index != torch.cuda.current_device():
        with torch.cuda.device(device):  # cuBLASLt launches on the current device
            return int8_gemm(a, w, out)
    strides = (a.stride(), w.stride(), out.stride())
    key = (device.index, m, k, n, strides)
    a_ptr, w_ptr, d_ptr = a.data_ptr(), w.data_ptr(), out.data_ptr()
    reason = alignment_reason(a_ptr, w_ptr, d_ptr)
    if reason:
        raise UnsupportedShapeError(f"cuBLASLt int8 GEMM: {reason} (use a fresh, contiguous tensor)")
    stream = stream_ptr(device.index)
    prepared = _prepared.get(key)
    if prepared is None:
        plan = plan_linear(m, n, k, *strides)
        reason = imma_reason(plan)
        if reason:
            raise UnsupportedShapeError(f"cuBLASLt int8 GEMM M={m} K={k} N={n}: {reason}")
        ptrs = (w_ptr, a_ptr, d_ptr) if plan.swapped else (a_ptr, w_ptr, d_ptr)
        with _lock:
            ws = _workspace(_device_state(device.index), device, stream)
            prepared = _prepared.get(key) or _prepare(key, plan, device, ptrs, ws, stream)
            _prepared[key] = prepared
    else:
        _stats["hits"] += 1
    state = _devices[device.index]
    ws = state.workspaces.get(stream)
    if ws is None:
        ws = _workspace(state, device, stream)
    # Row-major output: cuBLAS A is the weight, B the activation (see plan.py).
    ptrs = (w_ptr, a_ptr, d_ptr) if prepared.swapped else (a_ptr, w_ptr, d_ptr)
    status = _launch(state, prepared.desc, prepared.layouts, prepared.algo, *ptrs, ws,
                     prepared.workspace_bytes, stream)
    _lib.check("cublasLtMatmul", status, f"M={m} K={k} N={n}")
    return out


def cache_info() -> dict:
    """Counters since the last clear: ``searches`` (timed algorithm searches), ``hits`` (calls
    served from the per-shape cache), ``checked_reuse`` (a new M reusing its bucket's algorithm),
    ``heuristic_fallback``; plus ``shapes`` and ``algorithms`` cached."""
    return {**_stats, "shapes": len(_prepared), "algorithms": len(_algos)}


def clear_cache() -> None:
    """Forget every searched algorithm and prepared shape (destroying their descriptors)."""
    with _lock:
        for p in _prepared.values():
            for layout in p.layouts:
                _lib.destroy("MatrixLayout", layout)
        _prepared.clear()
        _algos.clear()
        search_log.clear()
        for key in _stats:
            _stats[key] = 0
