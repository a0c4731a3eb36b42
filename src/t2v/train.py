"""The trainer: one loop for both stages, on a CPU, a GPU, or many processes under torchrun.

Stage "autoencoder" trains the video autoencoder on clips. Stage "generator" trains the latent
generator (and a from-scratch text encoder with it) with flow matching on latents of the frozen
autoencoder, and writes a complete model folder at the end.

Every step's randomness is seeded from (seed, rank, step) and every batch is a pure function of
(step, rank), so a run resumed from a checkpoint repeats an uninterrupted run exactly (on CPU).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from t2v import config as cfg
from t2v import shapes
from t2v.data import open_source, to_model_tensor, to_uint8_clips
from t2v.errors import UserError
from t2v.flow import flow_loss, sample_t
from t2v.models.autoencoder import AutoencoderConfig, VideoAutoencoder, psnr
from t2v.models.generator import GeneratorConfig, LatentGenerator
from t2v.models.text_encoders import MAX_SLOTS, TextEncoderConfig, build_text_encoder
from t2v.pipeline import (
    PipelineConfig,
    TextToVideoPipeline,
    autocast,
    refuse_pickles,
    resolve_device,
    save_component,
)
from t2v.text import Tokenizer

STAGES = ("autoencoder", "generator")
SAMPLE_PROMPTS = (
    "a large red circle moving right",
    "a small blue square moving up",
    "a large yellow triangle staying still",
    "a small white cross moving down-left and a large green square moving up",
)


class TrainingError(UserError):
    """Training cannot go on; the message says why in one sentence."""


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
    two_object_share: float = 0.4  # share of two-object clips in the Moving Shapes stream
    tokenizer_captions: int = 20000  # captions used to fit the tokenizer

    def validate(self) -> None:
        if not 0.0 <= self.two_object_share <= 1.0:
            raise ValueError(
                f"data.two_object_share must be between 0 and 1, not {self.two_object_share}."
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
    stages: dict[str, StageConfig] = field(default_factory=dict)

    def validate(self) -> None:
        for name, stage in list(self.stages.items()):
            if name not in STAGES:
                raise cfg.ConfigError(
                    f"Unknown stage '{name}' under stages; use {' or '.join(STAGES)}."
                )
            if isinstance(stage, dict):
                self.stages[name] = cfg.from_dict(StageConfig, stage, prefix=f"stages.{name}.")
        if self.generator.attention_loss < 0:
            raise ValueError("generator.attention_loss must be 0 or more.")
        if self.generator.attention_loss > 0:
            if not self.text_encoder.split_objects or self.generator.text_attention != "cross":
                raise ValueError(
                    "generator.attention_loss needs text_encoder.split_objects: true and "
                    "generator.text_attention: cross."
                )
            if not (self.data.source == "shapes" or self.data.source.startswith("shapes:")):
                raise ValueError(
                    "generator.attention_loss needs to know where each object is, which only "
                    "the Moving Shapes source does; set it to 0 for other data."
                )

    def stage(self, name: str) -> StageConfig:
        return self.stages.get(name) or StageConfig()


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


# --- objectives ----------------------------------------------------------------------------


class AutoencoderObjective(nn.Module):
    def __init__(self, autoencoder: VideoAutoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, clips: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, dict]:
        return self.autoencoder.loss(clips)


class GeneratorObjective(nn.Module):
    """Flow matching on latents of the frozen autoencoder; the text encoder trains alongside
    when it is trainable. Captions are dropped to "" at cond_dropout for guidance."""

    def __init__(self, generator: LatentGenerator, text_encoder, autoencoder: VideoAutoencoder):
        super().__init__()
        self.generator, self.text_encoder = generator, text_encoder
        self._frozen = [autoencoder.requires_grad_(False).eval()]  # not a submodule: not trained

    def forward(
        self, clips: torch.Tensor, captions: list[str], boxes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        """boxes: where each object is (see shapes.object_boxes), for the attention loss."""
        g = self.generator.config
        with torch.no_grad():
            z = self._frozen[0].encode(clips).float()  # (B, C, T', H', W')
        keep = torch.rand(len(captions)) >= g.cond_dropout
        text = self.text_encoder([c if k else "" for c, k in zip(captions, keep, strict=True)])
        t = sample_t(len(z), device=z.device)
        maps = [] if boxes is not None and g.attention_loss > 0 else None
        loss = flow_loss(lambda x, tt: self.generator(x, tt, text, maps), z, t, torch.randn_like(z))
        if not maps:
            return loss, {}
        coverage = token_coverage(boxes.to(z.device), g.grid, clips.shape[-1])
        objects = boxes[:, :, 0, 0].isfinite().sum(1).to(z.device)  # (B,)
        slots = text.slots.masked_fill(~text.mask, 0).amax(1) + 1
        # Only clips whose caption was kept and split into one clause per object, and that
        # have several objects (with one, all the attention is on its slot anyway).
        use = keep.to(z.device) & (objects > 1) & (slots == objects)
        attention = slot_attention_loss(maps, text.slots, text.mask, coverage, use)
        return loss + g.attention_loss * attention, {
            "flow": loss.detach(),
            "attention": attention.detach(),
        }


def token_coverage(boxes: torch.Tensor, grid: tuple[int, int, int], size: int) -> torch.Tensor:
    """How much of each latent token each object covers, averaged over the token's frames:
    boxes (B, K, T, 4) in pixels of a size x size clip -> (B, K, N), N = latent tokens in
    (t, h, w) order; absent objects (NaN boxes) cover nothing."""
    gt, gh, gw = grid
    b, k, frames, _ = boxes.shape
    x0, y0, x1, y1 = boxes.float().unbind(-1)  # each (B, K, T)

    def overlap(lo, hi, cells):  # (B, K, T, cells): share of each cell's span inside [lo, hi]
        width = size / cells
        edge = torch.arange(cells, device=boxes.device) * width
        inside = torch.minimum(hi[..., None], edge + width) - torch.maximum(lo[..., None], edge)
        return (inside.clamp(min=0) / width).nan_to_num(0.0)

    cover = overlap(y0, y1, gh)[..., :, None] * overlap(x0, x1, gw)[..., None, :]
    cover = cover.view(b, k, gt, frames // gt, gh, gw).mean(3)  # (B, K, gt, gh, gw)
    return cover.flatten(2)


def slot_attention_loss(
    maps: list[torch.Tensor],
    slots: torch.Tensor,
    mask: torch.Tensor,
    coverage: torch.Tensor,
    use: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy between where the objects are and where the latent tokens look: for each
    token an object covers, the attention it pays to each object's text slot should follow
    the objects' shares of it (after Wang et al. 2024, "TokenCompose", which supervises
    cross-attention with segmentation masks). Tokens no object covers are free. Weighted by
    coverage, averaged over the blocks' maps (B, N, L); slots/mask (B, L); coverage
    (B, K, N); use (B,) which clips count."""
    k = coverage.shape[1]
    onehot = nn.functional.one_hot(slots.clamp(max=k - 1), k).float() * mask[..., None]
    total = coverage.sum(1)  # (B, N)
    target = (coverage / total.clamp(min=1e-6)[:, None]).transpose(1, 2)  # (B, N, K)
    weight = total.clamp(max=1.0) * use[:, None]
    norm = weight.sum().clamp(min=1e-6)
    losses = []
    for a in maps:
        on_slot = a.float() @ onehot  # (B, N, K): attention mass on each object's words
        ce = -(target * on_slot.clamp(min=1e-6).log()).sum(-1)  # (B, N)
        losses.append((ce * weight).sum() / norm)
    return torch.stack(losses).mean()


# --- checkpoints ---------------------------------------------------------------------------


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {
        f"{i}.{k}": v
        for i, s in sd["state"].items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor)
    }
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


class Checkpointer:
    """Atomic checkpoints: written to a temp folder, fsynced, renamed; the last N kept."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = folder, keep

    def latest(self) -> Path | None:
        found = sorted(self.folder.glob("ckpt-*[0-9]"))
        return found[-1] if found else None

    def save(
        self,
        step: int,
        model: nn.Module,
        ema: dict[str, torch.Tensor],
        opt: torch.optim.Optimizer,
        state: dict,
    ) -> Path:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        ema = {k: v.cpu().contiguous() for k, v in ema.items()}
        opt_tensors, opt_meta = _flatten_optimizer(opt)
        opt_tensors = {k: v.cpu().contiguous() for k, v in opt_tensors.items()}
        if not (_finite(weights) and _finite(ema) and _finite(opt_tensors)):
            raise TrainingError(
                f"Step {step}: the weights hold a non-finite value, so no "
                "checkpoint was written; lower the learning rate and resume."
            )
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng |= {f"torch_cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        final = self.folder / f"ckpt-{step:07d}"
        tmp = self.folder / f".tmp-ckpt-{step:07d}"
        for stale in self.folder.glob(".tmp-ckpt-*"):  # left by a save that crashed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, tensors in (
            ("model", weights),
            ("ema", ema),
            ("optimizer", opt_tensors),
            ("rng", rng),
        ):
            cfg.save_tensors(tensors, tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(
            json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1)
        )
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(self.folder.glob("ckpt-*[0-9]"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(
        path: Path, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device
    ) -> tuple[dict[str, torch.Tensor], dict]:
        refuse_pickles(path)
        model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
        ema = load_file(str(path / "ema.safetensors"), device=str(device))
        state = json.loads((path / "state.json").read_text())
        opt.load_state_dict(
            _unflatten_optimizer(
                load_file(str(path / "optimizer.safetensors"), device=str(device)),
                state.pop("optimizer"),
            )
        )
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        return ema, state


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


class Trainer:
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
        self.config, self.stage_name, self.s = config, stage, config.stage(stage)
        self.device = resolve_device(config.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.out = Path(config.run_dir) / stage
        self.progress = progress and self.dist.main
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.source = open_source(
            config.data.source,
            seed=config.data.seed,
            two_object_share=config.data.two_object_share,
            device=self.device,
        )
        if stage == "autoencoder":
            ae = (
                TextToVideoPipeline.from_pretrained(init_from, device="cpu").autoencoder
                if init_from
                else VideoAutoencoder(config.autoencoder)
            )
            config.autoencoder = ae.config
            self.pipeline = None
            self.model = AutoencoderObjective(ae)
        else:
            self.pipeline = self._build_generator(init_from)
            p = self.pipeline
            p.autoencoder.to(self.device)  # frozen, so not a submodule: .to() below misses it
            self.model = GeneratorObjective(p.generator, p.text_encoder, p.autoencoder)
        self.ae_config = config.autoencoder if self.pipeline is None else p.autoencoder.config
        self.model.to(self.device)
        self.model.train()
        params = _trainable(self.model)
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.s.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.s.lr,
            betas=self.s.betas,
            fused=True,  # one kernel for all parameters (CPU and CUDA)
        )
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        self.ckpt = Checkpointer(self.out, self.s.keep_checkpoints)
        self.parts: list[dict[str, float]] = []  # the objective's loss terms since the last log
        self.wants_boxes = stage == "generator" and config.generator.attention_loss > 0
        if self.wants_boxes:  # a model folder's config (--init-from) skips TrainConfig checks
            try:
                config.validate()
            except ValueError as e:
                raise TrainingError(str(e)) from None
        self.step, self.nonfinite_total, self.nonfinite_run = 0, 0, 0
        if resume:
            self._resume()
        self.ddp = self.model
        if self.dist.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    # -- building ------------------------------------------------------------------------
    def _build_generator(self, init_from: str | None) -> TextToVideoPipeline:
        c = self.config
        if init_from:  # transfer: every component from a trained model folder
            pipe = TextToVideoPipeline.from_pretrained(init_from, device="cpu")
            c.text_encoder, c.autoencoder = pipe.text_encoder.config, pipe.autoencoder.config
            c.generator = pipe.generator.config
            if isinstance(getattr(pipe.text_encoder, "tokenizer", None), Tokenizer) and (
                self.dist.main
            ):
                self.out.mkdir(parents=True, exist_ok=True)
                pipe.text_encoder.tokenizer.save(self.out / "tokenizer.json")
            return pipe
        ae_dir = Path(c.run_dir) / "autoencoder" / "final"
        if not (ae_dir / "model.safetensors").is_file():
            raise TrainingError(
                f"The generator stage needs a trained autoencoder at {ae_dir}; "
                "run `t2v train autoencoder` with the same config first."
            )
        ae = VideoAutoencoder(cfg.load_json(AutoencoderConfig, ae_dir / "config.json"))
        ae.load_state_dict(load_file(str(ae_dir / "model.safetensors")))
        tok_path = self.out / "tokenizer.json"
        # The word-level tokenizer of the captions; a pretrained encoder keeps it as the
        # word list that tells which prompts the model can follow.
        if tok_path.is_file():
            tokenizer = Tokenizer.load(tok_path)
        else:
            tokenizer = Tokenizer.train(self._caption_corpus())
            if self.dist.main:
                self.out.mkdir(parents=True, exist_ok=True)
                tokenizer.save(tok_path)
        te = build_text_encoder(c.text_encoder, tokenizer)
        c.generator.text_dim = te.config.output_dim
        c.generator.text_slots = MAX_SLOTS if c.text_encoder.split_objects else 0
        lat = ae.config.latent_shape
        c.generator.latent_channels, c.generator.latent_frames = lat[0], lat[1]
        c.generator.latent_size = lat[2]
        return TextToVideoPipeline(te, ae, LatentGenerator(c.generator), c.pipeline, "cpu")

    def _caption_corpus(self) -> list[str]:
        n = self.config.data.tokenizer_captions
        if self.config.data.source.startswith("shapes"):
            return shapes.caption_corpus(self.config.data.seed, n)
        _, captions = self.source.batch(0, n)
        return captions

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
            self.ckpt.save(
                self.step,
                self.model,
                self.ema,
                self.opt,
                {
                    "nonfinite_total": self.nonfinite_total,
                    "data_position": {
                        "step": self.step,
                        "world": self.dist.world,
                        "batch_size": self.s.batch_size,
                    },
                },
            )

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.s.ema_decay, (1 + self.step) / (10 + self.step))
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                self.ema[k].lerp_(v.float(), 1 - decay)
            else:
                self.ema[k].copy_(v)

    def ema_model(self) -> nn.Module:
        """The objective with EMA weights, as a copy (training weights untouched)."""
        import copy

        model = copy.deepcopy(self.model)
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.ema.items()})
        return model.eval()

    # -- one step --------------------------------------------------------------------------
    def train_step(self) -> float | None:
        """One optimisation step; returns the loss, or None when it was skipped."""
        s, d = self.s, self.dist
        torch.manual_seed(_step_seed(self.config.seed, d.rank, self.step))
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
        self._update_ema()
        return loss.item()

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Path:
        from tqdm import tqdm

        s = self.s
        writer = None
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save_json(self.config, self.out / "config.json")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"))
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
                    if self.dist.main:
                        line = {
                            "step": self.step,
                            "loss": mean,
                            "samples_per_s": rate,
                            "lr": lr_at(self.step - 1, s),
                            "time": time.time(),
                            **parts,
                        }
                        with open(self.out / "log.jsonl", "a") as log:
                            log.write(json.dumps(line) + "\n")
                        if not self.progress:
                            terms = "".join(f" {k} {v:.4f}" for k, v in parts.items())
                            print(
                                f"{self.stage_name} step {self.step}/{s.steps} loss {mean:.4f}"
                                f"{terms} {rate:.1f} samples/s",
                                flush=True,
                            )
                    if writer is not None:
                        writer.add_scalar("loss", mean, self.step)
                        writer.add_scalar("lr", lr_at(self.step - 1, s), self.step)
                        writer.add_scalar("samples_per_s", rate, self.step)
                        writer.add_scalar("nonfinite_steps", self.nonfinite_total, self.step)
                    losses, t0, seen = [], time.perf_counter(), 0
                if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                    self._save_checkpoint()
                if self.dist.main and (self.step % s.sample_every == 0 or self.step == s.steps):
                    self.write_samples()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
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
        """A GIF grid: reconstructions (autoencoder) or samples for fixed prompts (generator)."""
        from t2v.video import write_video

        if self.stage_name == "autoencoder":
            ae = self.ema_model().autoencoder
            clips, _ = shapes.train_batch(self.config.data.seed + 1, 0, 4)
            recon = to_uint8_clips(ae.decode(ae.encode(to_model_tensor(clips).to(self.device))))
            rows = np.concatenate([clips, recon], axis=2)
        else:
            pipe = self._ema_pipeline()
            rows = pipe.generate(
                list(SAMPLE_PROMPTS),
                list(range(len(SAMPLE_PROMPTS))),
                steps=min(20, pipe.config.steps),
            )
        grid = np.concatenate(list(rows), axis=2)  # (T, H, W * n, 3)
        return write_video(grid, self.out / "samples" / f"step-{self.step:07d}.gif")

    def finish(self) -> Path:
        """Write the stage's product: the autoencoder folder, or the whole model folder."""
        if not self.dist.main:
            return self.out
        if self.stage_name == "autoencoder":
            ae = self.ema_model().autoencoder
            scale, shift = latent_stats(ae, self.device, self.source)
            ae.config.scale, ae.config.shift = scale, shift
            metrics = {
                "psnr_db_eval": autoencoder_psnr(ae, self.device),
                "latent_scale": scale,
                "latent_shift": shift,
                "steps": self.step,
            }
            folder = self.out / "final"
            save_component(ae, ae.config, folder)
        else:
            folder = self._ema_pipeline().save_pretrained(Path(self.config.run_dir) / "model")
            metrics = {"steps": self.step}
        metrics["nonfinite_steps"] = self.nonfinite_total
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if self.progress:
            print(f"{self.stage_name}: {json.dumps(metrics)}")
        return folder


@torch.no_grad()
def latent_stats(
    ae: VideoAutoencoder, device: torch.device, source, count: int = 256
) -> tuple[float, float]:
    """Scale and shift that give the posterior means of training clips zero mean and unit
    variance (measured on the stage's own data, whatever its source)."""
    ae.config.scale, ae.config.shift = 1.0, 0.0
    clips, _ = source.batch(0, count)
    z = torch.cat(
        [ae.encode(to_model_tensor(clips[i : i + 32]).to(device)) for i in range(0, count, 32)]
    )
    return float(1 / z.std()), float(z.mean())


@torch.no_grad()
def autoencoder_psnr(ae: VideoAutoencoder, device: torch.device, count: int = 64) -> float:
    """Reconstruction PSNR on held-out clips (the evaluation split)."""
    clips = shapes.render(shapes.eval_specs(count))
    x = to_model_tensor(clips).to(device)
    recon = torch.cat([ae.decode(ae.encode(x[i : i + 16])) for i in range(0, count, 16)])
    return psnr(recon, x)


def export_checkpoint(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write a generator checkpoint's EMA weights as a model folder, like the one the stage
    writes at its end: the latest checkpoint, or the one of ``step``."""
    run_dir, out = Path(run_dir), Path(out)
    resolved = run_dir / "generator" / "config.json"
    if not resolved.is_file():
        raise TrainingError(f"No generator run at {run_dir}: {resolved} is missing.")
    folder = run_dir / "generator"
    found = {int(p.name.split("-")[1]): p for p in sorted(folder.glob("ckpt-*[0-9]"))}
    if not found or (step is not None and step not in found):
        have = ", ".join(map(str, found)) or "none"
        raise TrainingError(
            f"No checkpoint of step {step} in {folder}; it has: {have}."
            if step is not None
            else f"No checkpoint in {folder}."
        )
    config = cfg.load_json(TrainConfig, resolved)
    config.run_dir, config.device = str(run_dir), "cpu"
    trainer = Trainer(config, "generator", progress=False)
    trainer.ema, _ = Checkpointer.load(
        found[max(found) if step is None else step], trainer.model, trainer.opt, trainer.device
    )
    return trainer._ema_pipeline().save_pretrained(out)


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
