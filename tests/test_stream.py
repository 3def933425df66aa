"""Stream mode (qpipeline.stream, the server's WS /stream) on the tiny pipeline, CPU, float32.

Frames are 32x32 and the pipeline's reference resize target is 32*32 px, so that a frame is
~0.4 s on 2 cores (at 64x64 the tiny VAE's decode alone is ~0.9 s).

Tolerances: the plain loop is the pipeline's own arithmetic in the pipeline's order, so it equals
``Engine.generate`` bit for bit. The stream batch runs the same arithmetic per row, but a forward
over 2 rows is a GEMM with twice the rows, for which the CPU BLAS picks another blocking and sums
K in another order: float32 results move by a few ulps, which 2 steps and the VAE decode carry to
~1e-6 on [0, 1] pixels (measured: 9e-7). ATOL 1e-5 is ten times that and 1000x below what a
wrong timestep or seed changes (checked below, so the tolerance is not too loose to fail).
"""

import asyncio
import base64
import io
import json
import socket
import time

import numpy as np
import pytest

from qkernels.errors import InputError
from qpipeline.demo_pipeline import demo_engine, small_vae_references
from qpipeline.stream import StreamEditor

from .net import ThreadedServer, png_bytes

SIZE = 32
PROMPT = "make it snow"
ATOL = 1e-5


def pattern(t: float, size: int = SIZE, seed: int = 0):
    """A seeded synthetic camera frame: smooth colour noise shifted by ``t`` px plus a square that
    moves with ``t`` (t = 0: the still scene)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.random((size // 4, size // 4, 3))
    big = np.kron(base, np.ones((4, 4, 1)))
    shift = int(round(t)) % size
    img = np.roll(big, shift, axis=1)
    x = 2 + (int(round(2 * t)) % (size - 10))
    img[8:16, x:x + 8] = (1.0, 0.2, 0.1)
    return Image.fromarray((img * 255).astype(np.uint8))


@pytest.fixture(scope="module", autouse=True)
def _small_references():
    with small_vae_references(SIZE * SIZE):
        yield


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The tiny pipeline in float32, unquantized (bf16 backend = plain F.linear)."""
    return demo_engine(tmp_path_factory.mktemp("stream-pipeline"), backend="bf16", device="cpu").load()


def editor(engine, **kw):
    opts = dict(steps=2, size=SIZE, seed=3, output="np", threshold=None, vlm_every=1)
    opts.update(kw)
    return StreamEditor(engine, PROMPT, **opts)


def run_inline(ed, frames):
    out = []
    for f in frames:
        out += ed.process(f)
    return out + ed.flush()


def test_plain_loop_equals_engine_generate_bit_for_bit(engine):
    frame = pattern(3)
    got = editor(engine, batch=False).process(frame)
    assert len(got) == 1 and got[0].seq == 0 and not got[0].skipped
    ref = engine.generate([frame], PROMPT, num_steps=2, seed=3, height=SIZE, width=SIZE, output_type="np")
    assert got[0].image.shape == (SIZE, SIZE, 3) and np.array_equal(got[0].image, ref)


def test_an_unloaded_engine_loads_at_the_first_frame(engine, tmp_path):
    fresh = demo_engine(tmp_path / "pipe", backend="bf16", device="cpu")  # same seed: same weights
    assert not fresh.loaded
    got = editor(fresh, batch=False).process(pattern(3))[0].image
    assert fresh.loaded and np.array_equal(got, editor(engine, batch=False).process(pattern(3))[0].image)


def test_stream_batch_gives_the_plain_loop_images(engine):
    frames = [pattern(2 * t) for t in range(3)]
    plain = run_inline(editor(engine, steps=3, batch=False), frames)
    ed = editor(engine, steps=3, batch=True)
    batched = []
    for i, f in enumerate(frames):
        out = ed.process(f)
        # the pipeline fills: frame i comes out n - 1 = 2 forwards after it entered
        assert [r.seq for r in out] == ([] if i < 2 else [i - 2])
        batched += out
    rep = ed.report()
    assert rep["forwards"] == 3 and rep["rows"] == 1 + 2 + 3  # the third forward: 3 frames at 3 steps
    batched += ed.flush()  # two more forwards, of 2 rows and 1
    assert ed.report()["forwards"] == 5 and ed.report()["rows"] == 6 + 2 + 1
    assert [r.seq for r in batched] == [r.seq for r in plain] == [0, 1, 2]
    for b, p in zip(batched, plain):
        assert np.abs(b.image - p.image).max() <= ATOL
    # the tolerance can fail: another seed (another noise) moves pixels by far more
    other = run_inline(editor(engine, steps=3, batch=False, seed=4), frames[:1])[0]
    assert np.abs(other.image - plain[0].image).max() > 1000 * ATOL
    assert rep["encodes"] == 3  # vlm_every=1: each row carried its own frame's embedding
    assert ed.in_flight == 0


def test_latest_frame_wins_drops_never_reorders(engine):
    for batch in (False, True):
        ed = editor(engine, batch=batch)
        with ed:
            with engine._lock:  # the worker takes frame 0, then waits for the engine
                ed.submit(pattern(0))
                deadline = time.monotonic() + 10
                while ed._waiting is not None:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                for t in range(1, 6):  # each replaces the one waiting
                    assert ed.submit(pattern(3 * t)) == t
            results = [ed.next_result(timeout=60), ed.next_result(timeout=60)]
        assert [r.seq for r in results] == [0, 5]
        assert ed.stats["dropped"] == 4 and ed.stats["submitted"] == 6 and ed.stats["processed"] == 2
        assert all(r.t_in <= r.t_start <= r.t_out for r in results) and results[1].t_in > results[0].t_in
        assert list(ed.results(timeout=5)) == []  # closed: the iterator ends
    with pytest.raises(InputError):
        editor(engine).submit(np.zeros((4, 4, 3)))


def test_a_skipped_frame_returns_the_previous_result(engine):
    still = pattern(0)
    ed = editor(engine, batch=False, threshold=0.98, max_skip=4)
    out = run_inline(ed, [still] * 11)
    assert [r.seq for r in out] == list(range(11))
    assert [r.skipped for r in out] == [False] + [True] * 4 + [False] + [True] * 4 + [False]
    for r in out[1:5]:
        assert r.image is out[0].image and r.source_seq == 0 and r.similarity == 1.0
    # the refresh of a still scene gives the same image bit for bit (same noise, same embedding)
    assert np.array_equal(out[5].image, out[0].image) and out[5].source_seq == 5
    assert ed.report()["skip_rate"] == pytest.approx(8 / 11)
    # a moving frame is below the threshold: processed
    moved = ed.process(pattern(8))[0]
    assert not moved.skipped and moved.similarity < 0.98
    # stream batch: skipped frames wait for the frames before them (order kept)
    bt = run_inline(editor(engine, batch=True, threshold=0.98, max_skip=4), [pattern(4), still, still, still])
    assert [r.seq for r in bt] == [0, 1, 2, 3] and [r.skipped for r in bt] == [False, False, True, True]
    assert bt[2].image is bt[1].image and bt[2].source_seq == 1


def test_skip_is_probabilistic_between_threshold_and_one(engine):
    ed = editor(engine, threshold=0.5, max_skip=10**6)
    ed._last_frame_small = object()
    draws = [ed._skip(0.75) for _ in range(4000)]  # p = (0.75 - 0.5) / (1 - 0.5)
    assert 0.45 < sum(draws) / len(draws) < 0.55
    assert not any(ed._skip(0.5) for _ in range(100)) and all(ed._skip(1.0) for _ in range(100))


def test_vlm_embedding_reuse_and_still_scene_coherence(engine):
    frames = [pattern(0.25 * t) for t in range(5)]  # a slow motion: similar frames
    ed = editor(engine, batch=False, vlm_every=2, vlm_threshold=0.5)
    out = run_inline(ed, frames)
    assert [r.encoded for r in out] == [True, False, True, False, True]
    # a frame unlike the one encoded refreshes at once
    ed2 = editor(engine, batch=False, vlm_every=None, vlm_threshold=0.95)
    enc = [r.encoded for r in run_inline(ed2, [pattern(0), pattern(0), pattern(0, seed=9)])]
    assert enc == [True, False, True]
    # still camera, skip off: consecutive outputs the same (< 1e-3 mean abs; here exactly)
    still = run_inline(editor(engine, batch=True, vlm_every=1), [pattern(0)] * 2)
    for a, b in zip(still, still[1:]):
        assert np.abs(a.image - b.image).mean() < 1e-3
    # blend: the frame starts from the previous output's latent mixed with its own
    bl = run_inline(editor(engine, batch=False, blend=0.5), [pattern(0), pattern(1)])
    plain = run_inline(editor(engine, batch=False), [pattern(0), pattern(1)])
    assert np.array_equal(bl[0].image, plain[0].image)  # no previous output: the full schedule
    assert np.abs(bl[1].image - plain[1].image).max() > 1e-3


@pytest.mark.parametrize("kw", [dict(size=40), dict(steps=0), dict(threshold=1.0), dict(blend=1.0),
                                dict(output="jpeg"), dict(blend=0.5, reference_size=64)])
def test_bad_options_raise_input_error(engine, kw):
    with pytest.raises(InputError):
        editor(engine, **kw)


# --- the WebSocket ----------------------------------------------------------------------------------

uvicorn = pytest.importorskip("uvicorn", reason="the server extra: pip install -e '.[server]'")
websockets = pytest.importorskip("websockets", reason="the dev extra: pip install -e '.[dev]'")


png = png_bytes


class Server(ThreadedServer):
    """``create_app`` under uvicorn in a thread of this process; ``ws``: its stream's URL."""

    def __init__(self, engine, **config):
        from qpipeline.server import ServerConfig, create_app

        super().__init__(create_app(engine, ServerConfig(default_size=SIZE, **config)))

    def __enter__(self):
        super().__enter__()
        self.ws = f"ws://127.0.0.1:{self.port}/stream"
        return self


CONTROL = dict(prompt=PROMPT, steps=2, size=SIZE, threshold=None, seed=3, format="png")


async def _edit(ws, frame, as_json=False):
    """Send one frame, wait for its answer: (meta, RGB array)."""
    from PIL import Image

    if as_json:
        await ws.send(json.dumps({"image": base64.b64encode(png(frame)).decode()}))
        meta = json.loads(await asyncio.wait_for(ws.recv(), 60))
        data = base64.b64decode(meta.pop("image"))
    else:
        await ws.send(png(frame))
        meta = json.loads(await asyncio.wait_for(ws.recv(), 60))
        data = await asyncio.wait_for(ws.recv(), 60)
    assert meta["type"] == "frame" and meta["mime"] == "image/png"
    return meta, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


async def _closed(ws):
    """The close code and reason the server sent."""
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 60)
    return ws.close_code, ws.close_reason


def test_websocket_round_trip_over_loopback(engine):
    frames = [pattern(0), pattern(5), pattern(9)]
    # the client waits for each answer before it sends the next frame, so each frame runs alone
    # (a forward of one row) on the server; the same here: bit-equal PNGs
    inline = StreamEditor(engine, PROMPT, steps=2, size=SIZE, seed=3, threshold=None)
    expected = [r for f in frames for r in inline.process(f) + inline.flush()]

    async def client(url):
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps(CONTROL))
            ready = json.loads(await ws.recv())
            assert ready == dict(type="ready", steps=2, size=SIZE, threshold=None, format="png",
                                 max_frame_bytes=ready["max_frame_bytes"])
            answers = [await _edit(ws, frames[0]), await _edit(ws, frames[1], as_json=True),
                       await _edit(ws, frames[2])]
        return answers

    with Server(engine) as srv:
        answers = asyncio.run(client(srv.ws))
        import httpx

        health = httpx.get(srv.url + "/health").json()
    assert [m["seq"] for m, _ in answers] == [0, 1, 2]
    for (meta, got), exp in zip(answers, expected):
        assert np.array_equal(got, np.asarray(exp.image)) and meta["latency_ms"] > 0 and not meta["skipped"]
    assert health["streams"]["started"] == 1 and health["streams"]["active"] == 0


def _half_frame_then_close(port: int) -> None:
    """A client that opens a stream, starts a 10000-byte binary frame, sends 100 bytes of it and
    closes the connection."""
    key = base64.b64encode(b"0123456789abcdef").decode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall((f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    assert b" 101 " in sock.recv(4096).split(b"\r\n")[0]

    def frame(opcode, payload, length=None):
        n = len(payload) if length is None else length
        mask = b"\x01\x02\x03\x04"
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    sock.sendall(frame(1, json.dumps(CONTROL).encode()))
    sock.recv(4096)  # ready
    sock.sendall(frame(2, b"\x89PNG" + b"\x00" * 96, length=10000))  # 100 of 10000 bytes
    sock.close()


def test_bad_clients_get_a_close_code_and_the_server_keeps_serving(engine):
    async def scenario(srv):
        async with websockets.connect(srv.ws, max_size=2**24) as good:
            await good.send(json.dumps(CONTROL))
            await good.recv()
            codes = {}

            async def bad(name, messages, control=CONTROL):
                async with websockets.connect(srv.ws) as ws:
                    if control is not None:
                        await ws.send(json.dumps(control))
                        assert json.loads(await ws.recv())["type"] == "ready"
                    for m in messages:
                        await ws.send(m)
                    codes[name] = await _closed(ws)

            await bad("garbage", [b"\x00\x01garbage, not an image"])
            await _edit(good, pattern(1))  # still served
            await bad("oversize", [b"\x89PNG" + b"\x00" * 70000])
            await bad("text", ["not json"])
            await bad("control-later", [json.dumps(CONTROL)])
            async with websockets.connect(srv.ws) as ws:
                await ws.send(json.dumps(dict(CONTROL, steps=99)))
                codes["bad-control"] = await _closed(ws)
            async with websockets.connect(srv.ws) as ws:
                await ws.send(b"binary first")
                codes["binary-control"] = await _closed(ws)
            await asyncio.to_thread(_half_frame_then_close, srv.port)
            await _edit(good, pattern(2))
            # the limit is 2 streams: with `good` and one more open, a third is refused
            async with websockets.connect(srv.ws) as second:
                await second.send(json.dumps(CONTROL))
                await second.recv()
                async with websockets.connect(srv.ws) as third:
                    codes["third"] = await _closed(third)
                meta, _ = await _edit(second, pattern(3))
            meta_good, _ = await _edit(good, pattern(4))
            return codes, meta_good

    with Server(engine, max_streams=2, max_image_bytes=64 * 1024) as srv:
        codes, meta = asyncio.run(scenario(srv))
    assert codes["garbage"][0] == 1003 and "not an image" in codes["garbage"][1]
    assert codes["oversize"][0] == 1009 and "limit is 65536" in codes["oversize"][1]
    assert codes["text"][0] == 1003 and "JSON" in codes["text"][1]
    assert codes["control-later"][0] == 1008 and "one stream per connection" in codes["control-later"][1]
    assert codes["bad-control"][0] == 1008 and "steps must be in" in codes["bad-control"][1]
    assert codes["binary-control"][0] == 1003 and "first message" in codes["binary-control"][1]
    assert codes["third"][0] == 1008 and "too many streams" in codes["third"][1]
    assert meta["seq"] == 2 and not meta["skipped"]  # good's third frame: it was served throughout


def test_the_page_streams_the_webcam_in_headless_chromium(engine, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_server import _chromium

    with Server(engine) as srv:
        browser = _chromium(tmp_path)
        try:
            browser.get(srv.url + "/")
            for field, value in (("stream-size", str(SIZE)), ("stream-steps", "2")):
                box = browser.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)
            browser.find_element(By.ID, "stream-start").click()
            out = browser.find_element(By.ID, "stream-out")
            info = browser.find_element(By.ID, "stream-info")
            # three edited frames shown (the info line names the frame's sequence number)
            WebDriverWait(browser, 90).until(
                lambda b: " fps, latency " in info.text and int(info.text.split("frame ")[1].split()[0].rstrip(","))
                >= 2 or b.find_element(By.ID, "status").get_attribute("class") == "error")
            assert browser.find_element(By.ID, "status").get_attribute("class") != "error", \
                browser.find_element(By.ID, "status").text
            assert browser.execute_script("return arguments[0].naturalWidth", out) == SIZE
            assert browser.execute_script("return arguments[0].src", out).startswith("blob:")
            shot = tmp_path / "page-stream.png"
            browser.save_screenshot(str(shot))
            browser.find_element(By.ID, "stream-stop").click()
            WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "status").text == "stream stopped")
        finally:
            browser.quit()
    from PIL import Image

    assert Image.open(shot).size[0] > 0
