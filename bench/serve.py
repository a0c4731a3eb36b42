"""`t2v serve` throughput and overhead, against a local server on 127.0.0.1.

1. Requests per second on the GET endpoints (health, one job, the list), one keep-alive
   client, a fixed number of requests each.
2. End-to-end latency of one generation through the API (POST, server-sent events until
   done, GET the file) against the same generation through the model protocol in this
   process (resolve, generate, save, as the worker does); runs alternate, and the fastest of
   each are compared (the least disturbed by other work on the machine). The service should
   add at most 10 %. Also: how long a job waits from its POST to its first step's event.

Uses the bundled model when it exists, else the tiny test model (built here, with the most
sampling steps, 100, so that a generation is not mostly the ~10 ms of fixed HTTP costs).
Run: .venv/bin/python bench/serve.py   (about a minute; prints a markdown table)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's server runner and tiny model

from conftest import build_tiny_pipeline  # noqa: E402
from servers import Server, done  # noqa: E402
from t2v.backends import load_model  # noqa: E402
from t2v.model import GenerationRequest  # noqa: E402
from t2v.pipeline import DEFAULT_MODEL_DIR  # noqa: E402

GET_REQUESTS = 500
RUNS = 5
PROMPT = "a large red circle moving right"
MAX_OVERHEAD = 0.10


def get_rate(client, path: str) -> float:
    client.get(path)  # warm-up
    start = time.perf_counter()
    for _ in range(GET_REQUESTS):
        assert client.get(path).status_code == 200
    return GET_REQUESTS / (time.perf_counter() - start)


def through_api(server: Server, seed: int, steps: int | None) -> tuple[float, float]:
    """Latency seen by the client, and how long after the POST the first step's event came."""
    start = time.perf_counter()
    job_id = server.post(prompt=PROMPT, seed=seed, steps=steps)
    first_step = None
    with server.client.stream("GET", f"/v1/videos/{job_id}/events") as events:
        for line in events.iter_lines():
            if not line.startswith("data: "):
                continue
            job = json.loads(line.removeprefix("data: "))
            if first_step is None and job["step"] >= 1:
                first_step = time.perf_counter() - start
            if job["status"] in ("completed", "failed", "cancelled"):
                break
    assert job["status"] == "completed", job["error"]
    assert server.client.get(f"/v1/videos/{job_id}/content").status_code == 200
    return time.perf_counter() - start, first_step


def direct(model, out: Path, seed: int, steps: int | None) -> float:
    start = time.perf_counter()
    request = model.resolve(GenerationRequest(PROMPT, seed=seed, steps=steps))
    (video,) = model.generate([request], progress=lambda step, total: None)
    video.save(out, format="mp4")
    return time.perf_counter() - start


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (DEFAULT_MODEL_DIR / "pipeline.json").is_file():
            model, name, steps = DEFAULT_MODEL_DIR, "bundled", None
        else:
            model, name, steps = tmp / "tiny", "tiny (tests/conftest.py), 100 steps", 100
            build_tiny_pipeline().save_pretrained(model)
        pipe = load_model(model, device="cpu")
        with Server(tmp / "data", model, "--rate-limit", "0") as server:
            job_id = server.post(prompt=PROMPT, steps=2)
            server.wait(job_id, done)
            rates = {
                path: get_rate(server.client, path)
                for path in ("/healthz", f"/v1/videos/{job_id}", "/v1/videos?limit=20")
            }
            direct(pipe, tmp / "warm.mp4", 0, steps)
            api_s, wait_s, direct_s = [], [], []
            for seed in range(RUNS):
                latency, first_step = through_api(server, seed, steps)
                api_s.append(latency)
                wait_s.append(first_step)
                direct_s.append(direct(pipe, tmp / f"{seed}.mp4", seed, steps))

    api_min, direct_min = min(api_s), min(direct_s)
    overhead = api_min / direct_min - 1
    print(
        f"model: {name}; {GET_REQUESTS} sequential GETs per endpoint; {RUNS} generations each;"
        f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    print("| measurement | value |")
    print("|---|---|")
    for path, rate in rates.items():
        print(f"| GET {path.replace(job_id, '{id}')} | {rate:,.0f} req/s |")
    for label, times in (
        ("API (POST + events + content)", api_s),
        ("model protocol (resolve + generate + save)", direct_s),
    ):
        print(
            f"| generation via {label}, fastest / median | {min(times) * 1000:,.0f} /"
            f" {statistics.median(times) * 1000:,.0f} ms |"
        )
    print(
        f"| service overhead, fastest vs fastest | {overhead:+.1%}"
        f" ({(api_min - direct_min) * 1000:+,.0f} ms) |"
    )
    print(
        f"| POST to the first step's event, median | {statistics.median(wait_s) * 1000:,.0f} ms |"
    )
    if overhead > MAX_OVERHEAD:
        print(f"\nThe service adds more than {MAX_OVERHEAD:.0%}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
