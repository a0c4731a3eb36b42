"""The state store: jobs, API keys (hashed), idempotency keys, rate-limit counters and live
workers, behind one interface with two engines.

`SqliteStore` (the default) keeps everything in `<data-dir>/t2v.sqlite3`; one `t2v serve`
owns a data directory at a time (an exclusive `flock` on `<data-dir>/t2v.lock`).
`t2v.serve.store_pg.PgStore` (``--db postgresql://...``) is shared by any number of API
nodes and `t2v worker` processes. Both run the same SQL, written once in `SqlStore` with
``?`` placeholders and a ``{now}`` for the database's clock (seconds since the epoch).

A job moves queued -> running -> succeeded | failed | cancelled. A worker claims a job with
a lease (`lease_until`) that it renews while it works; a job whose lease ran out goes back
to the queue, or is failed once it has been started `MAX_ATTEMPTS` times. A worker records
the outcome only while the job is still its own (`worker` column), so two workers never
both finish one job. The schema is versioned (`SCHEMA_VERSION`): each start upgrades an
older one, and a newer one is refused.

Writes that fail because the disk is full or the database is unreachable raise
`StoreUnavailable`, a 503 with Retry-After, never a 500.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from t2v.errors import UserError

log = logging.getLogger("t2v.serve")

FINISHED = ("succeeded", "failed", "cancelled")
# The store's names for a job's states, and the API's (OpenAI's videos API, and cancelled).
API_STATUS = {
    "queued": "queued",
    "running": "in_progress",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}
MAX_ATTEMPTS = 3
SCHEMA_VERSION = 3
_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # secrets.token_urlsafe(16)


class JobError(Exception):
    """A request the service refuses; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


class StoreUnavailable(JobError):
    """The store cannot be written now (a full disk, an unreachable database): retry later."""

    def __init__(self, message: str, retry_after: int = 30):
        super().__init__(503, message, retry_after)


class KeyNameTaken(UserError):
    pass


class DuplicateKey(Exception):
    """`create` found this owner's idempotency key taken (by a request to another node)."""


@dataclass(frozen=True)
class JobRequest:
    """The generation knobs, named as in `t2v.model.GenerationRequest` (None: the model's
    default), plus the container and the model to run them on (None: the default model)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    format: str = "mp4"
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    model: str | None = None
    # Filled when the request was resolved (`t2v.model.Knobs.resolve`) before it was queued:
    # the prompt as typed when ``prompt`` is the model's reading of it, the reading's
    # warnings, and whether workers may skip normalising it again.
    original_prompt: str | None = None
    warnings: tuple[str, ...] = ()
    resolved: bool = False


@dataclass(frozen=True)
class Job(JobRequest):
    id: str = ""
    owner: str = ""
    status: str = "queued"
    progress: float = 0.0
    step: int = 0
    total_steps: int | None = None
    error: str | None = None
    attempts: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    seq: int = 0
    worker: str | None = None

    def eta_seconds(self, now: float) -> float | None:
        """Seconds left, extrapolated from the steps done so far (None until one is done)."""
        if self.status != "running" or not self.step or not self.total_steps:
            return None
        elapsed = now - (self.started_at or now)
        return max(0.0, elapsed * (self.total_steps - self.step) / self.step)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class LiveModel:
    """A model that at least one live worker serves, as the worker described it."""

    id: str
    workers: int
    info: dict


def request_hash(req: JobRequest) -> str:
    return hashlib.sha256(json.dumps(asdict(req), sort_keys=True).encode()).hexdigest()


_JOB_COLUMNS = tuple(Job.__dataclass_fields__)
_REQUEUE = "status = 'queued', step = 0, progress = 0, started_at = NULL, worker = NULL"


class SqlStore:
    """The store's SQL, written once for both engines. A subclass supplies `_tx` (a
    transaction yielding a function that runs one statement and returns its rows), `NOW`
    (the database clock as SQL) and `_claim_sql` (the claim, with the engine's row locking)."""

    NOW = ""
    videos: Path

    # --- the engine -------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator:
        raise NotImplementedError
        yield

    def _sql(self, sql: str) -> str:
        return sql.replace("{now}", self.NOW)

    def _rows(self, sql: str, args: tuple = ()) -> list:
        with self._tx() as run:
            return run(sql, args)

    def _one(self, sql: str, args: tuple = ()):
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _job_one(self, sql: str, args: tuple = ()) -> Job | None:
        row = self._one(sql, args)
        return _job(row) if row else None

    def _changed(self, run) -> None:
        """Tell other processes a job changed (PostgreSQL: NOTIFY); inside the transaction."""

    def ping(self) -> bool:
        """True while the database answers (for /readyz)."""
        try:
            self._rows("SELECT 1")
            return True
        except StoreUnavailable:
            return False

    def listen(self, on_change) -> None:
        """Call `on_change()` whenever another process changes a job (no-op: one process)."""

    def close(self) -> None:
        pass

    # --- jobs --------------------------------------------------------------------------------

    def video_path(self, job: Job) -> Path:
        """Where a job's video lives: named only by the job's random id, never by a request."""
        assert _ID.fullmatch(job.id)
        return self.videos / f"{job.id}.{job.format}"

    def create(self, owner: str, req: JobRequest, idempotency_key: str | None) -> Job:
        fields = asdict(req)
        fields["warnings"] = json.dumps(list(req.warnings))
        names = ", ".join(fields)
        try:
            with self._tx() as run:
                row = run(
                    f"INSERT INTO jobs (id, owner, idempotency_key, request_hash, status, {names},"
                    f" created_at) VALUES (?, ?, ?, ?, 'queued', {', '.join('?' * len(fields))},"
                    " {now}) RETURNING *",
                    (secrets.token_urlsafe(16), owner, idempotency_key, request_hash(req))
                    + tuple(fields.values()),
                )[0]
                self._changed(run)
        except self._integrity_errors():
            raise DuplicateKey from None
        return _job(row)

    def get(self, job_id: str, owner: str | None) -> Job | None:
        """The job with this id, if `owner` owns it (None: whoever does)."""
        if not _ID.fullmatch(job_id):
            return None
        if owner is None:
            return self._job_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._job_one("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner))

    def by_idempotency_key(self, owner: str, key: str) -> tuple[Job, str] | None:
        row = self._one("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, key))
        return (_job(row), row["request_hash"]) if row else None

    def list(self, owner: str, limit: int, before_seq: int | None) -> list[Job]:
        rows = self._rows(
            "SELECT * FROM jobs WHERE owner = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (owner, before_seq if before_seq is not None else 2**63 - 1, limit),
        )
        return [_job(r) for r in rows]

    def count(self, status: str) -> int:
        return self._one("SELECT COUNT(*) AS n FROM jobs WHERE status = ?", (status,))["n"]

    def status(self, job_id: str) -> str | None:
        row = self._one("SELECT status FROM jobs WHERE id = ?", (job_id,))
        return row["status"] if row else None

    def holder(self, job_id: str) -> tuple[str, str | None] | None:
        """A job's status and the worker that holds it, read each sampling step."""
        row = self._one("SELECT status, worker FROM jobs WHERE id = ?", (job_id,))
        return (row["status"], row["worker"]) if row else None

    def running(self) -> Job | None:
        return self._job_one("SELECT * FROM jobs WHERE status = 'running' ORDER BY seq LIMIT 1")

    def claim_next(
        self, worker: str = "local", model: str | None = None, lease_s: float = 3600.0
    ) -> Job | None:
        """The oldest queued job for `model` (or naming no model), now running as `worker`'s
        with a lease of `lease_s` seconds; first, jobs whose lease ran out are re-queued."""
        with self._tx() as run:
            self._expire(run)
            rows = run(self._claim_sql(), (lease_s, worker, model))
            if rows:
                self._changed(run)
        return _job(rows[0]) if rows else None

    def _claim_sql(self) -> str:
        raise NotImplementedError

    def _expire(self, run) -> None:
        """Jobs whose worker stopped renewing its lease: back to the queue, or failed."""
        why = (
            f"The job was started {MAX_ATTEMPTS} times and its worker stopped each time,"
            " so it was not retried; try other settings."
        )
        failed = run(
            "UPDATE jobs SET status = 'failed', error = ?, finished_at = {now}, worker = NULL"
            " WHERE status = 'running' AND lease_until < {now} AND attempts >= ? RETURNING id",
            (why, MAX_ATTEMPTS),
        )
        requeued = run(
            f"UPDATE jobs SET {_REQUEUE} WHERE status = 'running' AND lease_until < {{now}}"
            " RETURNING id",
        )
        for row in failed:
            log.warning("job %s failed: its worker stopped during each of its runs", row["id"])
        for row in requeued:
            log.warning("job %s: its worker stopped renewing the lease; queued again", row["id"])

    def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Extend `worker`'s lease on a running job; False when the job is no longer its own."""
        return self._update(
            "UPDATE jobs SET lease_until = {now} + ? WHERE id = ? AND worker = ?"
            " AND status = 'running'",
            (lease_s, job_id, worker),
            notify=False,
        )

    def _update(self, sql: str, args: tuple, notify: bool = True) -> bool:
        with self._tx() as run:
            done = bool(run(sql + " RETURNING id", args))
            if done and notify:
                self._changed(run)
        return done

    def set_progress(self, job_id: str, step: int, total: int, worker: str = "local") -> bool:
        return self._update(
            "UPDATE jobs SET step = ?, total_steps = ?, progress = ?"
            " WHERE id = ? AND status = 'running' AND worker = ?",
            (step, total, step / total, job_id, worker),
        )

    def set_reading(self, job_id: str, reading, worker: str) -> bool:
        """Record how `worker`'s model read a running job's prompt (a resolved
        `GenerationRequest`: its prompt, original_prompt and warnings), where the API node
        that queued it could not (one that loads no model)."""
        return self._update(
            "UPDATE jobs SET prompt = ?, original_prompt = ?, warnings = ?"
            " WHERE id = ? AND status = 'running' AND worker = ?",
            (
                reading.prompt,
                reading.original_prompt,
                json.dumps(list(reading.warnings)),
                job_id,
                worker,
            ),
        )

    def finish(
        self, job_id: str, status: str, error: str | None = None, worker: str = "local"
    ) -> bool:
        """Record the outcome of `worker`'s running job; False when it was cancelled or is
        no longer `worker`'s (its lease ran out and another worker took it)."""
        progress = ", progress = 1" if status == "succeeded" else ""
        return self._update(
            f"UPDATE jobs SET status = ?, error = ?, finished_at = {{now}}, worker = NULL"
            f"{progress} WHERE id = ? AND status = 'running' AND worker = ?",
            (status, error, job_id, worker),
        )

    def requeue(self, job_id: str, count_attempt: bool, worker: str = "local") -> None:
        self._update(
            f"UPDATE jobs SET {_REQUEUE}, attempts = attempts - ?"
            " WHERE id = ? AND status = 'running' AND worker = ?",
            (0 if count_attempt else 1, job_id, worker),
        )

    def cancel(self, job_id: str) -> bool:
        return self._update(
            "UPDATE jobs SET status = 'cancelled', finished_at = {now}, worker = NULL"
            " WHERE id = ? AND status IN ('queued', 'running')",
            (job_id,),
        )

    def recover(self) -> None:
        """At start-up of the only server of a data directory: no job is running, so any
        marked running died with the last process (the shared store uses leases instead)."""
        with self._tx() as run:
            run("UPDATE jobs SET lease_until = 0 WHERE status = 'running'")
            self._expire(run)
        for leftover in self.videos.glob(".*"):  # Video.save's temporary files start with "."
            leftover.unlink()

    # --- API keys ----------------------------------------------------------------------------

    def add_key(self, key_id: str, name: str, secret_sha256: str) -> ApiKey:
        try:
            self._rows(
                "INSERT INTO api_keys (id, name, secret_sha256, created_at)"
                " VALUES (?, ?, ?, {now})",
                (key_id, name, secret_sha256),
            )
        except self._integrity_errors():
            raise KeyNameTaken(
                f"An active key named '{name}' exists; revoke it first or pick another name."
            ) from None
        return self.key(key_id)

    def _integrity_errors(self) -> tuple[type[Exception], ...]:
        raise NotImplementedError

    def keys(self) -> list[ApiKey]:
        rows = self._rows(
            "SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY created_at"
        )
        return [ApiKey(**dict(r)) for r in rows]

    def key(self, key_id: str) -> ApiKey | None:
        row = self._one(
            "SELECT id, name, created_at, revoked_at FROM api_keys WHERE id = ?", (key_id,)
        )
        return ApiKey(**dict(row)) if row else None

    def key_hash(self, key_id: str) -> str | None:
        """The SHA-256 of an active key's secret; None for an unknown or revoked key."""
        row = self._one(
            "SELECT secret_sha256 FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,)
        )
        return row["secret_sha256"] if row else None

    def revoke_key(self, name_or_id: str) -> tuple[ApiKey, int] | None:
        """Revoke the key with this id, or the active key with this name, and cancel its
        queued and running jobs (a running one stops at its next step). Returns the key and
        how many jobs were cancelled; None when no active key matches."""
        with self._tx() as run:
            rows = run(
                "UPDATE api_keys SET revoked_at = {now} WHERE revoked_at IS NULL"
                " AND (id = ? OR name = ?) RETURNING id",
                (name_or_id, name_or_id),
            )
            if not rows:
                return None
            cancelled = run(
                "UPDATE jobs SET status = 'cancelled', finished_at = {now}, worker = NULL,"
                " error = 'The API key that made this job was revoked.'"
                " WHERE owner = ? AND status IN ('queued', 'running') RETURNING id",
                (rows[0]["id"],),
            )
            self._changed(run)
        return self.key(rows[0]["id"]), len(cancelled)

    # --- rate limits -------------------------------------------------------------------------

    def rate_hit(self, owner: str, per_minute: int) -> float:
        """Record one request by `owner` unless it is over `per_minute` in the last 60 s;
        returns 0, or the seconds until the oldest request in the window leaves it."""
        with self._tx() as run:
            self._lock_owner(run, owner)
            run("DELETE FROM rate_events WHERE owner = ? AND at <= {now} - 60", (owner,))
            rows = run(
                "SELECT COUNT(*) AS n, MIN(at) + 60 - {now} AS wait FROM rate_events"
                " WHERE owner = ?",
                (owner,),
            )
            if rows[0]["n"] >= per_minute:
                return max(float(rows[0]["wait"]), 0.001)
            run("INSERT INTO rate_events (owner, at) VALUES (?, {now})", (owner,))
        return 0.0

    def _lock_owner(self, run, owner: str) -> None:
        """Serialise one owner's rate-limit check (SQLite's write lock already does)."""

    # --- workers -----------------------------------------------------------------------------

    def heartbeat(self, worker: str, model: str, info: dict) -> None:
        """`worker` is alive and serves `model`, described by `info` (GET /v1/models)."""
        with self._tx() as run:
            run(
                "INSERT INTO workers (id, model, info, seen_at) VALUES (?, ?, ?, {now})"
                " ON CONFLICT (id) DO UPDATE SET model = excluded.model, info = excluded.info,"
                " seen_at = excluded.seen_at",
                (worker, model, json.dumps(info)),
            )
            run("DELETE FROM workers WHERE seen_at < {now} - 86400")  # killed long ago

    def forget_worker(self, worker: str) -> None:
        self._rows("DELETE FROM workers WHERE id = ?", (worker,))

    def live_models(self, within_s: float) -> list[LiveModel]:
        """The models of the workers seen in the last `within_s` seconds, by name."""
        rows = self._rows(
            "SELECT model, COUNT(*) AS n, MAX(info) AS info FROM workers"
            " WHERE seen_at > {now} - ? GROUP BY model ORDER BY model",
            (within_s,),
        )
        return [LiveModel(r["model"], r["n"], json.loads(r["info"])) for r in rows]


def _job(row) -> Job:
    job = {k: row[k] for k in _JOB_COLUMNS}
    job["warnings"], job["resolved"] = tuple(json.loads(job["warnings"])), bool(job["resolved"])
    return Job(**job)


def too_new(found: int, where: str) -> UserError:
    return UserError(
        f"{where} has schema version {found}, newer than this t2v's {SCHEMA_VERSION};"
        " upgrade t2v on this machine."
    )


def open_store(db: str | None, data_dir: Path, wait_s: float = 60.0) -> SqlStore:
    """The store `--db` names: a postgresql:// URL (waiting up to `wait_s` for a database
    that is still starting), or None for the data directory's SQLite."""
    if db is None:
        from t2v.serve.store_sqlite import SqliteStore

        return SqliteStore(data_dir)
    if not db.startswith(("postgresql://", "postgres://")):
        raise UserError(f"--db must be a postgresql:// URL, not '{db[:60]}'.")
    from t2v.serve.store_pg import PgStore

    return PgStore(db, data_dir, connect_timeout=wait_s)
