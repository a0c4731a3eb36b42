"""A `VideoModel` that draws a flat colour in a few milliseconds per step, for queue and
worker tests that are about jobs, not pixels. `launch_worker` runs `t2v worker` with it."""

from __future__ import annotations

import sys
import time

import numpy as np

from t2v.model import Cancelled, FloatRange, GenerationRequest, IntRange, Knobs, ModelInfo
from t2v.video import Video

KNOBS = Knobs(
    steps=IntRange(4, 1, 100),
    guidance=FloatRange(1.0, 0.0, 20.0),
    frames=IntRange(2, 1, 8),
    width=IntRange(16, 8, 64, 8),
    height=IntRange(16, 8, 64, 8),
    fps=FloatRange(8.0, 1.0, 60.0),
)


class FakeModel:
    """Each step sleeps `step_s` (so a test can act mid-job), then reports progress."""

    knobs = KNOBS

    def __init__(self, name: str = "fake", step_s: float = 0.0):
        self.info = ModelInfo(id=name, kind="fake", description="A flat colour, for tests.")
        self.step_s = step_s
        self.calls: list[GenerationRequest] = []

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        return self.knobs.resolve(request)

    def generate(self, requests, progress=None, cancelled=None) -> list:
        requests = [self.resolve(r) for r in requests]
        total = sum(r.steps for r in requests)
        for step in range(1, total + 1):
            if cancelled is not None and cancelled():
                raise Cancelled
            time.sleep(self.step_s)
            if progress is not None:
                progress(step, total)
        self.calls.extend(requests)
        return [
            Video(np.full((r.frames, r.height, r.width, 3), r.seed % 256, np.uint8), r.fps)
            for r in requests
        ]


# `python fake_model.py NAME STEP_S t2v-args...`: t2v with every model loaded as a FakeModel.
_LAUNCH = """
import sys
sys.path.insert(0, {tests!r})
from fake_model import FakeModel
from t2v import backends
from t2v.cli import main

name, step_s = sys.argv[1], float(sys.argv[2])
backends.load_model = lambda *a, **k: FakeModel(name, step_s)
sys.exit(main(sys.argv[3:]))
"""


def launch_args(name: str, step_s: float, *t2v_args: str) -> list[str]:
    """The command line of `t2v <t2v_args>` whose models are FakeModel(name, step_s)."""
    from pathlib import Path

    code = _LAUNCH.format(tests=str(Path(__file__).parent))
    return [sys.executable, "-c", code, name, str(step_s), *t2v_args]
