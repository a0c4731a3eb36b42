"""The diffusers backend through the Python API, on tiny random-weight Wan, LTX-Video and
CogVideoX folders (tests/tiny_diffusers.py): sizes, seeds, progress, cancel, refusals."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from t2v.backends import kind_of, load_model, read_knobs
from t2v.errors import UserError
from t2v.model import Cancelled, GenerationFailed, GenerationRequest, ModelError, VideoModel

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a dog running on the beach"
KINDS = {"wan": "WanPipeline", "ltx": "LTXPipeline", "cogvideox": "CogVideoXPipeline"}
# A small clip each kind can make: (frames, height, width).
SMALL = {"wan": (9, 32, 48), "ltx": (9, 32, 64), "cogvideox": (9, 32, 16)}


@pytest.fixture(scope="module")
def models(tiny_diffusers):
    return {kind: load_model(path, device="cpu") for kind, path in tiny_diffusers.items()}


def small(kind: str, **options) -> GenerationRequest:
    frames, height, width = SMALL[kind]
    return GenerationRequest(PROMPT, frames=frames, height=height, width=width, steps=2, **options)


@pytest.mark.parametrize("kind", KINDS)
def test_a_video_comes_out_with_the_asked_frames_and_size(models, kind, tmp_path):
    model = models[kind]
    assert isinstance(model, VideoModel)
    assert (model.info.kind, model.info.tested) == (KINDS[kind], True)
    events: list[tuple[int, int]] = []
    [video] = model.generate([small(kind, fps=10)], progress=lambda *e: events.append(e))
    frames, height, width = SMALL[kind]
    assert video.frames.shape == (frames, height, width, 3) and video.frames.dtype == np.uint8
    assert video.fps == 10
    assert events == [(1, 2), (2, 2)]
    assert video.frames.std() > 0  # not a blank clip
    written = video.save(tmp_path / "frames", format="png")  # the t2v video writer
    assert len(list(written.glob("*.png"))) == frames


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_seed_gives_the_same_frames(models, kind):
    model = models[kind]
    a, b, c = model.generate([small(kind, seed=s) for s in (5, 5, 6)])
    np.testing.assert_array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


def test_cancel_stops_within_one_step(models):
    steps: list[int] = []
    with pytest.raises(Cancelled):
        models["wan"].generate(
            [GenerationRequest(PROMPT, frames=5, height=16, width=16, steps=5)],
            progress=lambda done, total: steps.append(done),
            cancelled=lambda: len(steps) >= 2,
        )
    assert steps == [1, 2]
    [video] = models["wan"].generate([small("wan")])  # and the model still works
    assert video.frames.shape[0] == SMALL["wan"][0]


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        (
            "wan",
            {"frames": 8},
            "frames 8 is not possible for this model, which takes 5 to 161 of the form 4k+1; "
            "the nearest are 5 or 9.",
        ),
        (
            "ltx",
            {"frames": 12},
            "frames 12 is not possible for this model, which takes 9 to 257 of the form 8k+1; "
            "the nearest are 9 or 17.",
        ),
        (
            "ltx",
            {"width": 100},
            "width 100 is not possible for this model, which takes 32 to 1280 in multiples of "
            "32; the nearest are 96 or 128.",
        ),
        ("wan", {"height": 40}, "the nearest are 32 or 48."),
        ("cogvideox", {"frames": 13}, "of the form 8k+1; the nearest are 9 or 17."),
        ("cogvideox", {"frames": 50}, "the nearest is 49."),
        ("wan", {"steps": 0}, "steps must be a whole number from 1 to 100, not 0."),
    ],
)
def test_a_value_the_model_cannot_take_is_one_sentence_naming_the_nearest(
    models, kind, options, message
):
    with pytest.raises(UserError) as e:
        models[kind].resolve(GenerationRequest(PROMPT, **options))
    assert str(e.value).endswith(message) or message in str(e.value)
    assert str(e.value).count(". ") == 0 and "\n" not in str(e.value)


def test_defaults_come_from_the_pipeline_and_the_folder(tiny_diffusers, models):
    wan, cog = read_knobs(tiny_diffusers["wan"]), read_knobs(tiny_diffusers["cogvideox"])
    assert (wan.frames.default, wan.height.default, wan.width.default) == (81, 480, 832)
    assert (wan.steps.default, wan.guidance.default, wan.fps.default) == (50, 5.0, 16.0)
    # CogVideoX takes its default size and length from the transformer's config.
    assert (cog.frames.default, cog.height.default, cog.width.default) == (9, 32, 32)
    assert models["cogvideox"].knobs == cog and kind_of(tiny_diffusers["ltx"]) == "diffusers"


def test_a_wan_folder_with_few_rotary_positions_states_the_sizes_it_can_place(
    tiny_diffusers, tmp_path
):
    """Wan's rotary table holds rope_max_seq_len positions an axis (1024 in the released
    configs): a folder with 32 takes at most 32 x 16 px a side and 125 frames, and asking for
    more is a one-sentence refusal, never a RuntimeError from inside the transformer."""
    folder = shutil.copytree(tiny_diffusers["wan"], tmp_path / "wan")
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rope_max_seq_len": 32}))
    knobs = read_knobs(folder)
    assert (knobs.width.hi, knobs.height.hi, knobs.frames.hi) == (512, 512, 125)
    assert (knobs.width.default, knobs.height.default) == (512, 480)
    with pytest.raises(UserError, match="nearest is 512"):
        knobs.resolve(GenerationRequest(PROMPT, width=528))
    assert read_knobs(tiny_diffusers["wan"]).width.hi == 1280  # 1024 positions: the t2v cap


def test_the_rules_table_matches_the_installed_diffusers_defaults():
    import diffusers

    from t2v.backends.diffusers import TESTED

    for name, rules in TESTED.items():
        params = inspect.signature(getattr(diffusers, name).__call__).parameters
        assert params["num_inference_steps"].default == rules.steps, name
        assert params["guidance_scale"].default == rules.guidance, name
        for key, value in (("num_frames", rules.frames), ("height", rules.height)):
            assert params[key].default == value, (name, key)
        if "frame_rate" in params:
            assert params["frame_rate"].default == rules.fps


def _copy(tiny_diffusers, tmp_path, kind="wan"):
    return shutil.copytree(tiny_diffusers[kind], tmp_path / kind)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_a_folder_with_a_pickle_is_refused_before_loading(tiny_diffusers, tmp_path, suffix):
    folder = _copy(tiny_diffusers, tmp_path)
    (folder / "transformer" / f"weights{suffix}").write_bytes(b"\x80\x04K\x01.")
    for read in (read_knobs, load_model):
        with pytest.raises(ModelError, match=f"contains weights{suffix}, a pickle-format file"):
            read(folder)


MARKER_CODE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


@pytest.mark.parametrize("where", ["pipeline_index", "component"])
def test_custom_code_is_refused_and_never_runs(tiny_diffusers, tmp_path, where):
    folder = _copy(tiny_diffusers, tmp_path)
    marker = tmp_path / "custom-code-ran"
    index = json.loads((folder / "model_index.json").read_text())
    if where == "pipeline_index":  # a custom pipeline class in the folder's own module
        (folder / "my_pipeline.py").write_text(MARKER_CODE.format(marker=str(marker)))
        index["_class_name"] = ["my_pipeline", "MyPipeline"]
    else:  # a component class from a module of the folder
        (folder / "transformer" / "my_model.py").write_text(MARKER_CODE.format(marker=str(marker)))
        index["transformer"] = ["my_model", "MyTransformer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="Python code"):
        load_model(folder, device="cpu")
    assert not marker.exists()
    # Without the .py file the foreign class is still refused by name.
    for f in folder.rglob("*.py"):
        f.unlink()
    with pytest.raises(ModelError, match="Refusing to load"):
        load_model(folder, device="cpu")
    assert not marker.exists()


def test_without_the_extra_a_diffusers_folder_says_what_to_install(tiny_diffusers):
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "from t2v.backends import load_model\n"
        "from t2v.model import ModelError\n"
        "try:\n    load_model(sys.argv[1], device='cpu')\n"
        "except ModelError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_diffusers["wan"])], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith('needs the diffusers extra: pip install "t2v[diffusers]".')


def test_offload_on_a_cpu_is_one_sentence(tiny_diffusers):
    with pytest.raises(ModelError, match="needs --device cuda; leave it at none on a CPU."):
        load_model(tiny_diffusers["wan"], device="cpu", offload="model")


def test_running_out_of_memory_fails_the_request_with_a_reason(models, monkeypatch):
    import torch

    model = models["ltx"]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(model.pipe.transformer, "forward", out_of_memory)
    with pytest.raises(GenerationFailed, match="ran out of memory"):
        model.generate([small("ltx")])
    monkeypatch.undo()
    assert model.generate([small("ltx")])[0].frames.shape[0] == SMALL["ltx"][0]


def test_another_text_to_video_class_runs_as_untested(tiny_diffusers, tmp_path):
    folder = _copy(tiny_diffusers, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "SkyReelsV2Pipeline"  # Wan's components, Wan's call
    (folder / "model_index.json").write_text(json.dumps(index))
    model = load_model(folder, device="cpu")
    assert (model.info.kind, model.info.tested) == ("SkyReelsV2Pipeline", False)
    assert "untested" in model.info.description
    # Its defaults come from its own call signature (it needs ftfy to run, not installed here).
    k = model.knobs
    assert (k.frames.default, k.height.default, k.width.default, k.guidance.default) == (
        97,
        544,
        960,
        6.0,
    )


def test_the_pipelines_from_pretrained_takes_a_diffusers_folder_too(tiny_diffusers):
    from t2v.pipeline import TextToVideoPipeline

    model = TextToVideoPipeline.from_pretrained(tiny_diffusers["ltx"], device="cpu")
    assert isinstance(model, VideoModel) and model.info.kind == "LTXPipeline"


def test_a_folder_of_neither_kind_is_one_sentence(tmp_path):
    with pytest.raises(ModelError, match="neither pipeline.json .* nor model_index.json"):
        load_model(tmp_path, device="cpu")
    with pytest.raises(ModelError, match="No model folder at"):
        read_knobs(tmp_path / "missing")


def test_a_component_class_the_library_lacks_is_one_sentence(tiny_diffusers, tmp_path):
    folder = _copy(tiny_diffusers, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderKLNowhere"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="'AutoencoderKLNowhere', which the installed diffusers"):
        load_model(folder, device="cpu")


def test_loading_and_generating_never_touch_the_network(tiny_diffusers, monkeypatch):
    import os
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("t2v tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = load_model(tiny_diffusers["cogvideox"], device="cpu")
    assert model.generate([small("cogvideox")])[0].frames.shape[0] == SMALL["cogvideox"][0]
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_one_nearest_value_is_named_in_the_singular():
    from t2v.errors import UserError
    from t2v.model import IntRange

    with pytest.raises(
        UserError, match=r"takes 32 to 1280 in multiples of 16; the nearest is 1280\.$"
    ):
        IntRange(480, 32, 1280, 16).check("width", 2000)


# --- prompts longer than the text encoder reads -------------------------------------------

SHORT_WORDS = "a dog on the sky".split()  # one token each in tests/tiny_diffusers.py


def words(n: int) -> str:
    """A prompt of ``n`` one-token words: n + 1 tokens with T5's end token."""
    return " ".join(SHORT_WORDS[i % len(SHORT_WORDS)] for i in range(n))


def test_each_kind_states_how_many_tokens_its_text_encoder_reads(models):
    # Wan and LTX-Video: their call's max_sequence_length; CogVideoX: its transformer's.
    reads = {kind: model._prompt_tokens for kind, model in models.items()}
    assert reads == {"wan": 512, "ltx": 128, "cogvideox": 16}


@pytest.mark.parametrize("kind", ["ltx", "cogvideox"])
def test_the_warning_comes_exactly_when_diffusers_truncates_the_prompt(models, kind, monkeypatch):
    """diffusers logs (and only logs) the words it cuts; t2v warns for the same lengths and
    names the same words."""
    model = models[kind]
    limit = model._prompt_tokens
    logged: list[str] = []
    module = inspect.getmodule(type(model.pipe))
    monkeypatch.setattr(module.logger, "warning", lambda message, *args: logged.append(message))
    for n in range(limit - 3, limit + 3):
        logged.clear()
        model.pipe._get_t5_prompt_embeds(words(n), max_sequence_length=limit, device="cpu")
        warnings = model.resolve(GenerationRequest(words(n))).warnings
        assert len(warnings) == len(logged) == (n + 1 > limit), (n, warnings, logged)
    ignored = words(limit + 2).split()[limit - 1 :]  # the end token takes one of the places
    assert warnings == (
        f"The prompt is {limit + 3} tokens and this model reads the first {limit}, so it "
        f"ignores '{' '.join(ignored)}'.",
    )
    assert logged[0].endswith(f"{[' '.join(ignored)]}")  # diffusers names the same words


def test_a_prompt_at_the_limit_or_shorter_is_not_warned(models):
    cog = models["cogvideox"]
    assert cog.resolve(GenerationRequest(words(15))).warnings == ()  # 16 tokens: all read
    assert cog.resolve(GenerationRequest(PROMPT)).warnings == ()
    assert cog.resolve(GenerationRequest(words(16))).warnings == (  # 17: the last is cut
        "The prompt is 17 tokens and this model reads the first 16, so it ignores 'a'.",
    )


def test_wan_counts_the_prompt_as_its_pipeline_cleans_it(models, monkeypatch):
    """Wan unescapes HTML entities before tokenizing ("&amp;" is "&", one unknown letter);
    its limit of 512 is beyond 500 characters of the tiny vocabulary, so it is lowered."""
    model = models["wan"]
    monkeypatch.setattr(model, "_prompt_tokens", 8)
    assert model.resolve(GenerationRequest("a dog &amp; a cat")).warnings == ()  # 7 tokens
    [warning] = model.resolve(GenerationRequest("a dog &amp; a cat on the sky")).warnings
    assert warning == (
        "The prompt is 10 tokens and this model reads the first 8, so it ignores 'the sky'."
    )


def test_the_negative_prompt_is_warned_separately(models):
    cog = models["cogvideox"]
    only = cog.resolve(GenerationRequest(PROMPT, negative_prompt=words(20))).warnings
    assert only == (
        "The negative prompt is 21 tokens and this model reads the first 16, so it ignores "
        f"'{' '.join(words(20).split()[15:])}'.",
    )
    both = cog.resolve(GenerationRequest(words(20), negative_prompt=words(17))).warnings
    assert [w.split(" is ")[0] for w in both] == ["The prompt", "The negative prompt"]
    assert cog.resolve(GenerationRequest(words(20), negative_prompt=PROMPT)).warnings[0] == (
        only[0].replace("negative prompt", "prompt")
    )


def test_a_request_is_warned_once_however_often_it_is_resolved(models):
    cog = models["cogvideox"]
    once = cog.resolve(GenerationRequest(words(20)))
    assert cog.resolve(once) == once and len(once.warnings) == 1
    # A server may check a request with the knobs alone; the model's resolve then warns.
    checked = cog.knobs.resolve(GenerationRequest(words(20)))
    assert checked.resolved and checked.warnings == ()
    assert cog.resolve(checked).warnings == once.warnings


def test_a_long_ignored_tail_is_shortened_and_quoted_as_typed(models):
    """The tail is cut at a word and quoted from the prompt itself, letters the vocabulary
    lacks included (the tiny T5 reads each as one token)."""
    prompt = words(15) + " " + " ".join(["Zebra-crossing xylophones"] * 12)
    [warning] = models["cogvideox"].resolve(GenerationRequest(prompt)).warnings
    assert warning.startswith("The prompt is ")
    assert warning.endswith(
        "reads the first 16, so it ignores 'Zebra-crossing xylophones Zebra-crossing "
        "xylophones Zebra-crossing xylophones ...'."
    )
    assert len(warning) < 200


def test_the_cli_prints_the_warning(tiny_diffusers, tmp_path, capsys):
    from t2v.cli import main

    argv = ["generate", words(20), "--model", tiny_diffusers["cogvideox"], "--steps", 1]
    argv += ["--frames", 9, "--width", 16, "--height", 32, "-o", tmp_path / "clip.mp4"]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "t2v: warning: The prompt is 21 tokens and this model reads the first 16, so it " in err
    assert (tmp_path / "clip.mp4").is_file()
