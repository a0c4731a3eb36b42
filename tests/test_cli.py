"""Every command that writes keeps what the user did not ask to replace, and says why in one
sentence (the data-loss cases of the hardening issue, through the real `t2v` entry point)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from t2v import video
from t2v.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a large red circle moving right"


def files(folder: Path) -> list[str]:
    """Every path under ``folder``, hidden `.part` leftovers included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(capsys, argv: list, words: str) -> None:
    """The command exits 2 with one sentence on stderr that contains ``words``."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("t2v: error: ") and err.count("\n") == 1 and err.endswith(".\n"), err
    assert words in err, err


@pytest.fixture
def keep(tmp_path, monkeypatch):
    """`mkdir keep; touch keep/a.txt` and a plain file `notes`, in the current folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.txt").write_text("mine")
    (tmp_path / "notes").write_text("my notes")
    return tmp_path


def untouched(root: Path, *extra: str) -> None:
    assert files(root) == sorted(["keep", "keep/a.txt", "notes", *extra])
    assert (root / "keep" / "a.txt").read_text() == "mine"
    assert (root / "notes").read_text() == "my notes"


def test_generate_into_a_users_folder_is_refused(keep, tiny_model_dir, capsys):
    refused(capsys, ["generate", PROMPT, "--model", tiny_model_dir, "-o", "keep"], "did not write")
    untouched(keep)


@pytest.mark.parametrize("fmt", [None, "mp4", "png"])
def test_generate_onto_a_plain_file_is_refused(keep, tiny_model_dir, capsys, fmt):
    argv = ["generate", PROMPT, "--model", tiny_model_dir, "-o", "notes"]
    refused(capsys, argv + (["--format", fmt] if fmt else []), "notes")
    untouched(keep)


def test_generate_through_a_symlink(keep, tiny_model_dir, capsys):
    (keep / "linkdir").symlink_to(keep / "keep")
    argv = ["generate", PROMPT, "--model", tiny_model_dir, "--steps", 1]
    refused(capsys, [*argv, "-o", "linkdir"], "did not write")
    untouched(keep, "linkdir")
    (keep / "empty").mkdir()
    (keep / "frames").symlink_to(keep / "empty")
    assert main([str(a) for a in [*argv, "-o", "frames"]]) == 0  # written where it points
    assert (keep / "frames").is_symlink() and len(list((keep / "empty").glob("*.png"))) == 16
    assert not [p for p in files(keep) if p.endswith(".part")]


def test_generate_into_the_current_folder_is_refused(keep, tiny_model_dir, capsys):
    refused(capsys, ["generate", PROMPT, "--model", tiny_model_dir, "-o", "."], "folder")
    refused(capsys, ["generate", PROMPT, "--model", tiny_model_dir, "-o", "keep/.."], "folder")
    untouched(keep)


def test_generate_replaces_its_own_outputs(keep, tiny_model_dir, capsys):
    argv = ["generate", PROMPT, "--model", tiny_model_dir, "--steps", 1]
    for out in ("clip.mp4", "clip.mp4", "frames", "frames"):
        assert main([str(a) for a in [*argv, "-o", out]]) == 0
    assert len(list((keep / "frames").glob("*.png"))) == 16
    untouched(
        keep,
        "clip.mp4",
        "frames",
        "frames/.t2v-output.json",
        *[f"frames/{i:04d}.png" for i in range(16)],
    )


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_generate_leaves_the_old_file_and_no_part(
    keep, tiny_model_dir, capsys, monkeypatch, interrupt
):
    (keep / "clip.mp4").write_bytes(b"an older clip")

    def stopped(frames, target, fps, fmt):
        Path(target).write_bytes(b"half a file")
        raise interrupt()

    monkeypatch.setattr(video, "_encode", stopped)
    argv = ["generate", PROMPT, "--model", str(tiny_model_dir), "--steps", "1", "-o", "clip.mp4"]
    if interrupt is KeyboardInterrupt:
        assert main(argv) == 130
    else:
        with pytest.raises(RuntimeError):
            main(argv)
    assert (keep / "clip.mp4").read_bytes() == b"an older clip"
    untouched(keep, "clip.mp4")


@pytest.fixture
def read_only(keep):
    """A folder nobody can write in, root included: `chattr +i` (permission bits do not stop
    root, and a read-only mount needs privileges the tests do not have)."""
    folder = keep / "ro"
    folder.mkdir()
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", folder]).returncode:
        pytest.skip("chattr +i is not available on this file system")
    yield folder
    subprocess.run(["chattr", "-i", folder], check=True)


def test_generate_into_a_read_only_place_is_one_sentence(read_only, tiny_model_dir, capsys):
    refused(
        capsys, ["generate", PROMPT, "--model", tiny_model_dir, "-o", "ro/clip.mp4"], "read-only"
    )
    refused(capsys, ["data", "shapes", "--count", 1, "--out", "ro/shapes"], "read-only")
    assert files(read_only) == []


def test_batch_into_a_users_folder_is_refused(keep, tiny_model_dir, capsys):
    (keep / "prompts.txt").write_text(PROMPT + "\n")
    argv = ["generate", "--prompts-file", "prompts.txt", "--model", tiny_model_dir, "--out-dir"]
    refused(capsys, [*argv, "keep"], "did not write")
    refused(capsys, [*argv, "notes"], "is a file")
    untouched(keep, "prompts.txt")


@pytest.mark.parametrize("out", ["keep", "notes", "."])
def test_data_shapes_never_writes_over_the_users_things(keep, capsys, out):
    refused(capsys, ["data", "shapes", "--count", 1, "--out", out], out.strip("."))
    untouched(keep)


@pytest.mark.parametrize("out", ["keep", "notes"])
def test_eval_report_never_writes_over_the_users_things(keep, tiny_model_dir, capsys, out):
    refused(capsys, ["eval", "--model", tiny_model_dir, "--count", 3, "--out", out], out)
    untouched(keep)


@pytest.mark.parametrize("out", ["keep", "notes"])
def test_data_prepare_never_writes_over_the_users_things(keep, capsys, out):
    (keep / "videos").mkdir()
    frames = np.zeros((20, 32, 32, 3), np.uint8)
    video.write_video(frames, keep / "videos" / "clip.mp4", fps=8)
    (keep / "videos" / "clip.txt").write_text("a black square")
    argv = ["data", "prepare", "--videos", "videos", "--out", out, "--workers", 1]
    refused(capsys, argv, out)
    untouched(keep, "videos", "videos/clip.mp4", "videos/clip.txt")


# --- errors: one sentence for the person, a traceback for a bug ----------------------------


@pytest.mark.parametrize("option", [[], ["--negative-prompt"]])
def test_a_lone_surrogate_is_one_sentence(tmp_path, tiny_model_dir, capsys, option):
    texts = ["\ud800"] if not option else [PROMPT, *option, "a \udfff square"]
    argv = ["generate", *texts, "--model", tiny_model_dir, "-o", tmp_path / "c.mp4"]
    refused(capsys, argv, "lone surrogate")
    assert list(tmp_path.iterdir()) == []


def test_an_invisible_negative_prompt_is_no_negative_prompt(tmp_path, tiny_model_dir):
    argv = ["generate", PROMPT, "--model", tiny_model_dir, "--steps", "1", "--format", "png"]
    assert (
        main([str(a) for a in [*argv, "--negative-prompt", "\u200b\u200c", "-o", tmp_path / "a"]])
        == 0
    )
    assert main([str(a) for a in [*argv, "-o", tmp_path / "b"]]) == 0
    for name in ("0000.png", "0015.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_config_value_out_of_range_is_one_sentence(tmp_path, capsys):
    argv = ["train", "autoencoder", "--run-dir", tmp_path / "run"]
    refused(capsys, [*argv, "--set", "stages.autoencoder.steps=0"], "at least 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--count", 8, "--batch-size", 0, "--out", "e"],
        ["generate", PROMPT, "--prompts-file", "p.txt", "--out-dir", "b", "--batch-size", 0],
        ["data", "shapes", "--count", 0, "--out", "s"],
    ],
)
def test_counts_below_one_are_one_sentence(keep, capsys, argv):
    (keep / "p.txt").write_text(PROMPT)
    if "generate" in argv:
        argv = [argv[0], *argv[2:]]  # batch mode: no PROMPT
    refused(capsys, argv, "at least 1")


def test_a_bug_keeps_its_traceback(tmp_path, tiny_model_dir, monkeypatch):
    """A ValueError from inside t2v is a bug, not the user's mistake: it is not hidden."""
    import t2v.generate

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(t2v.generate, "check_video_output", broken)
    with pytest.raises(ValueError, match="invariant"):
        main(["generate", PROMPT, "--model", str(tiny_model_dir), "-o", str(tmp_path / "c.mp4")])


# --- the knobs: the model's names, defaults and limits -------------------------------------


def test_generate_takes_every_knob_of_the_python_api_by_the_same_name():
    import argparse
    import dataclasses

    from t2v.cli import build_parser
    from t2v.model import GenerationRequest

    generate = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["generate"]
    dests = {a.dest for a in generate._actions}
    knobs = {f.name for f in dataclasses.fields(GenerationRequest) if not f.metadata}
    assert knobs <= dests
    assert {"format", "device", "precision", "offload", "model"} <= dests


def test_knob_help_is_read_from_the_models_knobs(monkeypatch):
    import dataclasses

    import t2v.backends
    from t2v.cli import build_parser
    from t2v.model import IntRange

    bundled = t2v.backends.read_knobs(None)

    def help_text() -> str:
        import io
        from contextlib import redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out), pytest.raises(SystemExit):
            build_parser().parse_args(["generate", "--help"])
        return " ".join(out.getvalue().split())

    shown = help_text()
    steps = bundled.steps
    assert f"the bundled model's is {steps.default}, from {steps.lo} to {steps.hi}" in shown
    assert f"the bundled model takes only {bundled.frames.default}" in shown
    wan_like = dataclasses.replace(bundled, frames=IntRange(33, 5, 81, multiple=4, offset=1))
    monkeypatch.setattr(t2v.backends, "read_knobs", lambda path=None: wan_like)
    shown = help_text()
    assert "frames per clip (default: the model's; the bundled model's is 33, from 5 to 81" in shown
    assert "of the form 4k+1)" in shown


def test_knob_values_reach_the_video(tmp_path, tiny_model_dir):
    import av

    out = tmp_path / "clip.mp4"
    argv = ["generate", PROMPT, "--model", tiny_model_dir, "--steps", 1, "-o", out]
    assert main([str(a) for a in [*argv, "--fps", 12, "--frames", 16, "--width", 64]]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 12 and stream.frames == 16 and stream.width == 64


def test_a_number_the_model_cannot_take_is_refused_before_loading(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    import t2v.generate

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded for a request it cannot take")

    monkeypatch.setattr(t2v.generate, "load_model", never)
    argv = ["generate", PROMPT, "--model", tiny_model_dir, "-o", tmp_path / "c.mp4"]
    refused(capsys, [*argv, "--frames", 17], "which takes only 16")
    refused(capsys, [*argv, "--steps", 500], "steps must be a whole number from 1 to 100")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "words"),
    [(["--offload", "model", "--device", "cpu"], "needs --device cuda")]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no usable")]),
)
def test_device_options_the_machine_cannot_meet_are_one_sentence(
    tmp_path, tiny_model_dir, capsys, option, words
):
    argv = ["generate", PROMPT, "--model", tiny_model_dir, "-o", tmp_path / "c.mp4", *option]
    refused(capsys, argv, words)


# --- a diffusers folder through the same command --------------------------------------------


@pytest.fixture
def tiny_wan(tiny_diffusers):
    """The tiny random-weight Wan folder of tests/tiny_diffusers.py (conftest fixture)."""
    return tiny_diffusers["wan"]


def test_a_diffusers_model_makes_the_asked_frames_size_and_fps(tmp_path, tiny_wan):
    import av

    from t2v.video import read_video

    argv = ["generate", "a dog running on the beach", "--model", tiny_wan, "--steps", 2]
    argv += ["--frames", 9, "--width", 48, "--height", 32]
    assert main([str(a) for a in [*argv, "--fps", 10, "-o", tmp_path / "dog.mp4"]]) == 0
    with av.open(str(tmp_path / "dog.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.frames, stream.width, stream.height) == (9, 48, 32)
        assert stream.average_rate == 10
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / name
        assert main([str(a) for a in [*argv, "--seed", seed, "--format", "png", "-o", out]]) == 0
    a, b, c = (read_video(tmp_path / n, num_frames=9, size=(32, 48)) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_a_diffusers_model_refuses_what_it_cannot_make_in_one_sentence(tmp_path, tiny_wan, capsys):
    argv = ["generate", "a dog", "--model", tiny_wan, "-o", tmp_path / "dog.mp4"]
    refused(capsys, [*argv, "--frames", 10], "of the form 4k+1; the nearest are 9 or 13")
    refused(capsys, [*argv, "--height", 40], "the nearest are 32 or 48")
    assert list(tmp_path.iterdir()) == []
