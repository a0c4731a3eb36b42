"""A real `t2v serve` process with the tiny model: kill -9 in the middle of a job, SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from servers import Server, done, stepping
from t2v.serve.store_sqlite import SqliteStore


def test_kill_9_mid_job_then_restart(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    with Server(data, tiny_model_dir, step_delay=0.2) as server:
        finished = server.post(prompt="a red circle", steps=2)
        assert server.wait(finished, done)["status"] == "succeeded"
        video = server.client.get(f"/v1/videos/{finished}/content").content
        killed = server.post(prompt="a blue square", steps=50)
        waiting = server.post(prompt="a green circle", steps=2, format="webm")
        server.wait(killed, stepping)
        server.proc.send_signal(signal.SIGKILL)
        assert server.exit_code(10) == -signal.SIGKILL
    assert SqliteStore(data).get(killed, "").status == "running"  # as the dead process left it

    with Server(data, tiny_model_dir) as server:
        rerun = server.wait(killed, done)
        assert rerun["status"] == "succeeded" and rerun["step"] == 50
        assert server.wait(waiting, done)["status"] == "succeeded"
        assert server.client.get(f"/v1/videos/{finished}/content").content == video
        listed = [j["id"] for j in server.client.get("/v1/videos").json()["data"]]
        assert listed == [waiting, killed, finished]
    assert not [p for p in (data / "videos").iterdir() if p.name.startswith(".")]


def test_sigterm_finishes_the_running_job_while_readyz_says_503(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    with Server(data, tiny_model_dir, "--drain-timeout", "120", step_delay=0.2) as server:
        job = server.post(prompt="a red circle", steps=30)  # 6 s or more: time to look
        server.wait(job, stepping)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while server.client.get("/readyz").status_code != 503:
            assert time.monotonic() < deadline
        assert server.client.post("/v1/videos", json={"prompt": "a late circle"}).status_code == 503
        assert server.client.get(f"/v1/videos/{job}").json()["status"] == "running"
        assert server.exit_code(120) == 0
    assert SqliteStore(data).get(job, "").status == "succeeded"
    assert (data / "videos" / f"{job}.mp4").stat().st_size > 0


def test_sigterm_requeues_a_job_longer_than_the_drain_timeout(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    with Server(data, tiny_model_dir, "--drain-timeout", "0.5", step_delay=0.2) as server:
        job = server.post(prompt="a red circle", steps=100)
        server.wait(job, stepping)
        server.proc.send_signal(signal.SIGTERM)  # 20 s of steps left; 0.5 s to finish them
        assert server.exit_code(120) == 0
    requeued = SqliteStore(data).get(job, "")
    assert requeued.status == "queued" and requeued.step == 0 and requeued.attempts == 0


def test_a_model_that_does_not_load_stops_the_server_with_an_error(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "t2v.cli",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            "--model",
            str(empty),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "t2v: error: The model could not be loaded: No t2v model" in result.stderr
