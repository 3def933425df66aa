"""The edit server's app (``qpipeline.server.create_app``) on Ray Serve replicas, one ``Engine``
each: one front door, many GPUs. Needs the ``ray`` extra (``pip install 'qkernels[ray]'``).

    python -m qpipeline.serve --ray --replicas 2 --model Qwen-Image-Edit-2511/ --quantized q/
    python -m qpipeline.serve --ray --replicas 2 --demo            # the tiny pipeline, on CPU too
    serve run qpipeline.integrations.ray_serve:app_builder model=Qwen-Image-Edit-2511/ quantized=q/ replicas=2

Per replica: one Engine, loaded in the replica's constructor (a quantized checkpoint is read
memory-mapped, so replicas on one host share its page cache); one GPU when the cluster has GPUs
(``ray_actor_options={"num_gpus": 1}``, or ``gpus_per_replica`` < 1 to share one), none otherwise;
one request at a time (``max_ongoing_requests=1``). The rest wait in Ray's bounded queue
(``max_queued_requests``, per proxy); past it Ray answers 429 with ``Retry-After`` (Ray's default is
503: ``BackpressureConfig`` sets 429; tested with Ray 2.60). ``min_replicas`` + ``max_replicas``: Ray's
autoscaling between those bounds instead of a fixed count.

The endpoints, input limits, deadline (``timeout_s``: 504) and ``/health`` are the single server's,
from the same ``create_app``; every answer from a replica names it in ``X-Replica``. ``/health``
is a request like any other: with one request at a time per replica, it waits its turn behind a
running generate. Ray's own probe of a replica (``check_health``, every 10 s) and the proxy's
``/-/healthz`` answer while a job runs (the engine runs on the app's worker thread, not on the
replica's event loop).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

from ..server import ServerConfig

__all__ = ["RaySettings", "EditReplica", "build_app", "app_builder", "replica_name"]

DEPLOYMENT = "EditReplica"


@dataclass(frozen=True)
class RaySettings:
    """How many replicas and what each holds. ``replicas`` is ignored when both autoscaling
    bounds are given. ``gpus_per_replica`` None: 1 when the cluster has GPUs, else 0."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    max_queued_requests: int = 8
    health_check_period_s: float = 10.0

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both --min-replicas and --max-replicas, or neither")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas or \
                self.max_replicas is not None and self.max_replicas < 1:
            raise ValueError(f"autoscaling bounds must satisfy 0 <= min <= max, max >= 1, got "
                             f"{self.min_replicas} and {self.max_replicas}")
        if self.gpus_per_replica is not None and not 0 <= self.gpus_per_replica:
            raise ValueError(f"--gpus-per-replica must be >= 0, got {self.gpus_per_replica}")
        if self.max_queued_requests < 1:
            raise ValueError(f"the queue must hold >= 1 request, got {self.max_queued_requests}")


def replica_name() -> str:
    """This replica's id in Ray Serve (``ReplicaContext.replica_tag``, the replica's unique id)."""
    from ray import serve

    return serve.get_replica_context().replica_tag


class EditReplica:
    """One replica: an Engine (built and loaded here) and the edit app over it. ``engine_spec``
    is a dict of plain values (``_engine_from_spec``), so it travels to the replica by value."""

    def __init__(self, engine_spec: dict, config: ServerConfig):
        self._stack = contextlib.ExitStack()
        self.engine = _engine_from_spec(engine_spec, self._stack)
        self.config = config
        self.engine.load()
        self.name = replica_name()
        self._edit_app = None

    def __serve_build_asgi_app__(self):
        """The app Ray mounts (``serve.ingress()`` with no app: built here, after ``__init__``)."""
        from ..server import create_app

        app = create_app(self.engine, self.config, title="qpipeline edit server (Ray Serve)")
        name = self.name

        @app.middleware("http")
        async def _name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers["X-Replica"] = name
            return response

        self._edit_app = app
        return app

    def check_health(self):
        """Ray's probe: a replica whose engine worker thread died is replaced."""
        service = getattr(getattr(self._edit_app, "state", None), "service", None)
        thread = getattr(service, "_thread", None)
        if thread is not None and not thread.is_alive() and not service.queue._closed:
            raise RuntimeError("the engine worker thread is not running")

    def __del__(self):
        with contextlib.suppress(Exception):
            self.engine.unload()
            self._stack.close()


def _engine_from_spec(spec: dict, stack: contextlib.ExitStack):
    if spec.get("demo"):
        from ..demo_pipeline import demo_engine, small_vae_references

        stack.enter_context(small_vae_references())  # what serve --demo does (this process is the replica's)
        return demo_engine(spec["folder"], backend=spec.get("backend", "auto"), device=spec.get("device"),
                           fuse=spec.get("fuse", False), cuda_graphs=spec.get("cuda_graphs", False))
    from ..engine import Engine

    return Engine(spec["model"], backend=spec.get("backend", "auto"), quantized=spec.get("quantized"),
                  lora=spec.get("lora"), device=spec.get("device"), fuse=spec.get("fuse", False),
                  cuda_graphs=spec.get("cuda_graphs", False))


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def build_app(engine_spec: dict, config: ServerConfig | None = None, settings: RaySettings | None = None):
    """The bound Ray Serve application (``serve.run(build_app(...))``). Call with Ray connected
    (``ray.init``) so that the GPU default sees the cluster."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    config = config or ServerConfig()
    settings = settings or RaySettings()
    gpus = settings.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if _cluster_gpus() > 0 else 0.0  # a CPU-only cluster: replicas need no GPU
    options = dict(
        name=DEPLOYMENT,
        ray_actor_options={"num_gpus": gpus, "num_cpus": settings.cpus_per_replica},
        max_ongoing_requests=1,  # one inference at a time per replica; the engine is not reentrant
        max_queued_requests=settings.max_queued_requests,
        # Ray answers 503 past max_queued_requests unless told otherwise; 429 + Retry-After is what
        # the single server answers for a full queue (one queue's wait at one job's time per slot).
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=max(1, math.ceil(
            settings.max_queued_requests / max(1, settings.max_replicas or settings.replicas)))),
        health_check_period_s=settings.health_check_period_s,
        graceful_shutdown_timeout_s=config.timeout_s,  # a stopping replica lets its request finish
    )
    if settings.min_replicas is not None:
        options["autoscaling_config"] = dict(min_replicas=settings.min_replicas,
                                             max_replicas=settings.max_replicas, target_ongoing_requests=1)
    else:
        options["num_replicas"] = settings.replicas
    deployment = serve.deployment(**options)(serve.ingress()(EditReplica))
    return deployment.bind(engine_spec, config)


def demo_spec(folder, backend: str = "auto", device=None) -> dict:
    """The engine spec of the tiny pipeline, saved into ``folder`` now (by the caller's process,
    once) so that replicas only read it."""
    from pathlib import Path

    from ..demo_pipeline import save_pipeline

    if not (Path(folder) / "model_index.json").is_file():
        save_pipeline(folder)
    return dict(demo=True, folder=str(folder), backend=backend, device=device)


def _flag(args: dict, key: str) -> bool:
    """A ``serve run`` boolean argument: 1/true/yes or 0/false/no (absent: False)."""
    v = str(args.get(key, "0")).strip().lower()
    if v not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"{key} must be 1/true/yes or 0/false/no, got {args[key]!r}")
    return v in ("1", "true", "yes")


def app_builder(args: dict):
    """``serve run qpipeline.integrations.ray_serve:app_builder model=DIR [quantized=DIR] [lora=F]
    [backend=auto] [fuse=1] [cuda_graphs=1] [replicas=N] [max_queue=8] [timeout=300] [gpus_per_replica=1]``
    (or ``demo=DIR`` for the tiny pipeline saved into DIR)."""
    known = {"model", "quantized", "lora", "backend", "device", "demo", "fuse", "cuda_graphs", "replicas",
             "min_replicas", "max_replicas", "gpus_per_replica", "max_queue", "timeout"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}; arguments: {', '.join(sorted(known))}")
    backend = args.get("backend", "auto")
    if "demo" in args:
        spec = demo_spec(args["demo"], backend=backend, device=args.get("device"))
        default_size = 64
    elif "model" in args:
        spec = dict(model=args["model"], quantized=args.get("quantized"), lora=args.get("lora"), backend=backend,
                    device=args.get("device"))
        default_size = None
    else:
        raise ValueError("give model=<pipeline folder> (or demo=<folder>)")
    spec.update(fuse=_flag(args, "fuse"), cuda_graphs=_flag(args, "cuda_graphs"))
    max_queue = int(args.get("max_queue", ServerConfig.max_queue))

    def number(key, kind):
        return kind(args[key]) if key in args else None

    settings = RaySettings(replicas=int(args.get("replicas", 1)), min_replicas=number("min_replicas", int),
                           max_replicas=number("max_replicas", int),
                           gpus_per_replica=number("gpus_per_replica", float), max_queued_requests=max_queue)
    config = ServerConfig(max_queue=max_queue, timeout_s=float(args.get("timeout", ServerConfig.timeout_s)),
                          default_size=default_size)
    return build_app(spec, config, settings)


def spec_from_args(args, stack: contextlib.ExitStack) -> tuple[dict, int | None]:
    """(engine spec, default output side) for ``qpipeline.serve``'s model flags."""
    if not args.demo:
        from pathlib import Path

        from qkernels.errors import CheckpointError

        if not (Path(args.model) / "model_index.json").is_file():  # here, not in every replica
            raise CheckpointError(f"{args.model} is not a diffusers pipeline folder (no model_index.json)")
        return dict(model=str(Path(args.model).resolve()),
                    quantized=str(Path(args.quantized).resolve()) if args.quantized else None,
                    lora=str(Path(args.lora).resolve()) if args.lora else None, backend=args.backend,
                    device=args.device, fuse=args.fuse,
                    cuda_graphs=args.cuda_graphs), None
    if args.quantized or args.lora:
        raise ValueError("--demo builds its own pipeline; --quantized and --lora need --model")
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="qpipeline-demo-")
    stack.callback(shutil.rmtree, folder, ignore_errors=True)
    print("demo: the tiny built-in edit pipeline with seeded random weights: its images are noise, "
          "not edits", flush=True)
    spec = demo_spec(folder, backend=args.backend, device=args.device)
    spec.update(fuse=args.fuse, cuda_graphs=args.cuda_graphs)
    return spec, 64


def run(args, config: ServerConfig) -> int:
    """``python -m qpipeline.serve --ray``: connect (or start a local cluster), deploy, print the
    address, block until SIGINT/SIGTERM, then shut the deployment down."""
    import signal
    import sys
    import threading

    import ray
    from ray import serve

    from qkernels.errors import QKernelsError

    settings = RaySettings(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                           gpus_per_replica=args.gpus_per_replica, max_queued_requests=config.max_queue)
    with contextlib.ExitStack() as stack:
        try:
            spec, default_size = spec_from_args(args, stack)
        except (QKernelsError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if config.default_size is None and default_size is not None:
            config = ServerConfig(**{**asdict(config), "default_size": default_size})
        if args.port == 0:  # the proxy binds a port it is given; pick a free one here
            import socket

            with socket.socket() as sock:
                sock.bind((args.host, 0))
                args.port = sock.getsockname()[1]
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
        stack.callback(ray.shutdown)
        serve.start(http_options={"host": args.host, "port": args.port,
                                  # past the app's own deadline (504), the proxy gives up too
                                  "request_timeout_s": config.timeout_s + 30})
        stack.callback(serve.shutdown)
        serve.run(build_app(spec, config, settings), name="qpipeline", route_prefix="/")
        shown = f"[{args.host}]" if ":" in args.host else args.host
        what = (f"{settings.min_replicas}-{settings.max_replicas} replicas (autoscaling)"
                if settings.min_replicas is not None else f"{settings.replicas} replicas")
        print(f"serving on http://{shown}:{args.port} (Ray Serve, {what}, {config.max_queue} waiting at most "
              f"per proxy)", flush=True)
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
    return 0
