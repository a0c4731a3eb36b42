"""The state store's contract, run against SQLite and a real PostgreSQL alike."""

from __future__ import annotations

import time

import pytest

from pg import postgres  # noqa: F401 - the session fixture
from t2v.errors import UserError
from t2v.serve.auth import KeyStore, RateLimiter
from t2v.serve.store import MAX_ATTEMPTS, SCHEMA_VERSION, JobRequest, StoreUnavailable
from t2v.serve.store import open_store as open_store_for
from t2v.serve.store_sqlite import SqliteStore


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """open_store() -> a store on one database (each call: another connection to it)."""
    opened = []
    if request.param == "sqlite":

        def make(**kw):
            opened.append(SqliteStore(tmp_path / "data", **kw))
            return opened[-1]
    else:
        from t2v.serve.store_pg import PgStore

        url = request.getfixturevalue("postgres").fresh()

        def make(**kw):
            opened.append(PgStore(url, tmp_path / "data", **kw))
            return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store):
    return open_store()


def test_jobs_idempotency_and_listing(store):
    a = store.create("alice", JobRequest("a red circle", seed=3, frames=2, fps=4.0), "k1")
    b = store.create("bob", JobRequest("a blue square", model="m"), None)
    assert store.get(a.id, "alice") == a and store.get(a.id, "bob") is None
    assert store.get(a.id, None) == a and store.get("../etc/passwd", None) is None
    assert (a.status, a.frames, a.fps, a.model, b.model) == ("queued", 2, 4.0, None, "m")
    found, digest = store.by_idempotency_key("alice", "k1")
    assert found == a and len(digest) == 64 and store.by_idempotency_key("bob", "k1") is None
    with pytest.raises(Exception):  # noqa: B017 - each engine's own integrity error
        store.create("alice", JobRequest("again"), "k1")
    more = [store.create("alice", JobRequest(f"p{i}"), None) for i in range(3)]
    page = store.list("alice", 2, None)
    assert [j.id for j in page] == [more[2].id, more[1].id]
    assert [j.id for j in store.list("alice", 10, page[-1].seq)] == [more[0].id, a.id]
    assert store.count("queued") == 5


def test_claims_in_order_only_for_the_model_served(store):
    plain = store.create("", JobRequest("any model"), None)
    for_b = store.create("", JobRequest("needs b", model="b"), None)
    for_a = store.create("", JobRequest("needs a", model="a"), None)
    assert store.claim_next("w1", "a").id == plain.id
    assert store.claim_next("w1", "a").id == for_a.id
    assert store.claim_next("w1", "a") is None
    claimed = store.claim_next("w2", "b")
    assert claimed.id == for_b.id and claimed.worker == "w2" and claimed.attempts == 1


def test_only_the_leaseholder_finishes_and_an_expired_lease_requeues(store):
    job = store.create("", JobRequest("a red circle"), None)
    assert store.claim_next("w1", None, lease_s=0.3).id == job.id
    assert store.renew(job.id, "w1", 0.3) and not store.renew(job.id, "w2", 0.3)
    assert not store.set_progress(job.id, 1, 4, "w2") and store.set_progress(job.id, 1, 4, "w1")
    time.sleep(0.5)  # w1 stops renewing, as a killed worker would
    taken = store.claim_next("w2", None, lease_s=30)
    assert taken.id == job.id and taken.attempts == 2 and taken.step == 0
    assert not store.renew(job.id, "w1", 30)
    assert not store.finish(job.id, "succeeded", None, "w1")  # the late worker loses
    assert store.finish(job.id, "succeeded", None, "w2")
    assert not store.finish(job.id, "succeeded", None, "w2")  # exactly once
    assert store.get(job.id, "").status == "succeeded"


def test_a_job_whose_workers_keep_dying_fails_with_a_reason(store):
    job = store.create("", JobRequest("a red circle"), None)
    for attempt in range(MAX_ATTEMPTS):
        assert store.claim_next(f"w{attempt}", None, lease_s=0.05).id == job.id
        time.sleep(0.1)
    assert store.claim_next("w9", None) is None
    failed = store.get(job.id, "")
    assert failed.status == "failed" and "not retried" in failed.error
    assert failed.error.endswith(".")


def test_cancel_and_requeue(store):
    job = store.create("", JobRequest("a red circle"), None)
    store.claim_next("w1")
    store.requeue(job.id, count_attempt=False, worker="w1")
    assert store.get(job.id, "").status == "queued" and store.get(job.id, "").attempts == 0
    store.claim_next("w1")
    assert store.cancel(job.id) and not store.cancel(job.id)
    assert not store.set_progress(job.id, 2, 4, "w1")
    assert not store.finish(job.id, "succeeded", None, "w1")
    assert store.status(job.id) == "cancelled"


def test_keys_hashed_and_revoking_cancels_the_keys_jobs(store):
    keys = KeyStore(store)
    (alice, secret), (bob, _) = keys.create("alice"), keys.create("bob")
    assert keys.verify(secret) == alice and keys.verify(secret[:-1] + "x") is None
    with pytest.raises(UserError, match="exists"):
        keys.create("alice")
    running = store.create(alice.id, JobRequest("runs"), None)
    queued = store.create(alice.id, JobRequest("waits"), None)
    others = store.create(bob.id, JobRequest("bob's"), None)
    store.claim_next("w1")
    key, cancelled = keys.revoke("alice")
    assert key.revoked_at and cancelled == 2 and keys.verify(secret) is None
    for job in (running, queued):
        assert store.get(job.id, None).status == "cancelled"
        assert "revoked" in store.get(job.id, None).error
    assert store.status(others.id) == "queued"
    assert not store.finish(running.id, "succeeded", None, "w1")
    with pytest.raises(UserError, match="No active key"):
        keys.revoke("alice")
    assert keys.create("alice")[0].id != alice.id  # the name is free again


def test_rate_limit_window_slides_and_is_shared(open_store):
    first, second = open_store(), open_store()  # two nodes on one database
    limit_a, limit_b = RateLimiter(first, 2), RateLimiter(second, 2)
    assert limit_a("k") == 0 and limit_b("k") == 0 and 59 < limit_a("k") <= 60
    assert limit_b("other") == 0
    with first._tx() as run:
        run("UPDATE rate_events SET at = at - 30")
    assert 29 < limit_b("k") <= 30
    with first._tx() as run:
        run("UPDATE rate_events SET at = at - 31")
    assert limit_b("k") == 0
    assert RateLimiter(first, 0)("k") == 0


def test_live_models_come_from_workers_seen_lately(store):
    store.heartbeat("w1", "a", {"id": "a", "kind": "t2v"})
    store.heartbeat("w2", "a", {"id": "a", "kind": "t2v"})
    store.heartbeat("w3", "b", {"id": "b", "kind": "WanPipeline"})
    with store._tx() as run:
        run("UPDATE workers SET seen_at = seen_at - 60 WHERE id = 'w3'")
    live = store.live_models(15)
    assert [(m.id, m.workers, m.info["kind"]) for m in live] == [("a", 2, "t2v")]
    store.heartbeat("w3", "b", {"id": "b", "kind": "WanPipeline"})
    store.forget_worker("w1")
    assert [(m.id, m.workers) for m in store.live_models(15)] == [("a", 1), ("b", 1)]


def test_schema_upgrades_an_older_one_and_refuses_a_newer_one(open_store):
    old = open_store(migrate_to=1)  # the schema before models, leases and shared limits
    with old._tx() as run:
        run(
            "INSERT INTO jobs (id, owner, request_hash, status, prompt, seed, format,"
            " created_at) VALUES ('AAAAAAAAAAAAAAAAAAAAAA', '', 'h', 'queued', 'old', 0,"
            " 'mp4', 0)"
        )
    new = open_store()
    assert new._one("SELECT version FROM t2v_schema")["version"] == SCHEMA_VERSION
    job = new.claim_next("w1", "any")
    assert job.prompt == "old" and job.model is None and job.worker == "w1"
    with new._tx() as run:
        run("UPDATE t2v_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(UserError, match="newer than this t2v's") as refused:
        open_store()
    assert str(refused.value).count(".") >= 1 and "\n" not in str(refused.value)


def test_a_full_sqlite_disk_is_a_503_and_writes_resume_when_space_is_back(tmp_path):
    store = SqliteStore(tmp_path)
    job = store.create("", JobRequest("before"), None)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is now full
    with pytest.raises(StoreUnavailable) as full:
        for i in range(200):
            store.create("", JobRequest("x" * 400 + str(i)), None)
    assert full.value.status == 503 and full.value.retry_after and "retry" in full.value.message
    assert store.get(job.id, "").prompt == "before"  # reads still work
    store._db.execute("PRAGMA max_page_count = 1073741823")  # space is back
    assert store.create("", JobRequest("after"), None).status == "queued"


def test_a_corrupt_sqlite_file_is_one_sentence(tmp_path):
    (tmp_path / "t2v.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="not a t2v database") as refused:
        SqliteStore(tmp_path)
    assert "\n" not in str(refused.value)


def test_an_unreachable_or_wrong_db_url_is_one_sentence(tmp_path):
    for url in (f"postgresql://t2v@/none?host={tmp_path}", "mysql://db/t2v"):
        started = time.monotonic()
        with pytest.raises(UserError) as refused:
            open_store_for(url, tmp_path, wait_s=1)
        message = str(refused.value)
        assert "\n" not in message and message.endswith(".") and "--db" in message
        assert time.monotonic() - started < 5  # waited a little for a starting database
