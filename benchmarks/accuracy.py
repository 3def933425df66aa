"""Accuracy of every backend and peer against the bf16 result and against float64.

    python -m benchmarks.accuracy --out out/acc            # GPU-sized (K=N=3072, 'small' demo model)
    python -m benchmarks.accuracy --quick --out out/acc    # CPU/CI-sized

Cases:
  gaussian     one Linear, X ~ N(0, 1)
  outliers     the same Linear, a few input channels scaled x50 (the activation outliers of
               DiTs that per-token int8 handles worst: each token's scale is set by them)
  dit-block    one block of the Qwen-Image architecture (qpipeline.demo, seeded random weights),
               every Linear of the block quantized, both streams' outputs compared
  transformer  the whole demo transformer, Linears of its blocks quantized (embedders,
               norm_out, proj_out stay bf16, as the qwen-image recipe keeps them)

Rows (``accuracy.csv``): one per (case, variant, reference) with rel_error (relative Frobenius),
sqnr_db and cosine. The demo weights are random: these numbers measure the arithmetic, not
image quality.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn as nn

from . import harness
from .gemm import make_linear
from .variants import all_variants

COLUMNS = ["bench", "case", "variant", "family", "format", "status", "reference", "rel_error", "sqnr_db",
           "cosine", "shape", "note"]

SIZES = {
    # (K, N, M) of the Linear cases, demo size of the block/model cases, model layers
    "full": dict(k=3072, n=3072, m=1024, block="small", model="small", layers=None, image_hw=(32, 32), text=64),
    "quick": dict(k=1024, n=1024, m=256, block="tiny", model="tiny", layers=None, image_hw=(16, 16), text=16),
    "tiny": dict(k=256, n=256, m=64, block="tiny", model="tiny", layers=1, image_hw=(8, 8), text=8),
}
OUTLIER_CHANNELS, OUTLIER_GAIN = 4, 50.0


def _to64(x):
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return x.double()
        if x.is_complex():
            return x.to(torch.complex128)
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_to64(i) for i in x)
    if isinstance(x, dict):
        return {k: _to64(v) for k, v in x.items()}
    return x


def _flat(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.flatten()
    return torch.cat([o.float().flatten() for o in out if isinstance(o, torch.Tensor)])


def _cases(size: dict, device: torch.device):
    """Yield (case, module, call, select, whole_model, shape): ``call(module)`` runs it on the
    case's fixed input; float64 reference is ``call`` on a float64 copy with float64 inputs."""
    from qpipeline.demo import build_demo_transformer, demo_inputs

    k, n, m = size["k"], size["n"], size["m"]
    g = torch.Generator(device="cpu").manual_seed(7)
    lin = make_linear(k, n, device)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    yield "gaussian", nn.Sequential(lin), x, None, False, f"M={m} K={k} N={n}"

    xo = torch.randn(m, k, generator=g)
    idx = torch.randperm(k, generator=g)[:OUTLIER_CHANNELS]
    xo[:, idx] *= OUTLIER_GAIN
    yield "outliers", nn.Sequential(lin), xo.to(device, torch.bfloat16), None, False, \
        f"M={m} K={k} N={n}, {OUTLIER_CHANNELS} channels x{OUTLIER_GAIN:g}"

    model = build_demo_transformer(size["block"], num_layers=1, device=device)
    inputs = demo_inputs(model, image_hw=size["image_hw"], text_tokens=size["text"])
    captured = {}
    hook = model.transformer_blocks[0].register_forward_pre_hook(
        lambda mod, a, kw: captured.update(args=a, kwargs=kw), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    block = model.transformer_blocks[0]
    del model
    block_in = (captured["args"], captured["kwargs"])
    tokens = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    yield "dit-block", block, block_in, None, False, \
        f"demo '{size['block']}' block, hidden {block.img_mod[1].in_features}, {tokens} tokens"

    overrides = {} if size["layers"] is None else {"num_layers": size["layers"]}
    model = build_demo_transformer(size["model"], device=device, **overrides)
    inputs = demo_inputs(model, image_hw=size["image_hw"], text_tokens=size["text"])
    yield "transformer", model, ((), inputs), (lambda name, layer: name.startswith("transformer_blocks.")), True, \
        f"demo '{size['model']}', {model.config.num_layers} blocks, {tokens} tokens"


def _call(module, inp):
    if isinstance(inp, torch.Tensor):
        return module(inp)
    args, kwargs = inp
    out = module(*args, **kwargs)
    return out


def run(args, rows: list[dict] | None = None) -> list[dict]:
    device = torch.device(args.device or harness.default_device())
    size = SIZES["tiny" if args.tiny else "quick" if args.quick else "full"]
    variants = all_variants(device, peers=not args.no_peers, only=args.only.split(",") if args.only else None)
    rows = [] if rows is None else rows
    for v in variants:
        if not v.available:
            rows.append(dict(bench="accuracy", variant=v.name, family=v.family, format=v.format, status=v.status))
            print(f"[accuracy] {v.name}: {v.status}", flush=True)

    with torch.no_grad():
        for case, module, inp, select, whole, shape in _cases(size, device):
            y_bf16 = _flat(_call(module, inp))
            y64 = _flat(_call(copy.deepcopy(module).double(), _to64(inp)))
            for v in variants:
                if not v.available:
                    continue
                base = dict(bench="accuracy", case=case, variant=v.name, family=v.family, format=v.format,
                            shape=shape, note=v.note or None)
                try:
                    if v.name == "bf16":
                        y = y_bf16
                    else:
                        q = v.apply(copy.deepcopy(module), select, whole_model=whole)
                        y = _flat(_call(q, inp))
                        del q
                except Exception as exc:
                    rows.append({**base, "status": harness.fmt_status(exc)})
                    print(f"[accuracy] {case:<12} {v.name:<26} {rows[-1]['status']}", flush=True)
                    continue
                for ref_name, ref in (("bf16", y_bf16), ("float64", y64)):
                    if v.name == "bf16" and ref_name == "bf16":
                        continue
                    metrics = harness.compare(y, ref)
                    rows.append({**base, "status": "ok", "reference": ref_name, **metrics})
                    print(f"[accuracy] {case:<12} {v.name:<26} vs {ref_name:<8} rel {metrics['rel_error']:.3e}  "
                          f"SQNR {metrics['sqnr_db']:6.2f} dB  cos {metrics['cosine']:.6f}", flush=True)
            del module
    return rows


def plot(rows: list[dict], path, env: dict) -> str:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("reference") == "float64"]
    cases = list(dict.fromkeys(r["case"] for r in ok)) or ["none"]
    names = list(dict.fromkeys(r["variant"] for r in ok))

    def draw(axes):
        ax = axes[0]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            vals = [next((r["sqnr_db"] for r in ok if r["case"] == c and r["variant"] == name), 0.0) or 0.0
                    for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=8)
        ax.set_ylabel("SQNR vs float64 (dB, higher is better)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)

    title = f"Accuracy, {env['device_name']}, torch {env['torch']}, {env['timestamp']}"
    return harness.save_plot(path, draw, title=title, size=(8.0, 4.0))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench", help="output folder (accuracy.csv, .json, .png)")
    p.add_argument("--quick", action="store_true", help="CPU/CI-sized: K=N=1024, 'tiny' demo model")
    p.add_argument("--tiny", action="store_true", help="smallest (tests): K=N=256, 1-block tiny model")
    p.add_argument("--device", default=None)
    p.add_argument("--only", default=None, help="comma list of variant names (bf16 always kept)")
    p.add_argument("--no-peers", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or harness.default_device())
    env = harness.environment(device)
    print(f"[accuracy] {env['device_name']}  torch {env['torch']}  commit {env['git_commit']}", flush=True)
    rows, interrupted = harness.collect_rows(run, args, "accuracy")
    paths = harness.write_results(args.out, "accuracy", rows, env, COLUMNS)
    paths["png"] = plot(rows, f"{args.out}/accuracy.png", env)
    print(f"[accuracy] wrote {', '.join(paths.values())}", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
