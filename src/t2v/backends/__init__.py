"""Load any model t2v runs, telling the kinds apart by their files.

- a folder with ``pipeline.json`` is a t2v model (`t2v.pipeline.TextToVideoPipeline`);
- a folder with ``model_index.json`` is a diffusers text-to-video model
  (`t2v.backends.diffusers`, needs ``pip install "t2v[diffusers]"``);
- ``None`` is the bundled model.

Both kinds implement `t2v.model.VideoModel`, so no caller branches on which it holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from t2v.model import Knobs, ModelError, VideoModel

__all__ = ["kind_of", "load_model", "read_knobs"]


def _folder(path: str | Path | None) -> Path:
    from t2v.pipeline_config import model_folder

    path = model_folder(path)
    if not path.is_dir():
        raise ModelError(f"No model folder at {path}; give the folder that holds the model.")
    return path


def kind_of(path: str | Path | None) -> Literal["t2v", "diffusers"]:
    """Which kind of model folder ``path`` is, from its files alone."""
    path = _folder(path)
    if (path / "pipeline.json").is_file():
        return "t2v"
    if (path / "model_index.json").is_file():
        return "diffusers"
    raise ModelError(
        f"{path} is not a model folder: it has neither pipeline.json (a t2v model) nor "
        "model_index.json (a diffusers model)."
    )


def read_knobs(path: str | Path | None = None) -> Knobs:
    """A model's knobs from its JSON files alone: no torch, no weights, so the CLI can show
    them in --help and the server in its schema before (or without) loading the model."""
    path = _folder(path)
    if kind_of(path) == "diffusers":
        from t2v.backends.diffusers import read_knobs as diffusers_knobs

        return diffusers_knobs(path)
    from t2v import config as cfg
    from t2v.pipeline_config import PipelineConfig, knobs_of

    try:
        pipeline = cfg.load_json(PipelineConfig, path / "pipeline.json")
        autoencoder = json.loads((path / "autoencoder" / "config.json").read_text("utf-8"))
        generator = json.loads((path / "generator" / "config.json").read_text("utf-8"))
        return knobs_of(pipeline, autoencoder, generator)
    except (OSError, ValueError, KeyError) as e:  # ConfigError is a ValueError
        raise ModelError(f"Cannot read the model at {path}: {e}") from None


def load_model(
    path: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    offload: str = "none",
) -> VideoModel:
    """Load the model at ``path`` (None: the bundled model) on ``device`` (auto, cpu or
    cuda) in ``precision`` (fp32, bf16 or fp16). ``offload`` (none, model or sequential)
    keeps a large diffusers model's weights on the CPU until each part runs; GPU only.
    A folder that cannot or must not be loaded raises `ModelError`, one sentence."""
    path = _folder(path)
    if kind_of(path) == "diffusers":
        from t2v.backends.diffusers import DiffusersModel

        return DiffusersModel.from_folder(path, device, precision, offload)
    from t2v.pipeline import TextToVideoPipeline

    return TextToVideoPipeline.from_pretrained(path, device, precision, offload)
