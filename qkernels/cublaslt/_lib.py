"""Raw ctypes binding to the few cuBLASLt entry points an int8 GEMM needs.

Why ctypes on the already-loaded library rather than a binding package: CuPy has no cuBLASLt
binding (its maintainers point to nvmath-python), nvmath-python is an extra ~100 MB install that
the target machines do not have, and torch's CUDA wheels already ship libcublasLt and load it
into the process (libtorch_cuda links it). Binding the copy torch loaded means one cuBLASLt in
the process, of the version torch was built and tested with, and nothing to install.

Enum values and struct layouts follow the public ``cublasLt.h`` / ``cublas_api.h`` /
``library_types.h`` (stable since CUDA 11; checked against CUDA 13.0's headers). Only what
this package uses is declared. Importing this module loads nothing; :func:`lib` does, once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import sys

# cublasStatus_t (cublas_api.h)
STATUS_NAMES = {
    0: "CUBLAS_STATUS_SUCCESS",
    1: "CUBLAS_STATUS_NOT_INITIALIZED",
    3: "CUBLAS_STATUS_ALLOC_FAILED",
    7: "CUBLAS_STATUS_INVALID_VALUE",
    8: "CUBLAS_STATUS_ARCH_MISMATCH",
    11: "CUBLAS_STATUS_MAPPING_ERROR",
    13: "CUBLAS_STATUS_EXECUTION_FAILED",
    14: "CUBLAS_STATUS_INTERNAL_ERROR",
    15: "CUBLAS_STATUS_NOT_SUPPORTED",
    16: "CUBLAS_STATUS_LICENSE_ERROR",
}
STATUS_SUCCESS = 0
STATUS_NOT_SUPPORTED = 15

# cublasComputeType_t (cublas_api.h)
COMPUTE_32I = 72
# cudaDataType_t (library_types.h)
R_32F, R_16F, R_8I, R_32I, R_16BF = 0, 2, 3, 10, 14
# cublasOperation_t
OP_N, OP_T = 0, 1
# cublasLtMatmulDescAttributes_t
DESC_COMPUTE_TYPE, DESC_SCALE_TYPE, DESC_POINTER_MODE, DESC_TRANSA, DESC_TRANSB = 0, 1, 2, 3, 4
# cublasLtPointerMode_t
POINTER_MODE_HOST, POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO = 0, 3
# cublasLtMatrixLayoutAttribute_t
LAYOUT_TYPE, LAYOUT_ORDER, LAYOUT_ROWS, LAYOUT_COLS, LAYOUT_LD = 0, 1, 2, 3, 4
# cublasLtOrder_t
ORDER_COL, ORDER_ROW = 0, 1
# cublasLtMatmulPreferenceAttributes_t
PREF_SEARCH_MODE, PREF_MAX_WORKSPACE_BYTES = 0, 1


class MatmulAlgo(ctypes.Structure):
    """cublasLtMatmulAlgo_t: 8 x uint64, opaque, copyable by value (64 bytes)."""

    _fields_ = [("data", ctypes.c_uint64 * 8)]


class HeuristicResult(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t: algo, size_t workspaceSize, cublasStatus_t state,
    float wavesCount, int reserved[4] (96 bytes with natural alignment)."""

    _fields_ = [
        ("algo", MatmulAlgo),
        ("workspaceSize", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("wavesCount", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


assert ctypes.sizeof(MatmulAlgo) == 64 and ctypes.sizeof(HeuristicResult) == 96


class CublasLtError(RuntimeError):
    """A cuBLASLt call returned a status other than SUCCESS."""

    def __init__(self, func: str, status: int, hint: str = ""):
        self.status = status
        name = STATUS_NAMES.get(status, f"unknown status {status}")
        super().__init__(f"{func} failed with {name} ({status})" + (f": {hint}" if hint else ""))


_p = ctypes.c_void_p
_pp = ctypes.POINTER(ctypes.c_void_p)
# name -> argument types; every function returns cublasStatus_t (int) except the version query.
_SIGNATURES = {
    "cublasLtCreate": [_pp],
    "cublasLtDestroy": [_p],
    "cublasLtMatmulDescCreate": [_pp, ctypes.c_int, ctypes.c_int],
    "cublasLtMatmulDescDestroy": [_p],
    "cublasLtMatmulDescSetAttribute": [_p, ctypes.c_int, _p, ctypes.c_size_t],
    "cublasLtMatrixLayoutCreate": [_pp, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
    "cublasLtMatrixLayoutDestroy": [_p],
    "cublasLtMatrixLayoutSetAttribute": [_p, ctypes.c_int, _p, ctypes.c_size_t],
    "cublasLtMatmulPreferenceCreate": [_pp],
    "cublasLtMatmulPreferenceDestroy": [_p],
    "cublasLtMatmulPreferenceSetAttribute": [_p, ctypes.c_int, _p, ctypes.c_size_t],
    "cublasLtMatmulAlgoGetHeuristic": [_p, _p, _p, _p, _p, _p, _p, ctypes.c_int,
                                       ctypes.POINTER(HeuristicResult), ctypes.POINTER(ctypes.c_int)],
    "cublasLtMatmulAlgoCheck": [_p, _p, _p, _p, _p, _p, ctypes.POINTER(MatmulAlgo),
                                ctypes.POINTER(HeuristicResult)],
    # handle, desc, alpha, A, Adesc, B, Bdesc, beta, C, Cdesc, D, Ddesc, algo, workspace, size, stream
    "cublasLtMatmul": [_p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _p,
                       ctypes.POINTER(MatmulAlgo), _p, ctypes.c_size_t, _p],
}


# --------------------------------------------------------------------------------------------
# finding the library


def _loaded_in_process() -> list[str]:
    """Paths of libcublasLt already mapped into this process (torch's CUDA build maps it when
    libtorch_cuda loads). Linux only; elsewhere an empty list."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcublasLt.so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.isfile(p))


def _in_nvidia_packages() -> list[str]:
    """libcublasLt shipped by the ``nvidia-cublas*`` wheels (nvidia/cublas/lib for CUDA 12,
    nvidia/cu13/lib for CUDA 13), found without importing anything heavy."""
    found = []
    for entry in sys.path:
        base = os.path.join(entry or ".", "nvidia")
        if os.path.isdir(base):
            found += glob.glob(os.path.join(base, "*", "lib", "libcublasLt.so*"))
    return sorted(set(found))


def candidates() -> list[str]:
    """Where libcublasLt may be, best first: the copy torch already loaded, the nvidia wheels,
    then the system linker's search path."""
    out = _loaded_in_process() + _in_nvidia_packages()
    system = ctypes.util.find_library("cublasLt")
    if system:
        out.append(system)
    return list(dict.fromkeys(out))


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    tried = []
    for path in candidates():
        try:
            handle = ctypes.CDLL(path)
        except OSError as exc:
            tried.append(f"{path}: {exc}")
            continue
        missing = [name for name in _SIGNATURES if not hasattr(handle, name)]
        if missing:
            tried.append(f"{path}: lacks {', '.join(missing)}")
            continue
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(handle, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        handle.cublasLtGetVersion.restype = ctypes.c_size_t
        handle.cublasLtGetVersion.argtypes = []
        return handle, path
    detail = "; ".join(tried) if tried else "not loaded by torch, not in an nvidia-cublas wheel, not on the linker path"
    return None, f"libcublasLt not found ({detail})"


def library_reason() -> str | None:
    """None if libcublasLt can be loaded, else why not. Loads it (cheap once torch has)."""
    handle, info = _load()
    return None if handle is not None else info


def lib() -> ctypes.CDLL:
    handle, info = _load()
    if handle is None:
        raise OSError(info)
    return handle


def library_path() -> str:
    lib()
    return _load()[1]


def check(func: str, status: int, hint: str = "") -> None:
    if status != STATUS_SUCCESS:
        raise CublasLtError(func, status, hint)


def call(name: str, *args, hint: str = "") -> None:
    """Call ``name`` and raise :class:`CublasLtError` on a non-success status."""
    check(name, getattr(lib(), name)(*args), hint)


# --------------------------------------------------------------------------------------------
# small typed wrappers (each returns an opaque handle as a ctypes.c_void_p)


def create_handle() -> ctypes.c_void_p:
    h = ctypes.c_void_p()
    call("cublasLtCreate", ctypes.byref(h))
    return h


def _set(setter: str, obj, attr: int, value) -> None:
    call(setter, obj, attr, ctypes.byref(value), ctypes.sizeof(value))


def matmul_desc(compute_type: int, scale_type: int, transa: int, transb: int) -> ctypes.c_void_p:
    d = ctypes.c_void_p()
    call("cublasLtMatmulDescCreate", ctypes.byref(d), compute_type, scale_type)
    _set("cublasLtMatmulDescSetAttribute", d, DESC_TRANSA, ctypes.c_int32(transa))
    _set("cublasLtMatmulDescSetAttribute", d, DESC_TRANSB, ctypes.c_int32(transb))
    return d


def set_pointer_mode(desc: ctypes.c_void_p, mode: int) -> None:
    _set("cublasLtMatmulDescSetAttribute", desc, DESC_POINTER_MODE, ctypes.c_int32(mode))


def matrix_layout(dtype: int, rows: int, cols: int, ld: int, order: int = ORDER_COL) -> ctypes.c_void_p:
    layout = ctypes.c_void_p()
    call("cublasLtMatrixLayoutCreate", ctypes.byref(layout), dtype, rows, cols, ld)
    if order != ORDER_COL:
        _set("cublasLtMatrixLayoutSetAttribute", layout, LAYOUT_ORDER, ctypes.c_int32(order))
    return layout


def preference(max_workspace_bytes: int) -> ctypes.c_void_p:
    pref = ctypes.c_void_p()
    call("cublasLtMatmulPreferenceCreate", ctypes.byref(pref))
    _set("cublasLtMatmulPreferenceSetAttribute", pref, PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(max_workspace_bytes))
    return pref


def heuristics(handle, desc, a, b, c, d, pref, count: int) -> list[HeuristicResult]:
    """Up to ``count`` algorithms cuBLASLt proposes, best-guess first; an empty list if none fits
    (NOT_SUPPORTED is an answer here, not an error)."""
    results = (HeuristicResult * count)()
    returned = ctypes.c_int(0)
    status = lib().cublasLtMatmulAlgoGetHeuristic(handle, desc, a, b, c, d, pref, count, results,
                                                  ctypes.byref(returned))
    if status == STATUS_NOT_SUPPORTED:
        return []
    check("cublasLtMatmulAlgoGetHeuristic", status)
    return [results[i] for i in range(returned.value) if results[i].state == STATUS_SUCCESS]


def algo_check(handle, desc, a, b, c, d, algo: MatmulAlgo) -> HeuristicResult | None:
    """The algorithm's requirements for this exact problem, or None if it cannot run it."""
    result = HeuristicResult()
    status = lib().cublasLtMatmulAlgoCheck(handle, desc, a, b, c, d, ctypes.byref(algo), ctypes.byref(result))
    return result if status == STATUS_SUCCESS else None


def destroy(kind: str, obj) -> None:
    """Destroy a descriptor: ``kind`` is MatmulDesc, MatrixLayout or MatmulPreference."""
    if obj:
        getattr(lib(), f"cublasLt{kind}Destroy")(obj)


def version() -> int:
    return int(lib().cublasLtGetVersion())
