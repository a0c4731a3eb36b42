"""The sampling settings saved as a t2v model's pipeline.json, and the knobs they give.

Apart from `t2v.pipeline` so that `t2v.backends.read_knobs` (the CLI's help, the server's
schema) reads a model's knobs without importing torch or loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from t2v import config as cfg
from t2v.model import MAX_FPS, MAX_GUIDANCE, MAX_STEPS, MIN_FPS, FloatRange, IntRange, Knobs
from t2v.text import DEFAULT_MAX_CHARS

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
# The bundled default's teacher: the full sampler (guided Euler steps) that the default, a
# few-step student, was distilled from.
TEACHER_MODEL_DIR = Path(__file__).parent / "teacher_model"
# The bundled models by the id they are served and reported as; --model takes these too.
BUNDLED = {"t2v-moving-shapes": DEFAULT_MODEL_DIR, "t2v-moving-shapes-teacher": TEACHER_MODEL_DIR}
FORMAT_VERSION = 1  # of a t2v model folder; a folder of a newer format is refused


def model_folder(path: str | Path | None) -> Path:
    """The folder ``path`` names: the bundled model for None, a bundled model for its id
    (unless a folder of that name is there), else the path."""
    if path is None:
        return DEFAULT_MODEL_DIR
    folder = Path(path).expanduser()
    if str(path) in BUNDLED and not folder.exists():
        return BUNDLED[str(path)]
    return folder


def model_id(folder: Path) -> str:
    """The id a model is served and reported as: a bundled model's id, else the folder's
    name."""
    return next((name for name, where in BUNDLED.items() if folder == where), folder.name)


@dataclass
class PipelineConfig:
    steps: int = 20
    guidance: float = 6.0
    # "shortcut" samples a distilled generator (few steps, guidance inside), and only one.
    sampler: Literal["euler", "heun", "shortcut"] = "euler"
    shift: float = 1.0  # time-grid shift, see t2v.flow.time_grid
    # The most steps it takes: a distilled student's largest trained count (see t2v train
    # distill); a velocity model takes up to t2v.model.MAX_STEPS.
    max_steps: int = MAX_STEPS
    fps: float = 8.0
    max_prompt_chars: int = DEFAULT_MAX_CHARS
    format_version: int = FORMAT_VERSION

    def validate(self) -> None:
        if not 1 <= self.steps <= self.max_steps <= MAX_STEPS:
            raise ValueError(f"steps must be 1 to max_steps, and max_steps at most {MAX_STEPS}")
        if self.format_version > FORMAT_VERSION:
            raise cfg.ConfigError(
                f"format_version {self.format_version} is newer than this t2v reads "
                f"({FORMAT_VERSION}); upgrade t2v to load this model."
            )


def distilled_guidance(pipeline: PipelineConfig, generator: dict) -> float | None:
    """The guidance scale a distilled generator learned (its only one), or None for a
    velocity model; a pipeline.json that does not match its generator is refused."""
    baked = generator.get("distilled_guidance")
    if (baked is None) != (pipeline.sampler != "shortcut"):
        raise cfg.ConfigError(
            'pipeline.json\'s sampler must be "shortcut" for a distilled generator '
            f"and only for one, not {pipeline.sampler!r}."
        )
    if baked is not None and float(baked) != pipeline.guidance:
        raise cfg.ConfigError(
            f"pipeline.json's guidance {pipeline.guidance:g} differs from the "
            f"{float(baked):g} its distilled generator learned."
        )
    return None if baked is None else float(baked)


def knobs_of(pipeline: PipelineConfig, autoencoder: dict, generator: dict) -> Knobs:
    """The knobs of a t2v model: steps, guidance and fps from its pipeline.json; frames and
    size fixed by its autoencoder config; a distilled generator's config fixes the guidance
    and takes no negative prompt. Configs come as dicts, so no torch is needed to read them."""
    frames, size = int(autoencoder["frames"]), int(autoencoder["size"])
    baked = distilled_guidance(pipeline, generator)
    return Knobs(
        steps=IntRange(pipeline.steps, 1, pipeline.max_steps),
        guidance=(
            FloatRange(pipeline.guidance, 0.0, MAX_GUIDANCE)
            if baked is None
            else FloatRange(baked, baked, baked)
        ),
        frames=IntRange(frames, frames, frames),
        width=IntRange(size, size, size),
        height=IntRange(size, size, size),
        fps=FloatRange(pipeline.fps, MIN_FPS, MAX_FPS),
        max_prompt_chars=pipeline.max_prompt_chars,
        negative_prompt=baked is None,
    )
