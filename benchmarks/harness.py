"""Shared benchmark harness: timing, environment record, device peaks, result files, plots.

Every script writes long-format rows (one measurement per row) with the environment repeated in
each row, so one CSV is self-describing: ``<name>.csv``, ``<name>.json`` (``{"env", "rows"}``)
and ``<name>.png`` made from those rows.

Timing: on CUDA ``triton.testing.do_bench`` (it flushes L2 between calls) or CUDA events when
Triton is missing; on CPU ``time.perf_counter`` around each call. Each call takes the next of a
few freshly allocated input buffers, so a cache that still holds the last input is not what is
measured. Median and p20/p80 are reported.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

__all__ = [
    "Timing",
    "bench",
    "n_buffers_for",
    "environment",
    "ENV_COLUMNS",
    "DEVICE_PEAKS",
    "peak_for",
    "percent_of_peak",
    "compare",
    "write_results",
    "save_plot",
    "tensor_bytes",
    "module_bytes",
    "PeakMemory",
    "fmt_status",
    "collect_rows",
]


# --------------------------------------------------------------------------------------------
# timing


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int  # timed calls behind the statistics (do_bench: its own estimate)

    @property
    def spread_ms(self) -> float:
        return self.p80_ms - self.p20_ms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _stats(times_ms: list[float]) -> Timing:
    s = sorted(times_ms)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s))


def bench(
    fn: Callable,
    inputs: Sequence[tuple],
    device: torch.device | str,
    *,
    warmup: int = 3,
    min_reps: int = 5,
    max_reps: int = 200,
    budget_s: float = 1.0,
    use_do_bench: bool = True,
) -> Timing:
    """Time ``fn(*inputs[i])``, cycling over ``inputs`` (fresh buffers) call after call.

    CUDA: ``triton.testing.do_bench`` with warm-up/repetition windows derived from ``budget_s``
    (it clears L2 before each call); without Triton, one CUDA event pair per call. CPU:
    ``perf_counter`` per call, at least ``min_reps`` calls and until ``budget_s`` is spent.
    """
    device = torch.device(device)
    if not inputs:
        raise ValueError("bench needs at least one input tuple")
    state = {"i": 0}

    def step():
        args = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn(*args)

    if device.type == "cuda":
        if use_do_bench:
            try:
                import triton.testing
            except ImportError:
                use_do_bench = False
        if use_do_bench:
            # do_bench sizes its repetitions from a first estimate: rep ms of calls after warmup ms.
            rep_ms = max(25.0, budget_s * 1000 * 0.8)
            med, p20, p80 = triton.testing.do_bench(step, warmup=max(10.0, rep_ms / 4), rep=rep_ms,
                                                    quantiles=[0.5, 0.2, 0.8])
            return Timing(float(med), float(p20), float(p80), -1)
        for _ in range(warmup):
            step()
        _sync(device)
        times = []
        t_end = time.perf_counter() + budget_s
        while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return _stats(times)

    for _ in range(warmup):
        step()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return _stats(times)


def n_buffers_for(bytes_per_input: int, device: torch.device | str, *, max_buffers: int = 8) -> int:
    """How many distinct input buffers to rotate over: enough that together they exceed twice
    the last-level cache (H100: 50 MB L2; CPU: 32 MB assumed), at least 2, at most
    ``max_buffers`` and never more than 1/8 of free GPU memory."""
    device = torch.device(device)
    cache = 2 * 50 * 2**20 if device.type == "cuda" else 2 * 32 * 2**20
    n = max(2, min(max_buffers, math.ceil(cache / max(bytes_per_input, 1))))
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        n = max(1, min(n, free // 8 // max(bytes_per_input, 1)))
    return int(n)


# --------------------------------------------------------------------------------------------
# environment record


# load_avg: the 1-minute load average at the start; on a shared CPU machine a value above its
# thread count means other processes competed for the cores and CPU timings are inflated.
ENV_COLUMNS = ["device", "device_name", "torch", "triton", "cuda", "git_commit", "timestamp", "load_avg"]


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return ""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return ""
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device | str) -> dict:
    """Device, library versions, git commit and UTC timestamp of this run."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = ""
    import qkernels

    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "git_commit": _git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_avg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        # the JSON keeps these too; the CSV keeps ENV_COLUMNS only
        "python": platform.python_version(),
        "qkernels": qkernels.__version__,
        "diffusers": _version("diffusers"),
        "torchao": _version("torchao"),
        "bitsandbytes": _version("bitsandbytes"),
    }


# --------------------------------------------------------------------------------------------
# device peaks (dense, from the vendors' data sheets), in TFLOP/s or TOP/s

# First match on the device name wins, so the PCIe entries precede the generic ones.
DEVICE_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "int8": 1513.0, "fp8": 1513.0}),
    ("H100", {"bf16": 989.0, "int8": 1979.0, "fp8": 1979.0}),  # SXM / HBM3
    ("H200", {"bf16": 989.0, "int8": 1979.0, "fp8": 1979.0}),  # same compute as H100 SXM
    ("A100", {"bf16": 312.0, "int8": 624.0}),  # no fp8 tensor cores
]


def peak_for(device_name: str, kind: str) -> float | None:
    """Peak TFLOP/s (bf16, fp8) or TOP/s (int8) of a device, or None (CPU, unknown GPU)."""
    for key, peaks in DEVICE_PEAKS:
        if key.lower() in device_name.lower():
            return peaks.get(kind)
    return None


def percent_of_peak(tflops: float | None, device_name: str, kind: str) -> float | None:
    peak = peak_for(device_name, kind)
    if peak is None or tflops is None:
        return None
    return 100.0 * tflops / peak


# --------------------------------------------------------------------------------------------
# accuracy metrics


@torch.no_grad()
def compare(y: torch.Tensor, ref: torch.Tensor) -> dict:
    """rel_error (relative Frobenius), sqnr_db (= -20 log10 rel_error) and cosine similarity,
    computed in float64. A non-finite output gives NaN metrics, never a good-looking number."""
    y, ref = y.detach().double().flatten().cpu(), ref.detach().double().flatten().cpu()
    if not torch.isfinite(y).all():
        return {"rel_error": float("nan"), "sqnr_db": float("nan"), "cosine": float("nan")}
    err = (y - ref).norm().item()
    rnorm = ref.norm().item()
    rel = err / rnorm if rnorm > 0 else float("inf")
    sqnr = -20 * math.log10(rel) if rel > 0 else float("inf")
    cos = torch.nn.functional.cosine_similarity(y, ref, dim=0).item()
    return {"rel_error": rel, "sqnr_db": sqnr, "cosine": cos}


# --------------------------------------------------------------------------------------------
# memory


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao) and bitsandbytes'
    Int8Params (int8 data plus its ``SCB`` row scales)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        try:
            names, _ = t.__tensor_flatten__()
            return sum(tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n, None), torch.Tensor))
        except Exception:
            pass
    total = t.numel() * t.element_size()
    scb = getattr(t, "SCB", None)
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    return total


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(t)
    return total


class PeakMemory:
    """Peak memory over a ``with`` block, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` (allocator peak; ``base`` is what was allocated on
    entry). CPU: the process's peak resident set, reset on entry by writing 5 to
    /proc/self/clear_refs (Linux); where that is refused, the ru_maxrss high-water mark, which
    only moves when a block exceeds every earlier peak (``method`` says which was used).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak = self.base = 0
        self.method = ""

    @staticmethod
    def _vm(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(field)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._vm("VmRSS")
            self.method = "VmHWM after clear_refs"
        except OSError:
            import resource

            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss delta"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            self.peak = self._vm("VmHWM")
        else:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False


# --------------------------------------------------------------------------------------------
# result files


def collect_rows(run: Callable, args, name: str, finish: Callable | None = None) -> tuple[list[dict], bool]:
    """``run(args, rows)`` appending to ``rows``; returns (rows, interrupted). A SIGINT (Ctrl-C, or
    the GPU suite's per-step time limit) keeps the rows measured so far, so they are still
    written; ``finish(rows)`` (derived columns, e.g. speedups) runs either way."""
    rows: list[dict] = []
    interrupted = False

    def first_sigint(signum, frame):
        # `timeout` signals the child and then its process group: take the first, ignore the rest.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first_sigint)
    try:
        run(args, rows)
    except KeyboardInterrupt:
        interrupted = True
        print(f"[{name}] interrupted: writing the {len(rows)} rows measured so far", flush=True)
    finally:
        if not interrupted:
            signal.signal(signal.SIGINT, previous)
    if finish is not None:
        finish(rows)
    return rows, interrupted


def fmt_status(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"error: {type(exc).__name__}: {msg[:200]}"


def _clean(v):
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return None
        return float(f"{v:.7g}")  # 7 significant digits, whatever the magnitude
    return v


def write_results(out_dir: str | Path, name: str, rows: list[dict], env: dict, columns: list[str]) -> dict:
    """Write ``<name>.csv`` (ENV_COLUMNS + ``columns``, one row per measurement; a missing value
    is an empty cell) and ``<name>.json`` (``{"env": env, "columns", "rows"}``). Returns paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = ENV_COLUMNS + [c for c in columns if c not in ENV_COLUMNS]
    unknown = sorted({k for r in rows for k in r} - set(cols))
    if unknown:
        raise ValueError(f"rows carry columns not declared for {name}: {unknown}")
    full = [{c: _clean(r.get(c, env.get(c))) for c in cols} for r in rows]
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in full:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
    json_path.write_text(json.dumps({"env": env, "columns": cols, "rows": full}, indent=1) + "\n")
    return {"csv": str(csv_path), "json": str(json_path)}


def save_plot(path: str | Path, draw: Callable, *, title: str = "", ncols: int = 1, nplots: int = 1,
              size: tuple[float, float] = (5.0, 3.6)) -> str:
    """Draw ``nplots`` axes with ``draw(axes_list)`` on an Agg figure and save it as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = math.ceil(nplots / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    draw(flat[:nplots])
    for ax in flat[nplots:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def print_rows(rows: Iterable[dict], columns: list[str]) -> None:
    """A compact fixed-width table on stdout (progress for people watching a run)."""
    rows = list(rows)
    if not rows:
        return

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    widths = {c: min(w, 48) for c, w in widths.items()}
    print("  ".join(f"{c:<{widths[c]}}" for c in columns))
    for r in rows:
        print("  ".join(f"{cell(r.get(c))[:48]:<{widths[c]}}" for c in columns), flush=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")
