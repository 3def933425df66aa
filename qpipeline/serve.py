"""``python -m qpipeline.serve``: the edit server (``qpipeline.server``) over one engine.

    python -m qpipeline.serve --model Qwen-Image-Edit-2511/ --quantized q/ --lora lightning.safetensors
    python -m qpipeline.serve --demo            # the tiny built-in pipeline, random weights, no download

Binds 127.0.0.1 unless ``--host`` says otherwise; ``--port 0`` takes a free port. Prints
``serving on http://HOST:PORT`` once the model is loaded and the socket listens.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile

from qkernels.errors import QKernelsError


def build_parser() -> argparse.ArgumentParser:
    from .server import ServerConfig

    d = ServerConfig()
    p = argparse.ArgumentParser(prog="python -m qpipeline.serve", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8200, help="default 8200; 0: any free port")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help=f"waiting requests (default {d.max_queue})")
    p.add_argument("--timeout", type=float, default=d.timeout_s,
                   help=f"seconds from arrival to answer, else 504 (default {d.timeout_s:g})")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (repeatable; '*' for any)")
    p.add_argument("--max-image-mb", type=float, default=d.max_image_bytes / 2**20,
                   help=f"decoded bytes per image (default {d.max_image_bytes / 2**20:g} MiB)")
    p.add_argument("--max-pixels", type=int, default=d.max_image_pixels,
                   help=f"pixels per input image (default {d.max_image_pixels})")
    p.add_argument("--max-images", type=int, default=d.max_images, help=f"default {d.max_images}")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"default {d.max_steps}")
    p.add_argument("--default-size", type=int, default=None,
                   help="output side when a request gives none (default: the pipeline's ~1 MP; --demo: 64)")
    p.add_argument("--log-level", default="warning", help="uvicorn's (default warning)")
    r = p.add_argument_group("Ray Serve (--ray: the same app on N replicas, one engine and one GPU each; "
                             "--max-queue is then Ray's queue, per proxy)")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve (the ray extra)")
    r.add_argument("--replicas", type=int, default=1, help="replicas, one engine each (default 1)")
    r.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto': the one running here); default: start a local one")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscale between --min-replicas ...")
    r.add_argument("--max-replicas", type=int, default=None, help="... and --max-replicas")
    r.add_argument("--gpus-per-replica", type=float, default=None,
                   help="default 1 when the cluster has GPUs, else 0; 0.5: two replicas share a GPU")
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags, shared by ``qpipeline.serve`` and ``qpipeline.worker``."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers pipeline folder (Qwen-Image-Edit-2509/2511)")
    src.add_argument("--demo", action="store_true",
                     help="the tiny built-in pipeline with seeded random weights (no download)")
    p.add_argument("--quantized", help="checkpoint folder from qpipeline.quantize / save_quantized")
    p.add_argument("--lora", help="LoRA safetensors (merged at load, or a run-time branch with --quantized)")
    p.add_argument("--backend", default="auto", help="quantization backend (default auto; bf16: none)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--fuse", action="store_true",
                   help="the fused block path for the quantized transformer (norm + modulate + quant in one "
                        "kernel, q|k|v as one GEMM, fused epilogues; qpipeline.blocks)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the transformer's block loop from CUDA graphs (CUDA only; with --fuse the "
                        "webcam stream's fastest mode)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.ray:
        return _main_ray(args)
    try:
        import uvicorn

        from .server import create_app
    except ImportError as e:
        print(f"error: the server needs its extra: pip install 'qkernels[server]' ({e})", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        try:
            engine, default_size = engine_from_args(args, stack)
            config = _config(args, default_size)
            engine.load()
        except (QKernelsError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        app = create_app(engine, config)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                               timeout_graceful_shutdown=10))
        try:
            sock = server.config.bind_socket()
        except (OSError, SystemExit) as e:
            print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
            return 2
        # bind_socket binds but does not listen (the event loop would, later): listen now, so a
        # client that connects on the line below is queued, not refused
        sock.listen(server.config.backlog)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving on http://{shown}:{port} (page /, API docs /docs, {config.max_queue} waiting at most)",
              flush=True)
        if host not in ("127.0.0.1", "::1", "localhost"):
            print(f"note: listening on {host}: anyone who reaches this port can use the engine", flush=True)
        server.run(sockets=[sock])
    return 0


def _config(args, default_size=None):
    from .server import ServerConfig

    return ServerConfig(
        max_queue=args.max_queue, timeout_s=args.timeout, max_image_bytes=int(args.max_image_mb * 2**20),
        max_image_pixels=args.max_pixels, max_images=args.max_images, max_steps=args.max_steps,
        default_size=args.default_size if args.default_size is not None else default_size,
        cors_origins=tuple(args.cors))


def _main_ray(args) -> int:
    try:
        import fastapi  # noqa: F401
        import ray  # noqa: F401
        from ray import serve  # noqa: F401

        from .integrations import ray_serve
    except ImportError as e:
        print(f"error: --ray needs its extra: pip install 'qkernels[ray]' ({e})", file=sys.stderr)
        return 2
    try:
        config = _config(args)
        ray_serve.RaySettings(replicas=args.replicas, min_replicas=args.min_replicas,
                              max_replicas=args.max_replicas, gpus_per_replica=args.gpus_per_replica)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return ray_serve.run(args, config)


def engine_from_args(args, stack: contextlib.ExitStack):
    """(engine, default output side) for ``add_model_args``' flags; not loaded yet. ``--demo``
    saves the tiny pipeline into a temporary folder that ``stack`` removes."""
    from .engine import Engine

    if not args.demo:
        return Engine(args.model, backend=args.backend, quantized=args.quantized, lora=args.lora,
                      device=args.device, **_speed_args(args)), None
    if args.quantized or args.lora:
        raise ValueError("--demo builds its own pipeline; --quantized and --lora need --model")
    from .demo_pipeline import demo_engine, small_vae_references

    folder = tempfile.mkdtemp(prefix="qpipeline-demo-")
    stack.callback(shutil.rmtree, folder, ignore_errors=True)
    # The tiny VAE at the pipeline's ~1 MP reference size costs 5-9 s an image on 2 CPU cores;
    # 64x64 px references keep a demo edit near one second. Output side 64 by default, likewise.
    stack.enter_context(small_vae_references())
    print("demo: the tiny built-in edit pipeline with seeded random weights: its images are noise, "
          "not edits", flush=True)
    return demo_engine(folder, backend=args.backend, device=args.device, **_speed_args(args)), 64


def _speed_args(args) -> dict:
    """The engine's ``fuse`` / ``cuda_graphs`` from ``--fuse`` / ``--cuda-graphs`` (the Engine
    refuses what cannot run: graphs without CUDA, fusing a bf16 model)."""
    return dict(fuse=args.fuse, cuda_graphs=args.cuda_graphs)


if __name__ == "__main__":
    sys.exit(main())
