"""`t2v generate` with a tiny model: files that play, every format, batch mode, seeds, errors."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from t2v.cli import build_parser, main
from t2v.outputs import MARKER
from t2v.pipeline import TextToVideoPipeline
from t2v.video import read_video

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a large red circle moving right"
MAGIC = {"mp4": (4, b"ftyp"), "webm": (0, b"\x1a\x45\xdf\xa3"), "gif": (0, b"GIF89a")}


def generate(*argv) -> int:
    return main(["generate", *map(str, argv)])


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return TextToVideoPipeline.from_pretrained(tiny_model_dir, device="cpu")


def written_as(path: Path, fmt: str) -> bool:
    """Whether the file starts with the signature of the container `fmt`."""
    at, magic = MAGIC[fmt]
    return path.read_bytes()[at : at + len(magic)] == magic


def grey(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) -> flat luma-like values, which lossy 4:2:0 video keeps best."""
    return frames.astype(float).mean(-1).ravel()


def test_a_prompt_becomes_a_file_that_plays_and_its_path_is_printed(
    tmp_path, tiny_model_dir, pipe, capsys
):
    out = tmp_path / "clip.mp4"
    assert generate(PROMPT, "--model", tiny_model_dir, "-o", out, "--seed", 3) == 0
    assert capsys.readouterr().out == f"{out}\n"
    frames = read_video(out, num_frames=16, fps=8, size=64)
    assert frames.shape == (16, 64, 64, 3)
    same, other = (pipe(PROMPT, seed=s).frames for s in (3, 4))
    # The tiny random model draws noise-like clips, which H.264 keeps only roughly.
    assert np.corrcoef(grey(frames), grey(same))[0, 1] > 0.8
    assert np.corrcoef(grey(frames), grey(other))[0, 1] < 0.5


@pytest.mark.parametrize("fmt", ["mp4", "webm", "gif"])
def test_the_output_extension_sets_the_format(tmp_path, tiny_model_dir, fmt):
    out = tmp_path / f"clip.{fmt}"
    assert generate(PROMPT, "--model", tiny_model_dir, "-o", out, "--steps", 2) == 0
    assert written_as(out, fmt)
    assert read_video(out).shape == (16, 64, 64, 3)


@pytest.mark.parametrize("fmt", ["mp4", "webm", "gif", "png"])
def test_format_option_names_the_default_output(tmp_path, monkeypatch, tiny_model_dir, capsys, fmt):
    monkeypatch.chdir(tmp_path)
    args = [PROMPT, "--model", tiny_model_dir, "--format", fmt, "--steps", 2]
    assert generate(*args) == 0
    written = Path(capsys.readouterr().out.strip())
    stem = Path("out") / "a-large-red-circle-moving-right"
    assert written == (stem if fmt == "png" else stem.with_suffix(f".{fmt}"))
    if fmt == "png":
        assert sorted(p.name for p in written.glob("*.png"))[:2] == ["0000.png", "0001.png"]
    else:
        assert written_as(written, fmt)
    assert read_video(written).shape == (16, 64, 64, 3)


def test_png_frames_into_a_named_folder(tmp_path, tiny_model_dir, pipe):
    out = tmp_path / "frames"
    assert generate(PROMPT, "--model", tiny_model_dir, "-o", out, "--seed", 8) == 0
    assert len(list(out.glob("*.png"))) == 16
    np.testing.assert_array_equal(read_video(out), pipe(PROMPT, seed=8).frames)


def test_the_same_seed_gives_byte_identical_frames(tmp_path, tiny_model_dir):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert (
            generate(
                PROMPT,
                "--model",
                tiny_model_dir,
                "-o",
                tmp_path / name,
                "--format",
                "png",
                "--seed",
                seed,
            )
            == 0
        )
    a, b, c = (sorted((tmp_path / n).glob("*.png")) for n in "abc")
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    assert [f.read_bytes() for f in a] != [f.read_bytes() for f in c]


LINES = [
    PROMPT,
    "zzqx blorp",
    "a small blue square moving up",
    "   ",
    "a large yellow triangle staying still",
]


def write_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def test_batch_mode_writes_numbered_files_and_an_index_with_errors(
    tmp_path, tiny_model_dir, capsys
):
    out = tmp_path / "clips"
    assert (
        generate(
            "--prompts-file",
            write_prompts(tmp_path),
            "--out-dir",
            out,
            "--model",
            tiny_model_dir,
            "--seed",
            10,
            "--steps",
            2,
            "--batch-size",
            2,
        )
        == 0
    )
    assert capsys.readouterr().out == f"{out / 'index.jsonl'}\n"
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER,
        "0000.mp4",
        "0002.mp4",
        "0004.mp4",
        "index.jsonl",
    ]
    records = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == LINES
    assert [r["seed"] for r in records] == [10, 11, 12, 13, 14]
    assert [r["file"] for r in records] == ["0000.mp4", None, "0002.mp4", None, "0004.mp4"]
    assert "knows none of the words" in records[1]["error"]
    assert "empty" in records[3]["error"]
    assert not any("error" in records[i] for i in (0, 2, 4))
    for name in ("0000.mp4", "0002.mp4", "0004.mp4"):
        assert read_video(out / name).shape == (16, 64, 64, 3)


def test_batch_line_i_is_the_clip_of_its_prompt_with_seed_plus_i(tmp_path, tiny_model_dir, pipe):
    out = tmp_path / "frames"
    assert (
        generate(
            "--prompts-file",
            write_prompts(tmp_path),
            "--out-dir",
            out,
            "--model",
            tiny_model_dir,
            "--seed",
            10,
            "--format",
            "png",
            "--batch-size",
            16,
        )
        == 0
    )
    for i in (0, 2, 4):
        alone = pipe(LINES[i], seed=10 + i).frames.astype(int)
        # Batched CPU kernels may round a pixel one level differently; PNG is lossless.
        assert np.abs(read_video(out / f"{i:04d}") - alone).max() <= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [
                "",
            ],
            "The prompt is empty",
        ),
        (["a red circle " * 50], "the limit is 500, so shorten it."),
        (["zzqx blorp"], "The model knows none of the words in 'zzqx blorp'"),
        ([PROMPT, "--steps", "0"], "steps must be a whole number from 1 to 100, not 0."),
        ([PROMPT, "--steps", "101"], "steps must be a whole number from 1 to 100, not 101."),
        ([PROMPT, "--guidance", "25"], "guidance must be from 0 to 20, not 25.0."),
        ([PROMPT, "--seed", "-1"], "seed must be a whole number from 0 to 4294967295, not -1."),
        (
            [PROMPT, "--frames", "17"],
            "frames 17 is not possible for this model, which takes only 16.",
        ),
        (
            [PROMPT, "--width", "65"],
            "width 65 is not possible for this model, which takes only 64.",
        ),
        (
            [PROMPT, "--height", "32"],
            "height 32 is not possible for this model, which takes only 64.",
        ),
        ([PROMPT, "--fps", "0"], "fps must be from 1 to 60, not 0.0."),
    ],
)
def test_a_bad_request_exits_2_with_one_sentence(tmp_path, tiny_model_dir, capsys, argv, message):
    out = tmp_path / "clip.mp4"
    assert generate(*argv, "--model", tiny_model_dir, "-o", out) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("t2v: error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and captured.err.endswith(".\n")  # no progress bar
    assert not list(tmp_path.iterdir())


def test_a_model_folder_with_a_pickle_exits_2(tmp_path, tiny_model_dir, capsys):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "generator" / "extra.pt").write_bytes(b"\x80\x04K\x01.")
    assert generate(PROMPT, "--model", model, "-o", tmp_path / "clip.mp4") == 2
    assert "contains extra.pt, a pickle-format file" in capsys.readouterr().err
    assert not (tmp_path / "clip.mp4").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [PROMPT, "--prompts-file", "p.txt", "--out-dir", "d"],
            "either a PROMPT or --prompts-file",
        ),
        (["--prompts-file", "p.txt"], "--prompts-file needs --out-dir"),
        ([], "either a PROMPT or --prompts-file"),
    ],
)
def test_conflicting_or_missing_modes_exit_2(tiny_model_dir, capsys, argv, message):
    assert generate(*argv, "--model", tiny_model_dir) == 2
    assert message in capsys.readouterr().err


def _subparsers(parser: argparse.ArgumentParser):
    """(name, parser) for the parser and every nested subcommand."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _subparsers(child)


def test_every_help_documents_every_option_without_empty_defaults():
    parsers = list(_subparsers(build_parser()))
    names = {name for name, _ in parsers}
    assert {"t2v generate", "t2v eval", "t2v train", "t2v serve", "t2v data prepare"} <= names
    for name, parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue  # each subcommand has its own help, checked on its own
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        text = parser.format_help()
        for empty in ("(default: None)", "(default: False)", "(default: [])"):
            assert empty not in text, f"{name} --help shows {empty}"
    generate = dict(parsers)["t2v generate"].format_help()
    assert "(default: 0)" in generate  # --seed: a real default of 0 is still shown


# --- the model protocol (t2v.model) as the bundled kind of model implements it --------------


def test_load_model_gives_a_video_model_whose_knobs_come_from_its_configs(tiny_model_dir):
    from t2v.backends import load_model, read_knobs
    from t2v.model import VideoModel

    model = load_model(tiny_model_dir, device="cpu")
    assert isinstance(model, VideoModel) and model.info.kind == "t2v"
    k = model.knobs
    assert (k.steps.default, k.guidance.default, k.fps.default) == (4, 2.0, 8.0)  # pipeline.json
    assert (k.frames.lo, k.frames.hi, k.width.default, k.height.hi) == (16, 16, 64, 64)
    assert read_knobs(tiny_model_dir) == k


def test_read_knobs_loads_neither_torch_nor_weights(tiny_model_dir):
    import subprocess
    import sys

    code = (
        "import sys; from t2v.backends import read_knobs; k = read_knobs(sys.argv[1]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(k.steps.default)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"


def test_the_default_guidance_has_one_source():
    from t2v.backends import read_knobs
    from t2v.pipeline import PipelineConfig

    assert PipelineConfig().guidance == read_knobs(None).guidance.default == 6.0


def test_generate_takes_requests_reports_each_step_and_matches_the_older_call(tiny_model_dir):
    from t2v.backends import load_model
    from t2v.model import GenerationRequest

    model = load_model(tiny_model_dir, device="cpu")
    events: list[tuple[int, int]] = []
    requests = [
        GenerationRequest(PROMPT, seed=3, steps=2, fps=12),
        GenerationRequest("a small blue square moving up", seed=4, steps=3),
    ]
    videos = model.generate(requests, progress=lambda d, t: events.append((d, t)))
    assert events == [(i, 5) for i in range(1, 6)]  # counted over both requests
    assert [v.fps for v in videos] == [12, 8.0]
    assert [v.frames.shape for v in videos] == [(16, 64, 64, 3)] * 2
    np.testing.assert_array_equal(videos[0].frames, model(PROMPT, seed=3, steps=2).frames)


def test_cancel_stops_generation_within_one_step(tiny_model_dir):
    from t2v.backends import load_model
    from t2v.model import Cancelled, GenerationRequest

    model = load_model(tiny_model_dir, device="cpu")
    steps: list[int] = []
    with pytest.raises(Cancelled):
        model.generate(
            [GenerationRequest(PROMPT, steps=4)],
            progress=lambda d, t: steps.append(d),
            cancelled=lambda: len(steps) >= 2,
        )
    assert steps == [1, 2]


@pytest.mark.parametrize(
    ("request_options", "message"),
    [
        ({"frames": 17}, "frames 17 is not possible for this model, which takes only 16."),
        ({"width": 32}, "width 32 is not possible for this model, which takes only 64."),
        ({"steps": 101}, "steps must be a whole number from 1 to 100, not 101."),
        ({"prompt": "zzqx blorp"}, "The model knows none of the words in 'zzqx blorp'"),
        ({"negative_prompt": "a " * 300}, "The negative prompt is 599 characters long"),
    ],
)
def test_resolve_refuses_what_the_model_cannot_take_in_one_sentence(pipe, request_options, message):
    from t2v.errors import UserError
    from t2v.model import GenerationRequest

    with pytest.raises(UserError) as e:
        pipe.resolve(GenerationRequest(**({"prompt": PROMPT} | request_options)))
    assert message in str(e.value) and str(e.value).count(".") >= 1


def test_an_invisible_negative_prompt_means_none(pipe):
    from t2v.model import GenerationRequest

    assert (
        pipe.resolve(GenerationRequest(PROMPT, negative_prompt=" \u200b\t")).negative_prompt == ""
    )


def test_a_model_of_a_newer_format_is_refused(tmp_path, tiny_model_dir):
    import shutil

    from t2v.backends import load_model
    from t2v.model import ModelError

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "pipeline.json").read_text())
    (model / "pipeline.json").write_text(json.dumps(config | {"format_version": 2}))
    with pytest.raises(ModelError, match="upgrade t2v"):
        load_model(model, device="cpu")


def test_offload_is_refused_for_a_t2v_model(tiny_model_dir):
    from t2v.backends import load_model
    from t2v.model import ModelError

    with pytest.raises(ModelError, match="needs --device cuda"):
        load_model(tiny_model_dir, device="cpu", offload="model")


def test_importing_the_pipeline_loads_no_training_code():
    import subprocess
    import sys

    code = (
        "import sys, t2v.pipeline; "
        "print(sorted({'t2v.data', 't2v.train', 't2v.shapes'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_running_out_of_memory_is_a_generation_failure_with_a_reason(tiny_model_dir, monkeypatch):
    import torch

    from t2v.backends import load_model
    from t2v.model import GenerationFailed, GenerationRequest

    model = load_model(tiny_model_dir, device="cpu")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(model.generator, "forward", out_of_memory)
    with pytest.raises(GenerationFailed, match="ran out of memory"):
        model.generate([GenerationRequest(PROMPT, steps=1)])
