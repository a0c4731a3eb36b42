"""Layout first: box coverage, placement, the layout head and a generator that reads layouts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_layout_pipeline, kill_after_checkpoint
from t2v import config as cfg
from t2v import objectives, shapes
from t2v.models.generator import LatentGenerator
from t2v.models.layout import (
    GAP,
    box_coverage,
    clause_vectors,
    motion_of,
    place,
    predict_layout,
)
from t2v.pipeline import TextToVideoPipeline
from t2v.train import TrainConfig, train
from t2v.train_stages import add_layout
from t2v.video import to_model_tensor

pytestmark = pytest.mark.usefixtures("one_thread")


def test_box_coverage_is_each_cells_covered_share_averaged_over_its_frames():
    boxes = torch.full((1, 2, 4, 4), float("nan"))
    boxes[0, 0, :2] = torch.tensor([0.0, 0.0, 0.5, 0.25])  # frames 0-1: top-left 2x1 cells
    boxes[0, 0, 2:] = torch.tensor([0.5, 0.5, 0.75, 0.875])  # frames 2-3: partly covered cells
    cover = box_coverage(boxes, (2, 4, 4))  # (1, 2, 2, 4, 4)
    first = torch.zeros(4, 4)
    first[0, :2] = 1.0
    torch.testing.assert_close(cover[0, 0, 0], first)
    second = torch.zeros(4, 4)
    second[2, 2], second[3, 2] = 1.0, 0.5
    torch.testing.assert_close(cover[0, 0, 1], second)
    assert cover[0, 1].sum() == 0  # NaN: no object
    with pytest.raises(ValueError, match="3 frames do not divide"):
        box_coverage(boxes[:, :, :3], (2, 4, 4))


def test_placed_boxes_stay_in_the_frame_travel_as_asked_and_keep_apart():
    """Every two-object motion the renderer draws can be placed as it does: in the frame and
    apart, with the asked size and constant-speed travel."""
    specs = [shapes.train_spec(5, i, two_object_share=1.0) for i in range(200)]
    motions = motion_of(torch.from_numpy(shapes.object_boxes(specs)) / 64).numpy()
    for i, motion in enumerate(motions):
        tracks = place(motion, 16, np.random.default_rng(i))  # (2, 16, 4)
        assert tracks.shape == (2, 16, 4)
        assert (tracks >= -1e-6).all() and (tracks <= 1 + 1e-6).all()
        sides = np.broadcast_to(motion[:, :1], (2, 16))
        np.testing.assert_allclose(tracks[:, :, 2] - tracks[:, :, 0], sides, atol=1e-6)
        steps = np.diff(tracks[:, :, :2], axis=1)  # constant speed
        np.testing.assert_allclose(steps, steps[:, :1].repeat(15, 1), atol=1e-6)
        np.testing.assert_allclose(motion_of(torch.from_numpy(tracks)[None])[0], motion, atol=1e-5)
        gx = np.maximum(tracks[1, :, 0] - tracks[0, :, 2], tracks[0, :, 0] - tracks[1, :, 2])
        gy = np.maximum(tracks[1, :, 1] - tracks[0, :, 3], tracks[0, :, 1] - tracks[1, :, 3])
        assert np.maximum(gx, gy).min() >= GAP  # some axis separates them in every frame
        np.testing.assert_array_equal(tracks, place(motion, 16, np.random.default_rng(i)))


def test_an_impossible_motion_is_clipped_to_one_that_fits_the_frame():
    tracks = place(np.array([[1.5, 2.0, -0.3]]), 8, np.random.default_rng(0))
    assert (tracks >= -1e-9).all() and (tracks <= 1 + 1e-9).all()
    assert tracks[0, 0, 2] - tracks[0, 0, 0] == pytest.approx(0.9)


def test_each_clause_gets_its_own_vector_and_layout():
    pipe = build_tiny_layout_pipeline()
    text = pipe.text_encoder(["a red circle moving left and a blue square moving up", "a cross"])
    vectors, present = clause_vectors(text, 4)
    assert present.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert not torch.equal(vectors[0, 0], vectors[0, 1])
    # The one-clause prompt's vector is the one it gets alone.
    alone, _ = clause_vectors(pipe.text_encoder(["a cross"]), 4)
    torch.testing.assert_close(vectors[1, 0], alone[0, 0])
    boxes = predict_layout(pipe.generator.layout_head, text, 4, [7], 16)  # one seed: row 0
    assert boxes.shape == (2, 4, 16, 4)
    assert boxes[0, :2].isfinite().all() and boxes[0, 2:].isnan().all()
    assert boxes[1].isnan().all()  # no seed: as a guidance batch's unconditional half


def test_a_generator_given_a_layout_starts_as_the_one_it_came_from():
    gen = build_tiny_layout_pipeline().generator
    plain = LatentGenerator(replace(gen.config, layout=False))
    plain.load_state_dict({k: v for k, v in gen.state_dict().items() if "layout" not in k})
    added = add_layout(plain, 0.1)
    assert added.config.layout
    pipe = build_tiny_layout_pipeline()
    text = pipe.text_encoder(["a red circle moving left and a blue square moving up"])
    boxes = predict_layout(added.layout_head, text, 4, [0], 16)
    x, t = torch.randn(1, *pipe.autoencoder.config.latent_shape), torch.tensor([0.5])
    with torch.no_grad():
        want = plain(x, t, text)
        torch.testing.assert_close(added(x, t, text._replace(boxes=boxes)), want)
        # The nudged generator of build_tiny_layout_pipeline() does read the layout.
        assert not torch.allclose(gen(x, t, text._replace(boxes=boxes)), gen(x, t, text))


def test_a_layout_pipeline_saves_loads_and_samples_the_same_clip_for_the_same_seed(tmp_path):
    pipe = build_tiny_layout_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    loaded = TextToVideoPipeline.from_pretrained(tmp_path / "m", device="cpu")
    assert loaded.generator.config.layout
    prompt = "a red circle moving left and a blue square moving up"
    a = pipe.sample([prompt], [3])
    np.testing.assert_array_equal(loaded.sample([prompt], [3]), a)
    assert not np.array_equal(loaded.sample([prompt], [4]), a)


def test_the_layout_head_learns_size_and_travel_from_the_captions():
    pipe = build_tiny_layout_pipeline()
    gen = LatentGenerator(replace(pipe.generator.config, cond_dropout=0.0, attention_loss=0.0))
    objective = objectives.GeneratorObjective(gen, pipe.text_encoder, pipe.autoencoder)
    specs = [shapes.train_spec(0, i, two_object_share=0.5) for i in range(16)]
    x = to_model_tensor(shapes.render(specs))
    boxes = torch.from_numpy(shapes.object_boxes(specs))
    opt = torch.optim.Adam(objective.parameters(), lr=3e-3)
    history = []
    for step in range(60):
        torch.manual_seed(step)
        loss, parts = objective(x, [s.caption for s in specs], boxes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(parts["layout"]))
    assert set(parts) == {"flow", "layout"}
    assert np.mean(history[-5:]) < 0.3 * np.mean(history[:5])


def test_the_generator_stage_adds_a_layout_to_a_trained_model_and_trains_it(tmp_path):
    pipe = build_tiny_layout_pipeline()
    plain = LatentGenerator(replace(pipe.generator.config, layout=False))
    plain.load_state_dict({k: v for k, v in pipe.generator.state_dict().items() if "lay" not in k})
    folder = TextToVideoPipeline(pipe.text_encoder, pipe.autoencoder, plain, pipe.config)
    folder.save_pretrained(tmp_path / "plain")
    stage = "stages.generator."
    overrides = [f"{stage}{k}" for k in ("steps=2", "batch_size=4", "warmup=1", "log_every=1")]
    overrides += ["generator.layout=true", "device=cpu", "precision=fp32"]
    overrides += [f"run_dir={tmp_path / 'run'}", f"{stage}sample_every=1000"]
    config = cfg.load(TrainConfig, None, overrides)
    out = train("generator", config, init_from=str(tmp_path / "plain"), progress=False)
    lines = (tmp_path / "run" / "generator" / "log.jsonl").read_text().splitlines()
    assert all(json.loads(line)["layout"] >= 0 for line in lines) and len(lines) == 2
    trained = TextToVideoPipeline.from_pretrained(out, device="cpu")
    assert trained.generator.config.layout
    moved = trained.generator.layout_in.weight.abs().max()
    assert 0 < moved < 0.01  # two small steps from zero
    clip = trained.sample(["a red circle moving left and a blue square moving up"], [0])
    assert clip.shape == (1, 16, 64, 64, 3)


def test_a_resumed_layout_run_repeats_the_uninterrupted_run_exactly(tmp_path, monkeypatch):
    """The layout draws (which captions lose their layout) come from each step's seed, so a
    run killed after step 2 and resumed ends with the same weights as one never stopped."""
    pipe = build_tiny_layout_pipeline()
    pipe.save_pretrained(tmp_path / "start")
    stage = "stages.generator."
    overrides = [f"{stage}{k}" for k in ("steps=4", "batch_size=4", "warmup=1", "log_every=1")]
    overrides += ["generator.layout_dropout=0.5", "device=cpu", "precision=fp32"]
    overrides += [f"{stage}sample_every=1000", f"{stage}checkpoint_every=1"]

    def run(name: str, **kw) -> Path:
        config = cfg.load(TrainConfig, None, [*overrides, f"run_dir={tmp_path / name}"])
        return train("generator", config, init_from=str(tmp_path / "start"), progress=False, **kw)

    whole = run("whole")
    kill_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.undo()
    resumed = run("resumed", resume=True)
    losses = [
        [json.loads(line)["layout"] for line in (p.parent / "generator" / "log.jsonl").open()]
        for p in (whole, resumed)
    ]
    assert losses[0] == losses[1] and len(set(losses[0])) == 4
    weights = "generator/model.safetensors"
    assert (whole / weights).read_bytes() == (resumed / weights).read_bytes()


def test_a_model_that_reads_whole_prompts_trains_on_without_a_layout(
    tmp_path, tiny_model_dir, capsys
):
    overrides = ["generator.layout=true", "device=cpu", f"run_dir={tmp_path / 'run'}"]
    overrides += ["stages.generator.steps=1", "stages.generator.batch_size=2"]
    config = cfg.load(TrainConfig, None, overrides)
    out = train("generator", config, init_from=str(tiny_model_dir), progress=False)
    assert "layout off: " in capsys.readouterr().out
    assert not TextToVideoPipeline.from_pretrained(out).generator.config.layout


def test_a_saved_config_without_a_later_setting_loads_as_the_code_did_before_it(tmp_path):
    """A model folder saved before layouts existed has no "layout" in its generator config:
    it loads without one, whatever the default; a config file that leaves it out gets the
    default."""
    from t2v.models.generator import GeneratorConfig

    saved = cfg.to_dict(GeneratorConfig())
    del saved["layout"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert not cfg.load_json(GeneratorConfig, tmp_path / "config.json").layout
    assert cfg.from_dict(GeneratorConfig, saved).layout == GeneratorConfig().layout
