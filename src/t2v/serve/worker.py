"""Workers: `Worker` runs jobs from the store on one model (the threads of `t2v serve` and
the `t2v worker` process alike); `t2v worker` is a process that does so from a shared
PostgreSQL store.

Start one per GPU, on any machine that reaches the database and mounts the shared media
folder (`--data-dir`, where the API nodes read the videos):

    t2v worker --db postgresql://t2v@db/t2v --model ~/models/wan-1.3b --data-dir /mnt/media

The worker claims one job at a time for its model (or naming none), holds a lease that it
renews every few seconds, and records the outcome only while the lease is its own. A worker
that dies loses its lease: after `--lease-seconds` another worker takes the job (a job whose
worker died `MAX_ATTEMPTS` times fails with the reason). SIGTERM finishes the running job,
then exits; a second SIGTERM, or Ctrl-C, puts the job back in the queue at its next step.
A lost database is waited for with backoff, never a crash loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from t2v.errors import UserError
from t2v.model import Cancelled, FloatRange, GenerationRequest, IntRange, Knobs
from t2v.serve.store import Job, SqlStore, StoreUnavailable

log = logging.getLogger("t2v.serve")

PROGRESS_INTERVAL_S = 0.1  # at most this often a running job's progress is written
HEARTBEAT_S = 5.0  # how often a worker says it is alive (and renews its job's lease)
LIVE_S = 3 * HEARTBEAT_S  # a worker not heard from for this long serves nothing
RETRY_S = 1.0  # how often a worker retries writing a job's outcome the store refused


def model_name(model) -> str:
    """The name jobs use for `model`: its `ModelInfo.id`."""
    info = getattr(model, "info", None)
    return info.id if info is not None else "t2v"


def model_card(model) -> dict:
    """What a worker tells the store of its model: `GET /v1/models` shows it, and an API node
    that loads no model checks requests against its `knobs` (`card_knobs`)."""
    info = getattr(model, "info", None)
    card = (
        {"id": info.id, "kind": info.kind, "description": info.description, "tested": info.tested}
        if info
        else {}
    )
    knobs = getattr(model, "knobs", None)
    if isinstance(knobs, Knobs):
        card["knobs"] = dataclasses.asdict(knobs)
    return card or {"id": "t2v", "kind": "t2v"}


def card_knobs(card: dict) -> Knobs | None:
    """The knobs in a worker's `model_card`, or None when it stated none."""
    stated = card.get("knobs")
    if not stated:
        return None
    ranges = {"steps": IntRange, "frames": IntRange, "width": IntRange, "height": IntRange}
    return Knobs(
        **{
            name: ranges.get(name, FloatRange)(**value) if isinstance(value, dict) else value
            for name, value in stated.items()
        }
    )


class Worker:
    """Runs jobs from the store on one loaded model, one at a time, under a renewed lease.

    `stop` makes the running job go back to the queue at its next step; the caller's loop
    decides when to stop claiming. `run_one` returns False when nothing was queued.
    """

    def __init__(
        self,
        store: SqlStore,
        model,
        *,
        name: str | None = None,
        lease_s: float = 60.0,
        stop: threading.Event | None = None,
        on_change: Callable[[], None] = lambda: None,
    ):
        self.store, self.model, self.lease_s = store, model, lease_s
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.model_id = model_name(model)
        self.stop = stop or threading.Event()
        self.on_change = on_change
        self.current: Job | None = None

    def heartbeat(self) -> None:
        """Say this worker is alive and renew its job's lease (call every `HEARTBEAT_S`)."""
        self.store.heartbeat(self.name, self.model_id, model_card(self.model))
        job = self.current
        if job is not None and not self.store.renew(job.id, self.name, self.lease_s):
            log.warning("job %s is no longer this worker's (cancelled or lease lost)", job.id)

    def run_one(self) -> bool:
        job = self.store.claim_next(self.name, self.model_id, self.lease_s)
        if job is None:
            return False
        self.current = job
        try:
            self._execute(job)
        finally:
            self.current = None
            self.on_change()
        return True

    def _execute(self, job: Job) -> None:
        self.on_change()
        last_write, failure = 0.0, None

        def cancelled() -> bool:
            if failure is not None or self.stop.is_set():
                return True
            try:
                return self._lost(job)
            except StoreUnavailable:  # unreachable for now: keep going; the lease decides
                return False

        def progress(step: int, total: int) -> None:
            nonlocal last_write, failure
            if cancelled():
                raise Cancelled
            if step == total or time.monotonic() - last_write >= PROGRESS_INTERVAL_S:
                try:
                    self.store.set_progress(job.id, step, total, self.name)
                except StoreUnavailable as e:
                    failure = f"The server could not record the job's progress: {e.message}"
                    raise Cancelled from e
                last_write = time.monotonic()
                self.on_change()

        path = self.store.video_path(job)
        try:
            request = self.model.resolve(_request(job))
            if (request.prompt, request.original_prompt, request.warnings) != (
                job.prompt,
                job.original_prompt,
                job.warnings,
            ):  # read here, not by the API node: the video object shows the reading
                self._record_reading(job, request)
            video = self.model.generate([request], progress=progress, cancelled=cancelled)[0]
            video.save(path, format=job.format)  # the file appears only once complete
        except Cancelled:
            if failure is not None:
                self._finish(job, "failed", failure)
            elif self.stop.is_set() and not self._lost(job):
                self.store.requeue(job.id, count_attempt=False, worker=self.name)
                log.info("job %s interrupted by shutdown; queued again", job.id)
            else:
                log.info("job %s cancelled", job.id)
            return
        except (UserError, ValueError) as e:  # the model's one-sentence refusals
            self._finish(job, "failed", str(e))
            return
        except OSError as e:  # e.g. no space left for the video
            log.exception("job %s: writing its video failed", job.id)
            self._finish(job, "failed", f"The server could not write the video ({e.strerror}).")
            return
        except Exception as e:
            log.exception("job %s failed", job.id)
            why = f"Generation failed ({type(e).__name__}); the server log has the details."
            self._finish(job, "failed", why)
            return
        if not self._finish(job, "succeeded") and self.store.status(job.id) != "succeeded":
            path.unlink(missing_ok=True)  # cancelled (or taken over) while it was encoded

    def _record_reading(self, job: Job, request: GenerationRequest) -> None:
        try:
            self.store.set_reading(job.id, request, self.name)
        except StoreUnavailable:  # only what the video object shows: generate anyway
            log.warning("job %s: the store refused the prompt's reading", job.id)

    def _lost(self, job: Job) -> bool:
        """Whether the job was cancelled, or is no longer this worker's."""
        return self.store.holder(job.id) != ("running", self.name)

    def _finish(self, job: Job, status: str, error: str | None = None) -> bool:
        """Record the outcome, retrying while the store refuses writes (a full disk) until
        it accepts them or this worker stops (then the next start re-queues the job)."""
        while True:
            try:
                return self.store.finish(job.id, status, error, self.name)
            except StoreUnavailable:
                log.warning("job %s: the store refused its outcome; retrying", job.id)
                if self.stop.wait(RETRY_S):
                    return False


def _request(job: Job) -> GenerationRequest:
    """The job as the model protocol's request. A job the API node resolved keeps its reading
    and is not normalised again (`GenerationRequest.resolved`)."""
    return GenerationRequest(
        job.prompt,
        job.negative_prompt or "",  # resolved: "" is none (t2v.text.normalize_negative)
        job.seed,
        job.steps,
        job.guidance,
        job.frames,
        job.width,
        job.height,
        job.fps,
        original_prompt=job.original_prompt,
        warnings=job.warnings,
        resolved=job.resolved,
    )


def run_worker(
    db: str,
    model_dir: Path | None,
    data_dir: Path,
    device: str,
    lease_s: float,
    precision: str = "fp32",
    offload: str = "none",
) -> None:
    """Serve jobs until SIGTERM (finish the running job) or SIGINT (put it back)."""
    from t2v import backends
    from t2v.serve.store import open_store

    store = open_store(db, data_dir)
    draining, stop, wake = threading.Event(), threading.Event(), threading.Event()

    def on_signal(sig, frame):
        if sig == signal.SIGTERM and not draining.is_set():
            log.info("SIGTERM: finishing the running job, then exiting")
            draining.set()
        else:
            log.info("stopping: the running job goes back to the queue")
            draining.set()
            stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    model = backends.load_model(model_dir, device, precision, offload)
    worker = Worker(store, model, lease_s=lease_s, stop=stop)
    log.info("worker %s serves model '%s'", worker.name, worker.model_id)

    def heartbeats():
        while not stop.wait(min(HEARTBEAT_S, lease_s / 3)):
            try:
                worker.heartbeat()
            except StoreUnavailable:
                log.warning("the database is unreachable; the heartbeat will be retried")

    try:
        worker.heartbeat()
    except StoreUnavailable:
        log.warning("the database is unreachable; waiting for it")
    threading.Thread(target=heartbeats, name="t2v-heartbeat", daemon=True).start()
    store.listen(wake.set)  # a new job wakes the worker at once; it polls every second anyway
    backoff = 0.5
    try:
        while not draining.is_set():
            wake.clear()
            try:
                if worker.run_one():
                    backoff = 0.5
                    continue
            except StoreUnavailable:
                log.warning("the database is unreachable; retrying in %.0f s", backoff)
                wake.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            wake.wait(1.0)
    finally:
        stop.set()
        try:
            store.forget_worker(worker.name)
        except StoreUnavailable:
            pass
        store.close()
    log.info("worker %s stopped", worker.name)
