"""The edit server over real HTTP on 127.0.0.1, with the tiny pipeline on CPU.

Two kinds of server:
* ``python -m qpipeline.serve --demo`` as a subprocess (what a user starts): the images it
  answers equal ``Engine.generate`` in this process for the same seed (the same demo engine,
  built by ``demo_engine``), the bad inputs, the page in headless Chromium.
* ``create_app`` under uvicorn in a thread of this process, over a ``RecordingEngine`` that
  wraps the real engine: it counts the calls in flight (outside the engine's own lock, so two
  concurrent calls from the server would show), records each call's seed and image, can hold
  calls at a gate (to fill the queue deterministically) and fails on one prompt.

Each generate here is 2 steps at 32x32 (~0.7 s on 2 cores); the module runs ~20 of them.
"""

import asyncio
import base64
import io
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the server extra: pip install -e '.[server]'")
uvicorn = pytest.importorskip("uvicorn", reason="the server extra: pip install -e '.[server]'")

from PIL import Image  # noqa: E402

from qpipeline.demo_pipeline import demo_engine, reference_images, small_vae_references  # noqa: E402
from qpipeline.server import ServerConfig, create_app  # noqa: E402

from .net import ThreadedServer, png_bytes, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = dict(num_steps=2, height=32, width=32)
# Limits of the subprocess server, small so that each limit is cheap to cross.
LIMITS = ["--max-image-mb", "0.05", "--max-pixels", "4096", "--max-images", "2", "--max-steps", "8"]
MAX_IMAGE_BYTES = int(0.05 * 2**20)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module", autouse=True)
def _small_references():
    with small_vae_references():  # what the --demo server does too
        yield


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The engine --demo serves (same seed, same weights, same dtype and backend), loaded here."""
    return demo_engine(tmp_path_factory.mktemp("demo-pipeline"), device="cpu").load()


@pytest.fixture(scope="module")
def images():
    return reference_images(3, size=32, seed=3)


# --- in-process servers over a recording engine ----------------------------------------------------


class RecordingEngine:
    """The real engine behind a gate, recording calls. See the module docstring."""

    def __init__(self, engine):
        self._engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.seeds: list[int] = []
        self.outputs: dict[int, np.ndarray] = {}
        self.in_flight = self.peak = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, images, prompt, **kwargs):
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.seeds.append(kwargs["seed"])
        self.entered.release()
        try:
            assert self.gate.wait(60), "gate never opened"
            if prompt == "explode":
                raise RuntimeError("injected failure: out of memory")
            out = self._engine.generate(images, prompt, **kwargs)
            self.outputs[kwargs["seed"]] = np.asarray(out)
            return out
        finally:
            with self._lock:
                self.in_flight -= 1


class LiveServer(ThreadedServer):
    """``create_app`` over a recording engine, under uvicorn in a thread of this process."""

    def __init__(self, engine, **config):
        self.engine = RecordingEngine(engine)
        super().__init__(create_app(self.engine, ServerConfig(default_size=32, **config)))
        self.service = self.app.state.service

    def __exit__(self, *exc):
        self.engine.gate.set()
        super().__exit__(*exc)

    def wait_for(self, condition, what: str, timeout: float = 30):
        wait_for(condition, what, timeout, poll=0.02)


def _post_in_thread(url: str, path: str, results: dict, key, timeout: float = 120, **json):
    def run():
        try:
            with httpx.Client(timeout=timeout) as c:
                results[key] = c.post(url + path, json=json)
        except httpx.HTTPError as e:
            results[key] = e

    t = threading.Thread(target=run)
    t.start()
    return t


def test_32_concurrent_clients_each_answered_once_with_their_own_image(engine, images):
    image = b64(png_bytes(images[0]))
    with LiveServer(engine, max_queue=4, timeout_s=120) as live:
        live.engine.gate.clear()
        first: dict = {}
        t_first = _post_in_thread(live.url, "/generate", first, 0, images=[image], prompt="p", num_steps=2, seed=0)
        assert live.engine.entered.acquire(timeout=30)  # seed 0 runs (held at the gate): 4 slots wait

        async def clients():
            async with httpx.AsyncClient(base_url=live.url, timeout=120,
                                         limits=httpx.Limits(max_connections=64)) as c:
                async def one(seed):
                    return seed, await c.post("/generate", json=dict(images=[image], prompt="p", num_steps=2,
                                                                     seed=seed))

                tasks = [asyncio.ensure_future(one(seed)) for seed in range(1, 32)]
                # the queue is full once 27 of them have their 429; then let the engine go
                while sum(t.done() for t in tasks) < 27:
                    await asyncio.sleep(0.02)
                health = (await c.get("/health")).json()  # answers while the engine is busy
                live.engine.gate.set()
                return dict(await asyncio.gather(*tasks)), health

        t0 = time.monotonic()
        answers, health = asyncio.run(clients())
        t_first.join(60)
        answers[0] = first[0]
        elapsed = time.monotonic() - t0

    assert sorted(answers) == list(range(32)) and elapsed < 90
    assert health["queue"] == {"depth": 4, "max": 4, "running": True}
    codes = {seed: r.status_code for seed, r in answers.items()}
    assert set(codes.values()) <= {200, 429}, codes
    ok = sorted(seed for seed, code in codes.items() if code == 200)
    assert len(ok) == 5  # the one running + max_queue
    assert sorted(live.engine.seeds) == ok  # every accepted request ran exactly once, no refused one ran
    assert live.engine.peak == 1  # the engine never ran two at once
    for seed in ok:
        got = pixels(base64.b64decode(answers[seed].json()["image"]))
        assert np.array_equal(got, live.engine.outputs[seed]) and answers[seed].json()["seed"] == seed
    assert len({live.engine.outputs[s].tobytes() for s in ok}) == len(ok)  # seeds give different images
    for seed, r in answers.items():
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]
    stats = live.service.health()["stats"]
    assert stats["accepted"] == 5 and stats["completed"] == 5 and stats["rejected_full"] == 27


def _raw_post(url: str, path: str, **json_body) -> socket.socket:
    """A POST sent over a plain socket whose reading side the test controls: closing it is a
    client that leaves (what a browser tab closed mid-wait does)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(json_body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), host.encode(), len(body)) + body)
    return sock


def test_a_client_that_leaves_while_queued_is_never_run(engine, images):
    image = b64(png_bytes(images[0]))
    with LiveServer(engine, max_queue=4) as live:
        live.engine.gate.clear()
        res: dict = {}
        threads = [_post_in_thread(live.url, "/generate", res, 1, images=[image], prompt="p", num_steps=2, seed=1)]
        assert live.engine.entered.acquire(timeout=30)
        leaver = _raw_post(live.url, "/generate", images=[image], prompt="p", num_steps=2, seed=2)
        live.wait_for(lambda: len(live.service.queue) == 1, "seed 2 to queue")
        for seed in (3, 4):  # queued in this order, after seed 2
            threads.append(_post_in_thread(live.url, "/generate", res, seed, images=[image], prompt="p",
                                           num_steps=2, seed=seed))
            live.wait_for(lambda n=seed: len(live.service.queue) == n - 1, f"seed {seed} to queue")
        leaver.close()  # seed 2's client leaves while its job waits behind seed 1
        live.wait_for(lambda: live.service.stats["cancelled"] == 1, "the server to see the client leave")
        assert len(live.service.queue) == 2  # its slot was freed at once
        live.engine.gate.set()
        for t in threads:
            t.join(120)
    assert [res[s].status_code for s in (1, 3, 4)] == [200, 200, 200]
    assert live.engine.seeds == [1, 3, 4]  # in arrival order; seed 2 never ran


def test_deadline_answers_504_and_drops_the_waiting_job(engine, images):
    image = b64(png_bytes(images[0]))
    with LiveServer(engine, max_queue=4, timeout_s=2.5) as live:
        live.engine.gate.clear()
        res: dict = {}
        threads = [_post_in_thread(live.url, "/generate", res, 1, images=[image], prompt="p", num_steps=2, seed=1)]
        assert live.engine.entered.acquire(timeout=30)
        threads.append(_post_in_thread(live.url, "/generate", res, 2, images=[image], prompt="p", num_steps=2,
                                       seed=2))
        t0 = time.monotonic()
        for t in threads:
            t.join(30)
        assert time.monotonic() - t0 < 10
        for seed in (1, 2):  # seed 1 is past its deadline while running, seed 2 while waiting
            assert res[seed].status_code == 504 and "deadline of 2.5 s" in res[seed].json()["error"]
        assert live.service.stats["expired"] == 1 and len(live.service.queue) == 0
        live.engine.gate.set()
        live.wait_for(lambda: live.service.stats["completed"] == 1, "seed 1 to finish unread")
    assert live.engine.seeds == [1]  # the expired waiting job never ran


def test_a_failing_generate_answers_500_and_the_next_request_succeeds(engine, images):
    image = b64(png_bytes(images[0]))
    with LiveServer(engine, cors_origins=("http://page.example",)) as live, httpx.Client(base_url=live.url,
                                                                                         timeout=120) as c:
        r = c.post("/generate", json=dict(images=[image], prompt="explode", num_steps=2, seed=1))
        assert r.status_code == 500
        assert r.json() == {"error": "generate failed: RuntimeError: injected failure: out of memory"}
        live.engine.last_timings = {"denoise": 12.5, "vae_decode": 3.25}  # an engine that times its stages
        r = c.post("/edit", json=dict(image=image, prompt="p", steps=2, seed=2))
        assert r.status_code == 200 and np.array_equal(pixels(base64.b64decode(r.json()["image"])),
                                                       live.engine.outputs[2])
        assert r.json()["timings_ms"]["stages"] == {"denoise": 12.5, "vae_decode": 3.25}
        stats = live.service.health()["stats"]
        assert (stats["failed"], stats["completed"]) == (1, 1)

        # CORS: the configured origin may call from a browser, another may not
        pre = c.options("/edit", headers={"Origin": "http://page.example", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://page.example"
        h = c.get("/health", headers={"Origin": "http://elsewhere.example"})
        assert h.status_code == 200 and "access-control-allow-origin" not in h.headers


def test_stopping_fails_the_waiting_jobs_with_503_and_refuses_new_ones(engine, images):
    from qpipeline.server import EditService, Job, QueueClosed, RequestError

    rec = RecordingEngine(engine)
    rec.gate.clear()
    service = EditService(rec, ServerConfig(max_queue=2))
    running = service.submit(Job(images=images[:1], prompt="explode", num_steps=2, seed=1))
    assert rec.entered.acquire(timeout=30)
    waiting = service.submit(Job(images=images[:1], prompt="p", num_steps=2, seed=2))
    stopper = threading.Thread(target=service.stop, args=(30,))
    stopper.start()
    with pytest.raises(RequestError) as e:
        waiting.result(timeout=30)
    assert e.value.status == 503 and "shutting down" in e.value.message
    with pytest.raises(QueueClosed):
        service.submit(Job(images=images[:1], prompt="p", num_steps=2, seed=3))
    rec.gate.set()  # the running job finishes (here: fails) before the worker exits
    stopper.join(30)
    assert not stopper.is_alive() and isinstance(running.exception(timeout=1), RuntimeError)
    assert rec.seeds == [1]


# --- the subprocess server -------------------------------------------------------------------------


class ServeProcess:
    """``python -m qpipeline.serve --demo --port 0`` (no --host: the default must be loopback)."""

    def __init__(self, log_dir: Path, *args: str):
        self.stderr = open(log_dir / "serve.stderr", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "qpipeline.serve", "--demo", "--port", "0", *args],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()

    def wait_ready(self) -> "ServeProcess":
        deadline = time.monotonic() + 180  # import + build + load on 2 busy cores: 10-40 s
        while self.url is None:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line and line.startswith("serving on http://"):
                self.url = line.split()[2]
                self.ready_line = line
            elif line is None or self.proc.poll() is not None:
                self.close()
                self.stderr.seek(0)
                raise RuntimeError(f"server did not start: {self.stderr.read()[-3000:]}")
        return self

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


@pytest.fixture(scope="module", autouse=True)
def _serve_process(request, tmp_path_factory):
    """Starts the subprocess server before this module's first test when a selected test needs
    it, so that it boots (10-40 s) while the in-process tests, which come first, run."""
    wanted = any({"served", "client"} & set(item.fixturenames) for item in request.session.items
                 if item.module is request.module)
    server = ServeProcess(tmp_path_factory.mktemp("serve"), *LIMITS) if wanted else None
    yield server
    if server is not None:
        server.close()


@pytest.fixture(scope="module")
def served(_serve_process):
    return _serve_process.wait_ready()


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served.url, timeout=120) as c:
        yield c


def test_serve_binds_loopback_and_reports_health(served, client):
    assert served.ready_line.startswith("serving on http://127.0.0.1:")
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model_loaded"] is True and h["device"] == "cpu"
    assert h["backend"] == "auto" and sum(h["backends_in_use"].values()) > 0  # the transformer is quantized
    assert h["queue"] == {"depth": 0, "max": 8, "running": False}
    assert h["memory"]["rss_bytes"] > 0
    assert h["limits"]["max_images"] == 2 and h["limits"]["max_steps"] == 8
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="file"', 'id="camera"', 'id="prompt"', 'id="steps"', 'id="edit"', 'id="result"'):
        assert element in page.text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/edit", "/generate"):
        assert set(spec["paths"][path]["post"]["requestBody"]["content"]) == {"application/json",
                                                                               "multipart/form-data"}


def test_generate_and_edit_answer_the_engine_images(client, engine, images):
    a, b, c = images
    # /generate, JSON with base64, two reference images -> JSON with a base64 PNG and timings
    r = client.post("/generate", json=dict(images=[b64(png_bytes(a)), b64(png_bytes(b))], prompt="make it red",
                                           seed=5, **STEPS))
    assert r.status_code == 200, r.text
    body = r.json()
    expected = np.asarray(engine.generate([a, b], "make it red", seed=5, **STEPS))
    assert np.array_equal(pixels(base64.b64decode(body["image"])), expected)
    assert (body["width"], body["height"], body["seed"]) == (32, 32, 5)
    t = body["timings_ms"]
    assert {"decode", "queue", "generate", "encode", "total"} <= set(t) and t["total"] >= t["generate"] > 0

    # /edit, multipart upload, image/png asked for -> the PNG itself, timings in Server-Timing
    r = client.post("/edit", files={"image": ("c.png", png_bytes(c), "image/png")},
                    data={"prompt": "make it snow", "steps": "2", "seed": "7", "size": "32"},
                    headers={"Accept": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and "generate;dur=" in r.headers["server-timing"]
    edited = np.asarray(engine.generate([c], "make it snow", seed=7, **STEPS))
    assert np.array_equal(pixels(r.content), edited)

    # /edit, JSON: ref_image is a second reference; blend_ratio mixes the input back in
    r = client.post("/edit", json=dict(image=b64(png_bytes(c)), ref_image="data:image/png;base64," + b64(png_bytes(a)),
                                       prompt="make it snow", steps=2, seed=9, size=32, blend_ratio=0.25))
    assert r.status_code == 200, r.text
    out = engine.generate([c, a], "make it snow", seed=9, **STEPS)
    expected = np.asarray(Image.blend(c.resize(out.size, Image.Resampling.LANCZOS), out, 0.25))
    assert np.array_equal(pixels(base64.b64decode(r.json()["image"])), expected)


def _img(size, color=(200, 30, 30)) -> str:
    return b64(png_bytes(Image.new("RGB", (size, size), color)))


_OK = _img(32)
_NOISE = b64(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(MAX_IMAGE_BYTES + 100))
_TRUNCATED = b64(png_bytes(reference_images(1, size=32)[0])[:600])

# (endpoint, request keyword arguments, status, words the message must contain)
BAD = {
    "not-base64": ("/edit", dict(json=dict(image="this is not base64!", prompt="x")), 400, "not valid base64"),
    "not-an-image": ("/edit", dict(json=dict(image=b64(b"hello, not an image"), prompt="x")), 400, "not an image"),
    "truncated-image": ("/edit", dict(json=dict(image=_TRUNCATED, prompt="x")), 400, "truncated or corrupt"),
    "image-bytes": ("/edit", dict(json=dict(image=_NOISE, prompt="x")), 413, f"limit is {MAX_IMAGE_BYTES}"),
    "image-pixels": ("/edit", dict(json=dict(image=_img(80), prompt="x")), 413, "80x80 = 6400 pixels"),
    "steps-zero": ("/edit", dict(json=dict(image=_OK, prompt="x", steps=0)), 422, "steps must be in [1, 8]"),
    "steps-over": ("/generate", dict(json=dict(images=[_OK], prompt="x", num_steps=9)), 422, "num_steps must be in"),
    "steps-text": ("/edit", dict(json=dict(image=_OK, prompt="x", steps="many")), 422, "steps must be a number"),
    "steps-fraction": ("/edit", dict(json=dict(image=_OK, prompt="x", steps=2.5)), 422, "must be an integer"),
    "cfg-over": ("/generate", dict(json=dict(images=[_OK], prompt="x", true_cfg_scale=50)), 422, "true_cfg_scale"),
    "cfg-nan": ("/edit", dict(content=b'{"image": "%s", "prompt": "x", "true_cfg_scale": NaN}' % _OK.encode(),
                              headers={"content-type": "application/json"}), 422, "finite"),
    "prompt-empty": ("/edit", dict(json=dict(image=_OK, prompt="")), 422, "prompt must be a non-empty"),
    "prompt-blank": ("/generate", dict(json=dict(images=[_OK], prompt="   ")), 422, "prompt must be a non-empty"),
    "prompt-missing": ("/generate", dict(json=dict(images=[_OK])), 422, "prompt must be a non-empty"),
    "prompt-long": ("/edit", dict(json=dict(image=_OK, prompt="x" * 2001)), 422, "limit is 2000"),
    "too-many-images": ("/generate", dict(json=dict(images=[_OK] * 3, prompt="x")), 422, "3 images; the limit is 2"),
    "no-images": ("/generate", dict(json=dict(images=[], prompt="x")), 422, "at least one image"),
    "images-not-list": ("/generate", dict(json=dict(images=5, prompt="x")), 422, "list of base64"),
    "image-missing": ("/edit", dict(json=dict(prompt="x")), 422, "image is required"),
    "unknown-field": ("/generate", dict(json=dict(images=[_OK], prompt="x", num_step=4)), 422,
                      "unknown field 'num_step'"),
    "size-multiple": ("/edit", dict(json=dict(image=_OK, prompt="x", size=33)), 422, "multiple of 16"),
    "width-alone": ("/generate", dict(json=dict(images=[_OK], prompt="x", width=32)), 422, "both width and height"),
    "size-over": ("/edit", dict(json=dict(image=_OK, prompt="x", size=4096)), 422, "size must be in [16, 2048]"),
    "blend-over": ("/edit", dict(json=dict(image=_OK, prompt="x", blend_ratio=1.5)), 422, "blend_ratio"),
    "seed-negative": ("/edit", dict(json=dict(image=_OK, prompt="x", seed=-1)), 422, "seed must be in"),
    "json-invalid": ("/edit", dict(content=b"{not json", headers={"content-type": "application/json"}), 400,
                     "not valid JSON"),
    "json-array": ("/edit", dict(json=[1, 2]), 422, "must be an object"),
    "content-type": ("/edit", dict(content=b"image=1", headers={"content-type": "text/plain"}), 415,
                     "application/json or multipart/form-data"),
    "body-over": ("/edit", dict(json=dict(image="A" * 1_600_000, prompt="x")), 413, "request body"),
    "multipart-not-image": ("/edit", dict(files={"image": ("a.png", b"GIF89a garbage", "image/png")},
                                          data={"prompt": "x"}), 400, "not an image"),
    "multipart-unknown-file": ("/edit", dict(data={"prompt": "x"}, files={"other": ("a", b"1")}), 422,
                               "unknown field 'other'"),
    "multipart-text-not-base64": ("/edit", dict(data={"prompt": "x", "image": "not base64!"},
                                                 files={"ref_image": ("r.png", base64.b64decode(_OK), "image/png")}),
                                  400, "image is not valid base64"),
    "form-urlencoded": ("/edit", dict(data={"prompt": "x", "image": _OK}), 415,
                        "got application/x-www-form-urlencoded"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_4xx_and_a_one_line_message(client, case):
    path, kwargs, status, words = BAD[case]
    before = client.get("/health").json()["stats"]["accepted"]
    r = client.post(path, **kwargs)
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    message = r.json()["error"]
    assert message and "\n" not in message and len(message) <= 300
    assert words in message, message
    assert client.get("/health").json()["stats"]["accepted"] == before  # refused before it took a queue slot


def test_unknown_path_and_method_answer_json(client):
    r = client.get("/nothing-here")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = client.get("/edit")
    assert r.status_code == 405 and r.json()["error"]


def test_serve_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    from qpipeline import serve

    assert serve.main(["--model", str(tmp_path / "none"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a diffusers pipeline folder" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):  # --model or --demo is required
        serve.main([])
    assert serve.build_parser().parse_args(["--demo"]).host == "127.0.0.1"


def test_serve_passes_fuse_and_cuda_graphs_to_the_engine(capsys):
    """--fuse / --cuda-graphs reach the engine (the webcam stream's fast mode); what the engine
    cannot do is refused in one line: graphs without CUDA, fusing a bf16 model."""
    import contextlib

    from qpipeline import serve

    parse = serve.build_parser().parse_args
    with contextlib.ExitStack() as stack:
        engine, _ = serve.engine_from_args(parse(["--demo", "--fuse", "--device", "cpu"]), stack)
        assert engine.fuse and not engine.cuda_graphs
        engine, _ = serve.engine_from_args(parse(["--demo", "--device", "cpu"]), stack)
        assert not engine.fuse and not engine.cuda_graphs
    for argv, words in ((["--demo", "--cuda-graphs", "--device", "cpu"], "needs a CUDA device"),
                        (["--demo", "--fuse", "--backend", "bf16", "--device", "cpu"], "backend 'bf16' has none")):
        assert serve.main([*argv, "--port", "0"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the demo pipeline's save progress
        assert err.startswith("error:") and words in err, err


def test_no_cors_headers_unless_configured(client):
    h = client.get("/health", headers={"Origin": "http://page.example"})
    assert h.status_code == 200 and "access-control-allow-origin" not in h.headers


# --- the page in a real browser ------------------------------------------------------------------


def _chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert binary and driver, "headless Chromium is missing: run tests/install_browser.sh (CI does)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: CI runs as root; the next five keep it off the network, which a test has no
    # use for; the fake media flags give getUserMedia a generated camera and no permission prompt.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 "--disable-dev-shm-usage", "--window-size=1100,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_the_page_edits_an_upload_and_a_webcam_frame_in_headless_chromium(served, engine, images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "photo.png"
    images[1].save(photo)
    browser = _chromium(tmp_path)
    try:
        browser.get(served.url + "/")
        WebDriverWait(browser, 30).until(lambda b: "model loaded" in b.find_element(By.ID, "server").text)
        browser.find_element(By.ID, "file").send_keys(str(photo))
        for field, value in (("prompt", "make it blue"), ("steps", "2"), ("seed", "11"), ("size", "32")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "edit").click()
        result = browser.find_element(By.ID, "result")
        WebDriverWait(browser, 120).until(
            lambda b: result.is_displayed() and b.execute_script("return arguments[0].naturalWidth", result) > 0
            or b.find_element(By.ID, "status").get_attribute("class") == "error")
        assert browser.find_element(By.ID, "status").text == "done"
        assert browser.execute_script("return arguments[0].naturalWidth", result) == 32
        assert " s (generate " in browser.find_element(By.ID, "time").text
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        src = result.get_attribute("src")

        # webcam: Chromium's fake camera (640x480); the page scales the captured frame down to the
        # server's pixel limit (4096 here: 73x55), then edits it
        browser.find_element(By.ID, "camera").click()
        video = browser.find_element(By.ID, "video")
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return arguments[0].videoWidth", video) > 0)
        assert browser.execute_script("return [arguments[0].videoWidth, arguments[0].videoHeight]", video) == [640, 480]
        browser.find_element(By.ID, "capture").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "input-info").text.startswith("73x55,"))
        browser.find_element(By.ID, "edit").click()
        status = browser.find_element(By.ID, "status")
        WebDriverWait(browser, 120).until(lambda b: result.get_attribute("src") != src and status.text == "done"
                                          or status.get_attribute("class") == "error")
        assert status.text == "done"
        assert browser.execute_script("return arguments[0].naturalWidth", result) == 32
        browser.save_screenshot(str(tmp_path / "page-webcam.png"))
    finally:
        browser.quit()
    assert Image.open(shot).size[0] > 0 and Image.open(tmp_path / "page-webcam.png").size[0] > 0
    assert src.startswith("data:image/png;base64,")
    expected = np.asarray(engine.generate([images[1]], "make it blue", seed=11, **STEPS))
    assert np.array_equal(pixels(base64.b64decode(src.split(",", 1)[1])), expected)
