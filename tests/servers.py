"""A real `t2v serve` subprocess with a model, for the lifecycle, browser and schemathesis
tests and bench/serve.py."""

from __future__ import annotations

import ctypes
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

# Runs `t2v <args>`; with a delay > 0, every sampling step first sleeps that long, so that a
# test can act in the middle of a job. Test-only: it wraps the pipeline from outside and adds
# no knob to the server itself.
_LAUNCH = """
import sys, time
from t2v.cli import main
from t2v.pipeline import TextToVideoPipeline

delay = float(sys.argv[1])
if delay > 0:
    generate = TextToVideoPipeline.generate

    def slow_generate(self, requests, *args, progress=None, **knobs):
        def slow_progress(step, total):
            time.sleep(delay)
            if progress is not None:
                progress(step, total)

        return generate(self, requests, *args, progress=slow_progress, **knobs)

    TextToVideoPipeline.generate = slow_generate
sys.exit(main(sys.argv[2:]))
"""


def _die_with_parent() -> None:
    """Linux: SIGKILL the server if the test process dies first (a killed run leaves none)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Server:
    """`t2v serve` on a free loopback port, ready when started; stopped (SIGINT, then
    SIGKILL) on exit. Its log is kept in `log` for failure messages."""

    def __init__(
        self, data_dir: Path, model_dir: Path | None, *options: str, step_delay: float = 0.0
    ):
        self.args = [
            sys.executable,
            "-c",
            _LAUNCH,
            str(step_delay),
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            *(["--model", str(model_dir)] if model_dir is not None else []),  # None: --workers 0
            "--device",
            "cpu",
            *options,
        ]
        self.log: list[str] = []
        self.url = ""

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_die_with_parent,
        )
        threading.Thread(target=self._read_log, daemon=True).start()
        deadline = time.monotonic() + 120
        while not self.url:
            self._check_alive(deadline)
            time.sleep(0.05)
        self.client = httpx.Client(base_url=self.url, timeout=30)
        while self.client.get("/readyz").status_code != 200:
            self._check_alive(deadline)
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # stop now; a running job goes back in the queue
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def _read_log(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if found := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
                self.url = found[1]

    def _check_alive(self, deadline: float) -> None:
        assert self.proc.poll() is None, "the server exited:\n" + "".join(self.log)
        assert time.monotonic() < deadline, "the server did not start:\n" + "".join(self.log)

    def post(self, **body) -> str:
        response = self.client.post("/v1/videos", json=body)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def wait(self, job_id: str, until, timeout: float = 120.0) -> dict:
        """Poll the job until `until(job)` is true."""
        deadline = time.monotonic() + timeout
        while not until(job := self.client.get(f"/v1/videos/{job_id}").json()):
            assert time.monotonic() < deadline, f"gave up waiting; the job is {job}"
            time.sleep(0.05)
        return job

    def exit_code(self, timeout: float) -> int:
        return self.proc.wait(timeout)


def done(job: dict) -> bool:
    return job["status"] in ("completed", "failed", "cancelled")


def stepping(job: dict) -> bool:
    return job["status"] == "in_progress" and job["step"] >= 1
