"""Checkpoints and weight averaging: atomic safetensors checkpoints of a training run, the
EMA of its weights, the autoencoder stage's product, and a model folder exported from any
kept generator checkpoint (without building a trainer).

A checkpoint folder holds model, ema, optimizer and rng tensors as safetensors and the
step, counters and optimizer settings as JSON; nothing in it is ever unpickled.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from t2v import config as cfg
from t2v.errors import UserError
from t2v.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from t2v.models.build import build_pipeline
from t2v.models.generator import LatentGenerator
from t2v.outputs import check_dir, writing_dir
from t2v.pipeline import TextToVideoPipeline
from t2v.runtime import refuse_pickles
from t2v.sources import save_vocabulary
from t2v.text import Tokenizer
from t2v.train_config import TrainConfig

# What a model folder holds, so one an older t2v wrote (without a marker) can be replaced.
MODEL_LAYOUT = (
    "pipeline.json",
    "README.md",
    "tokenizer.json",
    *"text_encoder autoencoder generator".split(),
)


class TrainingError(UserError):
    """Training cannot go on; the message says why in one sentence."""


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


# --- exponential moving average --------------------------------------------------------------


def ema_init(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of every weight and buffer: the start of their moving average."""
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float, step: int) -> None:
    """Move the average towards ``model`` after ``step`` steps; the decay warms up as
    (1 + step) / (10 + step), so the first steps' random weights fade fast. Integer buffers
    are copied."""
    decay = min(decay, (1 + step) / (10 + step))
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k].lerp_(v.float(), 1 - decay)
        else:
            ema[k].copy_(v)


def ema_copy(model: nn.Module, ema: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding the averaged weights, in eval mode (``model`` untouched)."""
    averaged = copy.deepcopy(model)
    state = averaged.state_dict()
    averaged.load_state_dict({k: v.to(state[k].dtype) for k, v in ema.items()})
    return averaged.eval()


def load_ema(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The averaged weights of a checkpoint folder, alone (no optimizer, no rng)."""
    refuse_pickles(path)
    return load_file(str(path / "ema.safetensors"), device=str(device))


def checkpoint_of(folder: Path, step: int | None) -> Path:
    """The kept checkpoint of ``step`` in a stage folder, or its latest."""
    found = {int(p.name.split("-")[1]): p for p in sorted(folder.glob("ckpt-*[0-9]"))}
    if not found or (step is not None and step not in found):
        have = ", ".join(map(str, found)) or "none"
        raise TrainingError(
            f"No checkpoint of step {step} in {folder}; it has: {have}."
            if step is not None
            else f"No checkpoint in {folder}."
        )
    return found[max(found) if step is None else step]


# --- stage products ----------------------------------------------------------------------


def trained_autoencoder(run_dir: Path) -> VideoAutoencoder:
    """The autoencoder stage's product, which the generator stage trains on."""
    folder = run_dir / "autoencoder" / "final"
    if not (folder / "model.safetensors").is_file():
        raise TrainingError(
            f"The generator stage needs a trained autoencoder at {folder}; "
            "run `t2v train autoencoder` with the same config first."
        )
    ae = VideoAutoencoder(cfg.load_json(AutoencoderConfig, folder / "config.json"))
    ae.load_state_dict(load_file(str(folder / "model.safetensors")))
    return ae


def export_checkpoint(
    run_dir: str | Path, out: str | Path, step: int | None = None, stage: str = "generator"
) -> Path:
    """Write a generator or distill checkpoint's EMA weights as a model folder, like the one
    the stage writes at its end: the latest checkpoint, or the one of ``step``. ``out`` must
    be new, empty or a model folder t2v wrote (see t2v.outputs)."""
    run_dir, out = Path(run_dir), Path(out)
    folder = run_dir / stage
    if not (folder / "config.json").is_file():
        raise TrainingError(f"No {stage} run at {run_dir}: {folder / 'config.json'} is missing.")
    checkpoint = checkpoint_of(folder, step)
    check_dir(out, "model", MODEL_LAYOUT)
    c = cfg.load_json(TrainConfig, folder / "config.json")
    if stage == "distill":  # the student's generator over its teacher's other components
        teacher = TextToVideoPipeline.from_pretrained(c.distill.teacher, device="cpu")
        gen = LatentGenerator(c.generator)
        gen.load_state_dict(_prefixed(load_ema(checkpoint), "generator."))
        pipe = TextToVideoPipeline(teacher.text_encoder, teacher.autoencoder, gen, c.pipeline)
        with writing_dir(out, "model", MODEL_LAYOUT) as tmp:
            pipe.save_pretrained(tmp)
            save_vocabulary(tmp, c.data.source)
        return out
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(folder / "tokenizer.json")
    te, ae, gen = build_pipeline(
        c.text_encoder, trained_autoencoder(run_dir), c.generator, tokenizer
    )
    ema = load_ema(checkpoint)
    # The checkpoint holds the generator objective's weights: generator.* and text_encoder.*
    gen.load_state_dict(_prefixed(ema, "generator."))
    if te.trainable:
        te.load_state_dict(_prefixed(ema, "text_encoder."))
    with writing_dir(out, "model", MODEL_LAYOUT) as tmp:
        TextToVideoPipeline(te, ae, gen, c.pipeline, "cpu").save_pretrained(tmp)
        save_vocabulary(tmp, c.data.source)
    return out


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
