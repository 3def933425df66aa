"""The queue worker (``python -m qpipeline.worker --demo``) against a queue server written for the
test (``tests/queue_server.py``, FastAPI on 127.0.0.1 in a subprocess whose state survives a
restart), with the tiny pipeline on CPU.

Every job is accounted for in each case: a result recorded exactly once per id (the server
dedups by id; a retried upload repeats the same result), image results equal to ``Engine.generate``
in this process for the job's seed (the same demo engine the workers build), error results for
jobs that cannot run. Each generate is 1 step at 32x32 (~1 s on 2 busy cores).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("uvicorn", reason="the queue server of the test: pip install -e '.[dev]'")

from qpipeline.demo_pipeline import demo_engine, reference_images, small_vae_references  # noqa: E402
from qpipeline.worker import Backoff  # noqa: E402

from .net import free_port, pixels_b64 as pixels, png_b64, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
JOB = dict(prompt="make it red", num_steps=1, true_cfg_scale=1.0, width=32, height=32)


class QueueServer:
    def __init__(self, tmp: Path, jobs: list, *args: str):
        self.port, self.state_path, self.args = free_port(), tmp / "state.json", args
        (tmp / "jobs.json").write_text(json.dumps(jobs))
        self.jobs_path, self.proc, self.tmp = tmp / "jobs.json", None, tmp
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "QueueServer":
        log = open(self.tmp / "queue-server.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.queue_server", "--port", str(self.port),
                                      "--state", str(self.state_path), "--jobs", str(self.jobs_path), *self.args],
                                     cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._up, "the queue server to listen", 60)
        return self

    def _up(self) -> bool:
        try:
            self.state()
            return True
        except OSError:
            assert self.proc.poll() is None, (self.tmp / "queue-server.log").read_text()[-2000:]
            return False

    def state(self) -> dict:
        with urllib.request.urlopen(self.url + "/state", timeout=5) as r:
            return json.load(r)

    def saved_state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no graceful shutdown, an in-flight upload is cut
            self.proc.wait(10)


class Worker:
    def __init__(self, tmp: Path, name: str, queue_url: str, *args: str, gate: Path | None = None):
        """``gate``: each job's generate waits until that file exists (``tests/gated_worker.py``)."""
        self.log_path = tmp / f"worker-{name}.log"
        module = ["qpipeline.worker"] if gate is None else ["tests.gated_worker", str(gate)]
        self.proc = subprocess.Popen([sys.executable, "-m", *module, "--queue", queue_url, "--demo",
                                      "--poll", "0.2", "--max-backoff", "1.5", *args], cwd=REPO, env=ENV,
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The engine --demo runs (same seed, weights, dtype and backend), loaded here."""
    return demo_engine(tmp_path_factory.mktemp("demo-pipeline"), device="cpu").load()


@pytest.fixture(scope="module")
def reference():
    return reference_images(1, size=32, seed=4)[0]


def expected_image(engine, reference, seed: int, **job) -> np.ndarray:
    kw = {**JOB, **job}
    with small_vae_references():  # what --demo does
        return np.asarray(engine.generate([reference], kw["prompt"], num_steps=kw["num_steps"],
                                          true_cfg_scale=kw["true_cfg_scale"], seed=seed, height=kw["height"],
                                          width=kw["width"]))


def test_backoff_is_capped_exponential_and_jittered():
    b = Backoff(base=0.5, cap=4.0)
    waits = [b.next() for _ in range(8)]
    for n, w in enumerate(waits):
        nominal = min(4.0, 0.5 * 2**n)
        assert 0.5 * nominal <= w <= nominal, (n, w)
    assert len({round(w, 6) for w in waits[4:]}) > 1  # jittered, not in lock-step at the cap
    b.reset()
    assert b.next() <= 0.5


def test_queue_server_lease_survives_a_restart(tmp_path):
    """The test's queue server: a job handed out by a process killed before its worker got the answer
    is handed out again by the next process once its lease runs out (a drain run once lost such a
    job: the lease lived in the killed process only)."""
    from fastapi.testclient import TestClient

    from .queue_server import create_app

    (tmp_path / "jobs.json").write_text(json.dumps([dict(id="a", prompt="p"), dict(id="b", prompt="p")]))
    state, jobs = tmp_path / "state.json", tmp_path / "jobs.json"
    first = TestClient(create_app(state, jobs, lease_s=0.5))
    assert first.get("/api/queue/next").json()["id"] == "a"  # the answer a kill would cut
    second = TestClient(create_app(state, jobs, lease_s=0.5))  # a restart on the same state file
    assert second.get("/api/queue/next").json()["id"] == "b"
    assert second.get("/api/queue/next").status_code == 204  # "a" is still on its lease
    time.sleep(0.6)  # both leases out: both handed out again
    assert {second.get("/api/queue/next").json()["id"] for _ in range(2)} == {"a", "b"}
    assert second.post("/api/queue/result", json=dict(id="a", image="x")).json() == {"status": "recorded"}
    time.sleep(0.6)
    assert second.get("/api/queue/next").json()["id"] == "b"  # "b" was never answered
    assert second.get("/api/queue/next").status_code == 204  # "a" was, and is not handed out again
    assert second.get("/state").json()["handed_out"] == {"a": 2, "b": 3}


def test_two_workers_drain_20_jobs_through_faults(engine, reference, tmp_path):
    """Faults: the queue server down when the workers start, killed (SIGKILL) and restarted
    mid-run, a 500 on one result upload, a job whose image is not base64, a job whose body is not
    JSON. Every job's result is recorded exactly once, images equal to their seed's."""
    image = png_b64(reference)
    jobs = [dict(id=f"job-{i:02d}", images=[image], seed=i, **JOB) for i in range(20)]
    jobs.insert(3, dict(id="job-bad-image", images=["not base64!"], prompt="p", num_steps=1))
    jobs.insert(6, '{"id": "job-raw", "prompt": ')  # cut off: not JSON
    server = QueueServer(tmp_path, jobs, "--fail-upload", "job-04")
    workers = [Worker(tmp_path, name, server.url) for name in "ab"]
    try:
        # while the workers start (nothing listens yet), the expected images
        expected = {f"job-{i:02d}": expected_image(engine, reference, i) for i in range(20)}
        for w in workers:
            wait_for(lambda w=w: "queue server unreachable" in w.log() or w.proc.poll() is not None,
                     "each worker to find the queue server down", 180)
            assert w.proc.poll() is None, w.log()[-3000:]
        server.start()
        wait_for(lambda: len(server.state()["results"]) >= 8, "8 results", 120)
        server.kill()  # mid-run: uploads and polls now fail
        time.sleep(1.0)
        server.start()  # same port, same state file
        wait_for(lambda: len(server.state()["results"]) == 21 and server.state()["unattributed"],
                 "every job answered", 180)
        state = server.state()
        codes = [w.stop() for w in workers]
    finally:
        for w in workers:
            w.stop(5)
        server.kill()
    logs = [w.log() for w in workers]
    assert codes == [0, 0], logs
    assert state["starts"] == 2 and state["waiting"] == []
    assert set(state["results"]) == set(expected) | {"job-bad-image"}
    for job_id, want in expected.items():
        result = state["results"][job_id]
        assert set(result) == {"id", "image"}, result.get("error")
        assert np.array_equal(pixels(result["image"]), want), job_id
    assert len({state["results"][j]["image"] for j in expected}) == 20  # seeds give different images
    bad = state["results"]["job-bad-image"]
    assert set(bad) == {"id", "error"} and "not valid base64" in bad["error"] and "\n" not in bad["error"]
    [raw] = state["unattributed"]
    assert raw["id"] is None and raw["error"].startswith("malformed job: not a JSON object")
    # the 500 was retried with the same result; any other repeat (an upload cut by the kill, a
    # lease handed out again) repeated the same result too, and none was recorded twice
    assert state["failed_uploads"] == ["job-04"] and len(state["posts"]["job-04"]) >= 2
    for job_id, digests in state["posts"].items():
        assert len(set(digests)) == 1, job_id
    done = [len(re.findall(r"worker: job job-\d\d done", log)) for log in logs]
    assert min(done) >= 1 and sum(done) >= 20, done  # both workers took jobs
    for log in logs:
        assert "queue server reachable again" in log and "Traceback" not in log


def test_sigterm_mid_job_finishes_uploads_and_exits_0(engine, reference, tmp_path):
    token = "tok-3f9a1c77e2b54d0d"
    (tmp_path / "token").write_text(token + "\n")
    gate = tmp_path / "gate"  # the job in hand finishes only once this file exists
    slow = dict(id="job-slow", images=[png_b64(reference)], seed=7, **JOB)
    server = QueueServer(tmp_path, [slow, dict(id="job-next", images=[png_b64(reference)], seed=8, **JOB)],
                         "--token", token).start()
    worker = Worker(tmp_path, "a", server.url, "--token-file", str(tmp_path / "token"), "--health-port", "0",
                    gate=gate)
    tokenless = Worker(tmp_path, "no-token", server.url)
    try:
        assert tokenless.proc.wait(180) == 2  # refused token: a one-line error, exit 2
        assert "refused the token (401" in tokenless.log() and "Traceback" not in tokenless.log()
        wait_for(lambda: server.state()["handed_out"].get("job-slow") or worker.proc.poll() is not None,
                 "the slow job to be taken", 180)
        health_url = re.search(r"health on (http://\S+)", worker.log()).group(1)

        def health():  # answered from its own thread, so quickly even while the job runs
            t0 = time.monotonic()
            with urllib.request.urlopen(health_url, timeout=10) as r:
                answer = json.load(r)
            assert time.monotonic() - t0 < 2
            return answer

        # The queue marks the job handed out before the worker has parsed it: poll until it says so.
        wait_for(lambda: health()["running"] == "job-slow" or worker.proc.poll() is not None,
                 "the worker's health to name the held job", 60)
        assert health()["model_loaded"] and worker.proc.poll() is None
        worker.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: health()["stopping"], "the worker to take the signal", 30)
        assert "job-slow" not in server.state()["results"]  # still in hand after the signal
        gate.touch()
        assert worker.proc.wait(120) == 0, worker.log()[-3000:]
        state = server.state()
    finally:
        gate.touch()
        worker.stop(5)
        tokenless.stop(5)
        server.kill()
    assert np.array_equal(pixels(state["results"]["job-slow"]["image"]), expected_image(engine, reference, 7))
    assert [j["id"] for j in state["waiting"]] == ["job-next"]  # not taken after the signal
    assert "worker: stopped (1 done, 0 failed)" in worker.log()
    for w in (worker, tokenless):
        assert token not in w.log()


def test_worker_cli_refuses_bad_settings_in_one_line(tmp_path, capsys):
    from qpipeline import worker

    cases = [
        (["--queue", "queue-host:8000", "--demo"], "--queue must be an http(s) URL"),
        (["--queue", "http://127.0.0.1:1", "--demo", "--poll", "0"], "--poll must be > 0"),
        (["--queue", "http://127.0.0.1:1", "--demo", "--token-file", str(tmp_path / "none")],
         "cannot read --token-file"),
        (["--queue", "http://127.0.0.1:1", "--model", str(tmp_path / "none")], "not a diffusers pipeline folder"),
    ]
    for argv, words in cases:
        assert worker.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and words in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit):  # --queue is required
        worker.main(["--demo"])
