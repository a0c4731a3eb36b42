"""What each stage trains, built from the run's config and its data source.

Each builder returns the components and the run's resolved config: the caller's config with
what was decided here (a model folder's components for --init-from, the derived wiring,
the source's black-background weighting), made with ``dataclasses.replace``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from t2v.checkpoints import TrainingError, trained_autoencoder
from t2v.models.autoencoder import VideoAutoencoder
from t2v.models.build import build_pipeline
from t2v.models.generator import LatentGenerator
from t2v.pipeline import TextToVideoPipeline
from t2v.pipeline_config import model_folder
from t2v.sources import ClipSource
from t2v.text import Tokenizer
from t2v.train_config import TrainConfig


def build_autoencoder(
    config: TrainConfig, source: ClipSource, init_from: str | None, say: Callable[[str], None]
) -> tuple[VideoAutoencoder, TrainConfig]:
    """A fresh autoencoder, or the one of a model folder; its loss weights the non-black
    pixels more only when the source's clips are objects on black."""
    if init_from:
        ae = TextToVideoPipeline.from_pretrained(init_from, device="cpu").autoencoder
    else:
        ae = VideoAutoencoder(config.autoencoder)
    if not source.black_background and ae.config.fg_weight:
        say("the clips are not objects on black, so every pixel weighs the same")
        ae.config = replace(ae.config, fg_weight=0.0)
    return ae, replace(config, autoencoder=ae.config)


def build_generator(
    config: TrainConfig,
    source: ClipSource,
    init_from: str | None,
    out: Path,
    main: bool,
    say: Callable[[str], None],
) -> tuple[TextToVideoPipeline, TrainConfig]:
    """The pipeline the generator stage trains: every component of a model folder
    (--init-from), or fresh text encoder and generator over the run's trained autoencoder.
    The tokenizer is written to ``out`` (by the ``main`` process)."""
    c = config
    if init_from:  # transfer: every component from a trained model folder
        pipe = TextToVideoPipeline.from_pretrained(init_from, device="cpu")
        if pipe.generator.config.distilled_guidance is not None:
            raise TrainingError(
                f"{init_from} is a distilled few-step model; fine-tune the model it was "
                "distilled from (for the bundled one, t2v-moving-shapes-teacher), then distil."
            )
        tokenizer = getattr(pipe.text_encoder, "tokenizer", None)
        if isinstance(tokenizer, Tokenizer) and main:
            out.mkdir(parents=True, exist_ok=True)
            tokenizer.save(out / "tokenizer.json")
        g = pipe.generator.config
        if g.layout and not source.has_boxes:
            say("layout kept but not trained: the data source does not say where its objects are")
        elif c.generator.layout and not g.layout:
            if not g.text_slots:
                say(f"layout off: {init_from} reads each prompt whole, with no object clauses")
            elif layout_runs(c, source, say):
                pipe.generator = add_layout(pipe.generator, c.generator.layout_dropout)
    else:
        c = replace(c, generator=replace(c.generator, layout=layout_runs(c, source, say)))
        tokenizer = fit_tokenizer(out, source, c.data.tokenizer_captions, main)
        ae = trained_autoencoder(Path(c.run_dir))
        te, ae, gen = build_pipeline(c.text_encoder, ae, c.generator, tokenizer)
        pipe = TextToVideoPipeline(te, ae, gen, c.pipeline, "cpu")
    resolved = replace(
        c,
        text_encoder=pipe.text_encoder.config,
        autoencoder=pipe.autoencoder.config,
        generator=pipe.generator.config,
    )
    return pipe, resolved


def build_student(
    config: TrainConfig, init_from: str | None, say: Callable[[str], None]
) -> tuple[TextToVideoPipeline, LatentGenerator, int, TrainConfig]:
    """The student pipeline of stage "distill", its frozen teacher generator and the
    teacher's number of sampling steps (the grid of its path): the teacher
    folder's components, with a generator that also takes the step size, starting from the
    teacher's weights (its step embedding starts at zero, so it starts as the teacher)."""
    folder = init_from or config.distill.teacher or str(Path(config.run_dir) / "model")
    if not (model_folder(folder) / "pipeline.json").is_file():
        raise TrainingError(
            f"No teacher model at {folder}; train the generator stage first, or name one "
            "with distill.teacher or --init-from."
        )
    pipe = TextToVideoPipeline.from_pretrained(folder, device="cpu")
    teacher = pipe.generator
    if teacher.config.distilled_guidance is not None:
        raise TrainingError(f"{folder} is already a distilled model; distil its teacher.")
    if pipe.config.sampler != "euler":
        say(f"the teacher samples with {pipe.config.sampler}; its path is taken with Euler")
    gen_cfg = replace(teacher.config, distilled_guidance=pipe.config.guidance, cond_dropout=0.0)
    student = LatentGenerator(gen_cfg)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("step_mlp.") for k in missing):
        raise TrainingError(f"The teacher's generator does not fit the student: {missing}")
    pipe_cfg = replace(
        pipe.config,
        steps=config.distill.steps,
        max_steps=max(config.distill.step_counts),
        sampler="shortcut",
    )
    say(
        f"distilling {folder} ({pipe.config.steps} steps, guidance {pipe.config.guidance:g}) "
        f"into {config.distill.steps} steps"
    )
    student_pipe = TextToVideoPipeline(pipe.text_encoder, pipe.autoencoder, student, pipe_cfg)
    student_pipe.rewriter = pipe.rewriter
    resolved = replace(
        config,
        text_encoder=pipe.text_encoder.config,
        autoencoder=pipe.autoencoder.config,
        generator=gen_cfg,
        pipeline=pipe_cfg,
        distill=replace(config.distill, teacher=str(folder)),
    )
    return student_pipe, teacher, pipe.config.steps, resolved


def add_layout(generator: LatentGenerator, dropout: float) -> LatentGenerator:
    """A copy of a trained generator that also reads a layout: its layout input starts at
    zero, so it starts as the generator it came from; the layout head starts fresh."""
    layout = LatentGenerator(replace(generator.config, layout=True, layout_dropout=dropout))
    missing, unexpected = layout.load_state_dict(generator.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("layout_in.", "layout_head.")) for k in missing)
    return layout


def fit_tokenizer(out: Path, source: ClipSource, count: int, main: bool) -> Tokenizer:
    """The word-level tokenizer of the source's training captions (kept in ``out``, so a
    resumed run reads it back); a pretrained encoder keeps it as the word list that tells
    which prompts the model can follow."""
    path = out / "tokenizer.json"
    if path.is_file():
        return Tokenizer.load(path)
    tokenizer = Tokenizer.train(source.captions(count))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
    return tokenizer


def _without_boxes(config: TrainConfig, source: ClipSource) -> str | None:
    """Why what needs each object's box and clause cannot run on this source, or None."""
    if not source.has_boxes:
        return "the data source does not say where its objects are"
    if not config.text_encoder.split_objects:
        return "text_encoder.split_objects is off, so no object has a clause of its own"
    return None


def layout_runs(config: TrainConfig, source: ClipSource, say: Callable[[str], None]) -> bool:
    """Whether a fresh generator gets a layout, said in a log line when asked for."""
    if not config.generator.layout:
        return False
    why = _without_boxes(config, source)
    say(f"layout off: {why}" if why else "layout on (the source gives object boxes)")
    return why is None


def attention_loss_runs(
    config: TrainConfig, source: ClipSource, say: Callable[[str], None]
) -> bool:
    """Whether the generator's attention loss can run, said in a log line when asked for."""
    weight = config.generator.attention_loss
    if weight <= 0:
        return False
    why = _without_boxes(config, source)
    on = f"attention loss on, weight {weight:g} (the source gives object boxes)"
    say(f"attention loss off: {why}" if why else on)
    return why is None
