"""Layout planning for an int8 GEMM through cuBLASLt: pure functions, no CUDA needed.

The problem is a Linear layer's ``out[M, N] = a[M, K] @ w[N, K]^T`` on torch tensors described by
shape and strides (in elements). cuBLASLt computes ``D[m, n] = op(A)[m, k] @ op(B)[k, n]`` on
column-major matrices, each given by (rows, cols, ld) of its *storage* plus an op (N or T).

Any 2-D tensor with one unit stride is such a storage: ``t[r, c]`` with strides ``(1, s)`` is
column-major ``r x c`` with ld ``s`` (op N); with strides ``(s, 1)`` it is the transpose of the
column-major ``c x r`` matrix with ld ``s`` (op T). So:

* row-major ``out`` [M, N] is column-major ``out^T`` [N, M]: compute ``out^T = w @ a^T`` with
  cuBLAS A = ``w`` (m = N) and cuBLAS B = ``a^T`` (n = M). For row-major ``a`` and ``w`` this is
  the "TN" case: op(A) = T (``w`` is a ``K x N`` column-major storage, ld K) and op(B) = N
  (``a`` is a ``K x M`` column-major storage, ld K), D ld N. No copy of anything.
* column-major ``out`` is computed directly with cuBLAS A = ``a`` (m = M), B = ``w^T``.

IMMA (int8 tensor-core) kernels with the regular column-major ordering need, per the
cublasLtMatmul documentation: "TN" ops only (A transposed, B not), every leading dimension a
multiple of 4, m and k multiples of 4, and 4-byte aligned pointers (16 preferred). With the
row-major-output plan m is N, so a Linear layer needs K % 4 == 0 and N % 4 == 0 and any M;
the column-major-output plan would need M % 4 == 0 per call, which is why the backend uses the
row-major one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _lib
from ..errors import UnsupportedShapeError

__all__ = [
    "Storage",
    "GemmPlan",
    "as_column_major",
    "plan_linear",
    "imma_reason",
    "alignment_reason",
    "linear_shape_reason",
    "m_bucket",
    "emulate",
]

OP_NAMES = {_lib.OP_N: "N", _lib.OP_T: "T"}


@dataclass(frozen=True)
class Storage:
    """A matrix as cuBLASLt sees it: column-major ``rows x cols`` with leading dimension ``ld``,
    used as ``op(storage)`` where ``op`` is ``_lib.OP_N`` or ``_lib.OP_T``."""

    rows: int
    cols: int
    ld: int
    op: int

    @property
    def op_rows(self) -> int:
        return self.cols if self.op == _lib.OP_T else self.rows

    @property
    def op_cols(self) -> int:
        return self.rows if self.op == _lib.OP_T else self.cols


@dataclass(frozen=True)
class GemmPlan:
    """``D[m, n] = op(A) @ op(B)`` in cuBLASLt terms, and which torch tensor plays which role.

    ``swapped``: True when cuBLAS A is the weight and B the activation (row-major output).
    Descriptor specs: A and B are CUDA_R_8I, C = D are CUDA_R_32I, compute CUBLAS_COMPUTE_32I
    with scale type CUDA_R_32I (alpha = 1, beta = 0).
    """

    m: int
    n: int
    k: int
    a: Storage
    b: Storage
    d: Storage
    swapped: bool

    @property
    def ops(self) -> str:
        return OP_NAMES[self.a.op] + OP_NAMES[self.b.op]

    def layout_specs(self) -> tuple[tuple[int, int, int, int], ...]:
        """(cudaDataType, rows, cols, ld) for the A, B and C/D layout descriptors."""
        return (
            (_lib.R_8I, self.a.rows, self.a.cols, self.a.ld),
            (_lib.R_8I, self.b.rows, self.b.cols, self.b.ld),
            (_lib.R_32I, self.d.rows, self.d.cols, self.d.ld),
        )


def as_column_major(rows: int, cols: int, stride_r: int, stride_c: int, prefer: int = _lib.OP_N) -> Storage:
    """The column-major storage of a ``rows x cols`` tensor with element strides
    ``(stride_r, stride_c)``. A size-1 dimension's stride is meaningless in torch, so such a
    tensor can be read either way; ``prefer`` (OP_N or OP_T) picks the reading then."""
    if rows <= 0 or cols <= 0:
        raise UnsupportedShapeError(f"empty matrix {rows}x{cols}: nothing for cuBLASLt to compute")
    can_n = stride_r == 1 or rows == 1
    can_t = stride_c == 1 or cols == 1
    if can_n and (prefer == _lib.OP_N or not can_t):
        ld = stride_c if cols > 1 else rows
        if ld < rows:
            raise UnsupportedShapeError(f"columns overlap: stride {stride_c} < {rows} rows")
        return Storage(rows, cols, ld, _lib.OP_N)
    if can_t:
        # t is the transpose of a column-major cols x rows storage; ld = stride between rows.
        ld = stride_r if rows > 1 else cols
        if ld < cols:
            raise UnsupportedShapeError(f"rows overlap: stride {stride_r} < {cols} columns")
        return Storage(cols, rows, ld, _lib.OP_T)
    raise UnsupportedShapeError(
        f"a {rows}x{cols} tensor with strides ({stride_r}, {stride_c}) has no unit stride: "
        "cuBLASLt needs row- or column-major storage (make it .contiguous())"
    )


def plan_linear(
    m: int, n: int, k: int,
    a_strides: tuple[int, int],
    w_strides: tuple[int, int],
    out_strides: tuple[int, int],
) -> GemmPlan:
    """Plan ``out[m, n] = a[m, k] @ w[n, k]^T`` for the given element strides of ``a`` [m, k],
    ``w`` [n, k] and ``out`` [m, n]."""
    # Degenerate (size-1) dims are read the IMMA way where they can be: A as T, B and D as N.
    T, N = _lib.OP_T, _lib.OP_N
    out_row_major = out_strides[1] == 1 or n == 1
    if out_row_major:
        # out^T [n, m] column-major = w [n, k] @ a^T [k, m]
        a_s = as_column_major(n, k, w_strides[0], w_strides[1], T)
        b_s = as_column_major(k, m, a_strides[1], a_strides[0], N)
        d = as_column_major(n, m, out_strides[1], out_strides[0], N)
        plan_m, plan_n, swapped = n, m, True
    else:
        a_s = as_column_major(m, k, a_strides[0], a_strides[1], T)
        b_s = as_column_major(k, n, w_strides[1], w_strides[0], N)
        d = as_column_major(m, n, out_strides[0], out_strides[1], N)
        plan_m, plan_n, swapped = m, n, False
    if d.op != _lib.OP_N:
        raise UnsupportedShapeError("the output must be stored row- or column-major without overlap")
    return GemmPlan(plan_m, plan_n, k, a_s, b_s, d, swapped)


def imma_reason(plan: GemmPlan) -> str | None:
    """None if the plan meets the IMMA requirements of the regular (column-major) ordering,
    else what breaks them."""
    problems = []
    if plan.ops != "TN":
        problems.append(f"ops are {plan.ops}, IMMA takes only TN (A transposed, B not)")
    for name, s in (("A", plan.a), ("B", plan.b), ("C/D", plan.d)):
        if s.ld % 4:
            problems.append(f"ld{name} = {s.ld} is not a multiple of 4")
    if plan.m % 4:
        problems.append(f"m = {plan.m} is not a multiple of 4")
    if plan.k % 4:
        problems.append(f"k = {plan.k} is not a multiple of 4")
    return "; ".join(problems) or None


def alignment_reason(*ptrs: int) -> str | None:
    """IMMA needs every matrix pointer 4-byte aligned (16 is faster); torch allocations are
    512-byte aligned, so only an offset view can break this."""
    bad = [hex(p) for p in ptrs if p % 4]
    return f"pointers {', '.join(bad)} are not 4-byte aligned" if bad else None


def linear_shape_reason(in_features: int, out_features: int) -> str | None:
    """Why a Linear layer of this shape cannot use the row-major-output IMMA plan (any M)."""
    k, n = in_features, out_features
    reason = imma_reason(plan_linear(1, n, k, (k, 1), (k, 1), (n, 1)))
    if reason is None:
        return None
    return f"in_features and out_features must be multiples of 4 (cuBLASLt int8 IMMA: {reason})"


def m_bucket(m: int) -> int:
    """The M the algorithm search is keyed on: the next power of two, at least 16. Tokens per
    step vary little within a run, and an algorithm's tile choice changes with M's magnitude,
    not its last bits; every exact M is still checked against the chosen algorithm."""
    if m <= 0:
        raise UnsupportedShapeError(f"M must be positive, got {m}")
    return max(16, 1 << (m - 1).bit_length())


def emulate(plan: GemmPlan, a_flat: torch.Tensor, b_flat: torch.Tensor, d_flat: torch.Tensor) -> None:
    """Run the column-major GEMM ``plan`` describes on flat CPU buffers, exactly as cuBLASLt
    reads and writes them (element ``(i, j)`` of a storage lives at ``i + j * ld``).
    ``a_flat``/``b_flat`` are the int8 buffers of cuBLAS A and B, ``d_flat`` the int32 output
    buffer, each starting at its matrix's first element. For testing plans on CPU."""

    def read(flat: torch.Tensor, s: Storage) -> torch.Tensor:
        idx = torch.arange(s.rows)[:, None] + torch.arange(s.cols)[None, :] * s.ld
        mat = flat[idx].long()
        return mat.t() if s.op == _lib.OP_T else mat

    op_a, op_b = read(a_flat, plan.a), read(b_flat, plan.b)
    assert op_a.shape == (plan.m, plan.k) and op_b.shape == (plan.k, plan.n), "plan shapes disagree"
    d = op_a @ op_b
    idx = torch.arange(plan.d.rows)[:, None] + torch.arange(plan.d.cols)[None, :] * plan.d.ld
    d_flat[idx.reshape(-1)] = d.reshape(-1).to(d_flat.dtype)
