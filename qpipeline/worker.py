"""``python -m qpipeline.worker``: pulls edit jobs from a queue server, runs each on one engine and
posts the result back. The same model flags as ``qpipeline.serve``:

    python -m qpipeline.worker --queue http://queue:8000 --model Qwen-Image-Edit-2511/ --quantized q/
    python -m qpipeline.worker --queue http://127.0.0.1:8000 --demo --token-file token.txt

The protocol (what a queue server implements; the README has it with curl):

* ``GET {queue}/api/queue/next``: ``200`` with a job, a JSON object: ``/generate``'s body plus an
  ``id`` (a string or an integer): ``{"id", "images": [base64, ...], "prompt", "num_steps",
  "true_cfg_scale", "seed"}`` (``width`` + ``height`` and ``negative_prompt`` optional). ``204``
  (or a ``200`` with an empty body): no job now; the worker backs off (``--poll`` seconds doubling
  up to ``--max-backoff``, each wait jittered to 50-100% so that many workers do not poll in step)
  and asks again. ``401``/``403``: the token is refused; the worker exits 2.
* ``POST {queue}/api/queue/result``: ``{"id", "image": <base64 PNG>}`` or ``{"id", "error": "<one
  line>"}``. Any ``2xx`` acknowledges it. A failed upload (no connection, a timeout, ``408``,
  ``429``, ``5xx``) is retried with the same backoff until acknowledged, so the same result may
  arrive more than once: the queue server records a result by its ``id`` and acknowledges a repeat
  of an ``id`` it already recorded (``2xx``) without recording it again. At-least-once delivery
  plus that idempotent acknowledgement records each result exactly once. Another ``4xx`` means
  the server will never take it: the worker logs it and goes on.
* A job that cannot run (not base64, not an image, a field out of range, the engine out of memory)
  is answered with an ``error`` result and the worker takes the next one. A job body that is not a
  JSON object with an ``id`` is answered ``{"id": null, "error": "malformed job: ..."}``.
* A job handed out and never answered (its worker lost power) is the queue server's to hand out
  again after a lease of its choosing; the worker keeps no state between jobs.

``SIGTERM`` (or ``SIGINT``) lets the job in hand finish and its result upload, then the worker
exits 0; if that upload is still failing ``--drain-timeout`` seconds after the signal, it exits 1
naming the job. ``--token-file``: its content is sent as ``Authorization: Bearer <token>`` and is
never printed. ``--health-port``: ``GET /health`` on 127.0.0.1 answers (JSON: model, the job
running, counters, memory) while a job runs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from qkernels.errors import InputError, QKernelsError

__all__ = ["QueueWorker", "Backoff", "main"]

_RETRYABLE = {408, 425, 429}


class TokenRefused(Exception):
    """The queue server answered 401/403."""


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: the n-th wait in a row is
    ``uniform(0.5, 1) * min(cap, base * 2**n)``; ``reset()`` after a success."""

    base: float = 1.0
    cap: float = 30.0
    n: int = 0

    def next(self) -> float:
        wait = min(self.cap, self.base * 2 ** min(self.n, 32))
        self.n += 1
        return wait * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.n = 0


class QueueWorker:
    """One engine, one queue server. ``run()`` until ``stop()``; see the module docstring."""

    def __init__(self, engine, queue_url: str, *, token: str | None = None, poll_s: float = 1.0,
                 max_backoff_s: float = 30.0, drain_timeout_s: float = 60.0, http_timeout_s: float = 30.0,
                 config=None, log=None):
        from .server import ServerConfig

        check_settings(queue_url, poll_s, max_backoff_s)
        self.engine = engine
        self.base = queue_url.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.poll_s, self.max_backoff_s = poll_s, max_backoff_s
        self.drain_timeout_s, self.http_timeout_s = drain_timeout_s, http_timeout_s
        self.config = config or ServerConfig()
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._stop_at: float | None = None
        self.running: str | None = None  # the id of the job in hand
        self.stats = dict(completed=0, failed=0, malformed=0, uploads_retried=0, refused=0)
        self._unreachable = False

    # --- control ------------------------------------------------------------------------------

    def stop(self, *_signal) -> None:
        """Finish the job in hand, upload it, return from ``run`` (a signal handler)."""
        if not self._stop.is_set():
            self._stop_at = time.monotonic()
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        """Poll, run, upload until stopped. 0: stopped cleanly; 1: a result could not be uploaded
        within the drain timeout; 2: the queue server refused the token."""
        idle = Backoff(self.poll_s, self.max_backoff_s)
        try:
            while not self.stopping:
                job = self.next_job()
                if job is None:
                    self._stop.wait(idle.next())
                    continue
                idle.reset()
                result = self.process(job)
                if not self.upload(result):
                    return 1
        except TokenRefused as e:
            self._log(f"worker: error: {e}")
            return 2
        self._log(f"worker: stopped ({self.stats['completed']} done, {self.stats['failed']} failed)")
        return 0

    # --- the protocol -------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=self.http_timeout_s) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:  # a 4xx/5xx answer, not a transport failure
            with contextlib.suppress(OSError):
                return e.code, e.read()
            return e.code, b""

    def _reached(self, ok: bool, why: str = "") -> None:
        """Logs the queue server going away and coming back, once each, not once a poll."""
        if not ok and not self._unreachable:
            self._log(f"worker: queue server unreachable ({why}); retrying with backoff")
        elif ok and self._unreachable:
            self._log("worker: queue server reachable again")
        self._unreachable = not ok

    def next_job(self):
        """The next job (a dict, or the raw text of a malformed one as a str), or None."""
        try:
            status, body = self._request("GET", "/api/queue/next")
        except (OSError, urllib.error.URLError) as e:  # refused, reset, timed out, DNS
            self._reached(False, _reason(e))
            return None
        self._reached(True)
        if status in (401, 403):
            raise TokenRefused(f"the queue server refused the token ({status} on /api/queue/next)")
        if status == 204 or (status == 200 and not body.strip()):
            return None
        if status != 200:
            self._log(f"worker: /api/queue/next answered {status}; retrying with backoff")
            return None
        try:
            job = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return body.decode("utf-8", "replace")
        return job

    def process(self, job) -> dict:
        """The result to post for ``job``: ``{"id", "image"}`` or ``{"id", "error"}``. Never raises
        for anything a job can cause."""
        from .server import RequestError, encode_png, one_line, parse_generate

        if not isinstance(job, dict) or not isinstance(job.get("id"), (str, int)) or isinstance(job.get("id"), bool):
            self.stats["malformed"] += 1
            what = "not a JSON object" if not isinstance(job, dict) else "no string or integer 'id'"
            self._log(f"worker: malformed job ({what}): answered with id null")
            return {"id": None, "error": f"malformed job: {what}: {one_line(str(job))[:120]}"}
        job_id = job["id"]
        self.running = str(job_id)
        t0 = time.monotonic()
        try:
            fields = {k: v for k, v in job.items() if k != "id"}
            parsed = parse_generate(fields, None, self.config)
            image = self.engine.generate(parsed.images, parsed.prompt, **parsed.engine_kwargs())
            png = encode_png(image)
        except Exception as e:  # noqa: BLE001 - any failure of one job is that job's error result
            self.stats["failed"] += 1
            message = (f"{e.status}: {e.message}" if isinstance(e, RequestError)
                       else one_line(f"{type(e).__name__}: {e}"))
            if _is_oom(e):
                _free_device_cache()
            self._log(f"worker: job {job_id} failed: {message}")
            return {"id": job_id, "error": message}
        finally:
            self.running = None
        self.stats["completed"] += 1
        self._log(f"worker: job {job_id} done in {time.monotonic() - t0:.2f} s")
        return {"id": job_id, "image": base64.b64encode(png).decode("ascii")}

    def upload(self, result: dict) -> bool:
        """Post ``result`` until acknowledged. False only when a stop's drain timeout passed first."""
        retry = Backoff(self.poll_s, self.max_backoff_s)
        job_id = result["id"]
        while True:
            try:
                status, body = self._request("POST", "/api/queue/result", result)
                self._reached(True)
            except (OSError, urllib.error.URLError) as e:
                self._reached(False, _reason(e))
                status, body = None, b""
            if status is not None and 200 <= status < 300:
                return True
            if status in (401, 403):
                raise TokenRefused(f"the queue server refused the token ({status} on /api/queue/result)")
            if status is not None and 400 <= status < 500 and status not in _RETRYABLE:
                self.stats["refused"] += 1
                self._log(f"worker: the queue server refused the result of job {job_id} with {status}: "
                          f"{body[:200].decode('utf-8', 'replace')}; not retried")
                return True
            if status is not None:
                self._log(f"worker: result upload of job {job_id} answered {status}; retrying")
            self.stats["uploads_retried"] += 1
            wait = retry.next()
            if self._stop_at is not None and time.monotonic() + wait > self._stop_at + self.drain_timeout_s:
                self._log(f"worker: error: stopping with the result of job {job_id} not uploaded "
                          f"after {self.drain_timeout_s:g} s")
                return False
            time.sleep(wait)  # not the stop event: a stop must not skip a pending upload

    def health(self) -> dict:
        from .server import _memory

        return dict(status="ok", model_loaded=bool(getattr(self.engine, "loaded", False)),
                    queue=self.base, running=self.running, stopping=self.stopping,
                    queue_reachable=not self._unreachable, stats=dict(self.stats),
                    memory=_memory(getattr(self.engine, "device", None)))


def check_settings(queue_url: str, poll_s: float, max_backoff_s: float) -> None:
    url = urllib.parse.urlsplit(queue_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise InputError(f"--queue must be an http(s) URL such as http://host:8000, got {queue_url!r}")
    if not poll_s > 0 or not max_backoff_s >= poll_s:
        raise InputError(f"--poll must be > 0 and --max-backoff >= --poll, got {poll_s:g} and {max_backoff_s:g}")


def _reason(e: Exception) -> str:
    reason = getattr(e, "reason", e)
    return f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def serve_health(worker: QueueWorker, port: int):
    """``GET /health`` on 127.0.0.1:``port`` in a daemon thread; the server (its port:
    ``server.server_address[1]``)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            ok = self.path.split("?")[0] == "/health"
            body = json.dumps(worker.health() if ok else {"error": "Not Found"}).encode()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # no access log on stderr
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="qpipeline-worker-health", daemon=True).start()
    return server


def build_parser() -> argparse.ArgumentParser:
    from .serve import add_model_args

    p = argparse.ArgumentParser(prog="python -m qpipeline.worker", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--queue", required=True, metavar="URL", help="the queue server, e.g. http://host:8000")
    p.add_argument("--token-file", metavar="F", help="a file holding the bearer token (never printed)")
    p.add_argument("--poll", type=float, default=1.0, help="first wait in seconds when no job (default 1.0)")
    p.add_argument("--max-backoff", type=float, default=30.0, help="longest wait in seconds (default 30)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="after SIGTERM, seconds to keep retrying the last upload (default 60)")
    p.add_argument("--health-port", type=int, default=None, help="serve GET /health on 127.0.0.1:PORT")
    p.add_argument("--default-size", type=int, default=None,
                   help="output side when a job gives none (default: the pipeline's ~1 MP; --demo: 64)")
    return p


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise InputError(f"cannot read --token-file {path}: {e.strerror or e}") from None
    if not token or any(c.isspace() for c in token):
        raise InputError(f"--token-file {path} must hold one token, no spaces or line breaks")
    return token


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .serve import engine_from_args
    from .server import ServerConfig

    with contextlib.ExitStack() as stack:
        try:
            check_settings(args.queue, args.poll, args.max_backoff)  # before the model loads
            token = _read_token(args.token_file) if args.token_file else None
            engine, default_size = engine_from_args(args, stack)
            config = ServerConfig(default_size=args.default_size if args.default_size is not None else default_size)
            worker = QueueWorker(engine, args.queue, token=token, poll_s=args.poll, max_backoff_s=args.max_backoff,
                                 drain_timeout_s=args.drain_timeout, config=config)
            engine.load()
        except (QKernelsError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, worker.stop)
        signal.signal(signal.SIGINT, worker.stop)
        if args.health_port is not None:
            try:
                health = serve_health(worker, args.health_port)
            except OSError as e:
                print(f"error: cannot listen on 127.0.0.1:{args.health_port}: {e}", file=sys.stderr)
                return 2
            stack.callback(health.shutdown)
            print(f"health on http://127.0.0.1:{health.server_address[1]}/health", flush=True)
        print(f"worker: polling {worker.base}/api/queue/next", flush=True)
        return worker.run()


if __name__ == "__main__":
    sys.exit(main())
