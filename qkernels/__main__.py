"""`python -m qkernels`: the backend table for this machine."""

from __future__ import annotations

import argparse
import sys

import torch

from . import __version__, list_backends
from .capabilities import as_device, device_reason
from .errors import QKernelsError
from .registry import resolve_backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkernels", description=__doc__)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    args = parser.parse_args(argv)
    try:
        device = as_device(args.device)
        reason = device_reason(device)
        if reason:  # a table of "available" CUDA backends on a machine without CUDA would be a lie
            raise QKernelsError(f"--device {args.device}: {reason}")
        rows = list_backends(device)
    except (QKernelsError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else "no GPU"
    print(f"qkernels {__version__}  torch {torch.__version__}  device {device} ({gpu})")
    width = max(len(r.name) for r in rows)
    print(f"{'backend':<{width}}  {'format':<9}  available  reason")
    for r in rows:
        print(f"{r.name:<{width}}  {r.format:<9}  {'yes' if r.available else 'no':<9}  {r.reason}")
    try:
        print(f"auto -> {resolve_backend('auto', device).name}")
    except QKernelsError as exc:
        print(f"auto -> none ({exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
