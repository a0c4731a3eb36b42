"""The web API in-process: every status code, idempotency, limits, the Host/Origin guards,
path traversal, API keys and the content filter.

The app runs with real SQLite and real PyAV encoding; the model is a stand-in called like
`TextToVideoPipeline` whose sampling steps the test can hold, so that "running", "queued"
and "cancelled mid-job" happen when the test says so. The real model is served by the
subprocess tests (test_serve_lifecycle.py, test_browser.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from servers import Server
from t2v.errors import UserError
from t2v.pipeline import TextToVideoPipeline
from t2v.serve.app import ServeConfig, create_app
from t2v.serve.auth import KeyStore
from t2v.serve.store import MAX_ATTEMPTS, JobRequest
from t2v.serve.store_sqlite import SqliteStore
from t2v.text import PromptError
from t2v.video import Video

BASE = "http://127.0.0.1:8000"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
ID = "A" * 22  # well-formed, never issued


class HeldPipeline:
    """Called like TextToVideoPipeline; each step waits until `go` is set."""

    def __init__(self, steps: int = 4):
        self.steps, self.calls = steps, []
        self.go, self.at_step = threading.Event(), threading.Event()
        self.go.set()

    def __call__(
        self, prompt, *, negative_prompt=None, seed=0, steps=None, guidance=None, callback=None
    ):
        self.calls.append(prompt)
        total = steps or self.steps
        if prompt.startswith("explode"):
            raise RuntimeError("a bug in the model")
        for step in range(1, total + 1):
            self.at_step.set()
            assert self.go.wait(10), "the test never released the pipeline"
            if callback:
                callback(step, total)
        return Video(np.full((4, 16, 16, 3), seed % 256, np.uint8), fps=8.0)

    def check_prompt(self, prompt: str) -> str:
        if "xyzzy" in prompt:
            raise PromptError("The model knows none of the words in 'xyzzy'; describe a shape.")
        return prompt


@pytest.fixture
def serve(tmp_path):
    """serve(**config) -> (TestClient on a running app, its pipeline); stopped afterwards."""
    started = []

    def start(pipeline=None, **config):
        pipeline = pipeline or HeldPipeline()
        app = create_app(ServeConfig(data_dir=tmp_path / "data", **config), pipeline)
        client = TestClient(app, base_url=BASE, raise_server_exceptions=False)
        client.__enter__()
        started.append((client, pipeline))
        wait_until(lambda: client.get("/readyz").status_code == 200)
        return client, pipeline

    yield start
    for client, pipeline in started:
        pipeline.go.set()
        client.__exit__(None, None, None)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def wait_status(client, job_id, *statuses, headers=None):
    def reached():
        return client.get(f"/v1/videos/{job_id}", headers=headers).json()["status"] in statuses

    wait_until(reached)
    return client.get(f"/v1/videos/{job_id}", headers=headers).json()


def assert_error(response, status):
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert message.endswith(".") and "\n" not in message, message
    return message


def test_generate_fetch_and_list_every_format(serve):
    client, _ = serve()
    signatures = {"mp4": b"ftyp", "webm": b"\x1aE\xdf\xa3", "gif": b"GIF8"}
    types = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}
    ids = []
    for fmt in signatures:
        r = client.post("/v1/videos", json={"prompt": "a red circle", "seed": 7, "format": fmt})
        assert r.status_code == 202 and r.json()["status"] == "queued"
        assert r.headers["location"] == f"/v1/videos/{r.json()['id']}"
        job = wait_status(client, r.json()["id"], "succeeded")
        assert job["progress"] == 1 and job["error"] is None and job["seed"] == 7
        video = client.get(job["content_url"])
        assert video.status_code == 200 and video.headers["content-type"] == types[fmt]
        assert signatures[fmt] in video.content[:16]
        ids.append(job["id"])
    listed = client.get("/v1/videos").json()
    assert [j["id"] for j in listed["data"]] == ids[::-1] and listed["next_cursor"] is None


def test_events_stream_progress_then_done(serve):
    client, pipeline = serve(pipeline=HeldPipeline(steps=3))
    pipeline.go.clear()
    job_id = client.post("/v1/videos", json={"prompt": "a blue square"}).json()["id"]
    threading.Timer(0.3, pipeline.go.set).start()  # the stream starts before the job ends
    with client.stream("GET", f"/v1/videos/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith(("event:", "data:"))]
    kinds = [e.removeprefix("event: ") for e in events[::2]]
    jobs = [json.loads(e.removeprefix("data: ")) for e in events[1::2]]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"progress"}
    assert jobs[-1]["status"] == "succeeded" and jobs[-1]["content_url"]
    steps = [j["step"] for j in jobs]
    assert steps == sorted(steps) and steps[-1] == 3


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": " \t\n "}, "empty"),
        ({"prompt": "\u200b\u200d"}, "empty"),
        ({"prompt": "a " * 300}, "limit is 500"),
        ({"prompt": "a red circle", "negative_prompt": "b" * 501}, "negative prompt"),
        ({"prompt": "a c\u200bs\u200ba\u200bm clip"}, "blocked"),
        ({"prompt": "xyzzy"}, "knows none"),
        ({"prompt": "a", "steps": 0}, "steps"),
        ({"prompt": "a", "steps": 101}, "steps"),
        ({"prompt": "a", "guidance": -0.5}, "guidance"),
        ({"prompt": "a", "guidance": 20.5}, "guidance"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "seed": 2**32}, "seed"),
        ({"prompt": "a", "format": "avi"}, "format"),
        ({"prompt": "a", "colour": "red"}, "Unknown field 'colour'"),
        ({"seed": 1}, "'prompt' is required"),
        ([1, 2], "JSON object"),
    ],
)
def test_invalid_requests_get_422_with_one_sentence(serve, body, says):
    client, pipeline = serve()
    assert says in assert_error(client.post("/v1/videos", json=body), 422)
    assert pipeline.calls == []


def test_malformed_and_oversized_bodies_get_422(serve):
    client, pipeline = serve()
    headers = {"content-type": "application/json"}
    r = client.post("/v1/videos", content=b'{"prompt": "a red', headers=headers)
    assert "not valid JSON" in assert_error(r, 422)
    r = client.post("/v1/videos", content=b"NaN", headers=headers)
    assert_error(r, 422)
    big = json.dumps({"prompt": "a", "negative_prompt": "x" * 70_000}).encode()
    assert "64 KiB" in assert_error(client.post("/v1/videos", content=big, headers=headers), 422)

    def chunks():  # no Content-Length: the cap must count what arrives
        yield b'{"prompt": "a", "negative_prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = client.post("/v1/videos", content=chunks(), headers=headers)
    assert "64 KiB" in assert_error(r, 422)
    assert pipeline.calls == []
    # just under the cap is fine: spacing that normalisation collapses is not "too long"
    r = client.post("/v1/videos", json={"prompt": "a" + " " * 60_000 + "red circle"})
    assert r.status_code == 202 and r.json()["prompt"] == "a red circle"


def test_unknown_ids_and_traversal_get_404_never_a_file(serve, tmp_path):
    client, _ = serve()
    (tmp_path / "secret.txt").write_text("root:x:0:0")
    for path in [
        f"/v1/videos/{ID}",
        f"/v1/videos/{ID}/content",
        f"/v1/videos/{ID}/events",
        "/v1/videos/..%2F..%2Fetc%2Fpasswd/content",
        "/v1/videos/..%2F..%2Fsecret.txt/content",
        "/v1/videos/../../secret.txt",
        "/v1/videos/%2e%2e/content",
        "/v1/videos/a/b/content",
        "/v1/videos/..%5C..%5Csecret.txt/content",
        "/static/..%2F..%2Fjobs.py",
        "/static/%2e%2e/%2e%2e/secret.txt",
    ]:
        r = client.get(path)
        assert r.status_code == 404, path
        assert "root:" not in r.text and r.json()["error"]
    assert_error(client.delete(f"/v1/videos/{ID}"), 404)


def test_content_is_409_until_the_job_succeeds(serve):
    client, pipeline = serve()
    pipeline.go.clear()
    job_id = client.post("/v1/videos", json={"prompt": "a red circle"}).json()["id"]
    assert_error(client.get(f"/v1/videos/{job_id}/content"), 409)  # queued or running
    pipeline.at_step.wait(5)
    assert "running" in assert_error(client.get(f"/v1/videos/{job_id}/content"), 409)
    running = client.get(f"/v1/videos/{job_id}").json()
    assert running["status"] == "running" and running["content_url"] is None
    pipeline.go.set()
    wait_status(client, job_id, "succeeded")
    assert client.get(f"/v1/videos/{job_id}/content").status_code == 200


def test_cancel_queued_and_running_jobs(serve):
    client, pipeline = serve()
    pipeline.go.clear()
    running = client.post("/v1/videos", json={"prompt": "first"}).json()["id"]
    queued = client.post("/v1/videos", json={"prompt": "second"}).json()["id"]
    pipeline.at_step.wait(5)
    assert wait_status(client, running, "running")["status"] == "running"

    r = client.delete(f"/v1/videos/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = client.delete(f"/v1/videos/{running}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    pipeline.go.set()  # the worker drops the job at its next step...
    after = client.post("/v1/videos", json={"prompt": "third"}).json()["id"]
    wait_status(client, after, "succeeded")  # ...and goes on with the next one
    assert pipeline.calls == ["first", "third"]
    assert client.get(f"/v1/videos/{running}").json()["status"] == "cancelled"
    assert "cancelled" in assert_error(client.get(f"/v1/videos/{running}/content"), 409)
    assert "already succeeded" in assert_error(client.delete(f"/v1/videos/{after}"), 409)
    videos = client.app.state.queue.store.videos
    assert sorted(p.name for p in videos.iterdir()) == [f"{after}.mp4"]


def test_a_failing_job_says_why_and_the_worker_goes_on(serve):
    client, _ = serve()
    bad = client.post("/v1/videos", json={"prompt": "explode please"}).json()["id"]
    good = client.post("/v1/videos", json={"prompt": "a red circle"}).json()["id"]
    failed = wait_status(client, bad, "failed")
    assert "RuntimeError" in failed["error"] and failed["error"].endswith(".")
    assert wait_status(client, good, "succeeded")


def test_idempotency_key_returns_the_same_job(serve, tmp_path):
    client, pipeline = serve(auth=True)
    keys = KeyStore(SqliteStore(tmp_path / "data"))
    alice, bob = (
        {"Authorization": f"Bearer {keys.create(n)[1]}", "Idempotency-Key": "k1"}
        for n in ("alice", "bob")
    )
    body = {"prompt": "a red circle", "seed": 3}
    first = client.post("/v1/videos", json=body, headers=alice)
    retry = client.post("/v1/videos", json=body, headers=alice)
    assert first.status_code == retry.status_code == 202
    assert retry.json()["id"] == first.json()["id"] and retry.headers["idempotent-replayed"]
    other = client.post("/v1/videos", json=body, headers=bob)  # keys are scoped per API key
    assert other.json()["id"] != first.json()["id"]
    changed = client.post("/v1/videos", json={**body, "seed": 4}, headers=alice)
    assert "different request" in assert_error(changed, 422)
    wait_status(client, first.json()["id"], "succeeded", headers=alice)
    wait_status(client, other.json()["id"], "succeeded", headers=bob)
    assert len(pipeline.calls) == 2


def test_full_queue_gets_429_with_retry_after(serve):
    client, pipeline = serve(queue_size=1)
    pipeline.go.clear()
    client.post("/v1/videos", json={"prompt": "runs"})
    pipeline.at_step.wait(5)
    assert client.post("/v1/videos", json={"prompt": "waits"}).status_code == 202
    r = client.post("/v1/videos", json={"prompt": "refused"})
    assert "queue is full" in assert_error(r, 429) and int(r.headers["retry-after"]) >= 1


def test_rate_limit_gets_429_with_retry_after(serve):
    client, _ = serve(rate_limit=2)
    for _ in range(2):
        assert client.post("/v1/videos", json={"prompt": "a red circle"}).status_code == 202
    r = client.post("/v1/videos", json={"prompt": "a red circle"})
    assert "too many" in assert_error(r, 429) and 1 <= int(r.headers["retry-after"]) <= 60


def test_auth_keys_and_isolation(serve, tmp_path):
    client, _ = serve(auth=True)
    keys = KeyStore(SqliteStore(tmp_path / "data"))
    (alice_key, alice), (_, bob) = keys.create("alice"), keys.create("bob")
    a, b = ({"Authorization": f"Bearer {k}"} for k in (alice, bob))

    r = client.post("/v1/videos", json={"prompt": "a red circle"})
    assert "API key" in assert_error(r, 401) and r.headers["www-authenticate"] == "Bearer"
    for wrong in (alice[:-1] + "x", "t2v_nonsense", alice.replace("t2v_", "")):
        headers = {"Authorization": f"Bearer {wrong}"}
        assert_error(client.get("/v1/videos", headers=headers), 401)

    job = client.post("/v1/videos", json={"prompt": "a red circle"}, headers=a).json()["id"]
    assert client.get(f"/v1/videos/{job}", headers=a).status_code == 200
    for path in (f"/v1/videos/{job}", f"/v1/videos/{job}/content", f"/v1/videos/{job}/events"):
        assert_error(client.get(path, headers=b), 404)
    assert_error(client.delete(f"/v1/videos/{job}", headers=b), 404)
    assert client.get("/v1/videos", headers=b).json()["data"] == []
    assert [j["id"] for j in client.get("/v1/videos", headers=a).json()["data"]] == [job]
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200

    keys.revoke(alice_key.id)
    assert "revoked" in assert_error(client.get("/v1/videos", headers=a), 401)


def test_keys_are_stored_as_hashes_only(tmp_path):
    store = KeyStore(SqliteStore(tmp_path))
    key, secret = store.create("alice")
    assert store.verify(secret) == key
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret.encode() not in raw and secret.split("_")[-1].encode() not in raw
    with pytest.raises(UserError, match="exists"):
        store.create("alice")
    store.revoke("alice")
    assert store.verify(secret) is None
    assert store.create("alice")[0].id != key.id  # the name is free again


def test_keys_cli_prints_the_key_once_as_the_last_line(tmp_path):
    def t2v(*args):
        return subprocess.run(
            [sys.executable, "-m", "t2v.cli", "keys", *args, "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    created = t2v("create", "--name", "ci-bot")
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]
    assert KeyStore(SqliteStore(tmp_path)).verify(key).name == "ci-bot"
    listed = t2v("list")
    assert "ci-bot" in listed.stdout and key not in listed.stdout
    assert t2v("revoke", "ci-bot").returncode == 0
    again = t2v("revoke", "ci-bot")
    assert again.returncode == 2 and "No active key" in again.stderr


def test_serve_refuses_a_public_address_without_auth(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "t2v.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "without --auth" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Origin": "http://127.0.0.1:8001"}, 403),
        ({"Origin": "https://127.0.0.1:8000"}, 403),
        ({"Origin": "http://127.0.0.1:8000"}, 202),
        ({"Host": "evil.example"}, 403),
        ({"Host": "evil.example:8000", "Origin": "http://evil.example:8000"}, 403),
        ({"Host": "localhost:8000"}, 202),
        ({"Host": "[::1]:8000"}, 202),
        ({"Host": "t2v.lan"}, 202),  # --allowed-host
    ],
)
def test_origin_and_host_guards(serve, headers, status):
    client, _ = serve(allowed_hosts=("t2v.lan",))
    r = client.post("/v1/videos", json={"prompt": "a red circle"}, headers=headers)
    assert r.status_code == status, r.text
    if status == 403:
        assert_error(r, 403)
        assert_error(client.get("/v1/videos", headers=headers), 403)


def test_list_pages_with_a_cursor(serve):
    client, _ = serve()
    ids = [client.post("/v1/videos", json={"prompt": f"circle {i}"}).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        page = client.get("/v1/videos", params={"limit": 2, "cursor": cursor or ""}).json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert_error(client.get("/v1/videos", params={"cursor": "../x"}), 422)
    assert_error(client.get("/v1/videos", params={"limit": 0}), 422)


def test_readyz_is_503_while_loading_and_after_a_failed_load(tmp_path, monkeypatch):
    release, attempts = threading.Event(), []

    def from_pretrained(path, device):
        attempts.append(path)
        assert release.wait(10)
        if len(attempts) == 2:
            raise FileNotFoundError("No t2v model at /nowhere.")
        return HeldPipeline()

    monkeypatch.setattr(TextToVideoPipeline, "from_pretrained", from_pretrained)
    fatal = threading.Event()
    for expected in (200, 503):
        app = create_app(ServeConfig(data_dir=tmp_path / "data"), on_fatal=fatal.set)
        with TestClient(app, base_url=BASE) as client:
            assert "loading" in assert_error(client.get("/readyz"), 503)
            assert client.get("/healthz").status_code == 200
            queued = client.post("/v1/videos", json={"prompt": "waits for the model"})
            assert queued.status_code == 202
            release.set()
            wait_until(lambda c=client, e=expected: c.get("/readyz").status_code == e)
            release.clear()
    assert "No t2v model" in assert_error(client.get("/readyz"), 503) and fatal.is_set()


def test_draining_turns_readyz_503_and_refuses_new_jobs(serve):
    client, pipeline = serve()
    pipeline.go.clear()
    job_id = client.post("/v1/videos", json={"prompt": "a red circle"}).json()["id"]
    pipeline.at_step.wait(5)
    queue = client.app.state.queue
    drain = threading.Thread(target=queue.drain, args=(10,))
    drain.start()
    wait_until(lambda: client.get("/readyz").status_code == 503)
    assert "shutting down" in assert_error(client.post("/v1/videos", json={"prompt": "a"}), 503)
    pipeline.go.set()
    drain.join(10)
    assert client.get(f"/v1/videos/{job_id}").json()["status"] == "succeeded"


def test_jobs_that_keep_killing_the_server_are_failed_not_retried(tmp_path):
    store = SqliteStore(tmp_path)
    jobs = [store.create("", JobRequest(prompt=f"p{i}"), None) for i in range(2)]
    for _ in range(MAX_ATTEMPTS):  # each start claims the first job, then "dies"
        assert store.claim_next().id == jobs[0].id
        store.recover()
    survivor = store.get(jobs[0].id, "")
    assert survivor.status == "failed" and "not retried" in survivor.error
    assert store.get(jobs[1].id, "").status == "queued"


def test_blocklist_file_is_configurable(serve, tmp_path):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# ours\nblue square\n\n")
    client, _ = serve(blocklist=blocklist)
    refused = client.post("/v1/videos", json={"prompt": "a B L U E square"})
    assert "blue square" in assert_error(refused, 422)
    assert client.post("/v1/videos", json={"prompt": "a csam circle"}).status_code == 202


def test_openapi_is_served_locally(serve):
    client, _ = serve()
    schema = client.get("/openapi.json").json()
    assert {
        "/v1/videos",
        "/v1/videos/{video_id}",
        "/v1/videos/{video_id}/content",
        "/v1/videos/{video_id}/events",
        "/healthz",
        "/readyz",
    } <= set(schema["paths"])
    page = client.get("/")
    assert "default-src 'self'" in page.headers["content-security-policy"]


# --- the OpenAPI schema, fuzzed against a live server ------------------------------------------


def test_fuzzed_requests_get_no_server_error_and_match_the_schema(tmp_path, tiny_model_dir):
    """Schemathesis, against a live server: valid and invalid requests to every operation,
    with random ids and a real one; prompts start with words the tiny model knows, so that
    jobs are accepted and run."""
    options = ("--rate-limit", "0", "--queue-size", "5")  # bounded work for the worker
    with Server(tmp_path / "data", tiny_model_dir, *options) as server:
        real_id = server.post(prompt="a red circle", steps=2)
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 8
        for operation in operations:
            ids = {"video_id": real_id} if "{video_id}" in operation.path else None
            cases = st.one_of(
                operation.as_strategy(),
                operation.as_strategy(path_parameters=ids),
                operation.as_strategy(GenerationMode.NEGATIVE),
            )

            @given(case=cases)
            @settings(
                max_examples=25,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def check(case):
                if isinstance(case.body, dict) and isinstance(case.body.get("prompt"), str):
                    case.body["prompt"] = "a red circle " + case.body["prompt"]
                case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=30)

            check()
        assert "Traceback" not in "".join(server.log)


def test_docs_page_works_offline(serve):
    """/docs serves Swagger UI from the package, with no CDN address in the page."""
    client, _ = serve()
    page = client.get("/docs")
    assert page.status_code == 200
    assert "/docs-assets/swagger-ui-bundle.js" in page.text and "cdn" not in page.text.lower()
    bundle = client.get("/docs-assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert client.get("/openapi.json").json()["paths"]["/v1/videos"]
