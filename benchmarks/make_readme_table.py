"""Markdown results section from a results folder (the README's tables are pasted from this).

    python -m benchmarks.make_readme_table benchmarks/results/cpu > results.md
    python -m benchmarks.make_readme_table OUT --out summary.md --csv all_rows.csv

Reads every gemm.csv, accuracy.csv, e2e.csv, host.csv, kernels.csv and stream.csv under the folder (any depth) and prints, per
file, the environment it was measured in and its tables. Every number comes from those rows;
nothing is typed in by hand. ``--csv`` also writes all rows of all files as one long CSV.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

KINDS = ("gemm", "accuracy", "e2e", "host", "kernels", "stream")


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _env_line(rows: list[dict], source: str) -> str:
    r = rows[0]
    load = f", load avg {r['load_avg']}" if r.get("load_avg") else ""
    cuda = f", CUDA {r['cuda']}" if r.get("cuda") else ""
    return (f"*{r.get('device_name', '?')}; torch {r.get('torch', '?')}{cuda}, triton {r.get('triton') or '-'}; "
            f"commit {r.get('git_commit') or '?'}; {r.get('timestamp', '?')}{load}; from `{source}`.*")


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _not_run(rows: list[dict]) -> str:
    out = sorted({(r["variant"], r["status"]) for r in rows if r.get("status") not in ("ok", "") and not r.get("M")
                  and not r.get("case")})
    if not out:
        return ""
    return "\nNot measured here: " + "; ".join(f"`{v}` ({s})" for v, s in out) + ".\n"


def gemm_section(rows: list[dict], source: str) -> str:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("bench") in ("gemm", "raw-kernel")]
    parts = [_env_line(rows, source), ""]
    parts.append("Speedup over bf16 `F.linear` at each token count M (median; `raw-*` are bare kernels "
                 "on pre-quantized operands, no activation quantization). bf16 row: its median ms.\n")
    shapes = sorted({(int(r["K"]), int(r["N"])) for r in ok})
    for k, n in shapes:
        sel = [r for r in ok if (int(r["K"]), int(r["N"])) == (k, n)]
        ms = sorted({int(r["M"]) for r in sel})
        names = list(dict.fromkeys(r["variant"] for r in sel))
        body = []
        for name in names:
            cells = []
            for m in ms:
                r = next((r for r in sel if r["variant"] == name and int(r["M"]) == m), None)
                if r is None:
                    cells.append("")
                elif name == "bf16":
                    cells.append(f"{_num(r['median_ms']):.3g} ms")
                else:
                    sp = _num(r.get("speedup_vs_bf16"))
                    pct = _num(r.get("pct_of_peak"))
                    cells.append("" if sp is None else f"{sp:.2f}x" + (f" ({pct:.0f}%)" if pct is not None else ""))
            body.append([f"`{name}`"] + cells)
        parts.append(f"**K={k}, N={n}** (cells: speedup, and % of the device's peak where known)\n")
        parts.append(_table(["variant"] + [f"M={m}" for m in ms], body))
        parts.append("")
    aq = [r for r in rows if r.get("status") == "ok" and r.get("bench") == "act-quant"]
    if aq:
        body = [[f"`{r['variant']}`", r["M"], r["K"], f"{_num(r['median_ms']):.4g}", f"{_num(r['gbps']):.1f}"]
                for r in aq]
        parts.append("Activation quantization alone (`qkernels.ops.quantize_per_token`):\n")
        parts.append(_table(["op", "M", "K", "median ms", "GB/s"], body))
    parts.append(_not_run(rows))
    return "\n".join(parts)


def accuracy_section(rows: list[dict], source: str) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    cases = list(dict.fromkeys(r["case"] for r in ok))
    names = list(dict.fromkeys(r["variant"] for r in ok))
    body = []
    for name in names:
        cells = []
        for c in cases:
            f64 = next((r for r in ok if r["variant"] == name and r["case"] == c and r["reference"] == "float64"), None)
            b16 = next((r for r in ok if r["variant"] == name and r["case"] == c and r["reference"] == "bf16"), None)
            cell = "" if f64 is None else f"{_num(f64['sqnr_db']):.1f}"
            if b16 is not None:
                cell += f" / {_num(b16['sqnr_db']):.1f}"
            cells.append(cell)
        body.append([f"`{name}`"] + cells)
    shapes = {r["case"]: r.get("shape", "") for r in ok}
    parts = [_env_line(rows, source), "",
             "SQNR in dB against float64 / against the bf16 result (higher is better; 40 dB = 1% relative "
             "error). Demo weights are seeded random: this measures arithmetic, not image quality.\n",
             _table(["variant"] + cases, body), "",
             "Cases: " + "; ".join(f"{c}: {s}" for c, s in shapes.items()) + ".", _not_run(rows)]
    return "\n".join(parts)


def e2e_section(rows: list[dict], source: str) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    body = []
    for r in ok:
        sp = _num(r.get("speedup_vs_bf16"))
        body.append([
            f"`{r['variant']}`", f"{_num(r['median_ms']):.1f}", "" if sp is None else f"{sp:.2f}x",
            f"{_num(r['weight_bytes']) / 1e9:.2f}", f"{_num(r['peak_mem_bytes']) / 1e9:.2f}",
            f"{_num(r['rel_error_vs_bf16']):.2e}" if _num(r.get("rel_error_vs_bf16")) is not None else "",
            f"{_num(r['ms_60_blocks_extrapolated']):.0f}", f"{_num(r['weight_gb_60_blocks_extrapolated']):.1f}",
            f"{_num(r['load_s']):.2f}" if _num(r.get("load_s")) is not None else "",
        ])
    head = ok[0] if ok else (rows[0] if rows else {})
    what = (f"`{head.get('size')}` demo transformer, {head.get('blocks')} blocks, {head.get('height')}x"
            f"{head.get('width')}{' + reference' if head.get('reference') == 'True' else ''}, "
            f"{head.get('tokens')} tokens; peak memory by {head.get('mem_method')}.")
    load_notes = sorted({r.get("load_status", "") for r in ok if r.get("load_status") not in ("ok", "", None)})
    parts = [_env_line(rows, source), "", what + "\n",
             _table(["variant", "forward ms", "speedup", "weights GB", "peak GB", "rel. err vs bf16",
                     "60 blocks ms (extrapolated)", "60 blocks weights GB (extrapolated)", "load s"], body),
             ""]
    if load_notes:
        parts.append("Load column: " + "; ".join(load_notes) + ".")
    parts.append(_not_run(rows))
    return "\n".join(parts)


def host_section(rows: list[dict], source: str) -> str:
    blocks = [r for r in rows if r.get("status") == "ok" and r.get("activation") == "block"]
    ok = [r for r in rows if r.get("status") == "ok" and r.get("activation") != "block"]
    ms = sorted({int(r["M"]) for r in ok if r["variant"] != "torch-op"})
    keys = list(dict.fromkeys((r["variant"], r["activation"]) for r in ok if r["variant"] != "torch-op"))
    simulated = any(r.get("mode") == "simulated-driver" for r in ok)
    body = []
    for name, act in keys:
        cells = []
        for m in ms:
            r = next((r for r in ok if (r["variant"], r["activation"]) == (name, act) and int(r["M"]) == m), None)
            if r is None:
                cells.append("")
                continue
            cell = f"{_num(r['host_us']):.1f}"
            if _num(r.get("wall_us")) is not None:
                cell += f" / {_num(r['wall_us']):.1f}"
            if r.get("launches"):
                cell += f" ({r['launches']} launch{'es' if r['launches'] != '1' else ''})"
            cells.append(cell)
        body.append([f"`{name}`", act] + cells)
    shapes = sorted({(r["K"], r["N"]) for r in ok if r["variant"] != "torch-op"})
    what = ("Host microseconds per forward, Triton's CUDA code path under the simulated driver "
            "(kernels compiled for sm90, launches recorded, not run): the host cost minus the driver's "
            "own launch." if simulated else
            "Microseconds per forward: host (issuing the calls) / wall (with the final synchronize).")
    parts = [_env_line(rows, source), "", what + f" K x N = {', '.join(f'{k}x{n}' for k, n in shapes)}.\n",
             _table(["variant", "activation"] + [f"M={m}" for m in ms], body)]
    ref = next((r for r in ok if r["variant"] == "torch-op"), None)
    if ref is not None:
        parts.append(f"\nOne `F.linear` at 1x64x64 on the same CPU: {_num(ref['host_us']):.1f} us.")
    if blocks:
        wall = any(_num(r.get("wall_us")) is not None for r in blocks)
        parts += ["", f"Per Qwen-Image block, {blocks[0]['M']} tokens ({blocks[0].get('note') or ''}):", "",
                  _table(["variant", "host us" + (" / wall us" if wall else "")],
                         [[f"`{r['variant']}`", f"{_num(r['host_us']):.1f}" +
                           (f" / {_num(r['wall_us']):.1f}" if _num(r.get("wall_us")) is not None else "")]
                          for r in blocks])]
    parts.append(_not_run(rows))
    return "\n".join(parts)


def stream_section(rows: list[dict], source: str) -> str:
    """One line per (variant, quantized backend, size, VLM refresh): the moving scene's steady
    frames/s (and against the plain bf16 loop), its latency, the still scene's frames/s and skip
    rate, the peak memory."""
    ok = [r for r in rows if r.get("status") == "ok"]

    def line(r):
        return (r["variant"], r.get("quant_backend") or "", r["size"], r.get("vlm_every") or "",
                r.get("vlm_threshold") or "")

    body = []
    for key in dict.fromkeys(map(line, ok)):
        scenes = {r["scene"]: r for r in ok if line(r) == key}
        mv, st = scenes.get("moving"), scenes.get("still")
        vs = _num(mv.get("fps_vs_plain_bf16")) if mv else None
        vlm = f"every {key[3] or '-'}" + (f", < {key[4]}" if _num(key[4]) else "")  # 0: no similarity test
        body.append([
            f"`{key[0]}`", key[1] or "-", f"{key[2]}^2", vlm,
            f"{_num(mv['fps']):.2f}" + (f" ({vs:.2f}x)" if vs is not None else "") if mv else "",
            f"{_num(mv['latency_p50_ms']):.0f} / {_num(mv['latency_p95_ms']):.0f}" if mv else "",
            f"{_num(st['fps']):.2f}, {_num(st['skip_rate']):.0%}" if st else "",
            f"{max(_num(r['peak_gb']) or 0 for r in scenes.values()):.1f}",
        ])
    head = ok[0] if ok else (rows[0] if rows else {})
    what = (f"Stream mode, {head.get('steps')} steps, a {head.get('camera_fps')} fps synthetic camera; frames/s is "
            "the steady rate a viewer sees, latency from frame in to result out.\n")
    parts = [_env_line(rows, source), "", what,
             _table(["variant", "quantized backend", "size", "VLM embedding", "moving: frames/s (x plain bf16)",
                     "p50 / p95 ms", "still: frames/s, skipped", "peak GB"], body)]
    bad = sorted({(r["variant"], r["status"]) for r in rows if r.get("status") not in ("ok", "")})
    if bad:
        parts.append("\nNot measured here: " + "; ".join(f"`{v}` ({s})" for v, s in bad) + ".")
    return "\n".join(parts)


def kernels_section(rows: list[dict], source: str) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    body = [[f"`{r['kernel']}`", r["M"], f"{r['K']}x{r['N']}", f"{r['block_m']}x{r['block_n']}x{r['block_k']}",
             r["num_stages"], r["num_warps"], f"{_num(r['shared_bytes']) / 1024:.0f}", r["registers"],
             f"{r['spill_store_bytes']}/{r['spill_load_bytes']}", r["blocks_per_sm"],
             (f"wgmma {r.get('wgmma_shape', '')}, {r.get('wgmma_in_flight', '')} in flight" if _num(r["wgmma"])
              else "mma.sync"), r["ptx_sha"], r.get("note") or ""] for r in ok]
    parts = [_env_line(rows, source), "",
             "Each autotune config as compiled for sm90 (Triton on the CPU; ptxas -v): not timings.\n",
             _table(["kernel", "M", "KxN", "tile", "stages", "warps", "smem KiB", "regs", "spills st/ld",
                     "blocks/SM", "MMA", "PTX sha", "note"], body)]
    bad = [r for r in rows if r.get("status") != "ok"]
    if bad:
        parts.append("\nDid not compile: " + "; ".join(f"`{r['kernel']}` {r['block_m']}x{r['block_n']}x{r['block_k']} "
                                                       f"({r['status']})" for r in bad) + ".")
    return "\n".join(parts)


SECTIONS = {"gemm": ("GEMM", gemm_section), "accuracy": ("Accuracy", accuracy_section),
            "e2e": ("End to end", e2e_section), "host": ("Host overhead", host_section),
            "kernels": ("Compiled kernels", kernels_section), "stream": ("Stream", stream_section)}


def find(folder: Path) -> list[tuple[str, Path]]:
    found = []
    for kind in KINDS:
        for p in sorted(folder.rglob(f"{kind}.csv")):
            found.append((kind, p))
    return found


def render(folder: Path) -> str:
    out = ["## Results", ""]
    for kind, path in find(folder):
        rows = _read(path)
        if not rows:
            continue
        title, fn = SECTIONS[kind]
        rel = path.relative_to(folder)
        out += [f"### {title} ({rel.parent if str(rel.parent) != '.' else kind})", "", fn(rows, str(rel)), ""]
    if len(out) == 2:
        out.append(f"(no gemm.csv, accuracy.csv, e2e.csv, host.csv, kernels.csv or stream.csv under {folder})")
    return "\n".join(out).rstrip() + "\n"


def combined_csv(folder: Path, dest: Path) -> int:
    rows, cols = [], ["source"]
    for _, path in find(folder):
        for r in _read(path):
            rows.append({"source": str(path.relative_to(folder)), **r})
            cols += [c for c in r if c not in cols]
    with open(dest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.make_readme_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a results folder (searched recursively)")
    p.add_argument("--out", default=None, help="write the Markdown here (default: stdout)")
    p.add_argument("--csv", default=None, help="also write every row of every file as one CSV")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        return 2
    text = render(folder)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    if args.csv:
        combined_csv(folder, Path(args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
