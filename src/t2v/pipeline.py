"""TextToVideoPipeline: text encoder + latent generator + video decoder, saved as one folder.

A model folder holds one subfolder per component (config.json + model.safetensors), the
tokenizer as tokenizer.json, pipeline.json with the sampling defaults, and a model card
README.md. Nothing in it is ever unpickled. The pipeline implements `t2v.model.VideoModel`:
its knobs come from pipeline.json (steps, guidance, fps) and the autoencoder's config
(frames, size), read by `knobs_of` without loading any weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from t2v import config as cfg
from t2v.flow import time_grid
from t2v.model import (
    MAX_GUIDANCE,
    MAX_STEPS,
    GenerationRequest,
    IsCancelled,
    Knobs,
    ModelError,
    ModelInfo,
    Progress,
    UserError,
)
from t2v.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from t2v.models.generator import GeneratorConfig, LatentGenerator
from t2v.models.layout import predict_layout
from t2v.models.text_encoders import (
    TextEncoder,
    TextEncoderConfig,
    TextEncoding,
    build_text_encoder,
)
from t2v.pipeline_config import (
    DEFAULT_MODEL_DIR,
    PipelineConfig,
    distilled_guidance,
    knobs_of,
    model_folder,
    model_id,
)
from t2v.rewrite import Rewriter
from t2v.runtime import (
    StepCounter,
    autocast,
    check_offload,
    dtype,
    out_of_memory_fails,
    refuse_pickles,
    resolve_device,
)
from t2v.sampling import SAMPLERS
from t2v.text import PromptError, Tokenizer, normalize, normalize_negative
from t2v.video import Video, to_model_tensor, to_uint8_clips

__all__ = ["DEFAULT_MODEL_DIR", "MAX_GUIDANCE", "MAX_STEPS", "ModelError", "PipelineConfig"]
__all__ += ["TextToVideoPipeline", "knobs_of"]

DESCRIPTION = (
    "A small t2v model trained on Moving Shapes: coloured shapes moving on black, "
    "16 frames of 64x64."
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
    """The bundled kind of model, a `t2v.model.VideoModel`. ``info`` names it; ``knobs``
    derive from its configs each time, so they follow a caller that swaps ``config``.
    ``rewriter`` reads prompts in `resolve` (None: taken as typed; `sample` never reads)."""

    rewriter: Rewriter | None = None

    def __init__(
        self,
        text_encoder: TextEncoder,
        autoencoder: VideoAutoencoder,
        generator: LatentGenerator,
        config: PipelineConfig | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        info: ModelInfo | None = None,
    ):
        self.text_encoder, self.autoencoder, self.generator = text_encoder, autoencoder, generator
        self.config = config or PipelineConfig()
        self.device = resolve_device(device) if isinstance(device, str) else device
        dtype(precision)  # an unknown name fails here, not at the first generation
        self.precision = precision
        self.info = info or ModelInfo(id="t2v", kind="t2v", description=DESCRIPTION)
        for m in self.modules():
            m.to(self.device).eval()

    @property
    def knobs(self) -> Knobs:
        ae, gen = self.autoencoder.config, self.generator.config
        return knobs_of(
            self.config,
            {"frames": ae.frames, "size": ae.size},
            {"distilled_guidance": gen.distilled_guidance},
        )

    def modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.autoencoder, self.generator]

    # --- persistence -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str = "auto",
        precision: str = "fp32",
        offload: str = "none",
    ) -> TextToVideoPipeline:
        """Load a t2v model folder (None: the bundled model). A diffusers folder (with
        model_index.json) is handed to `t2v.backends.load_model`, which returns a
        `VideoModel` of its own kind. ``offload`` exists for the diffusers backend's sake; a
        t2v model is small, so only "none" is taken."""
        path = model_folder(path)
        if (path / "model_index.json").is_file() and not (path / "pipeline.json").is_file():
            from t2v.backends import load_model

            return load_model(path, device, precision, offload)
        if offload != "none":
            check_offload(offload, resolve_device(device))
            raise ModelError(
                f"--offload {offload} is for large diffusers models; a t2v model fits in "
                "memory, so leave it at none."
            )
        if not (path / "pipeline.json").is_file():
            raise ModelError(f"No t2v model at {path}: pipeline.json is missing.")
        refuse_pickles(path)
        try:
            pipe_cfg = cfg.load_json(PipelineConfig, path / "pipeline.json")
            text_cfg = cfg.load_json(TextEncoderConfig, path / "text_encoder" / "config.json")
            ae_cfg = cfg.load_json(AutoencoderConfig, path / "autoencoder" / "config.json")
            gen_cfg = cfg.load_json(GeneratorConfig, path / "generator" / "config.json")
            distilled_guidance(pipe_cfg, {"distilled_guidance": gen_cfg.distilled_guidance})
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
        info = ModelInfo(
            id=model_id(path),
            kind="t2v",
            description=DESCRIPTION,
            extra={"path": str(path), "precision": precision},
        )
        pipe = cls(text_encoder, autoencoder, generator, pipe_cfg, device, precision, info)
        info.extra["device"] = pipe.device.type
        pipe.rewriter = Rewriter.for_model(path)
        return pipe

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
        if self.rewriter is not None:
            self.rewriter.save(path)
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

    # --- generation: the VideoModel protocol ----------------------------------------------
    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """See `t2v.model.VideoModel.resolve`; the prompt is read as the nearest training
        caption (`t2v.rewrite`, when the folder has a vocabulary.json), with a warning that
        names the words the model does not know; a prompt of none of its words is refused."""
        request = self.knobs.resolve(request)
        if self.rewriter is not None and request.original_prompt is None:  # not read yet
            reading = self.rewriter.rewrite(request.prompt)
            request = replace(
                request,
                prompt=reading.prompt,
                original_prompt=request.prompt if reading.changed else None,
                warnings=reading.warnings,
            )
        if not self.text_encoder.understands(request.prompt):
            raise UserError(_unknown_words(request.prompt))
        return request

    def generate(
        self,
        requests: list[GenerationRequest] | list[str],
        seeds: list[int] | None = None,
        progress: Progress | None = None,
        cancelled: IsCancelled | None = None,
        **options,
    ):
        """`VideoModel.generate`: a list of `Video`, one per request. Called the older way,
        ``generate(prompts, seeds, steps=, guidance=, negative_prompts=, callback=)``, it
        returns uint8 frames (B, T, H, W, 3) as `sample` does."""
        if seeds is not None or options or any(isinstance(r, str) for r in requests):
            return self.sample(requests, seeds, **options)
        requests = [self.resolve(r) for r in requests]
        # One batch per (steps, guidance); usually a single batch of one request.
        groups: dict[tuple[int, float], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.steps, r.guidance), []).append(i)
        counter = StepCounter(sum(s for s, _ in groups), progress, cancelled)
        videos: list[Video | None] = [None] * len(requests)
        for (steps, guidance), members in groups.items():
            batch = [requests[i] for i in members]
            frames = self._sample(
                [r.prompt for r in batch],
                [r.seed for r in batch],
                [r.negative_prompt for r in batch],
                steps,
                guidance,
                lambda done, total: counter.step(),
            )
            for i, r, clip in zip(members, batch, frames, strict=True):
                videos[i] = Video(clip, fps=r.fps)
        return videos

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
        frames = self.sample(
            [prompt],
            [seed],
            steps=steps,
            guidance=guidance,
            negative_prompts=[negative_prompt or ""],
            callback=callback,
        )
        return Video(frames[0], fps=self.config.fps)

    # --- generation: prompts and seeds in, frames out ----------------------------------------
    def check_prompt(self, prompt: str) -> str:
        text = normalize(prompt, self.config.max_prompt_chars)
        if not self.text_encoder.understands(text):
            raise PromptError(_unknown_words(text))
        return text

    def _check_params(self, steps: int | None, guidance: float | None) -> tuple[int, float]:
        steps = self.config.steps if steps is None else steps
        guidance = self.config.guidance if guidance is None else guidance
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise UserError(f"steps must be a whole number, not {steps!r}.")
        knobs = self.knobs
        return knobs.steps.check("steps", steps), knobs.guidance.check("guidance", guidance)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """One noise tensor per seed, drawn on the CPU so every device starts alike."""
        shape = self.autoencoder.config.latent_shape
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32:
                raise UserError(f"seed must be a whole number from 0 to 2**32 - 1, not {s!r}.")
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(self.device)  # (B, C, T, H, W)

    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompts: list[str] | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Generate one clip per prompt: uint8 (B, T, H, W, 3). Clip i is set by
        (prompts[i], seeds[i], negative_prompts[i], steps, guidance); generated in another
        batch it can differ by one uint8 level (batch-size-dependent CPU kernels)."""
        if len(prompts) != len(seeds):
            raise ValueError("Give exactly one seed per prompt.")
        prompts = [self.check_prompt(p) for p in prompts]
        negatives = [
            normalize_negative(n, self.config.max_prompt_chars)
            for n in (negative_prompts or [""] * len(prompts))
        ]
        if any(negatives) and not self.knobs.negative_prompt:
            raise UserError(NO_NEGATIVE)
        steps, guidance = self._check_params(steps, guidance)
        return self._sample(prompts, seeds, negatives, steps, guidance, callback)

    @torch.no_grad()
    def _sample(
        self,
        prompts: list[str],
        seeds: list[int],
        negatives: list[str],
        steps: int,
        guidance: float,
        callback: Callable[[int, int], None] | None,
    ) -> np.ndarray:
        """The numbered steps, on checked inputs."""
        # 1. Draw the starting noise, one seed per clip.
        x = self.initial_noise(seeds)
        with out_of_memory_fails(), autocast(self.device, self.precision):
            ts = time_grid(steps, self.config.shift, device=self.device)
            if self.generator.config.distilled_guidance is not None:
                # A distilled generator: guidance is inside it, so one pass per step.
                text = self._with_layout(self.text_encoder(prompts), seeds)
                z = SAMPLERS["shortcut"](_Stepped(self.generator), x, ts, text, callback).float()
                return to_uint8_clips(self.autoencoder.decode(z).float())
            # 2. Encode text: the prompts, then (for guidance) the negatives or "". A layout
            # generator also gets where each prompt's objects go (the negatives get none).
            guided = guidance != 1.0
            text = self.text_encoder(prompts + negatives if guided else prompts)
            text = self._with_layout(text, seeds)
            # 3-4. Denoise from noise at t = 1 to latents at t = 0 with classifier-free
            # guidance (Ho & Salimans 2022): v = v_neg + g (v_cond - v_neg).
            sampler = SAMPLERS[self.config.sampler]
            z = sampler(
                _Guided(self.generator, guidance if guided else None), x, ts, text, callback
            ).float()
            # 5. Decode latents to frames.
            video = self.autoencoder.decode(z).float()  # (B, 3, T, H, W)
        return to_uint8_clips(video)  # (B, T, H, W, 3)

    def _with_layout(self, text: TextEncoding, seeds: list[int]) -> TextEncoding:
        g = self.generator
        if not g.config.layout:
            return text
        frames = self.autoencoder.config.frames
        boxes = predict_layout(g.layout_head, text, g.config.text_slots, seeds, frames)
        return text._replace(boxes=boxes)

    @torch.no_grad()
    def reconstruct(self, clips: np.ndarray) -> np.ndarray:
        """Pass uint8 clips (B, T, H, W, 3) through the autoencoder and back: the best the
        generator could show, since it only makes latents."""
        x = to_model_tensor(clips).to(self.device)
        with autocast(self.device, self.precision):
            video = self.autoencoder.decode(self.autoencoder.encode(x))
        return to_uint8_clips(video)


NO_NEGATIVE = (
    "This model has its guidance distilled into it, so it takes no negative prompt; "
    "its teacher model does."
)


def _unknown_words(prompt: str) -> str:
    return (
        f"The model knows none of the words in {prompt[:60]!r}; describe "
        "a shape, its colour and motion, e.g. 'a red circle moving left'."
    )


class _Stepped:
    """A distilled generator as the shortcut sampler's model."""

    def __init__(self, generator: LatentGenerator):
        self.generator = generator

    def __call__(self, x, t, text: TextEncoding, step: torch.Tensor) -> torch.Tensor:
        return self.generator(x, t, text, step=step).float()


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
