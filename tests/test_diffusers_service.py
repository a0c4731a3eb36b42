"""The tiny Wan, LTX-Video and CogVideoX folders through the product's two doors: the `t2v`
command (frames, size, seeds, and folders that could run code refused in one sentence) and
the web API (sizes, progress events, cancel, 422s naming the nearest values, keys and the
content filter), as a user reaches them. Real diffusers, real PyAV, real SQLite."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import threading
import time

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient

from t2v.backends import load_model
from t2v.cli import main
from t2v.model import Cancelled
from t2v.serve.app import ServeConfig, create_app
from t2v.serve.auth import KeyStore
from t2v.serve.store_sqlite import SqliteStore
from t2v.video import read_video

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("diffusers") is None, reason='needs pip install "t2v[diffusers]"'
    ),
    pytest.mark.usefixtures("one_thread"),
]

BASE = "http://127.0.0.1:8000"
PROMPT = "a dog running on the beach"
# A term of src/t2v/serve/blocklist.txt, spelled with gaps as the filter still reads it.
BLOCKED = "a c s a m dog"


def run(*argv) -> int:
    return main([str(a) for a in argv])


def one_sentence(err: str) -> str:
    assert err.startswith("t2v: error: ") and err.count("\n") == 1 and err.endswith(".\n"), err
    assert "Traceback" not in err, err
    return err


# --- the command ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wan", "ltx", "cogvideox"])
def test_generate_makes_the_asked_frames_and_size_and_a_seed_repeats(
    tmp_path, tiny_diffusers, kind
):
    argv = ["generate", PROMPT, "--model", tiny_diffusers[kind], "--steps", 2]
    argv += ["--frames", 9, "--width", 64, "--height", 32, "--format", "png"]
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert run(*argv, "--seed", seed, "-o", tmp_path / name) == 0
    a, b, c = (read_video(tmp_path / n, num_frames=9, size=(32, 64)) for n in "abc")
    assert len(list((tmp_path / "a").glob("*.png"))) == 9  # no frame padded by read_video
    assert a.shape[:3] == (9, 32, 64)
    assert np.array_equal(a, b) and not np.array_equal(a, c)

    assert run(*argv[:-2], "--seed", 5, "-o", tmp_path / "a.mp4") == 0
    with av.open(str(tmp_path / "a.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert (len(frames), *frames[0].shape) == (9, 32, 64, 3)


MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture(params=["pickle", "python"])
def unsafe_folder(request, tmp_path, tiny_diffusers):
    """A copy of tiny Wan with a pickle-format weight file, or with Python code that writes
    a marker file if anything imports or runs it; returns (folder, marker, what it says)."""
    folder, marker = tmp_path / "unsafe-wan", tmp_path / "marker"
    shutil.copytree(tiny_diffusers["wan"], folder)
    code = MARKER_CODE.format(marker=str(marker))
    if request.param == "pickle":
        # torch.save's format: a pickle whose loading would run the code (protocol 0 reduce)
        payload = f"cbuiltins\nexec\n(V{code.replace(chr(10), chr(92) + 'u000a')}\ntR.".encode()
        (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(payload)
        return folder, marker, "diffusion_pytorch_model.bin, a pickle-format file"
    (folder / "pipeline.py").write_text(code)
    (folder / "transformer" / "__init__.py").write_text(code)
    return folder, marker, "Python code"


def test_the_payload_would_write_the_marker(tmp_path):
    """The pickle fixture's payload is live: unpickling it here (our own bytes) runs it."""
    import pickle

    marker = tmp_path / "marker"
    code = MARKER_CODE.format(marker=str(marker))
    payload = f"cbuiltins\nexec\n(V{code.replace(chr(10), chr(92) + 'u000a')}\ntR.".encode()
    pickle.loads(payload)  # noqa: S301 -- bytes this test wrote, to prove the fixture bites
    assert marker.read_text() == "ran"


def test_generate_refuses_a_folder_that_could_run_code(tmp_path, unsafe_folder, capsys):
    folder, marker, says = unsafe_folder
    out = tmp_path / "out.mp4"
    assert run("generate", PROMPT, "--model", folder, "--steps", 1, "-o", out) == 2
    err = one_sentence(capsys.readouterr().err)
    assert "Refusing to load" in err and says in err, err
    assert not marker.exists() and not out.exists()


def test_serve_refuses_a_folder_that_could_run_code(tmp_path, unsafe_folder):
    folder, marker, says = unsafe_folder
    argv = ["serve", "--model", folder, "--port", "0", "--data-dir", tmp_path / "data"]
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from t2v.cli import main; sys.exit(main(sys.argv[1:]))"]
        + [str(a) for a in [*argv, "--device", "cpu"]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,  # even run from inside the folder, its code stays unimported
    )
    assert done.returncode == 2, done.stdout + done.stderr
    err = one_sentence(done.stderr)
    assert "Refusing to load" in err and says in err, err
    assert not marker.exists()


def test_a_pickle_in_a_symlinked_component_folder_is_refused_too(tmp_path, tiny_diffusers, capsys):
    folder, elsewhere = tmp_path / "wan", tmp_path / "elsewhere"
    shutil.copytree(tiny_diffusers["wan"], folder)
    shutil.move(folder / "transformer", elsewhere)
    (folder / "transformer").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "diffusion_pytorch_model.bin").write_bytes(b"not loaded, but must be refused")
    out = tmp_path / "out.mp4"
    small = ["--steps", 1, "--frames", 5, "--width", 32, "--height", 32]  # cheap if it runs
    assert run("generate", PROMPT, "--model", folder, *small, "-o", out) == 2
    assert "pickle-format" in one_sentence(capsys.readouterr().err)


def test_a_config_value_of_the_wrong_type_is_one_sentence(tmp_path, tiny_diffusers, capsys):
    folder = tmp_path / "wan"
    shutil.copytree(tiny_diffusers["wan"], folder)
    config = folder / "transformer" / "config.json"
    config.write_text(config.read_text().replace('"num_layers": ', '"num_layers": "x", "_": '))
    small = ["--steps", 1, "--frames", 5, "--width", 32, "--height", 32]
    assert run("generate", PROMPT, "--model", folder, *small, "-o", tmp_path / "o.mp4") == 2
    assert "Cannot load the diffusers model" in one_sentence(capsys.readouterr().err)


# --- the web API ----------------------------------------------------------------------------


class Watched:
    """A loaded diffusers model whose every step first sleeps `delay` seconds, so a test can
    act mid-job; it records when each step ended and how each generation ended. Test-only:
    it wraps the real model from outside."""

    def __init__(self, model, delay: float = 0.0):
        self.model, self.delay = model, delay
        self.info, self.knobs = model.info, model.knobs
        self.steps: list[float] = []
        self.endings: list[str] = []

    def resolve(self, request):
        return self.model.resolve(request)

    def generate(self, requests, progress=None, cancelled=None):
        def slow(step, total):
            time.sleep(self.delay)
            self.steps.append(time.monotonic())
            if progress is not None:
                progress(step, total)

        try:
            videos = self.model.generate(requests, slow, cancelled)
        except Cancelled:
            self.endings.append("cancelled")
            raise
        self.endings.append("completed")
        return videos


@pytest.fixture
def serve(tmp_path):
    """serve(folder, delay=0, **config) -> (TestClient on the app, its Watched model)."""
    started = []

    def start(folder, delay=0.0, **config):
        model = Watched(load_model(folder, "cpu"), delay)
        app = create_app(ServeConfig(data_dir=tmp_path / "data", rate_limit=0, **config), model)
        client = TestClient(app, base_url=BASE, raise_server_exceptions=False)
        client.__enter__()
        started.append(client)
        wait_until(lambda: client.get("/readyz").status_code == 200)
        return client, model

    yield start
    for client in started:
        client.__exit__(None, None, None)


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def finished(client, job_id, headers=None) -> dict:
    def job():
        return client.get(f"/v1/videos/{job_id}", headers=headers).json()

    wait_until(lambda: job()["status"] in ("completed", "failed", "cancelled"))
    return job()


def decoded(content: bytes) -> tuple[int, int, int]:
    with av.open(io.BytesIO(content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), *frames[0].shape[:2]


def refused_422(response) -> str:
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.endswith(".") and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("kind", "bad", "nearest"),
    [
        ("wan", {"frames": 7}, "the nearest are 5 or 9"),
        ("wan", {"width": 40}, "the nearest are 32 or 48"),
        ("ltx", {"frames": 12}, "the nearest are 9 or 17"),
        ("ltx", {"height": 48}, "the nearest are 32 or 64"),
    ],
)
def test_the_api_makes_the_asked_video_and_refuses_what_the_model_cannot(
    serve, tiny_diffusers, kind, bad, nearest
):
    client, model = serve(tiny_diffusers[kind])
    body = {"prompt": PROMPT, "frames": 9, "width": 64, "height": 32, "steps": 2, "seed": 1}
    job_id = client.post("/v1/videos", json=body).json()["id"]
    # progress comes as server-sent events while the job runs, then `done`
    with client.stream("GET", f"/v1/videos/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith(("event:", "data:"))]
    kinds = [line.removeprefix("event: ") for line in lines[::2]]
    jobs = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"progress"}, kinds
    assert jobs[-1]["status"] == "completed", jobs[-1]
    steps = [j["step"] for j in jobs]
    assert steps == sorted(steps) and steps[-1] == 2
    assert (jobs[-1]["frames"], jobs[-1]["size"]) == (9, "64x32")
    content = client.get(jobs[-1]["content_url"])
    assert content.status_code == 200 and decoded(content.content) == (9, 32, 64)

    before = client.get("/v1/videos").json()["data"]
    assert nearest in refused_422(client.post("/v1/videos", json={**body, **bad}))
    assert client.get("/v1/videos").json()["data"] == before
    assert model.endings == ["completed"]


def test_delete_stops_a_running_diffusers_job_within_a_step(serve, tiny_diffusers):
    client, model = serve(tiny_diffusers["wan"], delay=0.1)
    body = {"prompt": PROMPT, "frames": 5, "width": 32, "height": 32, "steps": 100}
    job_id = client.post("/v1/videos", json=body).json()["id"]
    wait_until(lambda: client.get(f"/v1/videos/{job_id}").json()["step"] >= 2)
    r = client.delete(f"/v1/videos/{job_id}")
    asked = time.monotonic()
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    wait_until(lambda: model.endings == ["cancelled"], timeout=10)
    after = [t for t in model.steps if t > asked]
    assert len(after) <= 1, f"{len(after)} steps ran after the cancel"
    assert len(model.steps) < 10
    job = client.get(f"/v1/videos/{job_id}").json()
    assert job["status"] == "cancelled"
    assert client.get(f"/v1/videos/{job_id}/content").status_code == 409
    # the worker goes on with the next job
    nxt = client.post("/v1/videos", json={**body, "steps": 1}).json()["id"]
    assert finished(client, nxt)["status"] == "completed"


@pytest.mark.parametrize("kind", ["wan", "cogvideox"])
def test_keys_and_the_content_filter_hold_as_for_the_bundled_model(
    serve, tiny_diffusers, tmp_path, kind
):
    client, model = serve(tiny_diffusers[kind], auth=True)
    _, key = KeyStore(SqliteStore(tmp_path / "data")).create("alice")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"prompt": PROMPT, "frames": 9, "width": 32, "height": 32, "steps": 2}

    r = client.post("/v1/videos", json=body)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"], r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/videos").status_code == 401
    says = refused_422(client.post("/v1/videos", json={**body, "prompt": BLOCKED}, headers=headers))
    assert "blocked" in says
    assert client.get("/v1/videos", headers=headers).json()["data"] == []

    job_id = client.post("/v1/videos", json=body, headers=headers).json()["id"]
    assert finished(client, job_id, headers)["status"] == "completed"
    assert client.get(f"/v1/videos/{job_id}").status_code == 401
    content = client.get(f"/v1/videos/{job_id}/content", headers=headers).content
    assert decoded(content) == (9, 32, 32)
    assert model.endings == ["completed"]


def test_events_of_a_cancelled_job_end(serve, tiny_diffusers):
    """A client following the events of a job that is then cancelled is told so, and the
    stream ends instead of hanging."""
    client, _ = serve(tiny_diffusers["ltx"], delay=0.1)
    body = {"prompt": PROMPT, "frames": 9, "width": 32, "height": 32, "steps": 100}
    job_id = client.post("/v1/videos", json=body).json()["id"]
    wait_until(lambda: client.get(f"/v1/videos/{job_id}").json()["step"] >= 1)
    # a second client, without its own lifespan: one TestClient is not for two threads at once
    other = TestClient(client.app, base_url=BASE)
    threading.Timer(0.3, lambda: other.delete(f"/v1/videos/{job_id}")).start()
    with client.stream("GET", f"/v1/videos/{job_id}/events") as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert json.loads(lines[-1].removeprefix("data: "))["status"] == "cancelled"


@pytest.mark.parametrize(("kind", "seconds", "frames"), [("ltx", "0.5", 9), ("cogvideox", "2", 17)])
def test_the_server_loads_the_folder_itself_and_maps_seconds_to_its_frames(
    tmp_path, tiny_diffusers, kind, seconds, frames
):
    """As `t2v serve --model FOLDER` runs: the knobs are read from the folder's JSON at once,
    the model is loaded on the worker, and seconds become the nearest frame count it takes."""
    folder = tiny_diffusers[kind]
    config = ServeConfig(data_dir=tmp_path / "data", model_dir=folder, device="cpu", rate_limit=0)
    with TestClient(create_app(config), base_url=BASE) as client:
        (model,) = client.get("/v1/models").json()["data"]
        assert model["id"] == folder.name and model["knobs"]["frames"]["offset"] == 1
        body = {"prompt": PROMPT, "seconds": seconds, "size": "32x32", "steps": 1}
        job = finished(client, client.post("/v1/videos", json=body).json()["id"])
        assert (job["status"], job["frames"], job["size"]) == ("completed", frames, "32x32"), job
        assert decoded(client.get(job["content_url"]).content) == (frames, 32, 32)
        (model,) = client.get("/v1/models").json()["data"]
        assert model["ready"] and model["kind"].endswith("Pipeline"), model


def test_the_api_returns_the_warning_of_a_prompt_longer_than_the_model_reads(
    tmp_path, tiny_diffusers
):
    """The tiny CogVideoX reads 16 tokens. Whether the node checks the request with the loaded
    model or, while it loads, with its knobs alone, the job carries the warning once."""
    folder = tiny_diffusers["cogvideox"]
    config = ServeConfig(data_dir=tmp_path / "data", model_dir=folder, device="cpu", rate_limit=0)
    with TestClient(create_app(config), base_url=BASE) as client:
        body = {"prompt": " ".join(["a dog on the sky"] * 4), "size": "16x32", "steps": 1}
        body["frames"] = 9
        job = finished(client, client.post("/v1/videos", json=body).json()["id"])
        assert job["status"] == "completed", job
        assert job["warnings"] == [
            "The prompt is 21 tokens and this model reads the first 16, so it ignores "
            "'a dog on the sky'."
        ]
