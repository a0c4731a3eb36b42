"""The training run's config: the components' configs, the data source, and each stage's
optimisation settings, as dataclasses read from YAML and saved, resolved, in the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from t2v import config as cfg
from t2v.models.autoencoder import AutoencoderConfig
from t2v.models.generator import GeneratorConfig
from t2v.models.text_encoders import TextEncoderConfig
from t2v.pipeline_config import PipelineConfig
from t2v.shapes import TWO_OBJECT_SHARE

STAGES = ("autoencoder", "generator", "distill")


@dataclass
class StageConfig:
    steps: int = 1000
    batch_size: int = 32  # per process
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    log_every: int = 25
    sample_every: int = 500  # GIF grid of samples in the run directory
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")


@dataclass
class DataConfig:
    source: str = "shapes"  # "shapes" (the Moving Shapes stream) or a verified shard folder
    seed: int = 0
    two_object_share: float = TWO_OBJECT_SHARE  # of the Moving Shapes training stream
    # Share of a shard folder's clips never trained on (at least one): the sample GIFs, the
    # PSNR and the sample prompts come from them. Moving Shapes holds out its eval list.
    held_out: float = 0.05
    tokenizer_captions: int = 20000  # captions used to fit the tokenizer

    def validate(self) -> None:
        if not 0.0 <= self.two_object_share <= 1.0:
            raise ValueError(
                f"data.two_object_share must be between 0 and 1, not {self.two_object_share}."
            )
        if not 0.0 < self.held_out < 1.0:
            raise ValueError(f"data.held_out must be above 0 and below 1, not {self.held_out}.")


@dataclass
class DistillConfig:
    """Stage "distill": a few-step student of a trained model, with its guidance inside."""

    teacher: str = ""  # the teacher's model folder; "" = the run's own RUN_DIR/model
    steps: int = 4  # the student's default number of steps (its pipeline.json)
    # The step counts the student learns and each one's share of the batches. A count of
    # at least `steps` learns from the teacher's own path (its Euler steps with guidance);
    # a smaller one from two of the student's own steps of half the size (Frans et al.
    # 2025, "One Step Diffusion via Shortcut Models"), so each needs its double listed.
    step_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    shares: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.75, 0.1])
    # Batches of `steps` start on the teacher's guided paths from noise, where the student's
    # sampler will be; False: on noised training latents, like the other counts.
    path_starts: bool = True

    def validate(self) -> None:
        counts = self.step_counts
        if len(counts) != len(self.shares) or not counts or min(self.shares) < 0:
            raise ValueError("distill.step_counts and distill.shares must pair up, shares >= 0")
        if self.steps not in counts or min(counts) < 1:
            raise ValueError(f"distill.step_counts must include distill.steps ({self.steps})")
        for n in counts:
            if n < self.steps and 2 * n not in counts:
                raise ValueError(
                    f"distill.step_counts has {n} below distill.steps, so it learns from two "
                    f"steps of {2 * n}, which must be listed too"
                )


@dataclass
class TrainConfig:
    run_dir: str = "runs/t2v"
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)

    def validate(self) -> None:
        for name in self.stages:
            if name not in STAGES:
                raise cfg.ConfigError(
                    f"Unknown stage '{name}' under stages; use {' or '.join(STAGES)}."
                )
        if self.generator.attention_loss < 0:
            raise ValueError("generator.attention_loss must be 0 or more.")

    def stage(self, name: str) -> StageConfig:
        return self.stages.get(name) or StageConfig()
