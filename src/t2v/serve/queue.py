"""The job queue the routes call (validation, admission) and the workers that drain it.

Generation is compute-bound, so a worker runs one job at a time and everything else waits in
the store's queue. Every state change is written to the store before it is announced, and
videos are written to `<data-dir>/videos/<id>.<format>` (a temporary name first, renamed
when complete), so a process killed at any instant leaves no half-written video and no job
stuck as running: the next start re-queues it (SQLite), or its lease runs out (PostgreSQL).

Cancelling a running job marks it cancelled at once; its worker notices before the next
sampling step and drops the job. Draining (SIGTERM) lets the running job finish; stopping
(Ctrl-C, or a drain that ran out of time) puts it back in the queue at the next step.

When the store cannot be written (a full disk), a new job gets a 503 (`StoreUnavailable`);
a running job whose progress cannot be written stops, and its worker keeps trying to record
it as failed, with the reason, until the write succeeds (or the next start re-queues it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from t2v.errors import UserError
from t2v.model import VideoModel
from t2v.serve.config import ServeConfig
from t2v.serve.store import (
    API_STATUS,
    FINISHED,
    MAX_ATTEMPTS,
    DuplicateKey,
    Job,
    JobError,
    JobRequest,
    LiveModel,
    SqlStore,
    StoreUnavailable,
    request_hash,
)
from t2v.serve.worker import HEARTBEAT_S, LIVE_S, Worker
from t2v.text import PromptError, normalize, normalize_negative

__all__ = [
    "FINISHED",
    "MAX_ATTEMPTS",
    "Job",
    "JobError",
    "JobQueue",
    "JobRequest",
    "Worker",
    "not_served",
]

log = logging.getLogger("t2v.serve")


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


class JobQueue:
    """The service the routes call: validation, admission, and `workers` worker threads.

    `load_model` (returning a `t2v.model.VideoModel`) runs once, on the first worker thread,
    before the first job; `on_fatal` is called when it fails (the CLI uses it to stop the
    server with a non-zero exit). With `workers=0` the node only serves the API, and
    `t2v worker` processes sharing its store run the jobs.
    """

    def __init__(
        self,
        store: SqlStore,
        load_model: Callable[[], VideoModel],
        *,
        blocked_term: Callable[[str], str | None] = lambda prompt: None,
        rate_limit: Callable[[str], float] = lambda owner: 0.0,
        queue_size: int = ServeConfig.queue_size,
        on_fatal: Callable[[], None] = lambda: None,
        workers: int = 1,
        lease_s: float = 60.0,
        model_id: str | None = None,
    ):
        self.store, self.changes = store, Changes()
        self._load, self._blocked_term, self._rate_limit = load_model, blocked_term, rate_limit
        self.queue_size, self.on_fatal, self.lease_s = queue_size, on_fatal, lease_s
        self.model_id = model_id  # the id of the model `load_model` loads, known before it does
        self._lock = threading.Lock()  # admission: idempotency check, bound and insert as one
        self._wake = threading.Event()
        self._draining, self._stop = threading.Event(), threading.Event()
        self._loaded = threading.Event()
        self._model: VideoModel | None = None
        self.load_error: str | None = None
        self.workers: list[Worker] = []
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"t2v-worker-{i}", daemon=True)
            for i in range(workers)
        ]

    # --- the API the routes use --------------------------------------------------------------

    @property
    def model(self):
        """The loaded model, or None while it loads (or on a node without workers)."""
        return self._model

    @property
    def state(self) -> str:
        """'ready', 'starting', 'draining', 'failed', or 'unavailable' (the store is not
        reachable)."""
        if self.load_error:
            return "failed"
        if self._draining.is_set() or self._stop.is_set():
            return "draining"
        if not self.store.ping():
            return "unavailable"
        if not self._threads:
            return "ready"
        if not self._loaded.is_set():
            return "starting"
        return "ready" if all(t.is_alive() for t in self._threads) else "failed"

    def submit(self, owner: str, req: JobRequest, idempotency_key: str | None) -> tuple[Job, bool]:
        """Queue a job, or return the one this idempotency key made; True means a replay."""
        if self._draining.is_set() or self._stop.is_set():
            raise JobError(503, "The server is shutting down; retry in a minute.", retry_after=60)
        req = _checked(req, self._blocked_term)
        self._check_model(req.model)
        with self._lock:
            if idempotency_key is not None and (job := self._replay(owner, idempotency_key, req)):
                return job, True
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
            try:
                job = self.store.create(owner, req, idempotency_key)
            except DuplicateKey:  # another node took the key between the check and the insert
                return self._replay(owner, idempotency_key, req), True
        self._wake.set()
        self.changes.notify()
        return job, False

    def _replay(self, owner: str, key: str, req: JobRequest) -> Job | None:
        """The job this idempotency key made, if the same request made it; else a 422."""
        found = self.store.by_idempotency_key(owner, key)
        if found and found[1] != request_hash(req):
            raise JobError(
                422,
                "This Idempotency-Key was used for a different request; use a new key for new"
                " work.",
            )
        return found[0] if found else None

    def live_models(self) -> list[LiveModel]:
        """The models that live workers (in this process or any other) serve, by name."""
        return self.store.live_models(LIVE_S)

    def _check_model(self, model: str | None) -> None:
        """A job that names a model goes only to workers serving it: refuse one none serves
        (this process's own workers serve `model_id` even while they load it). A job that
        names none goes to any worker."""
        if model is None or (self._threads and model == self.model_id):
            return
        served = [m.id for m in self.live_models()]
        if model not in served:
            raise not_served(model, served)

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
            status = self.store.status(job.id) or job.status  # it may have just finished
            done = {"cancelled": "was already cancelled"}.get(
                status, f"has already {API_STATUS[status]}"
            )
            raise JobError(409, f"The job {done}, so there is nothing to cancel.")
        self.changes.notify()  # a running job stops at its next sampling step
        return self.get(job_id, owner)

    def video(self, job_id: str, owner: str) -> tuple[Job, Path]:
        job = self.get(job_id, owner)
        if job.status != "succeeded":
            hint = "it has none" if job.status in FINISHED else "its events say when it completes"
            raise JobError(
                409, f"The video is not ready: the job is {API_STATUS[job.status]}; {hint}."
            )
        path = self.store.video_path(job)
        if not path.is_file():
            raise JobError(404, "The video file is missing from the server's data directory.")
        return job, path

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads; with SQLite, first take the data directory (a second
        server on it is refused, as a failed start: `load_error` says why, `on_fatal` runs)
        and re-queue the jobs the last process left running."""
        if self._threads and hasattr(self.store, "lock"):
            try:
                self.store.lock()
            except UserError as e:
                self.load_error = str(e)
                self.on_fatal()
                return
            self.store.recover()
        self.store.listen(self.changes.notify)
        for thread in self._threads:
            thread.start()
        if self._threads:
            threading.Thread(target=self._heartbeats, name="t2v-heartbeat", daemon=True).start()

    def drain(self, timeout: float) -> None:
        """Stop taking jobs, give the running ones `timeout` seconds to finish, then stop."""
        self._draining.set()
        self.changes.notify()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        self.stop()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop now: running jobs go back to the queue at their next sampling step."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)
        for worker in self.workers:
            try:
                self.store.forget_worker(worker.name)
            except StoreUnavailable:
                pass
        if hasattr(self.store, "unlock"):
            self.store.unlock()
        self.changes.notify(close=True)

    # --- the workers -------------------------------------------------------------------------

    def _run(self, index: int) -> None:
        if index == 0:
            try:
                self._model = self._load()
            except Exception as e:
                self.load_error = f"The model could not be loaded: {e}"
                log.exception("loading the model failed")
                self.changes.notify(close=True)
                self.on_fatal()
                return
            self._loaded.set()
            log.info("model loaded; %d jobs queued", self.store.count("queued"))
        else:
            while not self._loaded.wait(1.0):
                if self.load_error or self._stop.is_set():
                    return
        worker = Worker(
            self.store, self._model, lease_s=self.lease_s, stop=self._stop, on_change=self._notify
        )
        self.workers.append(worker)
        self._beat(worker)
        while not (self._stop.is_set() or self._draining.is_set()):
            self._wake.clear()
            try:
                if worker.run_one():
                    continue
            except StoreUnavailable:  # e.g. the disk is full: keep serving, try again
                log.exception("the job store failed")
            self._wake.wait(timeout=1.0)

    def _notify(self) -> None:
        self.changes.notify()

    def _beat(self, worker: Worker) -> None:
        try:
            worker.heartbeat()
        except StoreUnavailable:
            log.warning("the job store is unavailable; the worker's heartbeat is late")

    def _heartbeats(self) -> None:
        while not self._stop.wait(min(HEARTBEAT_S, self.lease_s / 3)):
            for worker in list(self.workers):
                self._beat(worker)

    def _eta_of_running(self) -> int:
        job = self.store.running()
        eta = job.eta_seconds(time.time()) if job else None
        return max(1, math.ceil(eta)) if eta is not None else 5


def not_served(model: str | None, served: list[str]) -> JobError:
    """The 422 for a job whose model no worker serves (None: a job that names none)."""
    if model is None:
        return JobError(
            422, "No worker serves a model right now; start a `t2v worker`, or retry in a minute."
        )
    names = ", ".join(f"'{m}'" for m in served) or "none right now"
    return JobError(
        422, f"No worker serves the model '{model[:60]}'; the models served are {names}."
    )


def _checked(req: JobRequest, blocked_term: Callable[[str], str | None]) -> JobRequest:
    """The request through the content filter, or a 422. A resolved request (the routes
    resolve each one through the model) is filtered as it is; another has its prompts
    normalised first, as the model will see them."""
    if not req.resolved:
        try:
            req = replace(
                req,
                prompt=normalize(req.prompt),
                negative_prompt=normalize_negative(req.negative_prompt) or None,
            )
        except PromptError as e:
            raise JobError(422, str(e)) from None
    for text in (req.original_prompt, req.prompt, req.negative_prompt):
        if text and (term := blocked_term(text)):
            raise JobError(422, f"The prompt contains the blocked term '{term}'; rephrase it.")
    return req
