"""The trainer: one loop for both stages, on a CPU, a GPU, or many processes under torchrun.

Stage "autoencoder" trains the video autoencoder on clips. Stage "generator" trains the latent
generator (and a from-scratch text encoder with it) with flow matching on latents of the frozen
autoencoder, and writes a complete model folder at the end. What a stage shows and measures
(sample GIFs, PSNR, sample prompts) comes from its data source's held-out clips.

Every step's randomness is seeded from (seed, rank, step) and every batch is a pure function of
(step, rank), so a run resumed from a checkpoint repeats an uninterrupted run exactly (on CPU).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from t2v import config as cfg
from t2v.checkpoints import (
    Checkpointer,
    TrainingError,
    ema_copy,
    ema_init,
    ema_update,
    export_checkpoint,
)
from t2v.models.autoencoder import VideoAutoencoder, psnr
from t2v.objectives import AutoencoderObjective, DistillObjective, GeneratorObjective
from t2v.pipeline import TextToVideoPipeline, save_component
from t2v.runtime import autocast, resolve_device
from t2v.sources import ClipSource, open_source, save_vocabulary
from t2v.train_config import STAGES, StageConfig, TrainConfig
from t2v.train_stages import (
    attention_loss_runs,
    build_autoencoder,
    build_generator,
    build_student,
)
from t2v.video import to_model_tensor, to_uint8_clips

__all__ = ["STAGES", "TrainConfig", "Trainer", "TrainingError", "export_checkpoint", "train"]

SAMPLE_CLIPS = 4  # columns of a sample GIF
PSNR_CLIPS = 64  # held-out clips the autoencoder's PSNR is measured on


# --- distributed ---------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_true(flag: bool, d: Dist, device: torch.device) -> bool:
    if d.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


# --- the loop ------------------------------------------------------------------------------


def lr_at(step: int, s: StageConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (Loshchilov & Hutter 2017)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    floor = s.lr * s.min_lr_ratio
    return floor + (s.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _optimizer(model: nn.Module, s: StageConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    params = _trainable(model)
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=s.lr,
        betas=s.betas,
        fused=True,  # one kernel for all parameters (CPU and CUDA)
    )


class Trainer:
    """One stage of a run. ``config`` is the caller's and stays as it is; ``self.config`` is
    the run's resolved config (with what the source and the components decided), which is
    what the run directory records."""

    def __init__(
        self,
        config: TrainConfig,
        stage: str,
        *,
        resume: bool = False,
        init_from: str | None = None,
        progress: bool = True,
    ):
        if stage not in STAGES:
            raise TrainingError(f"Unknown stage {stage!r}; use {' or '.join(STAGES)}.")
        self.stage_name, self.s = stage, config.stage(stage)
        self.device = resolve_device(config.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.out = Path(config.run_dir) / stage
        self.progress = progress and self.dist.main
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        d = config.data
        self.source: ClipSource = open_source(
            d.source, d.seed, d.two_object_share, self.device, held_out=d.held_out
        )
        if stage == "autoencoder":
            self.pipeline = None
            ae, self.config = build_autoencoder(config, self.source, init_from, self._say)
            self.model = AutoencoderObjective(ae)
            self.ae_config = ae.config
        elif stage == "distill":
            p, teacher, teacher_steps, self.config = build_student(config, init_from, self._say)
            self.pipeline = p
            p.autoencoder.to(self.device)  # frozen, so not submodules: .to() below misses them
            teacher.to(self.device)
            self.model = DistillObjective(
                p.generator,
                teacher,
                p.text_encoder,
                p.autoencoder,
                self.config.distill,
                teacher_steps,
            )
            self.ae_config = p.autoencoder.config
        else:
            p, self.config = build_generator(
                config, self.source, init_from, self.out, self.dist.main, self._say
            )
            self.pipeline = p
            p.autoencoder.to(self.device)  # frozen, so not a submodule: .to() below misses it
            self.model = GeneratorObjective(p.generator, p.text_encoder, p.autoencoder)
            self.ae_config = p.autoencoder.config
        layout = self.config.generator.layout and self.source.has_boxes
        self.wants_boxes = (stage == "distill" and layout) or (
            stage == "generator"
            and (attention_loss_runs(self.config, self.source, self._say) or layout)
        )
        self.model.to(self.device)
        self.model.train()
        self.opt = _optimizer(self.model, self.s)
        self.ema = ema_init(self.model)
        self.ckpt = Checkpointer(self.out, self.s.keep_checkpoints)
        self.parts: list[dict[str, float]] = []  # the objective's loss terms since the last log
        self.step, self.nonfinite_total, self.nonfinite_run = 0, 0, 0
        if resume:
            self._resume()
        self.ddp = self.model
        if self.dist.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _say(self, line: str) -> None:
        if self.dist.main:
            print(f"{self.stage_name}: {line}", flush=True)

    # -- checkpoints -----------------------------------------------------------------------
    def _resume(self) -> None:
        latest = self.ckpt.latest()
        if latest is None:
            raise TrainingError(f"--resume found no checkpoint in {self.out}.")
        self.ema, state = Checkpointer.load(latest, self.model, self.opt, self.device)
        self.step = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        if self.progress:
            print(f"resumed from {latest} at step {self.step}")

    def _save_checkpoint(self) -> None:
        if self.dist.main:
            position = {
                "step": self.step,
                "world": self.dist.world,
                "batch_size": self.s.batch_size,
            }
            state = {"nonfinite_total": self.nonfinite_total, "data_position": position}
            self.ckpt.save(self.step, self.model, self.ema, self.opt, state)

    def ema_model(self) -> nn.Module:
        """The objective with EMA weights, as a copy (training weights untouched)."""
        return ema_copy(self.model, self.ema)

    # -- one step --------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, list[str], list[torch.Tensor]]:
        s, d = self.s, self.dist
        clips, captions = self.source.batch(self.step, s.batch_size, d.rank, d.world)
        want = (self.ae_config.frames, self.ae_config.size, self.ae_config.size)
        if clips.shape[1:4] != want:
            raise TrainingError(
                f"The data holds {clips.shape[1]}x{clips.shape[2]}x"
                f"{clips.shape[3]} clips but the autoencoder expects "
                f"{want[0]}x{want[1]}x{want[2]}; prepare the data with "
                "matching --frames and --size."
            )
        x = to_model_tensor(clips).to(self.device, non_blocking=True)
        extra = []
        if self.wants_boxes:
            boxes = self.source.boxes(self.step, s.batch_size, d.rank, d.world)
            extra.append(torch.from_numpy(boxes).to(self.device))
        return x, captions, extra

    def train_step(self) -> float | None:
        """One optimisation step; returns the loss, or None when it was skipped."""
        s, d = self.s, self.dist
        torch.manual_seed(_step_seed(self.config.seed, d.rank, self.step))
        x, captions, extra = self._batch()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, s)
        with autocast(self.device, self.config.precision):
            loss, parts = self.ddp(x, captions, *extra)
        self.parts.append({k: float(v) for k, v in parts.items()})
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(_trainable(self.model), s.grad_clip)
        ok = _all_true(
            bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm)), d, self.device
        )
        self.step += 1
        if not ok:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            self.opt.zero_grad(set_to_none=True)
            if self.nonfinite_run >= s.max_nonfinite:
                raise TrainingError(
                    f"{self.nonfinite_run} steps in a row had a non-finite "
                    f"loss or gradient (last at step {self.step}); lower the "
                    "learning rate or use --precision fp32, then --resume."
                )
            return None
        self.nonfinite_run = 0
        self.opt.step()
        ema_update(self.ema, self.model, self.s.ema_decay, self.step)
        return loss.item()

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Path:
        from tqdm import tqdm

        s = self.s
        log = None
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save_json(self.config, self.out / "config.json")
            log = _Log(self.out, self.stage_name, s.steps, echo=not self.progress)
        bar = tqdm(
            total=s.steps,
            initial=self.step,
            disable=not self.progress,
            desc=self.stage_name,
            unit="step",
            dynamic_ncols=True,
        )
        losses, t0, seen = [], time.perf_counter(), 0
        try:
            while self.step < s.steps:
                loss = self.train_step()
                seen += s.batch_size * self.dist.world
                if loss is not None:
                    losses.append(loss)
                bar.update(1)
                if self.step % s.log_every == 0 or self.step == s.steps:
                    rate = seen / (time.perf_counter() - t0)
                    mean = float(np.mean(losses)) if losses else float("nan")
                    parts = {
                        k: float(np.mean([p[k] for p in self.parts if k in p]))
                        for k in dict.fromkeys(k for p in self.parts for k in p)
                    }
                    self.parts = []
                    bar.set_postfix(loss=f"{mean:.4f}", samples_s=f"{rate:.1f}")
                    if log is not None:
                        line = {"loss": mean, "samples_per_s": rate, "lr": lr_at(self.step - 1, s)}
                        line |= {"nonfinite_steps": self.nonfinite_total, **parts}
                        log.write(self.step, line)
                    losses, t0, seen = [], time.perf_counter(), 0
                if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                    self._save_checkpoint()
                if self.dist.main and (self.step % s.sample_every == 0 or self.step == s.steps):
                    self.write_samples()
        finally:
            bar.close()
            if log is not None:
                log.close()
        return self.finish()

    # -- outputs ---------------------------------------------------------------------------
    def _ema_pipeline(self) -> TextToVideoPipeline:
        model, p = self.ema_model(), self.pipeline
        return TextToVideoPipeline(
            model.text_encoder,
            p.autoencoder,
            model.generator,
            p.config,
            self.device,
            self.config.precision,
        )

    @torch.no_grad()
    def write_samples(self) -> Path:
        """A GIF grid from the source's held-out clips: the clips over their reconstructions
        (autoencoder), or samples for their captions (generator); beside it a .txt file
        holds the captions, one per column."""
        from t2v.video import write_video

        clips, captions = self.source.held_out(SAMPLE_CLIPS)
        if self.stage_name == "autoencoder":
            ae = self.ema_model().autoencoder
            recon = to_uint8_clips(ae.decode(ae.encode(to_model_tensor(clips).to(self.device))))
            rows = np.concatenate([clips, recon], axis=2)
        else:
            pipe = self._ema_pipeline()
            seeds = list(range(len(captions)))
            rows = pipe.generate(list(captions), seeds, steps=min(20, pipe.config.steps))
        grid = np.concatenate(list(rows), axis=2)  # (T, H, W * n, 3)
        gif = write_video(grid, self.out / "samples" / f"step-{self.step:07d}.gif")
        gif.with_suffix(".txt").write_text("".join(f"{c}\n" for c in captions), encoding="utf-8")
        return gif

    def finish(self) -> Path:
        """Write the stage's product: the autoencoder folder, or the whole model folder."""
        if not self.dist.main:
            return self.out
        if self.stage_name == "autoencoder":
            ae = self.ema_model().autoencoder
            scale, shift = latent_stats(ae, self.device, self.source)
            ae.config = replace(ae.config, scale=scale, shift=shift)
            metrics = {
                "psnr_db_eval": held_out_psnr(ae, self.device, self.source),
                "latent_scale": scale,
                "latent_shift": shift,
                "steps": self.step,
            }
            folder = self.out / "final"
            save_component(ae, ae.config, folder)
        else:
            name = "student" if self.stage_name == "distill" else "model"
            folder = self._ema_pipeline().save_pretrained(Path(self.config.run_dir) / name)
            save_vocabulary(folder, self.config.data.source)
            metrics = {"steps": self.step}
        metrics["nonfinite_steps"] = self.nonfinite_total
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if self.progress:
            print(f"{self.stage_name}: {json.dumps(metrics)}")
        return folder


class _Log:
    """Each logged step as a line of log.jsonl and as TensorBoard scalars (and, without a
    progress bar, one printed line)."""

    def __init__(self, out: Path, stage: str, steps: int, echo: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.out, self.stage, self.steps, self.echo = out, stage, steps, echo
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        for name in ("loss", "lr", "samples_per_s", "nonfinite_steps"):
            self.writer.add_scalar(name, values[name], step)
        if self.echo:
            terms = "".join(
                f" {k} {v:.4f}"
                for k, v in values.items()
                if k not in ("loss", "lr", "samples_per_s", "nonfinite_steps")
            )
            print(
                f"{self.stage} step {step}/{self.steps} loss {values['loss']:.4f}{terms} "
                f"{values['samples_per_s']:.1f} samples/s",
                flush=True,
            )

    def close(self) -> None:
        self.writer.close()


@torch.no_grad()
def latent_stats(
    ae: VideoAutoencoder, device: torch.device, source: ClipSource, count: int = 256
) -> tuple[float, float]:
    """Scale and shift that give the posterior means of training clips zero mean and unit
    variance (measured on the stage's own data, whatever its source)."""
    clips, _ = source.batch(0, count)
    z = torch.cat(
        [
            ae.encode_dist(to_model_tensor(clips[i : i + 32]).to(device))[0]
            for i in range(0, count, 32)
        ]
    )
    return float(1 / z.std()), float(z.mean())


@torch.no_grad()
def held_out_psnr(
    ae: VideoAutoencoder, device: torch.device, source: ClipSource, count: int = PSNR_CLIPS
) -> float:
    """Reconstruction PSNR on the source's held-out clips."""
    clips, _ = source.held_out(count)
    x = to_model_tensor(clips).to(device)
    recon = torch.cat([ae.decode(ae.encode(x[i : i + 16])) for i in range(0, len(x), 16)])
    return psnr(recon, x)


def train(
    stage: str,
    config: TrainConfig,
    *,
    resume: bool = False,
    init_from: str | None = None,
    progress: bool = True,
) -> Path:
    trainer = Trainer(config, stage, resume=resume, init_from=init_from, progress=progress)
    try:
        return trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
