"""Training both stages with tiny configs on real encoded videos: outputs, learning, exact
resume, torchrun, config errors, the non-finite guard, checkpoints and --init-from."""

import copy
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_TRAIN, build_tiny_pipeline, kill_after_checkpoint
from t2v import config as cfg
from t2v import objectives, shapes
from t2v import train as train_module
from t2v.cli import main
from t2v.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from t2v.models.generator import LatentGenerator
from t2v.models.layout import box_coverage
from t2v.models.text_encoders import PretrainedTextEncoder, TextEncoderConfig, build_text_encoder
from t2v.pipeline import TextToVideoPipeline
from t2v.sources import open_source
from t2v.train import Checkpointer, TrainConfig, Trainer, TrainingError
from t2v.video import read_video, to_model_tensor, write_video

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red square moving right"

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 210, 60),
    "blue": (50, 70, 230),
    "white": (235, 235, 235),
    "yellow": (235, 220, 40),
}
MOTIONS = {"right": (0, 3), "left": (0, -3), "down": (3, 0), "up": (-3, 0)}
CLIPS = [
    ("red", "right"),
    ("blue", "left"),
    ("green", "down"),
    ("white", "up"),
    ("yellow", "right"),
    ("red", "up"),
    ("blue", "down"),
    ("green", "left"),
]


def square_clip(colour: str, motion: str, frames: int = 24, size: int = 72) -> np.ndarray:
    """A coloured square crossing a black frame, with a faint grey grid: uint8 (T, H, W, 3)."""
    video = np.zeros((frames, size, size, 3), np.uint8)
    video[:, ::12, :] = video[:, :, ::12] = 40
    for t in range(frames):
        y, x = ((size // 2 - 8 + d * (t - frames // 2)) % (size - 16) for d in MOTIONS[motion])
        video[t, y : y + 16, x : x + 16] = COLOURS[colour]
    return video


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Eight H.264 clips (3 s at 8 fps) with sidecar captions."""
    folder = tmp_path_factory.mktemp("videos")
    for i, (colour, motion) in enumerate(CLIPS):
        write_video(square_clip(colour, motion), folder / f"{i}.mp4", fps=8)
        (folder / f"{i}.txt").write_text(f"a {colour} square moving {motion}")
    return folder


def prepared(videos, out: Path, frames: int, size: int) -> Path:
    options = f"--frames {frames} --size {size} --workers 1".split()
    assert main(["data", "prepare", "--videos", str(videos), "--out", str(out), *options]) == 0
    return out


@pytest.fixture(scope="module")
def shards(videos, tmp_path_factory):
    """8 frames of 32x32: a quarter of the pixels of the default clip, for fast tests."""
    return prepared(videos, tmp_path_factory.mktemp("shards"), 8, 32)


@pytest.fixture(scope="module")
def shards64(videos, tmp_path_factory):
    """16 frames of 64x64, the size of the Moving Shapes clips the tiny model was built for."""
    return prepared(videos, tmp_path_factory.mktemp("shards64"), 16, 64)


def recipe(run_dir: Path, source: Path, **stage) -> Path:
    """A tiny recipe for clips of 8x32x32 (TINY_TRAIN sizes), written beside run_dir."""
    data = copy.deepcopy(TINY_TRAIN)
    data["autoencoder"] |= {"frames": 8, "size": 32}
    data["data"] |= {"source": str(source)}
    stage = {
        "steps": 2,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup": 1,
        "log_every": 1,
        "checkpoint_every": 1,
        "sample_every": 1000,
        **stage,
    }
    data |= {
        "run_dir": str(run_dir),
        "seed": 0,
        "precision": "fp32",
        "device": "cpu",
        "stages": {"autoencoder": stage, "generator": dict(stage)},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def train_cli(path: Path, stage: str, *extra: str) -> int:
    return main(["train", stage, "--config", str(path), "--no-progress", *extra])


def logged(run_dir: Path, stage: str = "generator") -> dict[int, tuple[float, float]]:
    """Step -> (loss, lr) from the run's log.jsonl."""
    lines = (run_dir / stage / "log.jsonl").read_text().splitlines()
    return {r["step"]: (r["loss"], r["lr"]) for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def autoencoder_run(shards, tmp_path_factory):
    """Two autoencoder steps on the shards, through `t2v train autoencoder`."""
    run = tmp_path_factory.mktemp("ae") / "run"
    assert train_cli(recipe(run, shards), "autoencoder") == 0
    return run


def with_autoencoder(run: Path, autoencoder_run: Path) -> Path:
    """A run directory holding the trained autoencoder that the generator stage needs."""
    shutil.copytree(autoencoder_run / "autoencoder" / "final", run / "autoencoder" / "final")
    return run


def all_finite(folder: Path) -> bool:
    return all(
        torch.isfinite(t).all()
        for f in folder.glob("*.safetensors")
        for t in load_file(str(f)).values()
        if t.is_floating_point()
    )


# --- the two stages --------------------------------------------------------------------------


def test_autoencoder_stage_writes_weights_with_latent_stats_of_its_data(autoencoder_run, shards):
    out = autoencoder_run / "autoencoder"
    ae = VideoAutoencoder(cfg.load_json(AutoencoderConfig, out / "final" / "config.json"))
    ae.load_state_dict(load_file(str(out / "final" / "model.safetensors")))
    # The stored scale and shift make the latents of the training clips standard.
    clips, _ = open_source(str(shards), held_out=TrainConfig().data.held_out).batch(0, 256)
    with torch.no_grad():
        z = ae.encode(to_model_tensor(clips))
    assert z.shape == (256, 4, 2, 4, 4)
    assert abs(z.mean().item()) < 1e-3 and abs(z.std().item() - 1) < 1e-2
    assert sorted(logged(autoencoder_run, "autoencoder")) == [1, 2]
    resolved = cfg.load_json(TrainConfig, out / "config.json")  # the run's full config
    assert resolved.autoencoder.size == 32 and resolved.stages["autoencoder"].steps == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["psnr_db_eval"])
    assert read_video(out / "samples" / "step-0000002.gif", num_frames=8, size=(64, 128)).any()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("split", ["false", "true"])
def test_generator_stage_writes_a_model_folder_that_generates(
    tmp_path, shards, autoencoder_run, split
):
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    settings = ["--set", f"text_encoder.split_objects={split}"]
    assert train_cli(recipe(run, shards, steps=1), "generator", *settings) == 0
    pipe = TextToVideoPipeline.from_pretrained(run / "model", device="cpu")
    assert pipe.text_encoder.config.split_objects == (split == "true")
    assert pipe.generator.config.text_slots == (4 if split == "true" else 0)
    # Shards have free-text captions: no vocabulary for the prompt rewriter to map onto.
    assert not (run / "model" / "vocabulary.json").exists()
    trained_ae = load_file(str(autoencoder_run / "autoencoder" / "final" / "model.safetensors"))
    assert all(torch.equal(v, trained_ae[k]) for k, v in pipe.autoencoder.state_dict().items())
    clip = pipe(PROMPT, seed=1, steps=2).frames
    assert clip.shape == (8, 32, 32, 3)
    assert sorted(logged(run)) == [1]


def test_generator_stage_without_an_autoencoder_says_what_to_run(tmp_path, shards, capsys):
    assert train_cli(recipe(tmp_path / "run", shards), "generator") == 2
    err = capsys.readouterr().err
    assert "needs a trained autoencoder" in err and "t2v train autoencoder" in err


def test_autoencoder_loss_falls_on_a_small_fixed_set(tmp_path, shards):
    config = cfg.load(
        TrainConfig, recipe(tmp_path / "run", shards, steps=40, batch_size=8, lr=3e-3)
    )
    trainer = Trainer(config, "autoencoder", progress=False)  # 8 clips: every batch is the set
    losses = [trainer.train_step() for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


# --- resume, checkpoints, torchrun -----------------------------------------------------------


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory, shards, autoencoder_run):
    """Six uninterrupted generator steps, checkpointing every step and keeping two."""
    run = with_autoencoder(tmp_path_factory.mktemp("gen") / "run", autoencoder_run)
    assert train_cli(recipe(run, shards, steps=6, keep_checkpoints=2), "generator") == 0
    return run


def test_a_resumed_run_repeats_the_uninterrupted_run_exactly(
    tmp_path, monkeypatch, shards, autoencoder_run, generator_run
):
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    path = recipe(run, shards, steps=6, keep_checkpoints=2)
    kill_after_checkpoint(monkeypatch, 3)
    assert train_cli(path, "generator") == 130
    monkeypatch.undo()
    assert sorted(logged(run)) == [1, 2, 3] and not (run / "model").exists()
    assert train_cli(path, "generator", "--resume") == 0
    expected = logged(generator_run)
    assert len({loss for loss, _ in expected.values()}) == 6  # every step's loss differs
    assert logged(run) == expected  # exact float equality, steps 4-6 after the resume
    for part in ("generator", "text_encoder"):
        assert (run / "model" / part / "model.safetensors").read_bytes() == (
            generator_run / "model" / part / "model.safetensors"
        ).read_bytes()


def test_checkpoints_keep_the_last_few_complete_and_in_safetensors(generator_run):
    out = generator_run / "generator"
    assert sorted(p.name for p in out.glob("*ckpt*")) == ["ckpt-0000005", "ckpt-0000006"]
    ckpt = out / "ckpt-0000006"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "ema.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 6 and state["nonfinite_total"] == 0
    model, ema = (
        load_file(str(ckpt / "model.safetensors")),
        load_file(str(ckpt / "ema.safetensors")),
    )
    assert model.keys() == ema.keys() and any(not torch.equal(model[k], ema[k]) for k in model)
    assert any(k.endswith("exp_avg_sq") for k in load_file(str(ckpt / "optimizer.safetensors")))
    assert "torch_cpu" in load_file(str(ckpt / "rng.safetensors"))


def test_export_writes_any_kept_checkpoint_as_a_model_folder(generator_run, tmp_path, capsys):
    out = generator_run / "generator"
    # The latest checkpoint is the EMA the stage itself wrote to RUN_DIR/model at its end.
    assert main(["export", str(generator_run), "-o", str(tmp_path / "latest")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "latest")
    for part in ("generator", "text_encoder"):
        assert (tmp_path / "latest" / part / "model.safetensors").read_bytes() == (
            generator_run / "model" / part / "model.safetensors"
        ).read_bytes()
    assert main(["export", str(generator_run), "--step", "5", "-o", str(tmp_path / "s5")]) == 0
    ema = load_file(str(out / "ckpt-0000005" / "ema.safetensors"))
    pipe = TextToVideoPipeline.from_pretrained(tmp_path / "s5", device="cpu")
    weights = pipe.generator.state_dict()
    assert all(torch.equal(weights[k], ema[f"generator.{k}"]) for k in weights)
    assert pipe(PROMPT, seed=0, steps=2).frames.shape == (8, 32, 32, 3)
    assert main(["export", str(generator_run), "--step", "2", "-o", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err
    assert err == f"t2v: error: No checkpoint of step 2 in {out}; it has: 5, 6.\n"
    assert not (tmp_path / "s2").exists()
    # -o replaces only what t2v wrote: an earlier export, never a file or a foreign folder.
    assert main(["export", str(generator_run), "--step", "6", "-o", str(tmp_path / "s5")]) == 0
    assert TextToVideoPipeline.from_pretrained(tmp_path / "s5", device="cpu")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "model.txt").write_text("mine")
    for name in ("mine", "model.txt"):
        assert main(["export", str(generator_run), "-o", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "model.txt").read_text() == "mine"


def test_a_crash_while_checkpointing_leaves_the_previous_checkpoint_to_resume_from(
    tmp_path, monkeypatch, shards, autoencoder_run
):
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    path = recipe(run, shards, steps=4)
    save_tensors = train_module.cfg.save_tensors

    def disk_full_at_step_3(tensors, path):
        if "ckpt-0000003" in str(path) and str(path).endswith("ema.safetensors"):
            raise OSError("No space left on device")
        save_tensors(tensors, path)

    monkeypatch.setattr(train_module.cfg, "save_tensors", disk_full_at_step_3)
    with pytest.raises(OSError):
        train_cli(path, "generator")
    monkeypatch.undo()
    out = run / "generator"
    assert Checkpointer(out, 3).latest().name == "ckpt-0000002"
    assert train_cli(path, "generator", "--resume") == 0
    assert sorted(p.name for p in out.glob("*ckpt*")) == [
        "ckpt-0000002",
        "ckpt-0000003",
        "ckpt-0000004",
    ]  # the half-written folder is gone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_with_two_processes_keeps_ranks_identical_on_different_data(
    tmp_path, shards, autoencoder_run
):
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    path = recipe(run, shards, steps=3, batch_size=2)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        str(Path(__file__).with_name("ddp_worker.py")),
        str(path),
        str(tmp_path),
    ]
    done = subprocess.run(
        command,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["params"] == r1["params"] != r0["initial"] == r1["initial"]
    assert r0["ema"] == r1["ema"]
    assert len(r0["seen"]) == len(r1["seen"]) == 3
    for mine, theirs in zip(r0["seen"], r1["seen"], strict=True):
        assert len(mine) == len(theirs) == 2 and not set(mine) & set(theirs)
    assert sorted(logged(run)) == [1, 2, 3]  # one log line per step: only rank 0 writes
    assert TextToVideoPipeline.from_pretrained(run / "model", device="cpu")


# --- config errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "stages.generator.lrr=1",
            "Unknown config key 'stages.generator.lrr'; did you mean 'stages.generator.lr'?",
        ),
        (
            "generator.widht=16",
            "Unknown config key 'generator.widht'; did you mean 'generator.width'?",
        ),
        ("seed=abc", "seed must be an integer, not 'abc'."),
        ("data.two_object_share=1.5", "data.two_object_share must be between 0 and 1, not 1.5."),
        ("data.held_out=1", "data.held_out must be above 0 and below 1, not 1.0."),
        ("precision=fp16", "precision is 'fp16', but it must be one of 'fp32', 'bf16'."),
        (
            "generator.text_attention=joint",
            "'generator.text_attention' is 'joint', but this version of t2v no longer has that "
            "setting and only loads 'cross'.",
        ),
        ("generator.attention_loss=-1", "generator.attention_loss must be 0 or more."),
    ],
)
def test_a_config_mistake_is_named_in_one_sentence(tmp_path, capsys, shards, override, message):
    run = tmp_path / "run"
    assert train_cli(recipe(run, shards), "generator", "--set", override) == 2
    err = capsys.readouterr().err
    assert err == f"t2v: error: {message}\n"
    assert not run.exists()


# Overrides for a tiny generator on the Moving Shapes stream (which gives object boxes).
TINY_STREAM = ["generator.width=16", "generator.depth=1", "generator.heads=2", "device=cpu"]
TINY_STREAM += ["text_encoder.kind=transformer", "text_encoder.width=16", "text_encoder.heads=2"]


def test_the_attention_loss_runs_only_where_the_source_gives_object_boxes_and_says_so(
    tmp_path, capsys, shards, autoencoder_run
):
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    extra = ["--set", "text_encoder.split_objects=true", "--set", "generator.attention_loss=1"]
    assert train_cli(recipe(run, shards, steps=1), "generator", *extra) == 0
    out = capsys.readouterr().out
    assert "generator: attention loss off: the data source does not say where its objects" in out
    assert "attention" not in (run / "generator" / "log.jsonl").read_text()
    config = cfg.load(TrainConfig, None, TINY_STREAM)
    trainer = Trainer(replace(config, run_dir=str(run)), "generator", progress=False)
    assert trainer.wants_boxes  # Moving Shapes knows where its objects are
    assert "generator: attention loss on, weight 0.1" in capsys.readouterr().out


def test_a_layout_is_off_where_the_source_gives_no_boxes_or_prompts_are_whole_and_says_so(
    tmp_path, capsys, shards, autoencoder_run
):
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    extra = ["--set", "text_encoder.split_objects=true", "--set", "generator.layout=true"]
    assert train_cli(recipe(run, shards, steps=1), "generator", *extra) == 0
    out = capsys.readouterr().out
    assert "generator: layout off: the data source does not say where its objects are" in out
    assert not TextToVideoPipeline.from_pretrained(run / "model").generator.config.layout
    whole = cfg.load(TrainConfig, None, [*TINY_STREAM, "text_encoder.split_objects=false"])
    trainer = Trainer(replace(whole, run_dir=str(run)), "generator", progress=False)
    assert not trainer.config.generator.layout
    assert "layout off: text_encoder.split_objects is off" in capsys.readouterr().out
    config = cfg.load(TrainConfig, None, TINY_STREAM)
    trainer = Trainer(replace(config, run_dir=str(run)), "generator", progress=False)
    assert trainer.config.generator.layout and trainer.wants_boxes  # Moving Shapes has boxes
    assert "generator: layout on" in capsys.readouterr().out


def test_the_trainer_leaves_the_callers_config_as_it_was(tmp_path, shards, autoencoder_run):
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    config = cfg.load(TrainConfig, recipe(run, shards, steps=1))
    before = copy.deepcopy(config)
    for stage in ("autoencoder", "generator"):
        trainer = Trainer(config, stage, progress=False)
        assert config == before
    # The run's own config holds what was derived: the generator's wiring, the encoder's size.
    assert trainer.config.generator.text_dim == 16 and config.generator.text_dim == 384
    assert trainer.config.autoencoder.fg_weight == 0.0  # clips are not objects on black


def test_a_shard_folder_named_like_the_moving_shapes_source_is_still_shards(
    tmp_path, monkeypatch, shards, autoencoder_run
):
    """A folder called shapes_x once made the tokenizer learn Moving Shapes captions."""
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    shutil.copytree(shards, tmp_path / "shapes_x")
    monkeypatch.chdir(tmp_path)
    assert train_cli(recipe(run, Path("shapes_x"), steps=1), "generator") == 0
    words = json.loads((run / "generator" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "square" in words and not {"circle", "triangle", "cross"} & set(words)


def test_an_unknown_key_in_the_yaml_file_is_named(tmp_path, capsys, shards):
    path = recipe(tmp_path / "run", shards)
    data = yaml.safe_load(path.read_text())
    data["stages"]["autoencoder"]["warmpu"] = 10
    path.write_text(yaml.safe_dump(data))
    assert train_cli(path, "autoencoder") == 2
    assert "Unknown config key 'stages.autoencoder.warmpu'" in capsys.readouterr().err


def test_the_gpu_recipe_is_the_cpu_recipe_at_4x_the_batch_and_a_quarter_of_the_steps():
    root = Path(__file__).parents[1] / "configs"
    cpu = cfg.load(TrainConfig, root / "moving-shapes.yaml")
    gpu = cfg.load(TrainConfig, root / "moving-shapes-gpu.yaml")
    assert gpu.device == "cuda"
    assert replace(gpu, run_dir=cpu.run_dir, device=cpu.device, stages=cpu.stages) == cpu
    for stage in ("autoencoder", "generator", "distill"):
        c, g = cpu.stage(stage), gpu.stage(stage)
        assert (g.batch_size, 4 * g.steps, 4 * g.warmup) == (4 * c.batch_size, c.steps, c.warmup)
        assert g.lr == pytest.approx(2 * c.lr)
        assert g.ema_decay == pytest.approx(c.ema_decay**4, abs=0.002)


def test_a_config_with_a_base_names_only_what_it_changes(tmp_path):
    (tmp_path / "recipe.yaml").write_text(
        "seed: 3\nstages:\n  generator: {steps: 10, lr: 1.0e-3}\n  distill: {steps: 4}\n"
    )
    (tmp_path / "variant.yaml").write_text(
        "base: recipe.yaml\ndevice: cpu\nstages:\n  generator: {lr: 2.0e-3}\n"
    )
    c = cfg.load(TrainConfig, tmp_path / "variant.yaml", ["stages.distill.steps=5"])
    assert (c.seed, c.device, c.stage("generator").steps) == (3, "cpu", 10)
    assert (c.stage("generator").lr, c.stage("distill").steps) == (2e-3, 5)


def test_a_config_that_is_its_own_base_is_named(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(cfg.ConfigError, match="names itself as a base"):
        cfg.load(TrainConfig, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(cfg.ConfigError, match="must be the path of another config file"):
        cfg.load(TrainConfig, tmp_path / "c.yaml")


# --- non-finite steps --------------------------------------------------------------------------


def poison_losses(monkeypatch, bad_calls) -> None:
    """Make the flow-matching loss NaN on the given (1-based) calls, keeping its graph."""
    calls = []
    loss = objectives.flow_loss

    def maybe_nan(*args):
        calls.append(1)
        value = loss(*args)
        return value * math.nan if bad_calls(len(calls)) else value

    monkeypatch.setattr(objectives, "flow_loss", maybe_nan)


def test_a_non_finite_step_is_skipped_without_touching_the_weights(
    tmp_path, monkeypatch, shards, autoencoder_run
):
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    trainer = Trainer(
        cfg.load(TrainConfig, recipe(run, shards, steps=4)), "generator", progress=False
    )
    poison_losses(monkeypatch, lambda call: call == 2)
    assert trainer.train_step() is not None
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema = {k: v.clone() for k, v in trainer.ema.items()}
    assert trainer.train_step() is None
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(v, ema[k]) for k, v in trainer.ema.items())
    assert (trainer.step, trainer.nonfinite_total, trainer.nonfinite_run) == (2, 1, 1)
    assert trainer.train_step() is not None and trainer.nonfinite_run == 0
    trainer.run()
    metrics = json.loads((run / "generator" / "metrics.json").read_text())
    assert metrics["nonfinite_steps"] == 1


def test_too_many_non_finite_steps_in_a_row_stop_the_run(
    tmp_path, monkeypatch, capsys, shards, autoencoder_run
):
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    poison_losses(monkeypatch, lambda call: call >= 3)
    assert train_cli(recipe(run, shards, steps=20, max_nonfinite=3), "generator") == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(
            "t2v: error: 3 steps in a row had a non-finite loss or gradient (last at step 5)"
        )
        and err.count("\n") == 1
    )
    out = run / "generator"
    assert Checkpointer(out, 3).latest().name == "ckpt-0000004"  # the step before the stop
    assert all(all_finite(c) for c in out.glob("ckpt-*"))
    assert not (run / "model").exists()


def test_a_diverging_learning_rate_stops_the_run_without_a_non_finite_checkpoint(
    tmp_path, capsys, shards, autoencoder_run
):
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    assert train_cli(recipe(run, shards, steps=20, lr=1e30, max_nonfinite=3), "generator") == 2
    assert "3 steps in a row had a non-finite loss" in capsys.readouterr().err
    assert all(all_finite(c) for c in (run / "generator").glob("ckpt-*"))


def test_weights_with_a_non_finite_value_are_never_checkpointed(tmp_path, shards, autoencoder_run):
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    trainer = Trainer(cfg.load(TrainConfig, recipe(run, shards)), "generator", progress=False)
    trainer.train_step()
    with torch.no_grad():
        trainer.model.generator.patch_in.weight[0, 0] = math.inf
    with pytest.raises(TrainingError, match="non-finite value, so no checkpoint was written"):
        trainer._save_checkpoint()
    assert not list((run / "generator").glob("*ckpt*"))


# --- init from a trained model -----------------------------------------------------------------


def test_init_from_continues_a_trained_model_on_new_data(tmp_path, shards64, tiny_model_dir):
    run = tmp_path / "run"
    path = recipe(run, shards64)  # no autoencoder stage: every part comes from the model
    assert train_cli(path, "generator", "--init-from", str(tiny_model_dir)) == 0
    before = TextToVideoPipeline.from_pretrained(tiny_model_dir, device="cpu")
    after = TextToVideoPipeline.from_pretrained(run / "model", device="cpu")
    assert all(
        torch.equal(v, before.autoencoder.state_dict()[k])
        for k, v in after.autoencoder.state_dict().items()
    )
    for part in ("text_encoder", "generator"):
        old, new = getattr(before, part).state_dict(), getattr(after, part).state_dict()
        moved = [(new[k] - v).abs().max().item() for k, v in old.items() if v.is_floating_point()]
        assert 0 < max(moved) < 0.01  # two small steps from the trained weights, not afresh
    assert (run / "model" / "tokenizer.json").read_text() == (
        tiny_model_dir / "tokenizer.json"
    ).read_text()


def test_init_from_keeps_a_pretrained_text_encoder_frozen(tmp_path, shards64):
    pipe = build_tiny_pipeline()
    pipe.text_encoder = PretrainedTextEncoder(TextEncoderConfig(kind="pretrained"))
    pipe.generator = LatentGenerator(replace(pipe.generator.config, text_dim=384))
    pipe.save_pretrained(tmp_path / "minilm-model")
    run = tmp_path / "run"
    config = cfg.load(TrainConfig, recipe(run, shards64))
    trainer = Trainer(config, "generator", init_from=str(tmp_path / "minilm-model"), progress=False)
    encoder, generator = trainer.pipeline.text_encoder, trainer.pipeline.generator
    assert isinstance(encoder, PretrainedTextEncoder) and not encoder.frozen.training
    optimised = {id(p) for group in trainer.opt.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in encoder.frozen.parameters()}
    assert not any(k.startswith("text_encoder") for k in trainer.ema)  # nothing to average
    frozen = {k: v.clone() for k, v in encoder.frozen.state_dict().items()}
    initial = {k: v.clone() for k, v in generator.state_dict().items()}
    trainer.run()
    assert all(torch.equal(v, frozen[k]) for k, v in encoder.frozen.state_dict().items())
    assert any(not torch.equal(v, initial[k]) for k, v in generator.state_dict().items())
    saved = TextToVideoPipeline.from_pretrained(run / "model", device="cpu")
    assert saved.text_encoder.config.kind == "pretrained"
    assert not (run / "model" / "text_encoder" / "model.safetensors").exists()


# --- end to end --------------------------------------------------------------------------------


def test_videos_to_shards_to_trained_model_to_mp4(tmp_path, shards, autoencoder_run, capsys):
    """The shards and the autoencoder fixture come from real H.264 files via the CLI."""
    run = with_autoencoder(tmp_path / "run", autoencoder_run)
    assert train_cli(recipe(run, shards, steps=3), "generator") == 0
    out = tmp_path / "clip.mp4"
    capsys.readouterr()
    options = "--steps 4 --seed 3".split()
    assert main(["generate", PROMPT, "--model", str(run / "model"), "-o", str(out), *options]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    written = read_video(out, num_frames=8, size=32).mean(-1).ravel()  # grey (T*H*W,)
    pipe = TextToVideoPipeline.from_pretrained(run / "model", device="cpu")
    same, other = (pipe(PROMPT, seed=seed, steps=4).frames.mean(-1).ravel() for seed in (3, 4))
    # A barely trained model makes noisy clips, which H.264 keeps only roughly.
    assert np.corrcoef(written, same)[0, 1] > 0.8 > np.corrcoef(written, other)[0, 1]


def test_clip_size_mismatch_is_one_sentence(tmp_path):
    """Shards of another size than the autoencoder expects are refused before any step."""
    from t2v.config import from_dict
    from t2v.train import TrainConfig, Trainer, TrainingError

    config = from_dict(
        TrainConfig,
        {
            **{k: v for k, v in TINY_TRAIN.items() if k != "data"},
            "run_dir": str(tmp_path / "run"),
            "device": "cpu",
            "autoencoder": {**TINY_TRAIN["autoencoder"], "frames": 8, "size": 32},
            "stages": {"autoencoder": {"steps": 1, "batch_size": 2}},
        },
    )
    trainer = Trainer(config, "autoencoder", progress=False)
    with pytest.raises(TrainingError, match="expects 8x32x32"):
        trainer.train_step()


# --- the attention loss ----------------------------------------------------------------------


def _square(color, x0, y0, direction="right", size="large"):
    return shapes.ObjectSpec(color, "square", size, direction, x0, y0)


def test_box_coverage_follows_the_rendered_objects():
    specs = [
        shapes.ClipSpec(
            (_square("red", 3.0, 5.0), _square("blue", 40.5, 40.0, "left", "small")), ""
        ),
        shapes.ClipSpec((_square("white", 30.0, 30.0, "still"),), ""),
    ]
    boxes = torch.from_numpy(shapes.object_boxes(specs))
    assert boxes[1, 1].isnan().all()
    coverage = box_coverage(boxes / 64, (4, 4, 4)).flatten(2)  # (B, K, 64)
    clips = torch.from_numpy(shapes.render(specs)).float()  # (B, T, H, W, 3)
    for b, spec in enumerate(specs):
        colours = torch.tensor([shapes.COLORS[o.color] for o in spec.objects]).float()  # (K, 3)
        # Each lit pixel belongs to the object whose colour points its way; its coverage is
        # its brightness over the colour's (anti-aliased edges count by their share).
        nearest = (clips[b] @ colours.T / colours.norm(dim=1)).argmax(-1)  # (T, H, W)
        for k in range(len(spec.objects)):
            channel = int(colours[k].argmax())
            pixels = clips[b][..., channel] / colours[k, channel] * (nearest == k)
            tokens = pixels.view(4, 4, 4, 16, 4, 16).mean((1, 3, 5)).flatten()
            torch.testing.assert_close(coverage[b, k], tokens, atol=0.03, rtol=0)
    assert coverage[1, 1].abs().sum() == 0


def test_the_slot_attention_loss_is_lowest_when_tokens_look_at_their_own_object():
    coverage = torch.tensor([[[1.0, 0.5, 0.0], [0.0, 0.5, 0.0]]])  # (B=1, K=2, N=3)
    slots = torch.tensor([[0, 0, 1, 1]])
    mask = torch.tensor([[True, True, True, False]])

    def loss(own: float, use: bool = True) -> float:
        # Each object-covered token puts `own` of its attention on its object's words.
        a = torch.tensor(
            [[[own / 2, own / 2, 1 - own, 0.0], [0.25, 0.25, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]]]
        )
        return float(
            objectives.slot_attention_loss([a, a], slots, mask, coverage, torch.tensor([use]))
        )

    # Token 0 is all object 0's: -log 0.99; token 1 is split evenly and looks evenly: log 2;
    # token 2 is background and free.
    assert loss(0.99) == pytest.approx((-math.log(0.99) + math.log(2)) / 2, rel=1e-5)
    assert loss(0.99) < loss(0.5) < loss(0.01)
    assert loss(0.01, use=False) == 0.0


def test_the_attention_loss_teaches_tokens_to_attend_to_their_objects_words():
    pipe = build_tiny_pipeline()
    te = build_text_encoder(
        replace(pipe.text_encoder.config, split_objects=True), pipe.text_encoder.tokenizer
    )
    gen = LatentGenerator(
        replace(pipe.generator.config, text_slots=4, attention_loss=1.0, cond_dropout=0.0)
    )
    objective = objectives.GeneratorObjective(gen, te, pipe.autoencoder)
    specs = [shapes.train_spec(0, i, two_object_share=1.0) for i in range(8)]
    clips, captions = shapes.render(specs), [s.caption for s in specs]
    boxes = torch.from_numpy(shapes.object_boxes(specs))
    x = to_model_tensor(clips)
    opt = torch.optim.Adam(objective.parameters(), lr=3e-3)
    history = []
    for step in range(40):
        torch.manual_seed(step % 4)
        loss, parts = objective(x, captions, boxes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(parts["attention"]))
    assert set(parts) == {"flow", "attention"}
    assert np.mean(history[-4:]) < 0.7 * np.mean(history[:4])


def test_the_config_defaults_are_the_shipped_recipe_and_model():
    """A config that names nothing builds the models the recipe trains and the package
    ships: the generator stage's model is the bundled teacher, the distill stage's student
    the bundled default."""
    from t2v.models.generator import GeneratorConfig
    from t2v.pipeline_config import DEFAULT_MODEL_DIR, TEACHER_MODEL_DIR, PipelineConfig

    recipe_config = cfg.load(TrainConfig, Path(__file__).parents[1] / "configs/moving-shapes.yaml")
    defaults = TrainConfig()
    for part in ("autoencoder", "text_encoder", "generator", "pipeline", "distill"):
        assert getattr(recipe_config, part) == getattr(defaults, part), part
    teacher, student = TEACHER_MODEL_DIR, DEFAULT_MODEL_DIR
    gen = GeneratorConfig()
    assert cfg.load_json(GeneratorConfig, teacher / "generator" / "config.json") == gen
    assert cfg.load_json(GeneratorConfig, student / "generator" / "config.json") == replace(
        gen, cond_dropout=0.0, distilled_guidance=defaults.pipeline.guidance
    )
    assert cfg.load_json(PipelineConfig, teacher / "pipeline.json") == replace(
        defaults.pipeline, max_steps=PipelineConfig().max_steps
    )
    assert cfg.load_json(PipelineConfig, student / "pipeline.json") == replace(
        defaults.pipeline,
        steps=defaults.distill.steps,
        max_steps=max(defaults.distill.step_counts),
        sampler="shortcut",
    )
    for shipped in (teacher, student):
        text = cfg.load_json(TextEncoderConfig, shipped / "text_encoder" / "config.json")
        assert text == replace(TextEncoderConfig(), output_dim=384)  # derived when built
        ae = cfg.load_json(AutoencoderConfig, shipped / "autoencoder" / "config.json")
        assert ae == replace(AutoencoderConfig(), scale=ae.scale, shift=ae.shift)  # measured
