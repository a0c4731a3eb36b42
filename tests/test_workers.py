"""Workers: the queue's workers in-process (SQLite and PostgreSQL), and `t2v serve` API nodes
with `t2v worker` processes sharing a real PostgreSQL."""

from __future__ import annotations

import sqlite3
import time

import pytest

from fake_model import FakeModel
from pg import postgres  # noqa: F401 - the session fixture
from t2v.errors import UserError
from t2v.serve.auth import KeyStore
from t2v.serve.queue import JobQueue
from t2v.serve.store import JobError, JobRequest, StoreUnavailable
from t2v.serve.store_sqlite import SqliteStore


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
            from t2v.serve.store_pg import PgStore

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


def test_a_second_server_on_one_data_dir_is_refused(tmp_path, start_queue):
    first = start_queue(SqliteStore(tmp_path), FakeModel())
    job, _ = first.submit("", JobRequest("a red circle", steps=2), None)
    second = JobQueue(SqliteStore(tmp_path), FakeModel)
    with pytest.raises(UserError, match="Another t2v server is using") as refused:
        second.start()
    assert "\n" not in str(refused.value)
    wait_until(lambda: first.store.status(job.id) == "succeeded")
    first.stop()
    second.start()  # the first has stopped: the data directory is free
    second.stop()


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
    assert [(m.id, m.workers) for m in queue.live_models()] == [("shapes", 1)]


def test_workers_share_the_queue_and_each_job_runs_once(make_store, start_queue):
    model = FakeModel(step_s=0.001)
    queue = start_queue(make_store(), model, workers=3)
    jobs = [queue.submit("", JobRequest(f"circle {i}", steps=2), None)[0] for i in range(30)]
    wait_until(lambda: queue.store.count("succeeded") == 30)
    assert sorted(r.prompt for r in model.calls) == sorted(j.prompt for j in jobs)
    assert len({w.name for w in queue.workers}) == 3
