"""Workers: the queue's workers in-process (SQLite and PostgreSQL), and `t2v serve` API nodes
with `t2v worker` processes sharing a real PostgreSQL."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from fastapi.testclient import TestClient

from fake_model import FakeModel, launch_args
from pg import postgres  # noqa: F401 - the session fixture
from servers import Server, _die_with_parent
from t2v.model import FloatRange, GenerationRequest, IntRange, Knobs
from t2v.pipeline_config import DEFAULT_MODEL_DIR
from t2v.serve.app import ServeConfig, create_app
from t2v.serve.auth import KeyStore
from t2v.serve.queue import JobQueue
from t2v.serve.store import FINISHED, JobError, JobRequest, StoreUnavailable
from t2v.serve.store_pg import PgStore
from t2v.serve.store_sqlite import SqliteStore
from t2v.serve.worker import LIVE_S, Worker, card_knobs


def wait_until(condition, timeout=20.0, every=0.01):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return found


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request, tmp_path):
    opened = []

    def make():
        if request.param == "sqlite":
            opened.append(SqliteStore(tmp_path / "data"))
        else:
            if not hasattr(make, "url"):
                make.url = request.getfixturevalue("postgres").fresh()
            opened.append(PgStore(make.url, tmp_path / "data"))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def start_queue():
    """start_queue(store, model, **options) -> a started JobQueue; stopped afterwards."""
    started = []

    def start(store, model, **options):
        queue = JobQueue(store, lambda: model, **options)
        queue.start()
        started.append(queue)
        wait_until(lambda: queue.state == "ready")
        return queue

    yield start
    for queue in started:
        queue.stop(10)


def running(store, job_id):
    job = store.get(job_id, None)
    return job.status == "running" and job.step >= 1


class _FullDisk:
    """A SQLite connection whose writes fail as on a full disk while `full` is set."""

    def __init__(self, db: sqlite3.Connection):
        self._db, self.full = db, False

    def execute(self, sql, *args):
        if self.full and sql.split()[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


def test_a_full_disk_fails_the_running_job_once_space_is_back(tmp_path, start_queue):
    store = SqliteStore(tmp_path)
    disk = store._db = _FullDisk(store._db)
    queue = start_queue(store, FakeModel(step_s=0.02))
    job, _ = queue.submit("", JobRequest("a red circle", steps=100), None)
    wait_until(lambda: running(store, job.id))
    disk.full = True
    with pytest.raises(StoreUnavailable) as refused:  # the routes answer 503 + Retry-After
        queue.submit("", JobRequest("a blue square"), None)
    assert refused.value.status == 503 and refused.value.retry_after > 0
    assert refused.value.message.endswith(".") and "retry" in refused.value.message
    time.sleep(0.5)  # the worker could not write progress, stopped, and retries the outcome
    assert store.get(job.id, None).status == "running"
    disk.full = False  # space is back
    failed = wait_until(lambda: (j := store.get(job.id, None)).status == "failed" and j)
    assert "could not record" in failed.error and failed.error.endswith(".")
    after, _ = queue.submit("", JobRequest("a green circle", steps=2), None)
    wait_until(lambda: store.status(after.id) == "succeeded")  # the worker goes on


def test_a_post_on_a_full_disk_is_a_503_with_retry_after(tmp_path):
    app = create_app(ServeConfig(data_dir=tmp_path / "data"), FakeModel("t2v-moving-shapes"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        wait_until(lambda: client.get("/readyz").status_code == 200)
        store = app.state.queue.store
        store._db = _FullDisk(store._db)
        store._db.full = True
        r = client.post("/v1/videos", json={"prompt": "a red circle"})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
        assert "retry" in r.text
        store._db.full = False
        assert client.post("/v1/videos", json={"prompt": "a red circle"}).status_code == 202


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root and the right to mount; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected full disk still runs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_real_full_disk_fails_the_running_job_once_space_is_back(small_disk, start_queue):
    store = SqliteStore(small_disk)
    queue = start_queue(store, FakeModel(step_s=0.02))
    job, _ = queue.submit("", JobRequest("a red circle", steps=100), None)
    wait_until(lambda: running(store, job.id))
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
        for size in (65536, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    with pytest.raises(StoreUnavailable):
        for i in range(100):  # the WAL may hold a few more pages
            queue.submit("", JobRequest(f"a blue square {i}"), None)
    time.sleep(2.5)  # longer than the job: its last writes (video, outcome) meet the full disk
    assert store.get(job.id, None).status == "running"  # not recorded yet: it keeps trying
    filler.unlink()  # space is back
    failed = wait_until(lambda: (j := store.get(job.id, None)).status == "failed" and j)
    assert failed.error.endswith(".") and "could not" in failed.error


def test_a_second_server_on_one_data_dir_is_refused(tmp_path, start_queue):
    first = start_queue(SqliteStore(tmp_path), FakeModel())
    job, _ = first.submit("", JobRequest("a red circle", steps=2), None)
    fatal = []
    second = JobQueue(SqliteStore(tmp_path), FakeModel, on_fatal=lambda: fatal.append(1))
    second.start()  # refused: the CLI prints `load_error` and exits 2, as for a bad model
    assert fatal and second.state == "failed" and "\n" not in second.load_error
    assert second.load_error.startswith("Another t2v server is using")
    wait_until(lambda: first.store.status(job.id) == "succeeded")  # the first one ran on
    first.stop()
    third = JobQueue(SqliteStore(tmp_path), FakeModel)
    third.start()  # the first has stopped: the data directory is free
    assert third.load_error is None
    third.stop()


def test_a_second_t2v_serve_on_one_data_dir_exits_with_one_sentence(tmp_path, tiny_model_dir):
    with Server(tmp_path / "data", tiny_model_dir):
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "t2v.cli",
                "serve",
                "--port",
                "0",
                "--data-dir",
                str(tmp_path / "data"),
                "--model",
                str(DEFAULT_MODEL_DIR),
                "--device",
                "cpu",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert second.returncode == 2, second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert "Another t2v server is using" in last and "Traceback" not in second.stderr


def test_revoking_a_key_stops_its_running_job_and_drops_its_queued_ones(make_store, start_queue):
    store = make_store()
    model = FakeModel(step_s=0.05)
    queue = start_queue(store, model)
    keys = KeyStore(store)
    (alice, _), (bob, _) = keys.create("alice"), keys.create("bob")
    runs, _ = queue.submit(alice.id, JobRequest("a red circle", steps=100), None)
    waits, _ = queue.submit(alice.id, JobRequest("a blue square"), None)
    wait_until(lambda: running(store, runs.id))
    keys.revoke("alice")
    step = store.get(runs.id, None).step
    theirs, _ = queue.submit(bob.id, JobRequest("bob's circle", steps=2), None)
    wait_until(lambda: store.status(theirs.id) == "succeeded")  # the worker moved on
    stopped = store.get(runs.id, None)
    assert stopped.status == "cancelled" and "revoked" in stopped.error
    assert stopped.step <= step + 2 and store.status(waits.id) == "cancelled"
    assert [r.prompt for r in model.calls] == ["bob's circle"]
    assert not store.video_path(stopped).exists()


def test_a_job_for_a_model_no_worker_serves_is_refused(make_store, start_queue):
    queue = start_queue(make_store(), FakeModel("shapes"))
    wait_until(lambda: queue.live_models())
    with pytest.raises(JobError) as refused:
        queue.submit("", JobRequest("a red circle", model="wan-14b"), None)
    assert refused.value.status == 422 and "'wan-14b'" in refused.value.message
    assert "'shapes'" in refused.value.message and refused.value.message.endswith(".")
    job, _ = queue.submit("", JobRequest("a red circle", model="shapes", steps=2), None)
    wait_until(lambda: queue.store.status(job.id) == "succeeded")
    [live] = queue.live_models()
    assert (live.id, live.workers, card_knobs(live.info)) == ("shapes", 1, FakeModel.knobs)


class WanLike(FakeModel):
    """A worker's model whose knobs differ from the bundled model's (frames 4k+1, 16 fps)."""

    knobs = Knobs(
        steps=IntRange(4, 1, 50),
        guidance=FloatRange(5.0, 0.0, 20.0),
        frames=IntRange(9, 5, 33, multiple=4, offset=1),
        width=IntRange(32, 16, 64, multiple=16),
        height=IntRange(32, 16, 64, multiple=16),
        fps=FloatRange(16.0, 1.0, 60.0),
    )


@pytest.fixture
def api_node(make_store, tmp_path):
    """api_node(**config) -> a TestClient on `t2v serve` for the store `make_store` made."""
    clients = []

    def start(model=None, **config):
        make_store()  # creates the database when it is PostgreSQL's
        db = getattr(make_store, "url", None)
        app = create_app(ServeConfig(data_dir=tmp_path / "data", db=db, **config), model)
        clients.append(TestClient(app, base_url="http://127.0.0.1:8000").__enter__())
        return clients[-1]

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def test_an_api_node_checks_requests_against_the_knobs_of_live_workers(
    make_store, start_queue, api_node
):
    """A `--workers 0` node loads no model: GET /v1/models lists what live workers serve,
    each request is checked against its model's knobs, and a job naming none goes to the
    only model served (or --default-model); several served and none named is a 422."""
    wan = start_queue(make_store(), WanLike("wan-like"))
    node = api_node(workers=0)
    wait_until(lambda: [m.id for m in wan.live_models()] == ["wan-like"])
    assert node.get("/readyz").status_code == 200
    (card,) = node.get("/v1/models").json()["data"]
    assert (card["id"], card["ready"], card["knobs"]["fps"]["default"]) == ("wan-like", True, 16.0)
    assert node.get("/v1/models/wan-like").json() == card
    # 17 frames is not the bundled model's (16 only), but is the worker's model's 4k+1
    r = node.post("/v1/videos", json={"prompt": "a red circle", "frames": 17, "steps": 2})
    assert r.status_code == 202, r.text
    assert (r.json()["model"], r.json()["frames"], r.json()["fps"]) == ("wan-like", 17, 16.0)
    wait_until(lambda: wan.store.status(r.json()["id"]) == "succeeded")
    r = node.post("/v1/videos", json={"prompt": "a red circle", "frames": 16})
    assert r.status_code == 422 and "nearest are 13 or 17" in r.json()["error"]["message"]
    r = node.post("/v1/videos", json={"prompt": "a red circle", "model": "t2v-moving-shapes"})
    assert r.status_code == 422 and "'wan-like'" in r.json()["error"]["message"]

    shapes = Worker(make_store(), FakeModel("shapes"), name="shapes")  # a process elsewhere
    shapes.heartbeat()
    assert [m["id"] for m in node.get("/v1/models").json()["data"]] == ["shapes", "wan-like"]
    r = node.post("/v1/videos", json={"prompt": "a red circle"})
    assert r.status_code == 422 and "Name the model" in r.json()["error"]["message"]
    r = node.post("/v1/videos", json={"prompt": "a red circle", "model": "shapes", "steps": 2})
    assert r.status_code == 202 and r.json()["frames"] == FakeModel.knobs.frames.default
    assert shapes.run_one() and shapes.store.status(r.json()["id"]) == "succeeded"
    other = api_node(workers=0, default_model="wan-like")
    assert other.get("/v1/models").json()["data"][0]["id"] == "wan-like"  # the page's model
    r = other.post("/v1/videos", json={"prompt": "a red circle", "steps": 2})
    assert r.status_code == 202 and r.json()["model"] == "wan-like"
    wait_until(lambda: wan.store.status(r.json()["id"]) == "succeeded")

    wan.stop(10)
    shapes.store.forget_worker(shapes.name)  # the workers said goodbye: nothing is served
    assert node.get("/v1/models").json()["data"] == []
    r = node.post("/v1/videos", json={"prompt": "a red circle"})
    assert r.status_code == 422 and "No worker serves a model" in r.json()["error"]["message"]


class ReadingModel(FakeModel):
    """Reads prompts in its own words, as the bundled model does (t2v.rewrite)."""

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        request = self.knobs.resolve(request)
        if request.original_prompt is not None or "crimson" not in request.prompt:
            return request
        return replace(
            request,
            prompt=request.prompt.replace("crimson ", "red "),
            original_prompt=request.prompt,
            warnings=("Read 'crimson' as 'red'.",),
        )


def test_a_reading_made_by_the_worker_reaches_the_video_object(make_store, start_queue, api_node):
    """A node that loads no model cannot read the prompt; the worker's model does, and the
    video object then gives its reading (revised_prompt, warnings) and the prompt as sent."""
    start_queue(make_store(), ReadingModel("reader"))
    node = api_node(workers=0)
    wait_until(lambda: node.get("/v1/models").json()["data"])
    job = node.post("/v1/videos", json={"prompt": "a crimson circle", "steps": 2}).json()
    assert job["revised_prompt"] == "a crimson circle" and job["warnings"] == []
    url = f"/v1/videos/{job['id']}"
    done = wait_until(lambda: (j := node.get(url).json())["status"] == "completed" and j)
    assert (done["prompt"], done["revised_prompt"]) == ("a crimson circle", "a red circle")
    assert done["warnings"] == ["Read 'crimson' as 'red'."]


def test_a_node_takes_jobs_for_a_model_that_other_workers_serve(make_store, api_node):
    """A node with its own model also queues jobs for the models of live workers elsewhere,
    checked against their knobs; a job naming no model is its own."""
    node = api_node(model=FakeModel("own", step_s=0.001))
    wait_until(lambda: node.get("/readyz").status_code == 200)
    elsewhere = Worker(make_store(), WanLike("wan-like"), name="elsewhere")
    elsewhere.heartbeat()
    ids = [m["id"] for m in node.get("/v1/models").json()["data"]]
    assert ids[0] == "own" and "wan-like" in ids
    r = node.post("/v1/videos", json={"prompt": "a red circle", "model": "wan-like", "frames": 17})
    assert r.status_code == 202, r.text
    assert elsewhere.run_one() and elsewhere.store.status(r.json()["id"]) == "succeeded"
    r = node.post("/v1/videos", json={"prompt": "a red circle", "steps": 2})
    assert r.status_code == 202 and r.json()["model"] == "own"


def test_one_idempotency_key_sent_to_two_nodes_at_once_makes_one_job(make_store):
    nodes = [JobQueue(make_store(), FakeModel, workers=0) for _ in range(2)]
    for attempt in range(10):  # racing the check against the insert, ten times
        barrier, results = threading.Barrier(2), []

        def send(node, key=f"key-{attempt}", barrier=barrier, results=results):
            barrier.wait()
            results.append(node.submit("alice", JobRequest("a red circle", seed=1), key))

        threads = [threading.Thread(target=send, args=(node,)) for node in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(results) == 2 and results[0][0].id == results[1][0].id
        assert sorted(replayed for _, replayed in results) == [False, True]
    assert nodes[0].store.count("queued") == 10


def test_workers_share_the_queue_and_each_job_runs_once(make_store, start_queue):
    model = FakeModel(step_s=0.001)
    queue = start_queue(make_store(), model, workers=3)
    jobs = [queue.submit("", JobRequest(f"circle {i}", steps=2), None)[0] for i in range(30)]
    wait_until(lambda: queue.store.count("succeeded") == 30)
    assert sorted(r.prompt for r in model.calls) == sorted(j.prompt for j in jobs)
    assert len({w.name for w in queue.workers}) == 3


# --- two API nodes and three `t2v worker` processes on one PostgreSQL ------------------------

LEASE_S = 3.0
MODEL = "t2v-moving-shapes"  # the workers' model, with the bundled model's knobs


class Cluster:
    """Two `t2v serve --workers 0` nodes and `t2v worker` processes (FakeModel) sharing a
    PostgreSQL database and a media folder, as in production."""

    def __init__(self, url: str, root: Path):
        self.url, self.data, self.log = url, root / "media", root / "generated.log"
        self.store = PgStore(url, self.data)
        self.keys = KeyStore(self.store)
        self.key = self.keys.create("alice")[1]
        self.workers: list[subprocess.Popen] = []
        options = ("--auth", "--rate-limit", "0", "--queue-size", "1000")
        self.nodes = [
            Server(self.data, None, "--db", url, "--workers", "0", *options) for _ in range(2)
        ]

    def __enter__(self) -> Cluster:
        for _ in range(3):
            self.add_worker()
        for node in self.nodes:
            node.__enter__()
        wait_until(lambda: sum(m.workers for m in self.store.live_models(LIVE_S)) == 3, 60)
        return self

    def add_worker(self) -> subprocess.Popen:
        args = ("worker", "--db", self.url, "--data-dir", str(self.data))
        log = open(self.data.parent / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115
        self.workers.append(
            subprocess.Popen(
                launch_args(MODEL, 0.002, self.log, *args, "--lease-seconds", str(LEASE_S)),
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        )
        return self.workers[-1]

    def __exit__(self, *exc) -> None:
        for proc in self.workers:  # all at once: each then exits within a second or so
            proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.proc.send_signal(signal.SIGINT)
        for node in self.nodes:
            node.__exit__(*exc)
        for proc in self.workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.store.close()

    def headers(self, key: str | None = None, **more) -> dict:
        return {"Authorization": f"Bearer {key or self.key}", **more}

    def post(self, node: int, key: str | None = None, idempotency_key=None, **body) -> str:
        more = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = self.nodes[node].client.post("/v1/videos", json=body, headers=self.headers(key, **more))
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def generated(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory):  # noqa: F811 - the session fixture
    with Cluster(postgres.fresh(), tmp_path_factory.mktemp("cluster")) as running_cluster:
        yield running_cluster


def test_200_jobs_over_two_nodes_and_three_workers_none_lost_none_twice(cluster):
    prompts = [f"circle number {i}" for i in range(200)]
    ids = [cluster.post(i % 2, prompt=p, steps=1, format="gif") for i, p in enumerate(prompts)]
    wait_until(lambda: all(cluster.store.status(i) == "succeeded" for i in ids), 60, 0.2)
    generated = [p for p in cluster.generated() if p.startswith("circle number")]
    assert sorted(generated) == sorted(prompts)  # each generated once: none lost, none twice
    jobs = [cluster.store.get(i, None) for i in ids]
    assert all(j.attempts == 1 for j in jobs)
    assert all(cluster.store.video_path(j).stat().st_size > 0 for j in jobs)


def test_a_worker_killed_mid_job_loses_it_to_another_after_the_lease(cluster):
    job_id = cluster.post(0, prompt="slow circle for kill 9", steps=40, format="gif")
    job = wait_until(lambda: (j := cluster.store.get(job_id, None)).step >= 2 and j, 30)
    pid = int(job.worker.split(":")[1])
    victim = next(p for p in cluster.workers if p.pid == pid)
    victim.kill()  # kill -9: no goodbye, the lease just stops being renewed
    victim.wait(10)
    done = wait_until(lambda: (j := cluster.store.get(job_id, None)).status in FINISHED and j, 30)
    assert done.status == "succeeded" and done.attempts == 2
    assert cluster.generated().count("slow circle for kill 9") == 1
    assert [p.name for p in (cluster.data / "videos").glob(f"{job_id}*")] == [f"{job_id}.gif"]
    cluster.add_worker()


def test_a_cancel_sent_to_node_b_stops_a_job_node_a_accepted(cluster):
    job_id = cluster.post(0, prompt="slow circle to cancel", steps=60, format="gif")
    b, url, headers = cluster.nodes[1].client, f"/v1/videos/{job_id}", cluster.headers()
    wait_until(lambda: b.get(url, headers=headers).json()["progress"] > 0)
    r = b.delete(url, headers=headers)
    assert r.status_code == 200, r.text
    stopped_at = cluster.store.get(job_id, None).step
    time.sleep(0.5)  # ten steps' time: the worker has long noticed
    job = cluster.store.get(job_id, None)
    assert job.status == "cancelled" and job.step <= stopped_at + 1 and job.step < 60
    assert "slow circle to cancel" not in cluster.generated()
    assert not list((cluster.data / "videos").glob(f"{job_id}*"))


def test_progress_reaches_the_other_nodes_events_within_a_second(cluster):
    job_id = cluster.post(0, prompt="slow circle to watch", steps=30, format="gif")
    seen, started = [], time.monotonic()
    url = f"/v1/videos/{job_id}/events"
    with cluster.nodes[1].client.stream("GET", url, headers=cluster.headers()) as events:
        for line in events.iter_lines():
            if line.startswith("data:"):
                seen.append((time.monotonic() - started, json.loads(line[5:])))
                if seen[-1][1]["status"] in ("completed", "succeeded", "failed"):
                    break
    gaps = [b[0] - a[0] for a, b in zip(seen, seen[1:], strict=False)]
    assert len(seen) >= 5 and max(gaps) < 1.0, gaps  # 30 steps of 50 ms: pushed, not polled


def test_idempotency_holds_across_nodes(cluster):
    first = cluster.post(0, idempotency_key="retry-me", prompt="a red circle", steps=1)
    r = cluster.nodes[1].client.post(
        "/v1/videos",
        json={"prompt": "a red circle", "steps": 1},
        headers=cluster.headers(**{"Idempotency-Key": "retry-me"}),
    )
    assert r.status_code == 202 and r.json()["id"] == first
    assert r.headers["idempotent-replayed"] == "true"


def test_a_key_revoked_on_one_node_is_refused_by_the_other_at_once(cluster):
    bob = cluster.keys.create("bob")[1]
    b = cluster.nodes[1].client
    assert b.get("/v1/videos", headers=cluster.headers(bob)).status_code == 200
    revoked = subprocess.run(
        [sys.executable, "-m", "t2v.cli", "keys", "revoke", "bob", "--db", cluster.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    wait_until(lambda: b.get("/v1/videos", headers=cluster.headers(bob)).status_code == 401, 1.0)
    assert time.monotonic() - started < 1.0


def test_a_job_for_a_model_no_worker_serves_is_rejected(cluster):
    r = cluster.nodes[0].client.post(
        "/v1/videos",
        json={"prompt": "a red circle", "model": "wan-14b"},
        headers=cluster.headers(),
    )
    assert r.status_code == 422 and "wan-14b" in r.text


def _worker_of(cluster, job_id) -> subprocess.Popen:
    job = wait_until(lambda: (j := cluster.store.get(job_id, None)).step >= 2 and j, 30)
    pid = int(job.worker.split(":")[1])
    return next(p for p in cluster.workers if p.pid == pid)


def test_sigterm_finishes_the_running_job_then_exits(cluster):
    job_id = cluster.post(0, prompt="slow circle for sigterm", steps=30, format="gif")
    worker = _worker_of(cluster, job_id)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    job = cluster.store.get(job_id, None)
    assert job.status == "succeeded" and job.attempts == 1  # finished by the same worker
    cluster.add_worker()


def test_ctrl_c_puts_the_running_job_back_for_another_worker(cluster):
    job_id = cluster.post(0, prompt="slow circle for sigint", steps=30, format="gif")
    worker = _worker_of(cluster, job_id)
    worker.send_signal(signal.SIGINT)
    assert worker.wait(30) == 0
    done = wait_until(lambda: (j := cluster.store.get(job_id, None)).status in FINISHED and j, 30)
    assert done.status == "succeeded" and done.attempts == 1  # the release was not an attempt
    assert cluster.generated().count("slow circle for sigint") == 1
    cluster.add_worker()


def test_a_lost_database_is_a_503_then_everything_recovers(cluster, postgres):  # noqa: F811
    name = urlsplit(cluster.url).path.strip("/")
    alive = [p for p in cluster.workers if p.poll() is None]
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        node = cluster.nodes[1].client
        try:
            r = wait_until(lambda: (r := node.get("/readyz")).status_code == 503 and r, 10)
            assert "retry" in r.text and r.headers["retry-after"]
            r = node.get("/v1/videos", headers=cluster.headers())
            assert r.status_code == 503 and r.headers["retry-after"]
        finally:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    wait_until(lambda: node.get("/readyz").status_code == 200, 10)
    assert len(alive) == 3 and all(p.poll() is None for p in alive)  # no worker crashed
    job_id = cluster.post(1, prompt="a circle after the outage", steps=1, format="gif")
    wait_until(lambda: cluster.store.status(job_id) == "succeeded", 30, 0.1)
