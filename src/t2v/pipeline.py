"""TextToVideoPipeline: text encoder + latent generator + video decoder, saved as one folder.

A model folder holds one subfolder per component (config.json + model.safetensors), the
tokenizer as tokenizer.json, pipeline.json with the sampling defaults, and a model card
README.md. Nothing in it is ever unpickled.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

from t2v import config as cfg
from t2v.data import to_model_tensor, to_uint8_clips
from t2v.flow import time_grid
from t2v.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from t2v.models.generator import GeneratorConfig, LatentGenerator
from t2v.models.text_encoders import (
    TextEncoder,
    TextEncoderConfig,
    TextEncoding,
    build_text_encoder,
)
from t2v.sampling import SAMPLERS
from t2v.text import PromptError, Tokenizer, normalize
from t2v.video import Video

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
MAX_STEPS, MAX_GUIDANCE = 100, 20.0


class ModelError(RuntimeError):
    """A model folder that cannot be loaded; the message says which file and why."""


@dataclass
class PipelineConfig:
    steps: int = 20
    guidance: float = 4.0
    sampler: Literal["euler", "heun"] = "euler"
    shift: float = 1.0  # time-grid shift, see t2v.flow.time_grid
    fps: float = 8.0
    max_prompt_chars: int = 500
    format_version: int = 1


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but this machine has no usable CUDA GPU.")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"Unknown device {device!r}; use auto, cpu or cuda.")
    return torch.device(device)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU or CUDA, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"Unknown precision {precision!r}; use fp32 or bf16.")
    return contextlib.nullcontext()


def refuse_pickles(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelError(
                f"Refusing to load {path}: it contains {f.name}, a pickle-format "
                "file; t2v only loads safetensors weights and JSON configs."
            )


def save_component(module: torch.nn.Module, config, folder: Path) -> None:
    """A component folder: config.json and, if it has any, its weights as model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_json(config, folder / "config.json")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if state:
        cfg.save_tensors(state, folder / "model.safetensors")


def _load_weights(module: torch.nn.Module, folder: Path) -> None:
    f = folder / "model.safetensors"
    if not f.is_file():
        raise ModelError(f"{f} is missing.")
    try:
        state = load_file(str(f))
        module.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or mismatched file is one user error
        raise ModelError(f"{f} does not match its config.json: {str(e).splitlines()[0]}") from None


class TextToVideoPipeline:
    def __init__(
        self,
        text_encoder: TextEncoder,
        autoencoder: VideoAutoencoder,
        generator: LatentGenerator,
        config: PipelineConfig | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ):
        self.text_encoder, self.autoencoder, self.generator = text_encoder, autoencoder, generator
        self.config = config or PipelineConfig()
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.precision = precision
        for m in self.modules():
            m.to(self.device).eval()

    def modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.autoencoder, self.generator]

    # --- persistence -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, device: str = "auto", precision: str = "fp32"
    ) -> TextToVideoPipeline:
        path = Path(path) if path is not None else DEFAULT_MODEL_DIR
        if not (path / "pipeline.json").is_file():
            raise ModelError(f"No t2v model at {path}: pipeline.json is missing.")
        refuse_pickles(path)
        try:
            pipe_cfg = cfg.load_json(PipelineConfig, path / "pipeline.json")
            text_cfg = cfg.load_json(TextEncoderConfig, path / "text_encoder" / "config.json")
            ae_cfg = cfg.load_json(AutoencoderConfig, path / "autoencoder" / "config.json")
            gen_cfg = cfg.load_json(GeneratorConfig, path / "generator" / "config.json")
        except (cfg.ConfigError, ValueError) as e:
            raise ModelError(f"Cannot load the model at {path}: {e}") from None
        tokenizer = None  # optional for a pretrained encoder (its word list, see understands)
        if text_cfg.kind != "pretrained" or (path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(path / "tokenizer.json")
        text_encoder = build_text_encoder(text_cfg, tokenizer)
        autoencoder, generator = VideoAutoencoder(ae_cfg), LatentGenerator(gen_cfg)
        if text_encoder.trainable:
            _load_weights(text_encoder, path / "text_encoder")
        _load_weights(autoencoder, path / "autoencoder")
        _load_weights(generator, path / "generator")
        return cls(text_encoder, autoencoder, generator, pipe_cfg, device, precision)

    def save_pretrained(self, path: str | Path, card: str | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        te = self.text_encoder
        if te.trainable:
            save_component(te, te.config, path / "text_encoder")
        else:  # nothing trained: the config names the frozen model
            (path / "text_encoder").mkdir(exist_ok=True)
            cfg.save_json(te.config, path / "text_encoder" / "config.json")
        if isinstance(getattr(te, "tokenizer", None), Tokenizer):
            te.tokenizer.save(path / "tokenizer.json")
        save_component(self.autoencoder, self.autoencoder.config, path / "autoencoder")
        save_component(self.generator, self.generator.config, path / "generator")
        cfg.save_json(self.config, path / "pipeline.json")
        (path / "README.md").write_text(card or self.default_card(), encoding="utf-8")
        return path

    def default_card(self) -> str:
        rows = "\n".join(
            f"| {name} | {sum(p.numel() for p in m.parameters()):,} |"
            for name, m in zip(
                ("text encoder", "autoencoder", "generator"), self.modules(), strict=True
            )
        )
        frozen = getattr(self.text_encoder, "frozen", None)
        if frozen is not None:  # a pretrained encoder: its weights live outside the folder
            rows += f"\n| frozen pretrained text model (not stored) | {frozen.num_parameters():,} |"
        return (
            f"# t2v model\n\n| component | parameters |\n|---|---|\n{rows}\n\n"
            f"Sampling defaults: {cfg.to_dict(self.config)}\n"
        )

    # --- generation ------------------------------------------------------------------------
    def check_prompt(self, prompt: str) -> str:
        text = normalize(prompt, self.config.max_prompt_chars)
        if not self.text_encoder.understands(text):
            raise PromptError(
                f"The model knows none of the words in {text[:60]!r}; describe "
                "a shape, its colour and motion, e.g. 'a red circle moving left'."
            )
        return text

    def _check_params(self, steps: int | None, guidance: float | None) -> tuple[int, float]:
        steps = self.config.steps if steps is None else steps
        guidance = self.config.guidance if guidance is None else guidance
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be a whole number from 1 to {MAX_STEPS}, not {steps!r}.")
        if not 0 <= float(guidance) <= MAX_GUIDANCE:
            raise ValueError(f"guidance must be from 0 to {MAX_GUIDANCE:g}, not {guidance!r}.")
        return steps, float(guidance)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """One noise tensor per seed, drawn on the CPU so every device starts alike."""
        shape = self.autoencoder.config.latent_shape
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32:
                raise ValueError(f"seed must be a whole number from 0 to 2**32 - 1, not {s!r}.")
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(self.device)  # (B, C, T, H, W)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompts: list[str] | None = None,
        callback: Callable[[int, int], None] | None = None,
        timings: dict[str, float] | None = None,
    ) -> np.ndarray:
        """Generate one clip per prompt: uint8 (B, T, H, W, 3). Clip i is set by
        (prompts[i], seeds[i], negative_prompts[i], steps, guidance); generated in another
        batch it can differ by one uint8 level (batch-size-dependent CPU kernels)."""
        clock = {"text": 0.0, "sampling": 0.0, "decoding": 0.0}
        mark = time.perf_counter()
        # 1. Check inputs.
        if len(prompts) != len(seeds):
            raise ValueError("Give exactly one seed per prompt.")
        prompts = [self.check_prompt(p) for p in prompts]
        negatives = [
            normalize(n, self.config.max_prompt_chars) if n and n.strip() else ""
            for n in (negative_prompts or [""] * len(prompts))
        ]
        steps, guidance = self._check_params(steps, guidance)
        x = self.initial_noise(seeds)
        with autocast(self.device, self.precision):
            # 2. Encode text: the prompts, then (for guidance) the negatives or "".
            guided = guidance != 1.0
            text = self.text_encoder(prompts + negatives if guided else prompts)
            clock["text"] = time.perf_counter() - mark
            mark = time.perf_counter()
            # 3-4. Denoise from noise at t = 1 to latents at t = 0 with classifier-free
            # guidance (Ho & Salimans 2022): v = v_neg + g (v_cond - v_neg).
            ts = time_grid(steps, self.config.shift, device=self.device)
            sampler = SAMPLERS[self.config.sampler]
            z = sampler(
                _Guided(self.generator, guidance if guided else None), x, ts, text, callback
            ).float()
            clock["sampling"] = time.perf_counter() - mark
            mark = time.perf_counter()
            # 5. Decode latents to frames.
            video = self.autoencoder.decode(z).float()  # (B, 3, T, H, W)
        out = to_uint8_clips(video)  # (B, T, H, W, 3)
        clock["decoding"] = time.perf_counter() - mark
        if timings is not None:
            timings.update(clock)
        return out

    @torch.no_grad()
    def reconstruct(self, clips: np.ndarray) -> np.ndarray:
        """Pass uint8 clips (B, T, H, W, 3) through the autoencoder and back: the best the
        generator could show, since it only makes latents."""
        x = to_model_tensor(clips).to(self.device)
        with autocast(self.device, self.precision):
            video = self.autoencoder.decode(self.autoencoder.encode(x))
        return to_uint8_clips(video)

    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> Video:
        frames = self.generate(
            [prompt],
            [seed],
            steps=steps,
            guidance=guidance,
            negative_prompts=[negative_prompt or ""],
            callback=callback,
        )
        return Video(frames[0], fps=self.config.fps)


class _Guided:
    """The generator as a sampler model, with classifier-free guidance when scale is set."""

    def __init__(self, generator: LatentGenerator, scale: float | None):
        self.generator, self.scale = generator, scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        if self.scale is None:
            return self.generator(x, t, text).float()
        v = self.generator(torch.cat([x, x]), torch.cat([t, t]), text).float()
        v_cond, v_neg = v.chunk(2)
        return v_neg + self.scale * (v_cond - v_neg)
