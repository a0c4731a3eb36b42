"""The web API in-process: every status code, idempotency, limits, the Host/Origin guards,
path traversal, API keys, the content filter, the model's knobs and the OpenAI shapes.

The app runs with real SQLite and real PyAV encoding; the model is a stand-in `VideoModel`
whose sampling steps the test can hold, so that "in_progress", "queued" and "cancelled
mid-job" happen when the test says so. Its knobs are Wan's kind (frames 4k+1, sizes in
multiples of 16). The real model is served by the subprocess tests (test_serve_lifecycle.py,
test_browser.py, test_openai_api.py).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from dataclasses import replace

import av
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
from t2v import backends
from t2v.errors import UserError
from t2v.model import Cancelled, FloatRange, IntRange, Knobs, ModelInfo
from t2v.serve.app import ServeConfig, create_app
from t2v.serve.auth import KeyStore
from t2v.serve.store import MAX_ATTEMPTS, JobRequest
from t2v.serve.store_sqlite import SqliteStore
from t2v.video import Video

BASE = "http://127.0.0.1:8000"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
ID = "A" * 22  # well-formed, never issued
KNOBS = Knobs(
    steps=IntRange(4, 1, 100),
    guidance=FloatRange(5.0, 0.0, 20.0),
    frames=IntRange(9, 5, 33, multiple=4, offset=1),
    width=IntRange(32, 16, 64, multiple=16),
    height=IntRange(32, 16, 64, multiple=16),
    fps=FloatRange(8.0, 1.0, 60.0),
)


class HeldModel:
    """A `VideoModel` whose every step waits until `go` is set; it records what it ran."""

    info = ModelInfo(id="held", kind="test", description="A stand-in the tests hold.")
    knobs = KNOBS

    def __init__(self):
        self.calls, self.requests = [], []
        self.go, self.at_step = threading.Event(), threading.Event()
        self.go.set()

    def resolve(self, request):
        request = self.knobs.resolve(request)
        if "xyzzy" in request.prompt:
            raise UserError("The model knows none of the words in 'xyzzy'; describe a shape.")
        if "crimson" in request.prompt and request.original_prompt is None:  # a reading
            read = request.prompt.replace("crimson", "red").replace(" giraffe", "")
            warning = (
                ("The model does not know the word 'giraffe'.",) if read != request.prompt else ()
            )
            return replace(request, prompt=read, original_prompt=request.prompt, warnings=warning)
        return request

    def generate(self, requests, progress=None, cancelled=None):
        (r,) = requests
        self.calls.append(r.prompt)
        self.requests.append(r)
        if r.prompt.startswith("explode"):
            raise RuntimeError("a bug in the model")
        for step in range(1, r.steps + 1):
            self.at_step.set()
            assert self.go.wait(10), "the test never released the model"
            if cancelled is not None and cancelled():
                raise Cancelled
            if progress is not None:
                progress(step, r.steps)
        frames = np.full((r.frames, r.height, r.width, 3), r.seed % 256, np.uint8)
        return [Video(frames, fps=r.fps)]


@pytest.fixture
def serve(tmp_path):
    """serve(**config) -> (TestClient on a running app, its model); stopped afterwards."""
    started = []

    def start(pipeline=None, **config):
        pipeline = pipeline or HeldModel()
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
    """The OpenAI error shape, with one sentence; also the headers every response carries."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    message = error["message"]
    assert message.endswith(".") and "\n" not in message, message
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    return message


def decoded(content: bytes) -> tuple[int, int, int]:
    """(frames, height, width) of a video file, read back with PyAV."""
    with av.open(io.BytesIO(content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), *frames[0].shape[:2]


def test_generate_fetch_and_list_every_format(serve):
    client, _ = serve()
    signatures = {"mp4": b"ftyp", "webm": b"\x1aE\xdf\xa3", "gif": b"GIF8"}
    types = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}
    ids = []
    for fmt in signatures:
        r = client.post("/v1/videos", json={"prompt": "a red circle", "seed": 7, "format": fmt})
        assert r.status_code == 202 and r.json()["status"] == "queued"
        assert r.headers["location"] == f"/v1/videos/{r.json()['id']}"
        job = wait_status(client, r.json()["id"], "completed")
        assert job["object"] == "video" and job["model"] == "held"
        assert job["progress"] == 100 and job["error"] is None and job["seed"] == 7
        assert job["completed_at"] >= job["created_at"] > 0
        video = client.get(job["content_url"])
        assert video.status_code == 200 and video.headers["content-type"] == types[fmt]
        assert signatures[fmt] in video.content[:16]
        ids.append(job["id"])
    listed = client.get("/v1/videos").json()
    assert [j["id"] for j in listed["data"]] == ids[::-1] and listed["has_more"] is False
    assert listed["object"] == "list" and listed["last_id"] == ids[0]


def test_events_stream_progress_then_done(serve):
    client, pipeline = serve()
    pipeline.go.clear()
    job_id = client.post("/v1/videos", json={"prompt": "a blue square", "steps": 3}).json()["id"]
    threading.Timer(0.3, pipeline.go.set).start()  # the stream starts before the job ends
    with client.stream("GET", f"/v1/videos/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith(("event:", "data:"))]
    kinds = [e.removeprefix("event: ") for e in events[::2]]
    jobs = [json.loads(e.removeprefix("data: ")) for e in events[1::2]]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"progress"}
    assert jobs[-1]["status"] == "completed" and jobs[-1]["content_url"]
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
        # strict numbers: a string or a boolean where a number belongs
        ({"prompt": "a", "seed": "5"}, "seed"),
        ({"prompt": "a", "seed": True}, "seed"),
        ({"prompt": "a", "steps": "4"}, "steps"),
        ({"prompt": "a", "guidance": False}, "guidance"),
        ({"prompt": "a", "guidance": "6.0"}, "guidance"),
        ({"prompt": "a", "frames": 9.0}, "frames"),
        ({"prompt": "a", "seconds": True}, "seconds"),
        # what the model cannot make: the nearest values it can, and no job
        ({"prompt": "a", "frames": 10}, "the nearest are 9 or 13"),
        ({"prompt": "a", "width": 40}, "the nearest are 32 or 48"),
        ({"prompt": "a", "size": "40x32"}, "the nearest are 32 or 48"),
        ({"prompt": "a", "size": "32x96"}, "height 96"),
        ({"prompt": "a", "seconds": "10"}, "nearest durations it makes are 4.125 s"),
        ({"prompt": "a", "size": "big"}, "size"),
        ({"prompt": "a", "seconds": "four"}, "seconds"),
        ({"prompt": "a", "seconds": 1e300}, "seconds"),
        ({"prompt": "a", "seconds": "1", "frames": 9}, "not both"),
        ({"prompt": "a", "size": "32x32", "width": 48}, "not both"),
        ({"prompt": "a", "model": "sora-2"}, "the models served are 'held'."),
        ({"prompt": "a", "fps": 0}, "fps"),
        ({"prompt": "a", "input_reference": "x"}, "Unknown field 'input_reference'"),
    ],
)
def test_invalid_requests_get_422_with_one_sentence(serve, body, says):
    client, pipeline = serve()
    assert says in assert_error(client.post("/v1/videos", json=body), 422)
    assert pipeline.calls == [] and client.get("/v1/videos").json()["data"] == []


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_is_a_422_not_a_500(serve, field):
    client, pipeline = serve()
    body = {"prompt": "a red circle", field: "a \ud800 circle"}  # JSON escapes it as \ud800
    r = client.post(
        "/v1/videos", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert "lone surrogate" in assert_error(r, 422)  # never a 500 from SQLite or the tokenizer
    assert client.get("/v1/videos").json()["data"] == [] and pipeline.calls == []


def test_knobs_map_to_the_video_made(serve):
    """size and seconds (OpenAI's fields) and frames/width/height/fps (t2v's) reach the model,
    the response says how many frames, and the file has them."""
    client, pipeline = serve()
    r = client.post("/v1/videos", json={"prompt": "a dog", "size": "48x16", "seconds": "2"})
    job = r.json()
    assert r.status_code == 202 and (job["width"], job["height"], job["frames"]) == (48, 16, 17)
    assert job["size"] == "48x16" and job["seconds"] == "2.125" and job["fps"] == 8.0
    done = wait_status(client, job["id"], "completed")
    assert decoded(client.get(done["content_url"]).content) == (17, 16, 48)
    body = {"prompt": "a dog", "frames": 5, "width": 16, "height": 64, "fps": 10.0, "steps": 2}
    job = client.post("/v1/videos", json=body).json()
    assert (job["seconds"], job["size"], job["steps"], job["guidance"]) == ("0.5", "16x64", 2, 5.0)
    done = wait_status(client, job["id"], "completed")
    assert decoded(client.get(done["content_url"]).content) == (5, 64, 16)
    asked = [(r.frames, r.width, r.height, r.fps) for r in pipeline.requests]
    assert asked == [(17, 48, 16, 8.0), (5, 16, 64, 10.0)]


def test_the_prompt_is_normalised_once_from_post_to_video(serve, monkeypatch):
    """The route resolves the request (normalise, defaults, limits) once; the queue filters
    it as it is and the worker and the model's generate do not normalise it again."""
    import t2v.serve.queue
    import t2v.text

    calls = []

    def counted(normalize):
        def wrapper(*args, **kwargs):
            calls.append(args[0])
            return normalize(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(t2v.text, "normalize", counted(t2v.text.normalize))
    monkeypatch.setattr(t2v.serve.queue, "normalize", counted(t2v.serve.queue.normalize))

    class Resolving(HeldModel):  # generate resolves again, as the protocol says models do
        def generate(self, requests, progress=None, cancelled=None):
            return super().generate([self.resolve(r) for r in requests], progress, cancelled)

    client, model = serve(Resolving())
    job = client.post("/v1/videos", json={"prompt": "  a red\u200b circle  "}).json()
    wait_status(client, job["id"], "completed")
    assert calls == ["  a red\u200b circle  "]
    assert model.calls == ["a red circle"] and job["revised_prompt"] == "a red circle"


def test_the_models_reading_of_the_prompt_is_returned_and_kept(serve):
    """`revised_prompt` is the prompt the model was given, `prompt` the one sent, and
    `warnings` the model's sentences about it; the worker runs the reading as it was read."""
    client, model = serve()
    r = client.post("/v1/videos", json={"prompt": "a crimson giraffe circle"})
    job = r.json()
    assert r.status_code == 202, r.text
    assert (job["prompt"], job["revised_prompt"]) == ("a crimson giraffe circle", "a red circle")
    assert job["warnings"] == ["The model does not know the word 'giraffe'."]
    done = wait_status(client, job["id"], "completed")
    assert (done["prompt"], done["revised_prompt"], done["warnings"]) == (
        job["prompt"],
        job["revised_prompt"],
        job["warnings"],
    )
    assert model.calls == ["a red circle"]
    plain = client.post("/v1/videos", json={"prompt": "a red  circle"}).json()
    assert (plain["prompt"], plain["revised_prompt"], plain["warnings"]) == (
        "a red circle",
        "a red circle",
        [],
    )


def test_a_multipart_form_is_taken_as_json_is(serve):
    """OpenAI's clients POST a multipart form: numbers arrive as text and are read as such."""
    client, pipeline = serve()
    form = {"prompt": "a cat", "size": "16x16", "seconds": "1", "seed": "3", "guidance": "2"}
    r = client.post("/v1/videos", files={k: (None, v) for k, v in form.items()})
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["frames"], job["seed"], job["guidance"], job["size"]) == (9, 3, 2.0, "16x16")
    bad = client.post("/v1/videos", files={"prompt": (None, "a cat"), "seed": (None, "five")})
    assert "seed" in assert_error(bad, 422)
    upload = client.post("/v1/videos", files={"prompt": (None, "a"), "input_reference": b"png"})
    assert "input_reference" in assert_error(upload, 422)
    upload = client.post("/v1/videos", files={"prompt": ("prompt.txt", b"a red circle")})
    assert "prompt" in assert_error(upload, 422)
    assert len(client.get("/v1/videos").json()["data"]) == 1  # only the first form made a job


def test_models_lists_the_knobs_the_page_builds_from(serve):
    client, _ = serve()
    (model,) = client.get("/v1/models").json()["data"]
    assert (model["id"], model["object"], model["ready"]) == ("held", "model", True)
    knobs = model["knobs"]
    assert knobs["frames"] == {"default": 9, "min": 5, "max": 33, "multiple": 4, "offset": 1}
    assert knobs["steps"]["max"] == 100 and knobs["guidance"]["default"] == 5.0
    assert knobs["max_prompt_chars"] == 500 and knobs["formats"] == ["mp4", "webm", "gif"]
    assert client.get("/v1/models/held").json() == model
    # the API schema states the same limits, read from the same Knobs
    body = client.get("/openapi.json").json()["paths"]["/v1/videos"]["post"]["requestBody"]
    for content in body["content"].values():
        frames = content["schema"]["properties"]["frames"]
        assert frames["default"] == 9 and "4k+1" in frames["description"]
        assert {"minimum": 5, "maximum": 33}.items() <= frames["anyOf"][0].items()
        assert content["schema"]["properties"]["width"]["anyOf"][0]["multipleOf"] == 16
    assert "GET /v1/models" in assert_error(client.get("/v1/models/sora-2"), 404)


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
    says = assert_error(client.get(f"/v1/videos/{job_id}/content"), 409)
    assert "in_progress" in says and "running" not in says  # the API's word for the state
    running = client.get(f"/v1/videos/{job_id}").json()
    assert running["status"] == "in_progress" and running["content_url"] is None
    pipeline.go.set()
    wait_status(client, job_id, "completed")
    assert client.get(f"/v1/videos/{job_id}/content").status_code == 200


def test_cancel_queued_and_running_jobs(serve):
    client, pipeline = serve()
    pipeline.go.clear()
    running = client.post("/v1/videos", json={"prompt": "first"}).json()["id"]
    queued = client.post("/v1/videos", json={"prompt": "second"}).json()["id"]
    pipeline.at_step.wait(5)
    assert wait_status(client, running, "in_progress")["status"] == "in_progress"

    r = client.delete(f"/v1/videos/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = client.delete(f"/v1/videos/{running}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    pipeline.go.set()  # the worker drops the job at its next step...
    after = client.post("/v1/videos", json={"prompt": "third"}).json()["id"]
    wait_status(client, after, "completed")  # ...and goes on with the next one
    assert pipeline.calls == ["first", "third"]
    assert client.get(f"/v1/videos/{running}").json()["status"] == "cancelled"
    assert "cancelled" in assert_error(client.get(f"/v1/videos/{running}/content"), 409)
    says = assert_error(client.delete(f"/v1/videos/{after}"), 409)
    assert "already completed" in says and "succeeded" not in says
    videos = client.app.state.queue.store.videos
    assert sorted(p.name for p in videos.iterdir()) == [f"{after}.mp4"]


def test_a_failing_job_says_why_and_the_worker_goes_on(serve):
    client, _ = serve()
    bad = client.post("/v1/videos", json={"prompt": "explode please"}).json()["id"]
    good = client.post("/v1/videos", json={"prompt": "a red circle"}).json()["id"]
    failed = wait_status(client, bad, "failed")
    assert failed["error"]["code"] == "generation_failed"
    assert "RuntimeError" in failed["error"]["message"] and failed["error"]["message"].endswith(".")
    assert wait_status(client, good, "completed")


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
    wait_status(client, first.json()["id"], "completed", headers=alice)
    wait_status(client, other.json()["id"], "completed", headers=bob)
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


def test_an_api_only_node_takes_no_model_folder(tmp_path):
    """`--workers 0` runs no model: its models are those `t2v worker` processes serve."""
    argv = ["serve", "--workers", "0", "--db", "postgresql://t2v@db/t2v", "--model", str(tmp_path)]
    r = subprocess.run(
        [sys.executable, "-m", "t2v.cli", *argv, "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--default-model" in r.stderr and len(r.stderr.splitlines()) == 1


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
        ({"Host": "example.com:8000"}, 202),  # --allowed-host Example.COM:8000, normalised
        # behind a TLS proxy: --public-url https://t2v.example.org
        ({"Host": "t2v.example.org", "Origin": "https://t2v.example.org"}, 202),
        ({"Host": "t2v.example.org", "Origin": "https://evil.example"}, 403),
    ],
)
def test_origin_and_host_guards(serve, headers, status):
    client, _ = serve(
        allowed_hosts=("t2v.lan", "Example.COM:8000"), public_urls=("https://t2v.example.org",)
    )
    r = client.post("/v1/videos", json={"prompt": "a red circle"}, headers=headers)
    assert r.status_code == status, r.text
    if status == 403:
        assert_error(r, 403)
        assert_error(client.get("/v1/videos", headers=headers), 403)


def test_list_pages_the_openai_way(serve):
    client, _ = serve()
    ids = [client.post("/v1/videos", json={"prompt": f"circle {i}"}).json()["id"] for i in range(5)]
    seen, params = [], {"limit": 2}
    while True:
        page = client.get("/v1/videos", params=params).json()
        seen += [j["id"] for j in page["data"]]
        assert page["first_id"] == page["data"][0]["id"]
        if not page["has_more"]:
            break
        params = {"limit": 2, "after": page["last_id"]}
    assert seen == ids[::-1]
    assert_error(client.get("/v1/videos", params={"after": "../x"}), 404)
    assert_error(client.get("/v1/videos", params={"limit": 0}), 422)
    assert_error(client.get("/v1/videos", params={"order": "asc"}), 422)


def test_readyz_is_503_while_loading_and_after_a_failed_load(tmp_path, monkeypatch):
    release, attempts = threading.Event(), []

    def load_model(path, *options):
        attempts.append(path)
        assert release.wait(10)
        if len(attempts) == 2:
            raise FileNotFoundError("No t2v model at /nowhere.")
        return HeldModel()

    monkeypatch.setattr(backends, "load_model", load_model)
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
    assert client.get(f"/v1/videos/{job_id}").json()["status"] == "completed"


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
        "/v1/models",
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
        assert len(operations) == 10
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


def test_a_tls_proxy_origin_is_refused_unless_named(serve):
    """Without --public-url, the page's POST through an https proxy is cross-site to us."""
    client, _ = serve(allowed_hosts=("t2v.example.org",))
    headers = {"Host": "t2v.example.org", "Origin": "https://t2v.example.org"}
    r = client.post("/v1/videos", json={"prompt": "a red circle"}, headers=headers)
    assert "--public-url" in assert_error(r, 403)


def test_405_keeps_allow_and_every_error_has_the_headers(serve):
    client, _ = serve()
    r = client.put("/v1/videos", json={"prompt": "a"})
    assert_error(r, 405)
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert_error(client.get("/nowhere"), 404)
    assert_error(client.post("/v1/videos", headers={"content-length": "x"}), 422)  # the Guard's
    assert_error(client.get("/", headers={"Host": "evil.example"}), 403)  # the Guard's


def mount_tmpfs(path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=False)
    return done.returncode == 0


def test_a_full_disk_is_a_503_with_retry_after(tmp_path):
    """A real full filesystem (a 1 MiB tmpfs): a POST that cannot be stored is a 503."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "size=1m"):
        pytest.skip("needs a tmpfs mount (root in a container that allows it)")
    try:
        app = create_app(ServeConfig(data_dir=disk / "data"), HeldModel())
        with TestClient(app, base_url=BASE, raise_server_exceptions=False) as client:
            wait_until(lambda: client.get("/readyz").status_code == 200)
            assert client.post("/v1/videos", json={"prompt": "fits"}).status_code == 202
            filler = disk / "filler"
            with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
            r = client.post("/v1/videos", json={"prompt": "a long " * 60 + "circle"})
            assert "retry" in assert_error(r, 503) and int(r.headers["retry-after"]) > 0
            filler.unlink()
            assert client.post("/v1/videos", json={"prompt": "fits again"}).status_code == 202
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_docs_page_works_offline(serve):
    """/docs serves Swagger UI from the package, with no CDN address in the page; ReDoc,
    which would load its script and fonts from a CDN, is off."""
    client, _ = serve()
    assert_error(client.get("/redoc"), 404)
    page = client.get("/docs")
    assert page.status_code == 200
    assert "/docs-assets/swagger-ui-bundle.js" in page.text and "cdn" not in page.text.lower()
    bundle = client.get("/docs-assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert client.get("/openapi.json").json()["paths"]["/v1/videos"]
