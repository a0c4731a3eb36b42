"""A real `t2v serve` process with the tiny model: kill -9 in the middle of a job, SIGTERM,
the access log, and the one-sentence exits an operator meets."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from servers import Server, done, stepping
from t2v.serve.auth import KeyStore
from t2v.serve.store_sqlite import SqliteStore


def test_kill_9_mid_job_then_restart(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    with Server(data, tiny_model_dir, step_delay=0.2) as server:
        finished = server.post(prompt="a red circle", steps=2)
        assert server.wait(finished, done)["status"] == "completed"
        video = server.client.get(f"/v1/videos/{finished}/content").content
        killed = server.post(prompt="a blue square", steps=50)
        waiting = server.post(prompt="a green circle", steps=2, format="webm")
        server.wait(killed, stepping)
        server.proc.send_signal(signal.SIGKILL)
        assert server.exit_code(10) == -signal.SIGKILL
    assert SqliteStore(data).get(killed, "").status == "running"  # as the dead process left it

    with Server(data, tiny_model_dir) as server:
        rerun = server.wait(killed, done)
        assert rerun["status"] == "completed" and rerun["step"] == 50
        assert server.wait(waiting, done)["status"] == "completed"
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
        assert server.client.get(f"/v1/videos/{job}").json()["status"] == "in_progress"
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
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "t2v: error: " in result.stderr and "is not a model folder" in result.stderr


def t2v(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "t2v.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_sentence(result: subprocess.CompletedProcess, says: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2v: error: "), result.stderr
    assert says in lines[0] and lines[0].endswith("."), lines[0]


def test_operators_get_one_sentence_never_a_traceback(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "t2v.sqlite3").write_bytes(b"not a database, " * 64)
    a_file = tmp_path / "a-file"
    a_file.write_text("notes")
    serve = ("serve", "--port", "0")
    for args, says in [
        ((*serve, "--data-dir", str(corrupt)), "t2v.sqlite3"),
        (("keys", "list", "--data-dir", str(corrupt)), "t2v.sqlite3"),
        ((*serve, "--data-dir", str(a_file)), "is a file"),
        (("keys", "create", "--name", "x", "--data-dir", str(a_file)), "is a file"),
        (("serve", "--port", "99999", "--data-dir", str(tmp_path / "d")), "--port 99999"),
        ((*serve, "--allowed-host", "http://x/", "--data-dir", str(tmp_path / "d")), "host name"),
        ((*serve, "--public-url", "ftp://x", "--data-dir", str(tmp_path / "d")), "--public-url"),
    ]:
        assert_one_sentence(t2v(*args), says)
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_a_read_only_data_dir_is_one_sentence(tmp_path):
    data = tmp_path / "ro"
    data.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(data)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip("needs a read-only tmpfs mount (root in a container that allows it)")
    try:
        assert_one_sentence(t2v("serve", "--port", "0", "--data-dir", str(data)), "read-only")
        assert_one_sentence(t2v("keys", "list", "--data-dir", str(data)), "read-only")
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_the_access_log_never_holds_a_key(tmp_path, tiny_model_dir):
    """Keys sent where they do not belong, in a query string or a path, are still secrets."""
    data = tmp_path / "data"
    _, key = KeyStore(SqliteStore(data)).create("careless")
    with Server(data, tiny_model_dir, "--auth", "--allowed-host", "Example.COM:8000") as server:
        secret = key.split("_", 2)[2]  # t2v_<id>_<secret>; the secret itself may hold "_"
        for path in (
            f"/v1/videos?api_key={key}&limit=5",
            f"/v1/videos?limit=5&token={secret}",
            f"/v1/videos/{key}",
        ):
            assert server.client.get(path).status_code == 401
        accepted = server.client.get("/healthz", headers={"Host": "example.com:8000"})
        assert accepted.status_code == 200  # --allowed-host Example.COM:8000, normalised
        deadline = time.monotonic() + 10
        while sum("GET /v1/videos" in line for line in server.log) < 3:
            assert time.monotonic() < deadline, "".join(server.log)
            time.sleep(0.05)
        log = "".join(server.log)
        assert secret not in log and "api_key=[redacted]&limit=5" in log
        assert "token=[redacted]" in log and "/v1/videos/[redacted]" in log
