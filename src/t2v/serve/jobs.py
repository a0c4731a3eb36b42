"""The job queue: jobs persisted in SQLite, their videos as files, and the one worker thread.

Generation is compute-bound, so one worker runs one job at a time and everything else waits
in the queue. A job moves queued -> running -> succeeded | failed | cancelled. Every state
change is written to `<data-dir>/t2v.sqlite3` before it is announced, and videos are written
to `<data-dir>/videos/<id>.<format>` (a temporary name first, renamed when complete), so a
process killed at any instant leaves no half-written video and no job stuck as running:
`JobQueue.start` re-queues such jobs, or fails them once they have killed the server
`MAX_ATTEMPTS` times.

Cancelling a running job marks it cancelled at once; the worker notices at the next sampling
step (the pipeline's progress callback raises) and drops the job. Draining (SIGTERM) lets
the running job finish; stopping (Ctrl-C, or a drain that ran out of time) puts it back in
the queue at the next step, for the next start to run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from t2v.text import PromptError, normalize

log = logging.getLogger("t2v.serve")

FINISHED = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 3
PROGRESS_INTERVAL_S = 0.1  # at most this often a running job's progress is written
_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # secrets.token_urlsafe(16)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT,
    seed INTEGER NOT NULL,
    steps INTEGER,
    guidance REAL,
    format TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


def open_db(data_dir: Path) -> sqlite3.Connection:
    """The data directory's SQLite database, shared by jobs and API keys (one lock per user)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        data_dir / "t2v.sqlite3", check_same_thread=False, isolation_level=None, timeout=10
    )
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the worker's writes
    conn.execute("PRAGMA synchronous=NORMAL")  # durable across a killed process
    return conn


class JobError(Exception):
    """A request the queue refuses; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass(frozen=True)
class JobRequest:
    """The generation knobs, named and defaulted as in the CLI and `TextToVideoPipeline`."""

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    format: str = "mp4"


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

    def eta_seconds(self, now: float) -> float | None:
        """Seconds left, extrapolated from the steps done so far (None until one is done)."""
        if self.status != "running" or not self.step or not self.total_steps:
            return None
        elapsed = now - (self.started_at or now)
        return max(0.0, elapsed * (self.total_steps - self.step) / self.step)


class Changes:
    """Lets async handlers (server-sent events) wait for the next job update without polling."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.version = 0
        self.closed = False

    def notify(self, close: bool = False) -> None:
        with self._lock:
            self.version += 1
            self.closed = self.closed or close
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that request's event loop is already closed
                pass

    async def wait(self, version: int, timeout: float) -> bool:
        """Wait until something changed after `version`; False when `timeout` passed first."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self.version != version:
                return True
            self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter[1].wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                self._waiters.discard(waiter)


class JobStore:
    """Jobs in SQLite; every method is one short transaction under one lock."""

    def __init__(self, data_dir: Path):
        self.videos = data_dir / "videos"
        self.videos.mkdir(parents=True, exist_ok=True)
        self._db = open_db(data_dir)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def _one(self, sql: str, args: tuple) -> Job | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return _job(row) if row else None

    def _update(self, sql: str, args: tuple) -> bool:
        with self._lock:
            return self._db.execute(sql, args).rowcount > 0

    def video_path(self, job: Job) -> Path:
        """Where a job's video lives: named only by the job's random id, never by a request."""
        assert _ID.fullmatch(job.id)
        return self.videos / f"{job.id}.{job.format}"

    def create(self, owner: str, req: JobRequest, idempotency_key: str | None) -> Job:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, owner, idempotency_key, request_hash, status, prompt,"
                " negative_prompt, seed, steps, guidance, format, created_at)"
                " VALUES (:id, :owner, :key, :hash, 'queued', :prompt, :negative_prompt, :seed,"
                " :steps, :guidance, :format, :now)",
                dict(
                    asdict(req),
                    id=secrets.token_urlsafe(16),
                    owner=owner,
                    key=idempotency_key,
                    hash=_hash(req),
                    now=time.time(),
                ),
            )
            row = self._db.execute("SELECT * FROM jobs WHERE seq = last_insert_rowid()").fetchone()
        return _job(row)

    def get(self, job_id: str, owner: str) -> Job | None:
        if not _ID.fullmatch(job_id):
            return None
        return self._one("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner))

    def by_idempotency_key(self, owner: str, key: str) -> tuple[Job, str] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, key)
            ).fetchone()
        return (_job(row), row["request_hash"]) if row else None

    def list(self, owner: str, limit: int, before_seq: int | None) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE owner = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (owner, before_seq if before_seq is not None else 2**63 - 1, limit),
            ).fetchall()
        return [_job(r) for r in rows]

    def count(self, status: str) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)
            ).fetchone()[0]

    def status(self, job_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def running(self) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE status = 'running'", ())

    def claim_next(self) -> Job | None:
        with self._lock:
            row = self._db.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1"
                " WHERE seq = (SELECT MIN(seq) FROM jobs WHERE status = 'queued') RETURNING *",
                (time.time(),),
            ).fetchone()
        return _job(row) if row else None

    def set_progress(self, job_id: str, step: int, total: int) -> None:
        self._update(
            "UPDATE jobs SET step = ?, total_steps = ?, progress = ?"
            " WHERE id = ? AND status = 'running'",
            (step, total, step / total, job_id),
        )

    def finish(self, job_id: str, status: str, error: str | None = None) -> bool:
        """Record the outcome of a running job; False when it was cancelled meanwhile."""
        progress = ", progress = 1" if status == "succeeded" else ""
        return self._update(
            f"UPDATE jobs SET status = ?, error = ?, finished_at = ?{progress}"
            " WHERE id = ? AND status = 'running'",
            (status, error, time.time(), job_id),
        )

    def requeue(self, job_id: str, count_attempt: bool) -> None:
        self._update(
            "UPDATE jobs SET status = 'queued', step = 0, progress = 0, started_at = NULL,"
            " attempts = attempts - ? WHERE id = ? AND status = 'running'",
            (0 if count_attempt else 1, job_id),
        )

    def cancel(self, job_id: str) -> bool:
        return self._update(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?"
            " WHERE id = ? AND status IN ('queued', 'running')",
            (time.time(), job_id),
        )

    def recover(self) -> None:
        """At start-up: no job is running, so any marked running died with the last process."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = 'running'").fetchall()
        for job in map(_job, rows):
            if job.attempts >= MAX_ATTEMPTS:
                why = f"The server stopped {job.attempts} times while running this job, so it was"
                self.finish(job.id, "failed", f"{why} not retried; try other settings.")
                log.warning("job %s failed: the server stopped during each of its runs", job.id)
            else:
                self.requeue(job.id, count_attempt=True)
                log.warning("job %s was running when the server stopped; queued again", job.id)
        for leftover in self.videos.glob(".*"):  # Video.save's temporary files start with "."
            leftover.unlink()


def _job(row: sqlite3.Row) -> Job:
    return Job(**{k: row[k] for k in Job.__dataclass_fields__})


def _hash(req: JobRequest) -> str:
    return hashlib.sha256(json.dumps(asdict(req), sort_keys=True).encode()).hexdigest()


class _Cancelled(Exception):
    pass


class _Interrupted(Exception):
    pass


class JobQueue:
    """The service the routes call: validation, admission, and the worker that drains the queue.

    `load_pipeline` runs on the worker thread, once, before the first job; `on_fatal` is called
    when it fails (the CLI uses it to stop the server with a non-zero exit).
    """

    def __init__(
        self,
        store: JobStore,
        load_pipeline: Callable[[], Callable],
        *,
        blocked_term: Callable[[str], str | None] = lambda prompt: None,
        rate_limit: Callable[[str], float] = lambda owner: 0.0,
        queue_size: int = 100,
        on_fatal: Callable[[], None] = lambda: None,
    ):
        self.store, self.changes = store, Changes()
        self._load, self._blocked_term, self._rate_limit = load_pipeline, blocked_term, rate_limit
        self.queue_size, self.on_fatal = queue_size, on_fatal
        self._lock = threading.Lock()  # admission: idempotency check, bound and insert as one
        self._wake = threading.Event()
        self._draining, self._stop = threading.Event(), threading.Event()
        self._loaded = threading.Event()
        self._pipe: Callable | None = None
        self.load_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="t2v-worker", daemon=True)

    # --- the API the routes use --------------------------------------------------------------

    @property
    def state(self) -> str:
        """'ready', 'starting', 'draining' or 'failed'."""
        if self.load_error:
            return "failed"
        if self._draining.is_set() or self._stop.is_set():
            return "draining"
        if not self._loaded.is_set():
            return "starting"
        return "ready" if self._thread.is_alive() else "failed"

    def submit(self, owner: str, req: JobRequest, idempotency_key: str | None) -> tuple[Job, bool]:
        """Queue a job, or return the one this idempotency key made; True means a replay."""
        if self._draining.is_set() or self._stop.is_set():
            raise JobError(503, "The server is shutting down; retry in a minute.", retry_after=60)
        req = _checked(req, self._blocked_term)
        if (check := getattr(self._pipe, "check_prompt", None)) is not None:
            try:  # e.g. a prompt the model knows no word of: refuse now, not after queueing
                check(req.prompt)
            except PromptError as e:
                raise JobError(422, str(e)) from None
        with self._lock:
            if idempotency_key is not None:
                found = self.store.by_idempotency_key(owner, idempotency_key)
                if found and found[1] != _hash(req):
                    raise JobError(
                        422,
                        "This Idempotency-Key was used for a different request;"
                        " use a new key for new work.",
                    )
                if found:
                    return found[0], True
            if self.store.count("queued") >= self.queue_size:
                wait = self._eta_of_running()
                raise JobError(
                    429,
                    f"The queue is full ({self.queue_size} jobs); retry in {wait} s.",
                    retry_after=wait,
                )
            if wait := self._rate_limit(owner):
                raise JobError(
                    429,
                    "This API key has sent too many generation requests;"
                    f" retry in {math.ceil(wait)} s.",
                    retry_after=math.ceil(wait),
                )
            job = self.store.create(owner, req, idempotency_key)
        self._wake.set()
        self.changes.notify()
        return job, False

    def get(self, job_id: str, owner: str) -> Job:
        job = self.store.get(job_id, owner)
        if job is None:
            raise JobError(404, f"No video has the id '{job_id[:40]}'; GET /v1/videos lists yours.")
        return job

    def list(self, owner: str, limit: int, before_seq: int | None) -> list[Job]:
        return self.store.list(owner, limit, before_seq)

    def cancel(self, job_id: str, owner: str) -> Job:
        job = self.get(job_id, owner)
        if not self.store.cancel(job.id):
            done = {"cancelled": "was already cancelled"}.get(
                job.status, f"has already {job.status}"
            )
            raise JobError(409, f"The job {done}, so there is nothing to cancel.")
        self.changes.notify()  # a running job stops at its next sampling step
        return self.get(job_id, owner)

    def video(self, job_id: str, owner: str) -> tuple[Job, Path]:
        job = self.get(job_id, owner)
        if job.status != "succeeded":
            hint = "it has none" if job.status in FINISHED else "watch its events until it succeeds"
            raise JobError(409, f"The video is not ready: the job is {job.status}; {hint}.")
        path = self.store.video_path(job)
        if not path.is_file():
            raise JobError(404, "The video file is missing from the server's data directory.")
        return job, path

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.store.recover()
        self._thread.start()

    def drain(self, timeout: float) -> None:
        """Stop taking jobs, give the running one `timeout` seconds to finish, then stop."""
        self._draining.set()
        self.changes.notify()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.stop()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop now: the running job goes back to the queue at its next sampling step."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.changes.notify(close=True)

    # --- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            pipe = self._load()
        except Exception as e:
            self.load_error = f"The model could not be loaded: {e}"
            log.exception("loading the model failed")
            self.changes.notify(close=True)
            self.on_fatal()
            return
        self._pipe = pipe
        self._loaded.set()
        log.info("model loaded; %d jobs queued", self.store.count("queued"))
        while not (self._stop.is_set() or self._draining.is_set()):
            self._wake.clear()
            try:
                job = self.store.claim_next()
                if job is not None:
                    self._execute(pipe, job)
                    continue
            except sqlite3.Error:  # e.g. the disk is full: keep serving, try again
                log.exception("the job store failed")
            self._wake.wait(timeout=1.0)

    def _execute(self, pipe: Callable, job: Job) -> None:
        self.changes.notify()
        last_write = 0.0

        def callback(step: int, total: int) -> None:
            nonlocal last_write
            if self.store.status(job.id) != "running":  # cancelled by a DELETE
                raise _Cancelled
            if self._stop.is_set():
                raise _Interrupted
            if step == total or time.monotonic() - last_write >= PROGRESS_INTERVAL_S:
                self.store.set_progress(job.id, step, total)
                last_write = time.monotonic()
                self.changes.notify()

        path = self.store.video_path(job)
        try:
            video = pipe(
                job.prompt,
                negative_prompt=job.negative_prompt,
                seed=job.seed,
                steps=job.steps,
                guidance=job.guidance,
                callback=callback,
            )
            video.save(path, format=job.format)  # the file appears only once complete
            if not self.store.finish(job.id, "succeeded"):
                path.unlink(missing_ok=True)  # cancelled while the video was being encoded
        except _Cancelled:
            log.info("job %s cancelled", job.id)
        except _Interrupted:
            self.store.requeue(job.id, count_attempt=False)
            log.info("job %s interrupted by shutdown; queued again", job.id)
        except ValueError as e:  # PromptError and the pipeline's other one-sentence refusals
            self.store.finish(job.id, "failed", str(e))
        except Exception as e:
            log.exception("job %s failed", job.id)
            self.store.finish(
                job.id,
                "failed",
                f"Generation failed ({type(e).__name__}); the server log has the details.",
            )
        finally:
            self.changes.notify()

    def _eta_of_running(self) -> int:
        job = self.store.running()
        eta = job.eta_seconds(time.time()) if job else None
        return max(1, math.ceil(eta)) if eta is not None else 5


def _checked(req: JobRequest, blocked_term: Callable[[str], str | None]) -> JobRequest:
    """The request with prompts normalised as the pipeline will see them, or a 422."""
    try:
        prompt = normalize(req.prompt)
    except PromptError as e:
        raise JobError(422, str(e)) from None
    negative = _negative_prompt(req.negative_prompt)
    for text in (prompt, negative or ""):
        if term := blocked_term(text):
            raise JobError(422, f"The prompt contains the blocked term '{term}'; rephrase it.")
    return JobRequest(prompt, negative, req.seed, req.steps, req.guidance, req.format)


def _negative_prompt(text: str | None) -> str | None:
    try:
        normalize(text or "", max_chars=None)
    except PromptError:
        return None  # a negative prompt that normalises to nothing is no negative prompt
    try:
        return normalize(text)
    except PromptError as e:
        raise JobError(422, str(e).replace("The prompt", "The negative prompt", 1)) from None
