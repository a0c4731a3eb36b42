"""`t2v serve` throughput and overhead, against a local server on 127.0.0.1.

1. Requests per second on the GET endpoints (health, one job, the list), one keep-alive
   client, a fixed number of requests each.
2. End-to-end latency of one generation through the API (POST, server-sent events until
   done, GET the file) against the same generation through the pipeline in this process
   (call + save); runs alternate, and the fastest of each are compared (the least disturbed
   by other work on the machine). The service should add at most 10 %.

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
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's server runner and tiny model

from conftest import build_tiny_pipeline  # noqa: E402
from servers import Server, done  # noqa: E402
from t2v.pipeline import DEFAULT_MODEL_DIR, TextToVideoPipeline  # noqa: E402

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
    """Latency seen by the client, and the job's own run time as the server recorded it."""
    start = time.perf_counter()
    job_id = server.post(prompt=PROMPT, seed=seed, steps=steps)
    with server.client.stream("GET", f"/v1/videos/{job_id}/events") as events:
        lines = events.iter_lines()
        for line in lines:
            if line == "event: done":
                job = json.loads(next(lines).removeprefix("data: "))
                break
    assert job["status"] == "succeeded"
    assert server.client.get(f"/v1/videos/{job_id}/content").status_code == 200
    latency = time.perf_counter() - start
    run = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
    return latency, run.total_seconds()


def direct(pipe, out: Path, seed: int, steps: int | None) -> float:
    start = time.perf_counter()
    pipe(PROMPT, seed=seed, steps=steps, callback=lambda step, total: None).save(out, format="mp4")
    return time.perf_counter() - start


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (DEFAULT_MODEL_DIR / "pipeline.json").is_file():
            model, name, steps = DEFAULT_MODEL_DIR, "bundled", None
        else:
            model, name, steps = tmp / "tiny", "tiny (tests/conftest.py), 100 steps", 100
            build_tiny_pipeline().save_pretrained(model)
        pipe = TextToVideoPipeline.from_pretrained(model, device="cpu")
        with Server(tmp / "data", model, "--rate-limit", "0") as server:
            job_id = server.post(prompt=PROMPT, steps=2)
            server.wait(job_id, done)
            rates = {
                path: get_rate(server.client, path)
                for path in ("/healthz", f"/v1/videos/{job_id}", "/v1/videos?limit=20")
            }
            direct(pipe, tmp / "warm.mp4", 0, steps)
            api_s, run_s, direct_s = [], [], []
            for seed in range(RUNS):
                latency, run = through_api(server, seed, steps)
                api_s.append(latency)
                run_s.append(latency - run)
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
        ("pipeline (call + save)", direct_s),
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
        f"| API latency beyond the job's run time, median | {statistics.median(run_s) * 1000:,.0f}"
        " ms |"
    )
    if overhead > MAX_OVERHEAD:
        print(f"\nThe service adds more than {MAX_OVERHEAD:.0%}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
