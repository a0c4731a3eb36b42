"""The job queue's own cost, and how `t2v worker` processes scale, on a real PostgreSQL.

1. Overhead per job: with 1,000 jobs queued, one worker claims each (with its lease) and
   records it finished, nothing generated in between. Target: at most 20 ms per job.
   Measured on SQLite (the embedded store) and PostgreSQL.
2. Throughput: 1, 2 and 4 `t2v worker` processes (one torch thread each) on the tiny test
   model share one queue of jobs; jobs per second against the machine's cores.

Starts its own PostgreSQL (as tests/pg.py does; Debian package `postgresql`).
(Not bench/queue.py: run as a script, that name would hide the standard `queue` module.)
Run: .venv/bin/python bench/jobqueue.py   (about two minutes; prints markdown tables)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' PostgreSQL runner and tiny model

from pg import Postgres, find_binaries  # noqa: E402
from t2v.serve.store import JobRequest, SqlStore  # noqa: E402
from t2v.serve.store_pg import PgStore  # noqa: E402
from t2v.serve.store_sqlite import SqliteStore  # noqa: E402

TARGET_MS = 20.0


def overhead(store: SqlStore, queued: int) -> tuple[float, float]:
    """Mean and 95th-percentile ms of claim + finish, with `queued` jobs waiting."""
    for i in range(queued):
        store.create("bench", JobRequest(f"a red circle {i}"), None)
    times = []
    while True:
        start = time.perf_counter()
        job = store.claim_next("bench-worker", "tiny", 60.0)
        if job is None:
            break
        assert store.finish(job.id, "succeeded", None, "bench-worker")
        times.append((time.perf_counter() - start) * 1000)
    assert len(times) == queued
    return statistics.mean(times), statistics.quantiles(times, n=20)[-1]


def throughput(url: str, data: Path, model: Path, workers: int, jobs: int, steps: int) -> float:
    """Jobs per second of `workers` worker processes draining `jobs` queued jobs."""
    store = PgStore(url, data)
    with store._tx() as run:
        run("DELETE FROM jobs")
        run("DELETE FROM workers")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = ["worker", "--db", url, "--model", str(model), "--data-dir", str(data)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "t2v.cli", *args, "--device", "cpu"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(workers)
    ]
    try:
        deadline = time.monotonic() + 120
        while sum(m.workers for m in store.live_models(15)) < workers:  # loaded: timing starts
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.1)
        start = time.perf_counter()
        for i in range(jobs):
            store.create("bench", JobRequest(f"a red circle {i}", steps=steps, seed=i), None)
        while store.count("succeeded") < jobs:
            assert store.count("failed") == 0, "a job failed"
            time.sleep(0.02)
        return jobs / (time.perf_counter() - start)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", default="1,2,4")
    opts = parser.parse_args()
    bin_dir = find_binaries()
    if bin_dir is None:
        sys.exit("PostgreSQL is not installed (Debian: apt-get install postgresql).")
    root = Path(tempfile.mkdtemp(prefix="t2v-bench-queue-"))
    os.chmod(root, 0o755)
    pg = Postgres(root, bin_dir)
    pg.start()
    try:
        print(f"## Queue overhead per job (claim + finish), {opts.queued} jobs queued\n")
        print("| store | mean ms | p95 ms | target |\n|---|---|---|---|")
        stores = [
            ("SQLite", SqliteStore(root / "sqlite")),
            ("PostgreSQL", PgStore(pg.fresh(), root / "pg")),
        ]
        for name, store in stores:
            mean, p95 = overhead(store, opts.queued)
            verdict = "met" if mean <= TARGET_MS else "MISSED"
            print(f"| {name} | {mean:.2f} | {p95:.2f} | <= {TARGET_MS:g} ms: {verdict} |")
            store.close()

        from conftest import build_tiny_pipeline

        model = root / "tiny-model"
        build_tiny_pipeline().save_pretrained(model)
        url = pg.fresh()
        cores = os.cpu_count()
        print(f"\n## Throughput: tiny model, {opts.steps} steps, {opts.jobs} jobs, {cores} cores\n")
        print("| workers | jobs/s | vs 1 worker |\n|---|---|---|")
        base = None
        for n in map(int, opts.workers.split(",")):
            rate = throughput(url, root / "media", model, n, opts.jobs, opts.steps)
            base = base or rate
            print(f"| {n} | {rate:.2f} | {rate / base:.2f}x |")
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
