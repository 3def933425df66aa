"""HTTP over one ``Engine``: ``POST /edit``, ``POST /generate``, ``GET /health``, ``/docs`` and a
static page at ``/``. Started by ``python -m qpipeline.serve``; needs the ``server`` extra
(fastapi, uvicorn, python-multipart), which nothing else in the package imports.

    app = create_app(engine, ServerConfig(max_queue=8))      # any ASGI server can run it

One engine, one worker thread, a bounded FIFO queue (``EditService``):

* a request is checked and its images decoded before it queues: bad input never takes a slot
  and gets a 4xx JSON answer ``{"error": "<one line>"}``;
* a full queue answers 429 with ``Retry-After`` (the queue's expected wait, in seconds);
* each request has a deadline (``timeout_s`` from arrival): past it the answer is 504, and a job
  still waiting is dropped; a client that disconnects while its job waits is dropped the same
  way, so the GPU never computes an image nobody will read (a job already running finishes:
  a diffusion step cannot be interrupted, and its result is discarded);
* a generate that raises answers 500 with the message; the worker goes on with the next job.

The service knows nothing of HTTP (``parse_*`` and ``EditService`` take plain values), so a
queue worker or a Ray Serve deployment reuses the same checks, jobs and engine calls.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' `request: Request` annotation
# at run time, and Request is imported inside create_app (the extra is optional).

import asyncio
import base64
import binascii
import collections
import contextlib
import io
import json
import math
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from importlib import resources

from qkernels.errors import QKernelsError

__all__ = ["ServerConfig", "RequestError", "QueueFull", "QueueClosed", "Job", "JobQueue", "EditService", "create_app",
           "parse_edit", "parse_generate", "parse_stream_control", "decode_image"]


@dataclass(frozen=True)
class ServerConfig:
    """Queue and input limits. Shown by ``GET /health`` under ``limits``.

    ``max_image_pixels`` 16.8 MP (4096^2): any camera photo; the pipeline resizes each reference
    to ~1 MP anyway, so a larger input only costs decode time. ``max_size`` 2048 and
    ``max_output_pixels`` 4.2 MP: Qwen-Image is trained up to ~1.6 MP; 4 MP is ~16k image tokens,
    the most one H200 holds with a 20B transformer. ``max_images`` 3: Qwen-Image-Edit-2509/2511
    take 1-3 reference images. ``default_size``: output side when a request names none (None:
    the pipeline's ~1 MP at the last image's aspect).
    """

    max_queue: int = 8
    timeout_s: float = 300.0
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 3
    min_steps: int = 1
    max_steps: int = 50
    min_cfg: float = 1.0
    max_cfg: float = 20.0
    max_prompt_chars: int = 2000
    max_size: int = 2048
    max_output_pixels: int = 2048 * 2048
    default_size: int | None = None
    size_multiple: int = 16  # VAE scale 8 x 2x2 latent packing: the pipeline floors other sizes
    cors_origins: tuple[str, ...] = ()
    disconnect_poll_s: float = 0.1
    # WS /stream: concurrent streams (each holds the engine one forward at a time), their output
    # side and steps (a webcam stream is 1-4 Lightning steps at 256-512 px)
    max_streams: int = 1
    max_stream_size: int = 512
    max_stream_steps: int = 8
    stream_control_timeout_s: float = 30.0

    def __post_init__(self):
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_streams < 0:
            raise ValueError(f"max_streams must be >= 0, got {self.max_streams}")
        if self.default_size is not None and (self.default_size % self.size_multiple
                                              or not self.size_multiple <= self.default_size <= self.max_size):
            raise ValueError(f"default_size must be a multiple of {self.size_multiple} in "
                             f"[{self.size_multiple}, {self.max_size}], got {self.default_size}")

    @property
    def max_body_bytes(self) -> int:
        # every image base64-encoded (4/3) plus 1 MiB for the other fields and multipart framing
        return (self.max_images + 1) * math.ceil(self.max_image_bytes * 4 / 3) + 2**20


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, one_line(message)


class QueueFull(Exception):
    """No free slot: the HTTP side answers 429 with Retry-After."""


class QueueClosed(QueueFull):
    """The service is stopping: 503."""


class Cancelled(Exception):
    """The job's client went away or its deadline passed before it ran."""


def one_line(message) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= 300 else text[:297] + "..."


# --- request parsing (framework-free) ------------------------------------------------------------

_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,", re.IGNORECASE)


def decode_image(data: bytes | str, name: str, config: ServerConfig):
    """A PIL RGB image from raw bytes or base64 text (a ``data:`` URL prefix is accepted).
    Sizes are checked before any pixel is decoded: the header gives width and height."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(data, str):
        text = _DATA_URL.sub("", data.strip(), count=1)
        if len(text) * 3 // 4 > config.max_image_bytes + 2:
            raise RequestError(413, f"{name} is ~{len(text) * 3 // 4} bytes decoded; the limit is "
                                    f"{config.max_image_bytes}")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{name} is not valid base64") from None
    if not data:
        raise RequestError(400, f"{name} is empty")
    if len(data) > config.max_image_bytes:
        raise RequestError(413, f"{name} is {len(data)} bytes; the limit is {config.max_image_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise RequestError(413, f"{name} has more pixels than the limit of {config.max_image_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(400, f"{name} is not an image this server can read (PNG, JPEG, WebP, ...)") from None
    w, h = image.size
    if w * h > config.max_image_pixels:
        raise RequestError(413, f"{name} is {w}x{h} = {w * h} pixels; the limit is {config.max_image_pixels}")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)  # phone photos carry their rotation in EXIF
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        raise RequestError(400, f"{name} is a truncated or corrupt image") from None


def _field(payload: dict, key: str, kind, default, name: str | None = None):
    """``payload[key]`` as ``kind`` (int, float or str); form fields arrive as strings."""
    name = name or key
    if key not in payload or payload[key] is None or payload[key] == "":
        return default
    value = payload[key]
    if kind is str:
        if not isinstance(value, str):
            raise RequestError(422, f"{name} must be a string")
        return value
    if isinstance(value, bool):
        raise RequestError(422, f"{name} must be a number, got {json.dumps(value)}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RequestError(422, f"{name} must be a number, got {value[:40]!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(422, f"{name} must be a finite number, got {json.dumps(value)[:40]}")
    if kind is int:
        if value != int(value):
            raise RequestError(422, f"{name} must be an integer, got {value}")
        return int(value)
    return float(value)


def _in_range(value, lo, hi, name: str):
    if not lo <= value <= hi:
        raise RequestError(422, f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _check_fields(payload: dict, allowed: set[str]) -> None:
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}; fields: {', '.join(sorted(allowed))}")


def _prompt(payload: dict, config: ServerConfig, key: str = "prompt") -> str:
    prompt = _field(payload, key, str, None)
    if prompt is None or not prompt.strip():
        raise RequestError(422, f"{key} must be a non-empty string")
    if len(prompt) > config.max_prompt_chars:
        raise RequestError(422, f"{key} is {len(prompt)} characters; the limit is {config.max_prompt_chars}")
    return prompt


def _size(payload: dict, config: ServerConfig, allow_size: bool) -> tuple[int | None, int | None]:
    side = _field(payload, "size", int, None) if allow_size else None
    width, height = _field(payload, "width", int, None), _field(payload, "height", int, None)
    if (width is None) != (height is None):
        raise RequestError(422, "give both width and height, or neither")
    if width is None:
        side = side if side is not None else config.default_size
        if side is None:
            return None, None
        checks, width, height = [("size", side)], side, side
    else:
        checks = [("width", width), ("height", height)]
    m = config.size_multiple
    for name, v in checks:
        _in_range(v, m, config.max_size, name)
        if v % m:
            raise RequestError(422, f"{name} must be a multiple of {m}, got {v}")
    if width * height > config.max_output_pixels:
        raise RequestError(422, f"{width}x{height} is over the output limit of {config.max_output_pixels} pixels")
    return height, width


def _common(payload: dict, config: ServerConfig, steps_key: str, default_steps: int) -> dict:
    steps = _in_range(_field(payload, steps_key, int, default_steps), config.min_steps, config.max_steps, steps_key)
    cfg = _in_range(_field(payload, "true_cfg_scale", float, 1.0), config.min_cfg, config.max_cfg, "true_cfg_scale")
    seed = _in_range(_field(payload, "seed", int, 0), 0, 2**63 - 1, "seed")
    negative = _field(payload, "negative_prompt", str, None)
    if negative is not None and len(negative) > config.max_prompt_chars:
        raise RequestError(422, f"negative_prompt is over {config.max_prompt_chars} characters")
    return dict(num_steps=steps, true_cfg_scale=cfg, seed=seed, negative_prompt=negative)


EDIT_FIELDS = {"image", "prompt", "steps", "ref_image", "blend_ratio", "seed", "true_cfg_scale", "size",
               "width", "height", "negative_prompt"}
GENERATE_FIELDS = {"images", "prompt", "num_steps", "true_cfg_scale", "seed", "width", "height",
                   "negative_prompt"}


@dataclass
class Job:
    """One engine call: the checked arguments of ``Engine.generate`` plus the edit's blend."""

    images: list
    prompt: str
    num_steps: int
    true_cfg_scale: float = 1.0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    blend_ratio: float = 1.0  # share of the edited image in the answer; the rest is the input image
    deadline: float = math.inf  # time.monotonic() past which nobody waits for the answer
    queued_at: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future, repr=False)
    timings_ms: dict = field(default_factory=dict)

    def engine_kwargs(self) -> dict:
        return dict(num_steps=self.num_steps, true_cfg_scale=self.true_cfg_scale, seed=self.seed,
                    height=self.height, width=self.width, negative_prompt=self.negative_prompt)


def parse_edit(payload: dict, files: dict | None, config: ServerConfig) -> Job:
    """``/edit``: ``image`` (+ optional ``ref_image``, a second reference the model sees),
    ``prompt``, ``steps`` (default 4: the Lightning LoRAs take 4-8), ``blend_ratio``,
    ``seed``, ``true_cfg_scale``, ``size`` or ``width`` + ``height``. ``files``: multipart
    uploads by field name (lists of bytes); a field may also hold base64 text."""
    files = files or {}
    _check_fields({**payload, **files}, EDIT_FIELDS)
    images = []
    for key in ("image", "ref_image"):
        if len(files.get(key, [])) + (key in payload and payload[key] not in (None, "")) > 1:
            raise RequestError(422, f"give one {key}")
        data = files[key][0] if files.get(key) else payload.get(key)
        if data in (None, "", b""):
            if key == "image":
                raise RequestError(422, "image is required (base64 in JSON, or a file in multipart)")
            continue
        if not isinstance(data, (str, bytes)):
            raise RequestError(422, f"{key} must be a base64 string")
        images.append(data)
    prompt = _prompt(payload, config)
    common = _common(payload, config, "steps", 4)
    blend = _in_range(_field(payload, "blend_ratio", float, 1.0), 0.0, 1.0, "blend_ratio")
    height, width = _size(payload, config, allow_size=True)
    decoded = [decode_image(d, k, config) for d, k in zip(images, ("image", "ref_image"))]
    return Job(images=decoded, prompt=prompt, height=height, width=width, blend_ratio=blend, **common)


def parse_generate(payload: dict, files: dict | None, config: ServerConfig) -> Job:
    """``/generate``: ``images`` (a list of base64 strings, or repeated multipart files),
    ``prompt``, ``num_steps`` (default 8), ``true_cfg_scale``, ``seed``, ``width`` + ``height``."""
    files = files or {}
    _check_fields({**payload, **files}, GENERATE_FIELDS)
    images = payload.get("images")
    if images in (None, ""):
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RequestError(422, "images must be a list of base64 strings")
    images = list(images) + list(files.get("images", []))
    if not images:
        raise RequestError(422, "images must hold at least one image")
    if len(images) > config.max_images:
        raise RequestError(422, f"{len(images)} images; the limit is {config.max_images}")
    prompt = _prompt(payload, config)
    common = _common(payload, config, "num_steps", 8)
    height, width = _size(payload, config, allow_size=False)
    decoded = [decode_image(d, f"images[{i}]", config) for i, d in enumerate(images)]
    return Job(images=decoded, prompt=prompt, height=height, width=width, **common)


STREAM_FIELDS = {"prompt", "steps", "size", "threshold", "seed", "format", "blend"}


def parse_stream_control(payload, config: ServerConfig) -> dict:
    """``WS /stream``'s first message: ``prompt``, ``steps`` (default 2), ``size`` (default 256,
    capped by ``max_stream_size``), ``threshold`` (similar-frame skip, default 0.98; null: off),
    ``seed``, ``blend`` (latent blend strength, default 0), ``format`` ("jpeg" or "png": the
    edited frames' encoding). -> (StreamEditor keyword arguments, format)."""
    if not isinstance(payload, dict):
        raise RequestError(422, "the control message must be a JSON object")
    _check_fields(payload, STREAM_FIELDS)
    prompt = _prompt(payload, config)
    steps = _in_range(_field(payload, "steps", int, 2), config.min_steps, config.max_stream_steps, "steps")
    m = config.size_multiple
    size = _in_range(_field(payload, "size", int, min(256, config.max_stream_size)), m, config.max_stream_size,
                     "size")
    if size % m:
        raise RequestError(422, f"size must be a multiple of {m}, got {size}")
    threshold = 0.98 if "threshold" not in payload else (
        None if payload["threshold"] is None else _in_range(_field(payload, "threshold", float, 0.98), 0.0, 0.9999,
                                                            "threshold"))
    seed = _in_range(_field(payload, "seed", int, 0), 0, 2**63 - 1, "seed")
    blend = _in_range(_field(payload, "blend", float, 0.0), 0.0, 0.95, "blend")
    fmt = _field(payload, "format", str, "jpeg")
    if fmt not in ("jpeg", "png"):
        raise RequestError(422, f"format must be 'jpeg' or 'png', got {fmt[:20]!r}")
    return dict(prompt=prompt, steps=steps, size=size, threshold=threshold, seed=seed, blend=blend), fmt


# --- the queue and its worker --------------------------------------------------------------------


class JobQueue:
    """A bounded FIFO whose waiting jobs can be withdrawn (their slot frees at once)."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._jobs: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> int:
        """Append ``job``; its position (1 = next). Raises QueueFull."""
        with self._cond:
            if self._closed:
                raise QueueClosed("the server is shutting down")
            if len(self._jobs) >= self.maxsize:
                raise QueueFull(f"the queue is full ({self.maxsize} waiting)")
            self._jobs.append(job)
            self._cond.notify()
            return len(self._jobs)

    def take(self) -> Job | None:
        """The oldest job; blocks; None once closed and empty."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            return self._jobs.popleft() if self._jobs else None

    def remove(self, job: Job) -> bool:
        """Withdraw a waiting job; False if it was already taken."""
        with self._cond:
            try:
                self._jobs.remove(job)
                return True
            except ValueError:
                return False

    def close(self) -> list[Job]:
        """Refuse new jobs, wake the worker; the jobs that were still waiting."""
        with self._cond:
            self._closed = True
            left, self._jobs = list(self._jobs), collections.deque()
            self._cond.notify_all()
            return left


class EditService:
    """One engine behind one worker thread and a ``JobQueue``. ``submit`` returns the job's
    ``Future``, resolved with ``(PIL image, timings_ms)`` or the engine's exception; ``cancel``
    withdraws a job that has not started. Thread-safe; knows nothing of HTTP."""

    def __init__(self, engine, config: ServerConfig | None = None):
        self.engine = engine
        self.config = config or ServerConfig()
        self.queue = JobQueue(self.config.max_queue)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.running: Job | None = None
        # counters shown by /health
        self.stats = dict(accepted=0, completed=0, failed=0, rejected_full=0, cancelled=0, expired=0)
        self._run_s = collections.deque(maxlen=16)  # recent engine seconds, for Retry-After

    def start(self) -> "EditService":
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="qpipeline-engine-worker", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, fail the waiting ones (503), let the running one finish."""
        for job in self.queue.close():
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RequestError(503, "the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> Future:
        self.start()
        try:
            self.queue.put(job)
        except QueueFull:
            self._count("rejected_full")
            raise
        self._count("accepted")
        return job.future

    def cancel(self, job: Job, why: str = "cancelled") -> bool:
        """Withdraw ``job`` if it has not started (True); a running job finishes unread."""
        if job.future.cancel():
            self.queue.remove(job)
            self._count(why)
            return True
        return False

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the queue ahead at the recent engine time."""
        per_job = sum(self._run_s) / len(self._run_s) if self._run_s else 1.0
        return max(1, math.ceil(per_job * (len(self.queue) + 1)))

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _work(self) -> None:
        while (job := self.queue.take()) is not None:
            if time.monotonic() > job.deadline:
                self.cancel(job, "expired")
            if not job.future.set_running_or_notify_cancel():
                continue  # withdrawn while waiting: never run
            self.running = job
            t0 = time.monotonic()
            job.timings_ms["queue"] = (t0 - job.queued_at) * 1e3
            try:
                image = self.engine.generate(job.images, job.prompt, **job.engine_kwargs())
                t1 = time.monotonic()
                job.timings_ms["generate"] = (t1 - t0) * 1e3
                stages = getattr(self.engine, "last_timings", None)  # per-stage ms, when the engine keeps them
                if isinstance(stages, dict):
                    job.timings_ms["stages"] = dict(stages)
                self._run_s.append(t1 - t0)
                if job.blend_ratio < 1.0:
                    from PIL import Image

                    base = job.images[0].resize(image.size, Image.Resampling.LANCZOS)
                    image = Image.blend(base, image.convert("RGB"), job.blend_ratio)
            except BaseException as e:  # noqa: BLE001 - every failure goes to its client; the worker goes on
                self._count("failed")
                job.future.set_exception(e)
            else:
                self._count("completed")
                job.future.set_result(image)
            finally:
                self.running = None

    def health(self) -> dict:
        engine = self.engine
        with self._lock:
            stats = dict(self.stats)
        return dict(
            status="ok",
            model_loaded=bool(getattr(engine, "loaded", False)),
            model=str(getattr(engine, "model_dir", "")),
            backend=getattr(engine, "backend", None),
            backends_in_use=_backends_in_use(engine),
            device=str(getattr(engine, "device", "")),
            queue=dict(depth=len(self.queue), max=self.config.max_queue, running=self.running is not None),
            memory=_memory(getattr(engine, "device", None)),
            stats=stats,
            limits={k: v for k, v in asdict(self.config).items() if k not in ("cors_origins", "disconnect_poll_s")},
        )


def _backends_in_use(engine) -> dict:
    """QuantLinear backends of the loaded transformer, with their layer counts."""
    transformer = getattr(engine, "transformer", None)
    if transformer is None:
        return {}
    from qkernels import QuantLinear

    return dict(collections.Counter(m.backend for m in transformer.modules() if isinstance(m, QuantLinear)))


def _memory(device) -> dict:
    import torch

    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        return dict(device="cuda", allocated_bytes=torch.cuda.memory_allocated(device),
                    reserved_bytes=torch.cuda.memory_reserved(device), free_bytes=free, total_bytes=total)
    out = dict(device="cpu")
    try:  # resident set size of this process (Linux)
        with open("/proc/self/statm") as f:
            import os

            out["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return out


def encode_jpeg(image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _close_reason(message) -> str:
    """A WebSocket close reason: one line, at most 123 bytes of UTF-8 (RFC 6455 5.5.1)."""
    text = one_line(message).encode("utf-8")[:123]
    return text.decode("utf-8", "ignore")


def encode_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # level 1: 3-4x faster than 6 at ~10% more bytes
    return buf.getvalue()


# --- the HTTP side -------------------------------------------------------------------------------


def _schemas(config: ServerConfig):
    """Pydantic models for /docs only (the handlers check with ``parse_*``, which take form
    strings too and word their own messages)."""
    from pydantic import BaseModel, ConfigDict, Field

    lim = config

    class EditRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        image: str = Field(description=f"the photo to edit: base64 (a data: URL prefix is accepted); "
                                       f"at most {lim.max_image_bytes} bytes and {lim.max_image_pixels} pixels")
        prompt: str = Field(description=f"the edit instruction, 1-{lim.max_prompt_chars} characters")
        steps: int = Field(4, ge=lim.min_steps, le=lim.max_steps, description="denoising steps")
        ref_image: str | None = Field(None, description="a second reference image (base64) the model sees")
        blend_ratio: float = Field(1.0, ge=0, le=1, description="share of the edited image; the rest is the input")
        seed: int = Field(0, ge=0, description="same seed, same image")
        true_cfg_scale: float = Field(1.0, ge=lim.min_cfg, le=lim.max_cfg, description="> 1: true CFG (two passes)")
        size: int | None = Field(None, description=f"square output side, a multiple of {lim.size_multiple}")
        width: int | None = Field(None, description="output width (with height)")
        height: int | None = Field(None, description="output height (with width)")
        negative_prompt: str | None = None

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        images: list[str] = Field(description=f"1-{lim.max_images} reference images, base64")
        prompt: str
        num_steps: int = Field(8, ge=lim.min_steps, le=lim.max_steps)
        true_cfg_scale: float = Field(1.0, ge=lim.min_cfg, le=lim.max_cfg)
        seed: int = Field(0, ge=0)
        width: int | None = None
        height: int | None = None
        negative_prompt: str | None = None

    class ImageResponse(BaseModel):
        image: str = Field(description="the result, base64 PNG")
        width: int
        height: int
        seed: int
        timings_ms: dict = Field(description="queue, decode, generate, encode, total (+ the engine's stages)")

    class ErrorResponse(BaseModel):
        error: str = Field(description="one line")

    return EditRequest, GenerateRequest, ImageResponse, ErrorResponse


def _multipart_schema(model) -> dict:
    schema = model.model_json_schema()
    for key in ("image", "ref_image", "images"):
        if key in schema["properties"]:
            binary = {"type": "string", "format": "binary"}
            schema["properties"][key] = {"type": "array", "items": binary} if key == "images" else binary
    return schema


def create_app(engine, config: ServerConfig | None = None, *, service: EditService | None = None,
               title: str = "qpipeline edit server"):
    """The FastAPI app over ``engine`` (anything with ``generate(images, prompt, **kw)``). The
    worker thread starts with the app's lifespan (or the first request) and stops with it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request, WebSocket
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser

    config = config or (service.config if service is not None else ServerConfig())
    service = service or EditService(engine, config)
    EditRequest, GenerateRequest, ImageResponse, ErrorResponse = _schemas(config)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await run_in_threadpool(service.stop, 10.0)

    app = FastAPI(title=title, lifespan=lifespan,
                  description="Image editing over one quantized diffusion engine. Errors: `{\"error\": \"...\"}`.")
    app.state.service = service
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Server-Timing", "Retry-After", "X-Seed"])

    def error(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error(exc.status_code, exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        return error(422, f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def read_body(request: Request) -> bytes:
        limit = config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(413, f"request body is {length} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_request(request: Request) -> tuple[dict, dict]:
        """(fields, files): JSON object fields, or multipart fields and uploaded files' bytes."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/json", "multipart/form-data"):
            raise RequestError(415, f"content-type must be application/json or multipart/form-data, "
                                    f"got {ctype or 'none'}")
        body = await read_body(request)
        if ctype == "application/json":
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise RequestError(400, f"body is not valid JSON: {e}") from None
            if not isinstance(payload, dict):
                raise RequestError(422, "the JSON body must be an object")
            return payload, {}

        async def replay():
            yield body

        # max_part_size bounds text parts: one may hold a base64 image
        parser = MultiPartParser(request.headers, replay(), max_files=config.max_images + 2, max_fields=64,
                                 max_part_size=math.ceil(config.max_image_bytes * 4 / 3) + 2**10)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise RequestError(400, f"malformed multipart body: {e.message}") from None
        fields, files = {}, {}
        for key, value in form.multi_items():
            if not isinstance(value, str):
                files.setdefault(key, []).append(await value.read())
            elif key == "images":  # base64 text parts, repeated like file parts
                fields.setdefault("images", []).append(value)
            elif key in fields:
                raise RequestError(422, f"field {key!r} given twice")
            else:
                fields[key] = value
        await form.close()
        return fields, files

    def wants_png(request: Request) -> bool:
        return (request.query_params.get("format") == "png"
                or "image/png" in request.headers.get("accept", "").lower())

    async def answer(request: Request, parse):
        t0 = time.monotonic()
        payload, files = await read_request(request)
        job = await run_in_threadpool(parse, payload, files, config)
        job.queued_at, job.deadline = time.monotonic(), t0 + config.timeout_s  # deadline: from the request's arrival
        job.timings_ms["decode"] = (job.queued_at - t0) * 1e3
        try:
            future = service.submit(job)
        except QueueFull as e:
            retry = service.retry_after_s()
            return error(503 if isinstance(e, QueueClosed) else 429, f"{e}; retry in {retry} s",
                         {"Retry-After": str(retry)})
        waiting = asyncio.wrap_future(future)
        while not waiting.done():
            left = job.deadline - time.monotonic()
            if left <= 0:
                service.cancel(job, "expired")  # a running job finishes unread
                return error(504, f"no result within the deadline of {config.timeout_s:g} s")
            await asyncio.wait({waiting}, timeout=min(config.disconnect_poll_s, left))
            if not waiting.done() and await request.is_disconnected():
                service.cancel(job, "cancelled")
                return error(499, "client disconnected")  # nobody reads it; the job is withdrawn
        if waiting.cancelled():
            return error(504, f"no result within the deadline of {config.timeout_s:g} s")
        exc = waiting.exception()
        if isinstance(exc, RequestError):
            return error(exc.status, exc.message)
        if isinstance(exc, QKernelsError) and isinstance(exc, ValueError):
            return error(422, str(exc))  # the engine's own input checks
        if exc is not None:
            return error(500, f"generate failed: {type(exc).__name__}: {exc}")
        image = waiting.result()
        t1 = time.monotonic()
        png = await run_in_threadpool(encode_png, image)
        job.timings_ms["encode"] = (time.monotonic() - t1) * 1e3
        job.timings_ms["total"] = (time.monotonic() - t0) * 1e3
        timings = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in job.timings_ms.items()}
        server_timing = ", ".join(f"{k};dur={v:.1f}" for k, v in timings.items() if isinstance(v, float))
        headers = {"Server-Timing": server_timing, "X-Seed": str(job.seed)}
        if wants_png(request):
            return Response(png, media_type="image/png", headers=headers)
        return JSONResponse(dict(image=base64.b64encode(png).decode("ascii"), width=image.width,
                                 height=image.height, seed=job.seed, timings_ms=timings), headers=headers)

    error_responses = {code: {"model": ErrorResponse, "description": why} for code, why in (
        (400, "not base64, not an image, malformed body"), (413, "an image or the body over its limit"),
        (415, "neither JSON nor multipart"), (422, "a field out of range, missing or unknown"),
        (429, "queue full; see Retry-After"), (500, "the engine failed"), (504, "deadline passed"))}

    def body_doc(model) -> dict:
        return {"requestBody": {"required": True, "content": {
            "application/json": {"schema": model.model_json_schema()},
            "multipart/form-data": {"schema": _multipart_schema(model)}}}}

    ok = {200: {"model": ImageResponse, "description": "JSON with a base64 PNG; `image/png` itself when "
                                                      "asked (`Accept: image/png` or `?format=png`)",
                "content": {"image/png": {}}}}

    @app.post("/edit", responses={**ok, **error_responses}, openapi_extra=body_doc(EditRequest),
              summary="Edit one image (+ an optional reference) with a prompt")
    async def edit(request: Request):
        return await answer(request, parse_edit)

    @app.post("/generate", responses={**ok, **error_responses}, openapi_extra=body_doc(GenerateRequest),
              summary="Generate from 1-3 reference images and a prompt")
    async def generate(request: Request):
        return await answer(request, parse_generate)

    @app.get("/health", summary="Model, backend, queue depth, memory, counters, limits")
    async def health():
        return dict(service.health(), streams=dict(streams))

    streams = dict(active=0, max=config.max_streams, started=0, refused=0)

    @app.websocket("/stream")
    async def stream(ws: WebSocket):
        """Frames in, edited frames out; protocol in the README ("Stream mode")."""
        await ws.accept()  # accepted first, so that a refusal carries its close code and reason
        if streams["active"] >= config.max_streams:
            streams["refused"] += 1
            await ws.close(1008, _close_reason(f"too many streams: {streams['active']} running, the limit is "
                                               f"{config.max_streams}"))
            return
        streams["active"] += 1
        streams["started"] += 1
        try:
            outcome = await _serve_stream(ws)
        finally:
            streams["active"] -= 1
        if outcome is not None:  # after the slot is free: a client that reconnects at once gets it
            with contextlib.suppress(Exception):  # the client may be gone already
                await ws.close(outcome[0], _close_reason(outcome[1]))

    async def _serve_stream(ws):
        """Runs one stream; (close code, reason) to close with, or None when the client left."""
        from .stream import StreamEditor

        try:
            first = await asyncio.wait_for(ws.receive(), config.stream_control_timeout_s)
        except asyncio.TimeoutError:
            return (1008, f"no control message within {config.stream_control_timeout_s:g} s")
        if first["type"] == "websocket.disconnect":
            return
        if first.get("text") is None:
            return (1003, 'the first message must be JSON text: {"prompt", "steps", "size", "threshold"}')
        try:
            payload = json.loads(first["text"])
            kwargs, fmt = parse_stream_control(payload, config)
        except ValueError as e:
            return (1003, f"the control message is not valid JSON: {e}")
        except RequestError as e:
            return (1008, e.message)
        if getattr(engine, "pipeline", None) is None and not hasattr(engine, "load"):
            return (1011, "this server's engine cannot stream")
        try:
            editor = await run_in_threadpool(lambda: StreamEditor(engine, **kwargs))
        except QKernelsError as e:
            return (1008, str(e))
        encode = encode_png if fmt == "png" else encode_jpeg
        mime = "image/png" if fmt == "png" else "image/jpeg"
        await ws.send_text(json.dumps(dict(type="ready", steps=kwargs["steps"], size=kwargs["size"],
                                           threshold=kwargs["threshold"], format=fmt,
                                           max_frame_bytes=config.max_image_bytes)))
        t_open = time.monotonic()

        async def writer():
            async for r in editor.aresults():
                data = await run_in_threadpool(encode, r.image)
                rep = editor.stats
                meta = dict(type="frame", seq=r.seq, source_seq=r.source_seq, skipped=r.skipped,
                            latency_ms=round(r.latency_ms, 2), similarity=r.similarity, mime=mime,
                            results=rep["results"] + rep["skipped"], dropped=rep["dropped"], skipped_total=rep["skipped"],
                            fps=round((rep["results"] + rep["skipped"]) / max(time.monotonic() - t_open, 1e-9), 3))
                if r.tag:  # the frame came as JSON text: answer likewise
                    await ws.send_text(json.dumps(dict(meta, image=base64.b64encode(data).decode("ascii"))))
                else:
                    await ws.send_text(json.dumps(meta))
                    await ws.send_bytes(data)

        write_task = asyncio.ensure_future(writer())
        try:
            while True:
                recv = asyncio.ensure_future(ws.receive())
                done, _ = await asyncio.wait({recv, write_task}, return_when=asyncio.FIRST_COMPLETED)
                if write_task in done:
                    recv.cancel()
                    exc = write_task.exception()
                    return (1011, f"the stream failed: {type(exc).__name__}: {exc}" if exc
                                       else "the stream ended")
                msg = recv.result()
                if msg["type"] == "websocket.disconnect":
                    return
                text, data = msg.get("text"), msg.get("bytes")
                is_json = text is not None
                if is_json:
                    try:
                        obj = json.loads(text)
                    except ValueError:
                        return (1003, 'a text message must be JSON: {"image": "<base64>"}')
                    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                        if isinstance(obj, dict) and "prompt" in obj:
                            return (1008, "one stream per connection: reconnect to change the prompt")
                        return (1003, 'a text message must be JSON: {"image": "<base64>"}')
                    data = obj["image"]
                try:
                    image = await run_in_threadpool(decode_image, data, "frame", config)
                except RequestError as e:
                    return (1009 if e.status == 413 else 1003, e.message)
                editor.submit(image, tag=is_json)
        finally:
            write_task.cancel()
            await run_in_threadpool(lambda: editor.close(drain=False))  # nobody reads what is in flight

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("qpipeline").joinpath("static/index.html").read_text("utf-8"))

    return app
