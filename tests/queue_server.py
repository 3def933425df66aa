"""A small queue server speaking the worker's protocol (``qpipeline.worker``), run by the worker
tests as a subprocess on 127.0.0.1:

    python -m tests.queue_server --port P --state state.json [--jobs jobs.json] [--token T]
                                 [--fail-upload ID] [--lease 15]

Its state (jobs waiting, handed out, results) lives in ``--state``, rewritten atomically on every
change, so the test can kill it and start it again on the same port and file (a restart mid-run).
``--jobs`` seeds a fresh state: a JSON list whose items are job objects, or strings sent as the
raw body of ``/api/queue/next`` (a malformed job).

* ``GET /api/queue/next``: the oldest waiting job (200), else 204. A job handed out and not answered
  within ``--lease`` seconds is handed out again (its worker may have died, or the answer that
  carried it was cut). The jobs on lease are in the state file too: after a restart, the previous
  process's leases run ``--lease`` seconds from the start, so a job whose hand-out a kill cut off
  is not lost.
* ``POST /api/queue/result``: records a result by ``id`` the first time (200 ``recorded``); a repeat
  of a recorded id is acknowledged (200 ``duplicate``), never recorded twice; ``posts`` keeps a
  digest of every upload of each id. A result
  with ``"id": null`` (the worker's answer to a malformed job) is kept in ``unattributed``.
  ``--fail-upload ID`` answers the first upload of that id with a 500 and records nothing.
* ``GET /state``: the whole state, for the test.
* With ``--token``, every request must carry ``Authorization: Bearer <token>``, else 401.
"""

import argparse
import hashlib
import json
import os
import threading
import time


def load_state(path, jobs_path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    with open(jobs_path) as f:
        jobs = json.load(f)
    return dict(waiting=jobs, handed_out={}, leased={}, results={}, posts={}, unattributed=[],
                failed_uploads=[], starts=0)


def save_state(state, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_app(state_path, jobs_path=None, token=None, fail_upload=None, lease_s=15.0):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    state = load_state(state_path, jobs_path)
    state["starts"] += 1
    save_state(state, state_path)
    lock = threading.Lock()
    # id -> (monotonic hand-out time, job); a previous process's leases restart their clocks now
    leased = {job_id: (time.monotonic(), job) for job_id, job in state["leased"].items()}
    app = FastAPI()

    def authorized(request: Request) -> bool:
        return token is None or request.headers.get("authorization") == f"Bearer {token}"

    @app.get("/api/queue/next")
    def next_job(request: Request):
        if not authorized(request):
            return JSONResponse({"error": "bad token"}, status_code=401)
        with lock:
            now = time.monotonic()
            for job_id, (t, job) in list(leased.items()):
                if job_id in state["results"]:
                    del leased[job_id], state["leased"][job_id]
                elif now - t > lease_s:  # never answered: hand it out again
                    del leased[job_id], state["leased"][job_id]
                    state["waiting"].insert(0, job)
            if not state["waiting"]:
                return Response(status_code=204)
            job = state["waiting"].pop(0)
            if isinstance(job, str):  # a malformed job: sent as it is
                state["handed_out"]["<raw>"] = state["handed_out"].get("<raw>", 0) + 1
                save_state(state, state_path)
                return Response(job, media_type="application/json")
            state["handed_out"][str(job["id"])] = state["handed_out"].get(str(job["id"]), 0) + 1
            leased[str(job["id"])] = (now, job)
            state["leased"][str(job["id"])] = job
            save_state(state, state_path)
            return JSONResponse(job)

    @app.post("/api/queue/result")
    async def result(request: Request):
        if not authorized(request):
            return JSONResponse({"error": "bad token"}, status_code=401)
        body = await request.json()
        with lock:
            job_id = body.get("id")
            if job_id is None:
                state["unattributed"].append(body)
                save_state(state, state_path)
                return {"status": "recorded"}
            key = str(job_id)
            # every upload of an id, as a digest of what it carried: a retried upload repeats it
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            state["posts"].setdefault(key, []).append(digest)
            if key == fail_upload and key not in state["failed_uploads"]:
                state["failed_uploads"].append(key)
                save_state(state, state_path)
                return JSONResponse({"error": "injected failure"}, status_code=500)
            if key in state["results"]:
                save_state(state, state_path)
                return {"status": "duplicate"}
            state["results"][key] = body
            leased.pop(key, None)
            state["leased"].pop(key, None)
            save_state(state, state_path)
            return {"status": "recorded"}

    @app.get("/state")
    def get_state():
        with lock:
            return json.loads(json.dumps(state))

    return app


def main():
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--jobs")
    p.add_argument("--token")
    p.add_argument("--fail-upload")
    p.add_argument("--lease", type=float, default=15.0)
    a = p.parse_args()
    app = create_app(a.state, a.jobs, a.token, a.fail_upload, a.lease)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
