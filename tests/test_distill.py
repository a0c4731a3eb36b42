"""The few-step student: a generator that takes its step size and has its teacher's guidance
inside, the shortcut sampler, `t2v train distill`, and the knobs such a model offers through
the CLI, the Python API and REST."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from conftest import (
    TINY_TRAIN,
    build_tiny_layout_pipeline,
    build_tiny_pipeline,
    kill_after_checkpoint,
)
from t2v import config as cfg
from t2v.cli import main
from t2v.flow import time_grid
from t2v.model import GenerationRequest, ModelError, UserError
from t2v.models.generator import LatentGenerator
from t2v.pipeline import TextToVideoPipeline
from t2v.sampling import sample_euler, sample_shortcut
from t2v.serve.app import ServeConfig, create_app
from t2v.train_config import DistillConfig, TrainConfig
from t2v.video import to_model_tensor

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red square moving right", "a small blue circle moving up"]


def student_of(pipe: TextToVideoPipeline) -> TextToVideoPipeline:
    """An untrained student of ``pipe``: its weights, a zero step embedding, 2 steps."""
    gen = LatentGenerator(replace(pipe.generator.config, distilled_guidance=pipe.config.guidance))
    gen.load_state_dict(pipe.generator.state_dict(), strict=False)
    config = replace(pipe.config, steps=2, sampler="shortcut")
    return TextToVideoPipeline(pipe.text_encoder, pipe.autoencoder, gen, config)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    student_of(build_tiny_pipeline()).save_pretrained(path)
    return path


def guided_latents(pipe: TextToVideoPipeline, noise, steps: int) -> torch.Tensor:
    """The teacher's guided Euler path from ``noise`` over ``steps`` steps."""
    g = pipe.config.guidance
    text = pipe.text_encoder(PROMPTS + [""] * len(PROMPTS))

    def velocity(x, t, _):
        v_cond, v_neg = pipe.generator(torch.cat([x, x]), torch.cat([t, t]), text).chunk(2)
        return v_neg + g * (v_cond - v_neg)

    return sample_euler(velocity, noise, time_grid(steps), None)


def student_latents(pipe: TextToVideoPipeline, noise, steps: int) -> torch.Tensor:
    text = pipe.text_encoder(PROMPTS)
    return sample_shortcut(
        lambda x, t, c, d: pipe.generator(x, t, c, step=d), noise, time_grid(steps), text
    )


# --- the network and the sampler -------------------------------------------------------------


def test_a_student_starts_as_its_teacher_and_needs_its_step():
    pipe = build_tiny_pipeline()
    student = student_of(pipe).generator
    x, t = torch.randn(2, *pipe.autoencoder.config.latent_shape), torch.tensor([0.9, 0.3])
    text = pipe.text_encoder(PROMPTS)
    with torch.no_grad():
        want = pipe.generator(x, t, text)
        assert torch.equal(student(x, t, text, step=torch.tensor([0.5, 0.25])), want)
    with pytest.raises(ValueError, match="step size"):
        student(x, t, text)
    with pytest.raises(ValueError, match="step size"):
        pipe.generator(x, t, text, step=t)


def test_the_shortcut_sampler_of_a_step_blind_model_is_euler():
    x = torch.randn(3, 4)

    def velocity(x, t, _):
        return x * t[:, None] - 1

    ts = time_grid(5)
    euler = sample_euler(velocity, x, ts, None)
    seen = []

    def mean_velocity(x, t, _, d):
        seen.append(round(float(d[0]), 6))
        return velocity(x, t, None)

    assert torch.allclose(sample_shortcut(mean_velocity, x, ts, None), euler)
    assert seen == [0.2] * 5


# --- the stage ------------------------------------------------------------------------------


def two_step_objective(teacher: TextToVideoPipeline, student: TextToVideoPipeline):
    """The distillation of a 2-step student from a teacher of 4 steps, all on 2 steps."""
    from t2v.objectives import DistillObjective

    config = DistillConfig(steps=2, step_counts=[1, 2], shares=[0.0, 1.0])
    return DistillObjective(
        student.generator,
        teacher.generator,
        teacher.text_encoder,
        teacher.autoencoder,
        config,
        teacher_steps=4,
    )


def test_the_default_counts_targets_chain_into_the_teachers_own_sampler():
    """Cut into 2 steps of 2 guided Euler steps each, the teacher's path from a noise ends
    where its 4-step sampler does: the student of 2 steps learns exactly what it replaces."""
    teacher = build_tiny_pipeline()
    student = student_of(teacher)
    objective = two_step_objective(teacher, student)
    noise = torch.randn(len(PROMPTS), *teacher.autoencoder.config.latent_shape)
    x, times, target = objective.path_points(noise, PROMPTS, 2)
    assert times.tolist() == [1.0, 1.0, 0.5, 0.5]
    assert torch.equal(x[:2], noise)
    end = noise - 0.5 * target[:2] - 0.5 * target[2:]
    with torch.no_grad():
        assert torch.allclose(end, guided_latents(teacher, noise, 4), atol=1e-5)
    loss, parts = objective(torch.zeros(4, 3, 16, 64, 64), PROMPTS * 2)
    assert set(parts) == {"steps_2"} and loss > 0


def test_a_layout_teachers_paths_and_targets_follow_one_layout():
    """With a layout teacher, a path from noise keeps the layout it was drawn with, as the
    teacher's sampler does, and the student reads the same layout at every step of it."""
    from t2v import shapes
    from t2v.objectives import with_boxes

    teacher = build_tiny_layout_pipeline()
    student = student_of(teacher)
    assert student.generator.config.layout
    objective = two_step_objective(teacher, student)
    boxes = objective.layout(PROMPTS)  # one object each, in the frame
    assert boxes[:, 0].isfinite().all() and boxes[:, 1:].isnan().all()
    noise = torch.randn(len(PROMPTS), *teacher.autoencoder.config.latent_shape)
    x, _, target = objective.path_points(noise, PROMPTS, 2, boxes)
    end = noise - 0.5 * target[:2] - 0.5 * target[2:]
    g, both = teacher.config.guidance, teacher.text_encoder(PROMPTS + [""] * len(PROMPTS))
    both = with_boxes(both, boxes)

    def velocity(x, t, _):
        v_cond, v_neg = teacher.generator(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return v_neg + g * (v_cond - v_neg)

    with torch.no_grad():
        assert torch.allclose(end, sample_euler(velocity, noise, time_grid(4), None), atol=1e-5)
        _, _, unlaid = objective.path_points(noise, PROMPTS, 2)
    assert not torch.allclose(target, unlaid)  # the layout is read
    # On noised training clips, the clips' own boxes lay the batch out.
    specs = [shapes.train_spec(0, i) for i in range(4)]
    clips = to_model_tensor(shapes.render(specs))
    one = DistillConfig(steps=2, step_counts=[1, 2], shares=[1.0, 0.0])
    objective.config = one
    loss, parts = objective(
        clips, [s.caption for s in specs], torch.from_numpy(shapes.object_boxes(specs))
    )
    assert set(parts) == {"steps_1"} and loss > 0


def distill_recipe(tmp_path, teacher, **distill) -> str:
    data = {k: v for k, v in TINY_TRAIN.items() if k != "data"}
    data |= {
        "run_dir": str(tmp_path / "run"),
        "device": "cpu",
        "precision": "fp32",
        "data": {"source": "shapes", "seed": 3},
        "distill": {
            "teacher": str(teacher),
            "steps": 2,
            "step_counts": [1, 2, 4],
            "shares": [0.2, 0.5, 0.3],
            **distill,
        },
        "stages": {
            "distill": {
                "steps": 40,
                "batch_size": 8,
                "lr": 3e-3,
                "warmup": 2,
                "ema_decay": 0.0,
                "log_every": 1,
                "checkpoint_every": 40,
                "sample_every": 1000,
            }
        },
    }
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_distill_stage_brings_a_two_step_student_to_its_teachers_four_steps(
    tmp_path, tiny_model_dir
):
    teacher = TextToVideoPipeline.from_pretrained(tiny_model_dir, device="cpu")
    assert teacher.config.steps == 4  # the tiny teacher samples 4 guided steps
    path = distill_recipe(tmp_path, tiny_model_dir)
    assert main(["train", "distill", "--config", path, "--no-progress"]) == 0
    folder = tmp_path / "run" / "student"
    student = TextToVideoPipeline.from_pretrained(folder, device="cpu")
    assert student.config.sampler == "shortcut" and student.config.steps == 2
    assert student.knobs.steps.hi == 4  # its largest trained count
    with pytest.raises(UserError, match="steps must be a whole number from 1 to 4, not 5"):
        student.resolve(GenerationRequest(PROMPTS[0], steps=5))
    assert student.generator.config.distilled_guidance == teacher.config.guidance
    assert (folder / "tokenizer.json").read_text() == (
        tiny_model_dir / "tokenizer.json"
    ).read_text()

    noise = torch.randn(
        len(PROMPTS),
        *teacher.autoencoder.config.latent_shape,
        generator=torch.Generator().manual_seed(7),
    )
    with torch.no_grad():
        target = guided_latents(teacher, noise, 4)
        before = student_latents(student_of(teacher), noise, 2)
        after = student_latents(student, noise, 2)
    gap_before = (before - target).square().mean().item()
    gap_after = (after - target).square().mean().item()
    assert gap_after < 0.5 * gap_before, (gap_before, gap_after)

    lines = [json.loads(line) for line in (tmp_path / "run" / "distill" / "log.jsonl").open()]
    logged = {k for line in lines for k in line if k.startswith("steps_")}
    assert logged == {"steps_1", "steps_2", "steps_4"}  # each count trained, each logged
    resolved = cfg.load_json(TrainConfig, tmp_path / "run" / "distill" / "config.json")
    assert resolved.generator.distilled_guidance == teacher.config.guidance
    # `t2v export --stage distill` writes any kept checkpoint as the same kind of folder.
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), "--stage", "distill", "-o", str(out)]) == 0
    exported = TextToVideoPipeline.from_pretrained(out, device="cpu")
    assert exported.config == student.config
    weights = student.generator.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in exported.generator.state_dict().items())


def test_a_resumed_distillation_repeats_the_uninterrupted_one_exactly(
    tmp_path, tiny_model_dir, monkeypatch
):

    def run(name: str, *extra: str) -> int:
        path = distill_recipe(tmp_path / name, tiny_model_dir)
        settings = ["--set", "stages.distill.steps=6", "--set", "stages.distill.checkpoint_every=1"]
        return main(["train", "distill", "--config", path, "--no-progress", *settings, *extra])

    def losses(name: str) -> dict[int, float]:
        log = tmp_path / name / "run" / "distill" / "log.jsonl"
        return {r["step"]: r["loss"] for r in map(json.loads, log.open())}

    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    assert run("whole") == 0
    kill_after_checkpoint(monkeypatch, 3)
    assert run("cut") == 130
    monkeypatch.undo()
    assert sorted(losses("cut")) == [1, 2, 3]
    assert run("cut", "--resume") == 0
    assert len(set(losses("whole").values())) == 6  # every step's loss differs
    assert losses("cut") == losses("whole")  # exact float equality, steps 4-6 after the resume
    weights = "run/student/generator/model.safetensors"
    assert (tmp_path / "cut" / weights).read_bytes() == (tmp_path / "whole" / weights).read_bytes()


def test_distilling_a_student_or_nothing_is_one_sentence(tmp_path, student_dir, capsys):
    assert main(["train", "distill", "--config", distill_recipe(tmp_path, student_dir)]) == 2
    assert "already a distilled model" in capsys.readouterr().err
    assert main(["train", "distill", "--config", distill_recipe(tmp_path, tmp_path / "none")]) == 2
    assert "No teacher model at" in capsys.readouterr().err
    # Fine-tuning a student as a velocity model would train its step embedding into noise.
    recipe = distill_recipe(tmp_path, student_dir)
    assert main(["train", "generator", "--config", recipe, "--init-from", str(student_dir)]) == 2
    err = capsys.readouterr().err
    assert "is a distilled few-step model; fine-tune the model it was distilled from" in err


@pytest.mark.parametrize(
    ("distill", "says"),
    [
        ({"step_counts": [1, 2, 4], "shares": [1.0, 1.0]}, "pair up"),
        ({"steps": 3}, "must include distill.steps"),
        ({"step_counts": [1, 4], "shares": [1.0, 1.0], "steps": 4}, "two steps of 2"),
    ],
)
def test_a_distill_config_mistake_is_named(distill, says):
    with pytest.raises(cfg.ConfigError, match=says):
        cfg.from_dict(TrainConfig, {"distill": {**vars(DistillConfig()), **distill}})


# --- the knobs of a distilled model -----------------------------------------------------------


def test_a_students_knobs_fix_its_guidance_and_take_no_negative_prompt(student_dir):
    from t2v.backends import read_knobs

    pipe = TextToVideoPipeline.from_pretrained(student_dir, device="cpu")
    knobs = read_knobs(student_dir)
    assert knobs == pipe.knobs
    assert knobs.steps.default == 2 and not knobs.negative_prompt
    assert (knobs.guidance.default, knobs.guidance.lo, knobs.guidance.hi) == (2.0, 2.0, 2.0)
    (video,) = pipe.generate([GenerationRequest(PROMPTS[0], seed=1)])
    assert video.frames.shape == (16, 64, 64, 3)
    with pytest.raises(UserError, match="guidance is fixed at 2, not 3"):
        pipe.resolve(GenerationRequest(PROMPTS[0], guidance=3.0))
    with pytest.raises(UserError, match="no negative prompt"):
        pipe.resolve(GenerationRequest(PROMPTS[0], negative_prompt="green"))
    with pytest.raises(UserError, match="no negative prompt"):
        pipe.sample(PROMPTS[:1], [0], negative_prompts=["green"])
    # An invisible or blank negative prompt is no negative prompt, as for every model.
    assert (
        pipe.resolve(GenerationRequest(PROMPTS[0], negative_prompt=" \u200b")).negative_prompt == ""
    )


def test_the_cli_says_what_a_student_cannot_do_in_one_sentence(student_dir, tmp_path, capsys):
    out = tmp_path / "a.mp4"
    base = ["generate", PROMPTS[0], "--model", str(student_dir), "-o", str(out)]
    assert main([*base, "--guidance", "3"]) == 2
    assert "fixed at 2" in capsys.readouterr().err and not out.exists()
    assert main([*base, "--negative-prompt", "green"]) == 2
    assert "no negative prompt" in capsys.readouterr().err and not out.exists()
    assert main(base) == 0 and out.stat().st_size > 0


def test_rest_gives_422s_and_lists_the_fixed_guidance(student_dir, tmp_path):
    pipe = TextToVideoPipeline.from_pretrained(student_dir, device="cpu")
    app = create_app(ServeConfig(data_dir=tmp_path / "data"), pipe)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        (model,) = client.get("/v1/models").json()["data"]
        assert model["knobs"]["guidance"] == {"default": 2.0, "min": 2.0, "max": 2.0}
        assert model["knobs"]["negative_prompt"] is False
        for body, says in [
            ({"guidance": 3}, "fixed at 2"),
            ({"negative_prompt": "green"}, "no negative prompt"),
        ]:
            r = client.post("/v1/videos", json={"prompt": PROMPTS[0], **body})
            assert r.status_code == 422 and says in r.json()["error"]["message"], r.text


def test_a_pipeline_json_that_does_not_match_its_generator_is_refused(student_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(student_dir, broken)
    config = json.loads((broken / "pipeline.json").read_text())
    (broken / "pipeline.json").write_text(json.dumps({**config, "sampler": "euler"}))
    with pytest.raises(ModelError, match='must be "shortcut" for a distilled generator'):
        TextToVideoPipeline.from_pretrained(broken, device="cpu")
    (broken / "pipeline.json").write_text(json.dumps({**config, "guidance": 5.0}))
    with pytest.raises(ModelError, match="differs from the 2 its distilled generator learned"):
        TextToVideoPipeline.from_pretrained(broken, device="cpu")
