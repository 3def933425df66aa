"""The edit app on Ray Serve (``qpipeline.integrations.ray_serve``): a local cluster
(``ray.init(num_cpus=2)``), 2 replicas of the tiny pipeline on CPU, real HTTP clients on
127.0.0.1 through Ray's proxy. One cluster and one deployment for the module (Ray and the two
replicas take ~30-60 s to start on 2 cores).

Replicas are 1 step at 32x32 here (~1 s each), one request at a time each, 4 more in Ray's queue.
"""

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install -e '.[ray]'")
httpx = pytest.importorskip("httpx", reason="the dev extra: pip install -e '.[dev]'")

from qpipeline.demo_pipeline import demo_engine, reference_images, small_vae_references  # noqa: E402
from qpipeline.integrations.ray_serve import RaySettings, build_app, demo_spec  # noqa: E402
from qpipeline.server import ServerConfig  # noqa: E402

from .net import free_port, pixels_b64 as pixels, png_b64  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUEUED = 4
JOB = dict(prompt="make it red", num_steps=1, width=32, height=32)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The deployment's URL. Ray's worker processes start from this Python with this
    environment; PYTHONPATH makes them import this checkout's packages, as this process does."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), old]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 90})
        spec = demo_spec(tmp_path_factory.mktemp("ray-demo"), device="cpu")
        settings = RaySettings(replicas=2, cpus_per_replica=0.5, max_queued_requests=QUEUED,
                               health_check_period_s=2.0)
        t0 = time.monotonic()
        serve.run(build_app(spec, ServerConfig(max_queue=QUEUED, timeout_s=60, default_size=32), settings),
                  name="qpipeline", route_prefix="/")
        print(f"ray serve: 2 replicas up in {time.monotonic() - t0:.1f} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The replicas' engine (same seed, weights, dtype, backend), loaded here."""
    return demo_engine(tmp_path_factory.mktemp("demo"), device="cpu").load()


@pytest.fixture(scope="module")
def reference():
    return reference_images(1, size=32, seed=5)[0]


def expected(engine, reference, seed: int, num_steps: int = 1) -> np.ndarray:
    with small_vae_references():
        return np.asarray(engine.generate([reference], JOB["prompt"], num_steps=num_steps, seed=seed,
                                          height=32, width=32))


async def _burst(url: str, bodies: dict, timeout: float):
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=64)) as c:
        async def one(key, body):
            try:
                return key, await c.post("/generate", json=body)
            except httpx.HTTPError as e:  # a timeout or a cut connection: counted as lost below
                return key, e

        return dict(await asyncio.gather(*(one(k, b) for k, b in bodies.items())))


def _health_by_replica(url: str, tries: int = 40) -> dict:
    """``/health`` of each replica, by its X-Replica name (Ray picks the replica)."""
    seen = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(tries):
            r = c.get("/health")
            assert r.status_code == 200, r.text
            seen[r.headers["x-replica"]] = r.json()
            if len(seen) == 2:
                break
    return seen


def test_16_concurrent_clients_each_answered_once_on_both_replicas(cluster, engine, reference):
    before = _health_by_replica(cluster)
    assert len(before) == 2
    image = png_b64(reference)
    t0 = time.monotonic()
    answers = asyncio.run(_burst(cluster, {seed: dict(images=[image], seed=seed, **JOB) for seed in range(16)}, 90))
    elapsed = time.monotonic() - t0
    assert sorted(answers) == list(range(16)) and elapsed < 90
    assert all(isinstance(r, httpx.Response) for r in answers.values()), answers  # none lost
    codes = {seed: r.status_code for seed, r in answers.items()}
    assert set(codes.values()) <= {200, 429}, {s: (r.status_code, r.text[:200]) for s, r in answers.items()}
    ok = sorted(s for s, code in codes.items() if code == 200)
    # 2 running + QUEUED waiting at the proxy accepted at once, later arrivals may find a free slot.
    # The router's view of a replica's load can lag by the request it just answered (a /health
    # probe above; seen once in a loaded full-suite run: 5 accepted), hence one slot a replica less.
    assert QUEUED <= len(ok) < 16, codes
    for seed in ok:
        body = answers[seed].json()
        assert body["seed"] == seed and np.array_equal(pixels(body["image"]), expected(engine, reference, seed))
    assert {answers[s].headers["x-replica"] for s in ok} == set(before)  # both replicas answered
    for seed, r in answers.items():
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and "x-replica" not in r.headers
    after = _health_by_replica(cluster)
    # no request ran twice and none that was refused ran: the replicas' counters add up to the 200s
    ran = sum(after[n]["stats"]["completed"] - before[n]["stats"]["completed"] for n in after)
    assert ran == len(ok) and all(h["stats"]["failed"] == 0 and h["queue"]["max"] == QUEUED for h in after.values())


def _replica_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if "SERVE_REPLICA" in a["name"] and "EditReplica" in a["name"])


def _running_replicas() -> int:
    status = serve.status().applications["qpipeline"].deployments["EditReplica"]
    return status.replica_states.get("RUNNING", 0)


def test_a_killed_replica_is_replaced_and_its_requests_answered_before_their_deadline(cluster, engine, reference):
    names = _replica_actors()
    assert len(names) == 2
    image = png_b64(reference)
    bodies = {seed: dict(images=[image], seed=seed, **{**JOB, "num_steps": 6}) for seed in range(100, 106)}

    victim = ray.get_actor(names[0], namespace="serve")

    async def run():
        burst = asyncio.ensure_future(_burst(cluster, bodies, 90))
        # Kill it while it holds a request (Ray's own count of a replica's ongoing requests, which
        # its router polls too), not after a fixed sleep: on a fast machine the burst may be over.
        deadline = time.monotonic() + 60
        while await victim.get_num_ongoing_requests.remote() < 1:
            assert time.monotonic() < deadline and not burst.done(), "the replica never took a request"
            await asyncio.sleep(0.02)
        ray.kill(victim, no_restart=True)
        return await burst

    t0 = time.monotonic()
    answers = asyncio.run(run())
    elapsed = time.monotonic() - t0
    assert elapsed < 90 and all(isinstance(r, httpx.Response) for r in answers.values()), answers
    codes = {seed: r.status_code for seed, r in answers.items()}
    # the killed replica was running one of them (each replica holds one while 4 wait): that one
    # gets Ray's 500 (measured: "Internal Server Error"); the others are answered by the survivor,
    # or refused with 429 + Retry-After where the halved deployment's queue is full (measured once
    # in five runs: {100: 200, 101: 500, 102: 200, 103: 200, 104: 429, 105: 429})
    errors = [seed for seed, code in codes.items() if code not in (200, 429)]
    assert 1 <= len(errors) <= 2 and any(code == 200 for code in codes.values()), str(codes)
    for seed, r in answers.items():
        if r.status_code == 200:
            assert np.array_equal(pixels(r.json()["image"]), expected(engine, reference, seed, num_steps=6))
        elif r.status_code == 429:  # refused while the deployment was down to one replica
            assert int(r.headers["retry-after"]) >= 1, r.headers
        else:  # the request the killed replica held: an error answer, not a hang
            assert r.status_code in (500, 502, 503), (r.status_code, r.text[:300])
    # Ray starts a replacement; the deployment is back to 2 replicas and answers
    deadline = time.monotonic() + 90
    while not (_running_replicas() == 2 and len(_replica_actors()) == 2 and names[0] not in _replica_actors()):
        assert time.monotonic() < deadline, serve.status()
        time.sleep(0.5)
    seen = _health_by_replica(cluster)
    assert len(seen) == 2 and set(seen) != {n.rsplit("#", 1)[-1] for n in names}
    with httpx.Client(base_url=cluster, timeout=60) as c:
        r = c.post("/generate", json=dict(images=[image], seed=200, **JOB))
    assert r.status_code == 200 and np.array_equal(pixels(r.json()["image"]), expected(engine, reference, 200))


def test_serve_ray_refuses_bad_settings_in_one_line(capsys, tmp_path):
    from qpipeline import serve
    from qpipeline.integrations.ray_serve import app_builder

    for argv, words in ((["--ray", "--demo", "--replicas", "0"], "--replicas must be >= 1"),
                        (["--ray", "--demo", "--min-replicas", "1"], "give both --min-replicas and --max-replicas"),
                        (["--ray", "--demo", "--min-replicas", "3", "--max-replicas", "2"], "0 <= min <= max"),
                        (["--ray", "--model", str(tmp_path / "none")], "not a diffusers pipeline folder")):
        assert serve.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and words in err and len(err.splitlines()) == 1, err
    with pytest.raises(ValueError, match="unknown argument 'replica'"):
        app_builder({"model": str(tmp_path), "replica": "2"})
    with pytest.raises(ValueError, match="give model="):
        app_builder({})
    with pytest.raises(ValueError, match="fuse must be 1/true/yes or 0/false/no"):
        app_builder({"model": str(tmp_path), "fuse": "maybe"})


def test_serve_ray_spec_carries_fuse_and_cuda_graphs(tmp_path):
    """The replicas' engine spec takes --fuse / --cuda-graphs (serve --ray) and fuse= / cuda_graphs=
    (serve run); a replica builds its engine with them."""
    import contextlib

    from qpipeline import serve as qserve
    from qpipeline.integrations import ray_serve as rs

    args = qserve.build_parser().parse_args(["--ray", "--demo", "--fuse", "--device", "cpu"])
    with contextlib.ExitStack() as stack:
        spec, _ = rs.spec_from_args(args, stack)
        assert spec["fuse"] is True and spec["cuda_graphs"] is False
        engine = rs._engine_from_spec(spec, stack)
        assert engine.fuse and not engine.cuda_graphs
    assert rs._flag({"fuse": "yes"}, "fuse") and not rs._flag({}, "fuse") and not rs._flag({"fuse": "0"}, "fuse")
