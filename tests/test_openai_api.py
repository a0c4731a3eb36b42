"""The official `openai` Python client against a real `t2v serve`: the OpenAI videos API as
SGLang Diffusion, LocalAI and the AI SDK speak it, unchanged, with t2v's keys."""

from __future__ import annotations

import importlib.util
import io

import av
import openai
import pytest

from servers import Server
from t2v.serve.auth import KeyStore
from t2v.serve.store_sqlite import SqliteStore

# The client marks the videos API deprecated (OpenAI's own service ends); the shape stays.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def frames_of(content: bytes) -> tuple[int, int, int]:
    with av.open(io.BytesIO(content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), *frames[0].shape[:2]


def test_the_openai_client_creates_polls_lists_and_downloads(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    _, key = KeyStore(SqliteStore(data)).create("openai-client")
    with Server(data, tiny_model_dir, "--auth", "--rate-limit", "0") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        (model,) = client.models.list().data
        knobs = model.model_extra["knobs"]
        size = f"{knobs['width']['default']}x{knobs['height']['default']}"
        seconds = knobs["frames"]["default"] / knobs["fps"]["default"]  # the tiny model's only

        video = client.videos.create_and_poll(
            prompt="a red circle moving right",
            model=model.id,
            size=size,
            seconds=f"{seconds:g}",
            poll_interval_ms=50,
            extra_body={"seed": 3, "steps": 2},  # t2v's knobs ride along as extra fields
        )
        assert (video.object, video.status, video.progress) == ("video", "completed", 100)
        assert (video.size, video.seconds, video.model) == (size, f"{seconds:g}", model.id)
        assert video.completed_at >= video.created_at and video.error is None
        frames = knobs["frames"]["default"]
        assert (video.model_extra["frames"], video.model_extra["seed"]) == (frames, 3)

        assert client.videos.retrieve(video.id).status == "completed"
        content = client.videos.download_content(video.id).read()
        width, height = map(int, size.split("x"))
        assert frames_of(content) == (frames, height, width)

        more = [
            client.videos.create(prompt=f"a blue square {i}", seconds=f"{seconds:g}")
            for i in range(2)
        ]
        listed = [v.id for v in client.videos.list(limit=1)]  # the client follows `after` pages
        assert listed == [more[1].id, more[0].id, video.id]
        page = client.videos.list(limit=2)
        assert page.has_more and page.last_id == more[0].id

        # what the model cannot make is an error the client raises, and makes no job
        for bad in ({"seconds": f"{seconds * 2:g}"}, {"size": "720x1280"}, {"model": "sora-2"}):
            with pytest.raises(openai.UnprocessableEntityError) as raised:
                client.videos.create(prompt="a red circle", **bad)
            assert raised.value.body["message"].endswith(".")
        assert len(list(client.videos.list())) == 3
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve("A" * 22)
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="t2v_wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.videos.list()


@pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason='needs pip install "t2v[diffusers]"'
)
def test_seconds_map_to_the_frames_a_diffusers_model_takes(tmp_path, tiny_diffusers):
    """Tiny Wan takes 4k+1 frames at 16 fps: half a second (8 frames) is made as the nearest
    such count, 9, and the video says so; keys and the content filter hold as for t2v's own."""
    data = tmp_path / "data"
    _, key = KeyStore(SqliteStore(data)).create("wan-client")
    with Server(data, tiny_diffusers["wan"], "--auth", "--rate-limit", "0") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        knobs = client.models.list().data[0].model_extra["knobs"]
        assert (knobs["frames"]["multiple"], knobs["frames"]["offset"]) == (4, 1)
        assert knobs["fps"]["default"] == 16
        video = client.videos.create_and_poll(
            prompt="a dog running on a beach",
            seconds="0.5",
            size="48x32",
            poll_interval_ms=50,
            extra_body={"steps": 2},
        )
        assert video.status == "completed", video.error
        assert (video.model_extra["frames"], video.seconds) == (9, "0.562")
        content = client.videos.download_content(video.id).read()
        assert frames_of(content) == (9, 32, 48)
        with pytest.raises(openai.UnprocessableEntityError, match="nearest are 32 or 48"):
            client.videos.create(prompt="a dog", size="40x32")
        with pytest.raises(openai.UnprocessableEntityError, match="blocked term"):
            client.videos.create(prompt="a c s a m dog", size="48x32")
        # the model's default size, 832x480 (Wan's), works: the tiny folder's positions reach it
        video = client.videos.create_and_poll(
            prompt="a dog", seconds="0.3", poll_interval_ms=50, extra_body={"steps": 1}
        )
        assert video.status == "completed" and video.size == "832x480", video.error
        assert frames_of(client.videos.download_content(video.id).read()) == (5, 480, 832)
        keyless = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            keyless.videos.retrieve(video.id)
