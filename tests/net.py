"""Loopback helpers shared by the server, stream, worker and Ray tests: free ports, PNG/base64
images, polling with a deadline, and an ASGI app under uvicorn in a thread of this process."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_b64(image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def pixels_b64(b64: str) -> np.ndarray:
    """The RGB pixels of a base64 image."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def wait_for(condition, what: str, timeout: float, poll: float = 0.1):
    """``condition()``'s first truthy value; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(poll)
    return value


class ThreadedServer:
    """An ASGI app under uvicorn on 127.0.0.1 (a free port) in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), "uvicorn to start", 30, poll=0.02)
        assert self.server.started, "uvicorn did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
