"""A `VideoModel` that draws a flat colour in a few milliseconds per step, for queue and
worker tests that are about jobs, not pixels. `launch_args` runs `t2v` with it.

It takes the bundled teacher's knobs (read from its JSON files: up to 100 steps, so a test
can make a long job), so an API node that checks requests against the teacher queues jobs
this model accepts. A prompt that starts
with "slow" takes `SLOW_STEP_S` per step, so a test can act in the middle of that job.
With `log` set, each finished video appends its prompt to that file (one line, O_APPEND),
so a test across processes can count how often each job was really generated.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from t2v.backends import read_knobs
from t2v.model import Cancelled, GenerationRequest, ModelInfo
from t2v.video import Video

SLOW_STEP_S = 0.05


class FakeModel:
    """Each step sleeps `step_s` (or `SLOW_STEP_S` for a "slow..." prompt), then reports."""

    knobs = read_knobs("t2v-moving-shapes-teacher")

    def __init__(self, name: str = "fake", step_s: float = 0.0, log: str | None = None):
        self.info = ModelInfo(id=name, kind="fake", description="A flat colour, for tests.")
        self.step_s, self.log = step_s, log
        self.calls: list[GenerationRequest] = []

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        return self.knobs.resolve(request)

    def generate(self, requests, progress=None, cancelled=None) -> list:
        requests = [self.resolve(r) for r in requests]
        total = sum(r.steps for r in requests)
        slow = any(r.prompt.startswith("slow") for r in requests)
        for step in range(1, total + 1):
            if cancelled is not None and cancelled():
                raise Cancelled
            time.sleep(SLOW_STEP_S if slow else self.step_s)
            if progress is not None:
                progress(step, total)
        self.calls.extend(requests)
        if self.log:
            for r in requests:
                fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(fd, f"{r.prompt}\n".encode())
                os.close(fd)
        return [
            Video(np.full((r.frames, r.height, r.width, 3), r.seed % 256, np.uint8), r.fps)
            for r in requests
        ]


_LAUNCH = """
import sys
sys.path.insert(0, {tests!r})
from fake_model import FakeModel
from t2v import backends
from t2v.cli import main

name, step_s, log = sys.argv[1], float(sys.argv[2]), sys.argv[3] or None
backends.load_model = lambda *a, **k: FakeModel(name, step_s, log)
sys.exit(main(sys.argv[4:]))
"""


def launch_args(name: str, step_s: float, log: str | Path | None, *t2v_args: str) -> list[str]:
    """The command line of `t2v <t2v_args>` whose models are FakeModel(name, step_s, log)."""
    code = _LAUNCH.format(tests=str(Path(__file__).parent))
    return [sys.executable, "-c", code, name, str(step_s), str(log or ""), *t2v_args]
