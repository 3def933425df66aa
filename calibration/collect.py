"""Collect activation statistics of every ``nn.Linear`` of a model with forward hooks.

    stats = collect(model, batches)                 # batches: kwargs dicts, arg tuples or tensors
    stats.save("stats.safetensors")

    with ActivationCollector(model, timestep_buckets=4) as c:   # drive the model yourself
        for t, inputs in ...:
            c.set_timestep(t); model(**inputs)
    stats = c.stats()

The hooks never synchronize with the host: every statistic is reduced on the device with
``torch.maximum`` and read back once, by :meth:`ActivationCollector.stats`.

CLI (without ``--model``: the built-in demo transformer with seeded random weights and generated
inputs; its statistics describe that random model only):

    python -m calibration.collect --samples 8 --steps 8 --out stats.safetensors
    python -m calibration.collect --model <diffusers dir> --samples 16 --out stats.safetensors
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from qkernels.capabilities import device_reason
from qkernels.errors import CalibrationError, QKernelsError

from .stats import ActivationStats, LayerStats

__all__ = ["ActivationCollector", "collect", "flow_matching_batches", "main"]

# |x| elements per call the percentile is taken over: kthvalue on 65536 fp32 values is ~0.1 ms on
# an H100 and its 99.9th percentile has a standard error of ~0.01% in rank (binomial, n = 65536).
DEFAULT_SUBSAMPLE = 65536
DEFAULT_PERCENTILE = 99.9


class _Accumulator:
    """Running per-layer statistics, all on the layer's device."""

    __slots__ = ("in_features", "channel_amax", "percentile", "by_timestep", "calls", "tokens")

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.channel_amax: torch.Tensor | None = None
        self.percentile: torch.Tensor | None = None
        self.by_timestep: torch.Tensor | None = None
        self.calls = 0
        self.tokens = 0


class ActivationCollector:
    """Context manager: hooks on every ``nn.Linear`` of ``model`` record its input's statistics.

    ``percentile``: q of the clipping statistic, e.g. 99.9 (per call, on a random subsample of
    ``subsample`` elements; across calls the maximum is kept, so a static scale from it clips at
    most about (100 - q)% of the elements of any one call).
    ``timestep_buckets``: B > 0 also records max |x| per bucket of the timestep set with
    :meth:`set_timestep`, buckets equally spaced over ``timestep_range``.
    ``layers``: optional predicate on a module name; default all Linear layers.
    """

    def __init__(self, model: nn.Module, *, percentile: float = DEFAULT_PERCENTILE,
                 subsample: int = DEFAULT_SUBSAMPLE, timestep_buckets: int = 0,
                 timestep_range: tuple[float, float] = (0.0, 1.0),
                 layers: Callable[[str], bool] | None = None, seed: int = 0):
        if not 0 < percentile <= 100:
            raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
        if subsample < 1:
            raise CalibrationError(f"subsample must be >= 1, got {subsample}")
        if timestep_buckets < 0 or (timestep_buckets and not timestep_range[1] > timestep_range[0]):
            raise CalibrationError(f"need timestep_buckets >= 0 and an increasing timestep_range, "
                                   f"got {timestep_buckets}, {timestep_range}")
        self.model = model
        self.percentile_q = float(percentile)
        self.subsample = int(subsample)
        self.timestep_buckets = int(timestep_buckets)
        self.timestep_range = (float(timestep_range[0]), float(timestep_range[1]))
        self.seed = seed
        self._bucket: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._acc: dict[str, _Accumulator] = {}
        self._handles: list = []
        self.forward_passes = 0
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and (layers is None or layers(name)):
                self._acc[name] = _Accumulator(module.in_features)
        self._modules = {name: module for name, module in model.named_modules() if name in self._acc}

    # ---------------------------------------------------------------- hooks

    def __enter__(self) -> "ActivationCollector":
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def set_timestep(self, t: float | None) -> None:
        """The timestep (a Python float, in ``timestep_range``) of the forward passes that follow."""
        if t is None or not self.timestep_buckets:
            self._bucket = None
            return
        lo, hi = self.timestep_range
        b = math.floor((float(t) - lo) / (hi - lo) * self.timestep_buckets)
        self._bucket = min(max(b, 0), self.timestep_buckets - 1)

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return g

    def _make_hook(self, name: str):
        acc = self._acc[name]

        @torch.no_grad()
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if x is None or x.numel() == 0:
                return None
            x2 = x.detach().reshape(-1, acc.in_features)
            # max(amax, -amin) instead of x.abs().amax(): no full-size |x| temporary (393 MB at
            # 16k tokens x 12288). Both propagate NaN, so a non-finite input is caught in stats().
            ch = torch.maximum(x2.amax(dim=0), x2.amin(dim=0).neg()).float()
            flat = x2.reshape(-1)
            n = flat.numel()
            if n > self.subsample:
                idx = torch.randint(n, (self.subsample,), device=flat.device, generator=self._generator(flat.device))
                flat = flat[idx]
                n = self.subsample
            k = max(1, math.ceil(self.percentile_q / 100.0 * n))
            p = flat.float().abs().kthvalue(k).values
            if acc.channel_amax is None:
                acc.channel_amax, acc.percentile = ch, p
            else:
                acc.channel_amax = torch.maximum(acc.channel_amax, ch)
                acc.percentile = torch.maximum(acc.percentile, p)
            if self._bucket is not None:
                if acc.by_timestep is None:
                    acc.by_timestep = torch.full((self.timestep_buckets,), -1.0, device=ch.device)
                acc.by_timestep[self._bucket] = torch.maximum(acc.by_timestep[self._bucket], ch.max())
            acc.calls += 1
            acc.tokens += x2.shape[0]
            return None

        return hook

    # ---------------------------------------------------------------- result

    def stats(self, **metadata: Any) -> ActivationStats:
        """The statistics so far, on the CPU. Raises CalibrationError if no input was seen or a
        statistic is non-finite (naming the layer)."""
        seen = {n: a for n, a in self._acc.items() if a.calls}
        if not seen:
            raise CalibrationError(
                "no calibration data: no Linear layer received an input (the sample set is empty, "
                "or the model has no nn.Linear)")
        layers = {}
        for name, a in seen.items():
            ch = a.channel_amax.cpu()
            layers[name] = LayerStats(
                name, ch, ch.max(), a.percentile.cpu(), self.percentile_q,
                None if a.by_timestep is None else a.by_timestep.cpu(), a.calls, a.tokens)
        meta = dict(
            forward_passes=self.forward_passes,
            percentile_q=self.percentile_q,
            subsample=self.subsample,
            layers_without_input=[n for n, a in self._acc.items() if not a.calls],
        )
        if self.timestep_buckets:
            lo, hi = self.timestep_range
            meta["timestep_bucket_edges"] = [lo + (hi - lo) * i / self.timestep_buckets
                                             for i in range(self.timestep_buckets + 1)]
        meta.update(metadata)
        stats = ActivationStats(layers, meta)
        stats.check()
        return stats


def call_model(model: nn.Module, batch: Any):
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _timestep_of(batch: Any) -> float | None:
    if isinstance(batch, dict) and "timestep" in batch:
        t = batch["timestep"]
        # One host read per forward pass (not per layer), only when timestep buckets are on.
        return float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)
    return None


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable[Any], *, percentile: float = DEFAULT_PERCENTILE,
            subsample: int = DEFAULT_SUBSAMPLE, timestep_buckets: int = 0,
            timestep_range: tuple[float, float] = (0.0, 1.0),
            timestep_fn: Callable[[Any], float | None] | None = None,
            layers: Callable[[str], bool] | None = None, progress: bool = True,
            total: int | None = None, metadata: dict | None = None) -> ActivationStats:
    """Run ``model`` on every batch (a kwargs dict, an args tuple, or one tensor) and return the
    statistics of its Linear layers' inputs. ``timestep_fn(batch)`` gives a batch's timestep for
    the per-timestep buckets (default: a dict batch's ``timestep`` entry)."""
    from tqdm.auto import tqdm

    collector = ActivationCollector(model, percentile=percentile, subsample=subsample,
                                    timestep_buckets=timestep_buckets, timestep_range=timestep_range,
                                    layers=layers)
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    get_t = timestep_fn or _timestep_of
    with collector:
        for batch in tqdm(batches, total=total, disable=not progress, desc="calibrating", unit="batch"):
            if timestep_buckets:
                collector.set_timestep(get_t(batch))
            call_model(model, batch)
            collector.forward_passes += 1
    if collector.forward_passes == 0:
        raise CalibrationError("the calibration sample set is empty: no batch was given (samples must be >= 1)")
    meta = {"model_class": type(model).__name__, **(metadata or {})}
    return collector.stats(**meta)


# --------------------------------------------------------------------------------------------
# Generated inputs for a Qwen-Image-style transformer over a flow-matching schedule


def flow_matching_timesteps(steps: int) -> list[float]:
    """Sigmas of diffusers' FlowMatchEulerDiscreteScheduler (shift 1.0) for ``steps`` steps: the
    values in [0, 1] the Qwen-Image pipeline passes as ``timestep`` (its timesteps / 1000)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(steps)
    return [float(t) / 1000.0 for t in sched.timesteps]


def flow_matching_batches(model: nn.Module, *, samples: int, steps: int, image_hw=(16, 16),
                          text_tokens: int = 32, seed: int = 0):
    """``samples * steps`` input dicts for ``model`` (a QwenImageTransformer2DModel): per sample a
    seeded clean latent x0, noise e and text embedding; per step sigma the noisy latent
    ``(1 - sigma) x0 + sigma e`` at timestep sigma, as a flow-matching sampler feeds it."""
    from qpipeline.demo import demo_inputs

    sigmas = flow_matching_timesteps(steps)

    class _Batches:
        def __len__(self):
            return samples * len(sigmas)

        def __iter__(self):
            for i in range(samples):
                clean = demo_inputs(model, image_hw=image_hw, text_tokens=text_tokens, seed=seed + 2 * i)
                noise = demo_inputs(model, image_hw=image_hw, text_tokens=text_tokens,
                                    seed=seed + 2 * i + 1)["hidden_states"]
                x0 = clean["hidden_states"]
                for sigma in sigmas:
                    batch = dict(clean)
                    batch["hidden_states"] = ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)
                    batch["timestep"] = torch.full_like(clean["timestep"], sigma)
                    yield batch

    return _Batches()


def _load_local_transformer(path: str, dtype: torch.dtype, device: str):
    import json
    import os

    import diffusers

    sub = "transformer" if os.path.isfile(os.path.join(path, "transformer", "config.json")) else None
    cfg_path = os.path.join(path, sub or "", "config.json")
    if not os.path.isfile(cfg_path):
        raise CalibrationError(f"{path} is not a diffusers model folder: no transformer/config.json or config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{cfg_path} is not readable JSON ({exc})") from None
    cls_name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    # only a diffusers model class, by name: a config names data, never code to run
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) and cls_name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise CalibrationError(f"{cfg_path}: unknown model class {cls_name!r} for this diffusers version")
    try:
        model = cls.from_pretrained(path, subfolder=sub, torch_dtype=dtype, local_files_only=True,
                                    use_safetensors=True)  # never a pickle (.bin) fallback
    except Exception as exc:  # diffusers' own errors for a malformed folder: one line, not a traceback
        raise CalibrationError(f"cannot load {cls_name} from {path}: {type(exc).__name__}: {exc}") from None
    return model.to(device).eval().requires_grad_(False)


def _outlier_ratio(s: LayerStats) -> float:
    med = s.channel_amax.median()
    return float(s.amax / med) if med > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calibration.collect", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local diffusers model folder (transformer/ subfolder or a transformer "
                                   "folder); default: the built-in demo transformer (seeded random weights)")
    p.add_argument("--demo-size", default="small", help="demo transformer size without --model (tiny, small)")
    p.add_argument("--samples", type=int, default=4, help="generated (latent, text) samples (default 4)")
    p.add_argument("--steps", type=int, default=8, help="flow-matching timesteps per sample (default 8)")
    p.add_argument("--image-hw", type=int, nargs=2, default=(16, 16), metavar=("H", "W"),
                   help="latent patches per side (default 16 16 = 256 tokens)")
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE)
    p.add_argument("--timestep-buckets", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise CalibrationError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1)") from None
        if reason := device_reason(device):
            raise CalibrationError(f"--device {args.device}: {reason}")
        if os.path.isdir(args.out):
            raise CalibrationError(f"--out {args.out} is a folder; give a file name such as stats.safetensors")
        anc = os.path.dirname(os.path.abspath(args.out))
        while not os.path.exists(anc):
            anc = os.path.dirname(anc)
        if not os.path.isdir(anc) or not os.access(anc, os.W_OK):  # before collecting, not after
            raise CalibrationError(f"--out {args.out}: {anc} is {'not a folder' if not os.path.isdir(anc) else 'not writable'}")
        if args.samples < 1 or args.steps < 1:
            raise CalibrationError(f"--samples and --steps must be >= 1 (got {args.samples}, {args.steps}): "
                                   f"an empty sample set calibrates nothing")
        if args.model:
            model = _load_local_transformer(args.model, torch.bfloat16, args.device)
            source = args.model
            if type(model).__name__ != "QwenImageTransformer2DModel":
                raise CalibrationError(
                    f"generated inputs exist for QwenImageTransformer2DModel only, not {type(model).__name__}; "
                    f"call calibration.collect.collect(model, batches) with the model's own inputs")
        else:
            from qpipeline.demo import build_demo_transformer

            model = build_demo_transformer(args.demo_size, device=args.device)
            source = f"demo:{args.demo_size} (seeded random weights)"
        batches = flow_matching_batches(model, samples=args.samples, steps=args.steps,
                                        image_hw=tuple(args.image_hw), text_tokens=args.text_tokens, seed=args.seed)
        t0 = time.perf_counter()
        stats = collect(model, batches, percentile=args.percentile, timestep_buckets=args.timestep_buckets,
                        progress=not args.no_progress,
                        metadata=dict(source=source, samples=args.samples, steps=args.steps,
                                      image_hw=list(args.image_hw), text_tokens=args.text_tokens,
                                      seed=args.seed, timesteps=flow_matching_timesteps(args.steps)))
        stats.save(args.out)
    except QKernelsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the --out path (permissions, a full disk): one line, not a traceback
        print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 2
    worst = sorted(stats.layers.values(), key=_outlier_ratio, reverse=True)[:5]
    print(f"{len(stats)} layers, {stats.metadata['forward_passes']} forward passes in "
          f"{time.perf_counter() - t0:.1f} s -> {args.out}")
    print("largest outlier ratio (amax / median channel amax):")
    for s in worst:
        print(f"  {s.name:60s} amax {float(s.amax):9.3g}  p{s.percentile_q:g} {float(s.percentile):9.3g}  "
              f"ratio {_outlier_ratio(s):7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
