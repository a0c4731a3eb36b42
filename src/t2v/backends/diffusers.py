"""Open-weight text-to-video models in diffusers format (Wan, LTX-Video, CogVideoX).

A diffusers folder holds ``model_index.json`` and one subfolder per component. It is loaded
offline (``HF_HUB_OFFLINE``, ``local_files_only``), from safetensors only, and refused with
one sentence, before anything in it is read, when it holds a pickle-format file, any
``.py`` file, or a ``model_index.json`` naming a class outside diffusers and transformers:
none of its code ever runs, and ``trust_remote_code`` is never passed.

`DiffusersModel` implements `t2v.model.VideoModel`. Its knobs follow each pipeline's own
rules (read from diffusers 0.42's ``check_inputs`` and ``__call__``): Wan takes 4k+1 frames
and sizes in multiples of 16; LTX-Video 8k+1 frames and sizes in multiples of 32;
CogVideoX 8k+1 frames (an odd number of latent frames, which its VAE decodes exactly) and
sizes in multiples of 16. The factors come from the folder's VAE
and transformer configs, so a smaller model gets its own. Other diffusers text-to-video
classes with the same call run as "untested" (``ModelInfo.tested`` False). A prompt longer
than the T5 text encoder reads (the call's ``max_sequence_length``) resolves with a warning
that names the words it ignores, where diffusers would only log them.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from t2v.model import (
    MAX_FPS,
    MAX_GUIDANCE,
    MAX_STEPS,
    MIN_FPS,
    FloatRange,
    GenerationRequest,
    IntRange,
    IsCancelled,
    Knobs,
    ModelError,
    ModelInfo,
    Progress,
)
from t2v.runtime import (
    StepCounter,
    check_offload,
    dtype,
    folder_files,
    out_of_memory_fails,
    refuse_pickles,
    resolve_device,
)

INSTALL = 'pip install "t2v[diffusers]"'
LIBRARIES = ("diffusers", "transformers")
MAX_SIZE = 1280  # pixels a side: what the tested models were trained up to
TAIL_CHARS = 80  # of the ignored words a warning quotes
# The arguments of the diffusers text-to-video call that t2v drives.
CALL = ("prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale")
CALL += ("generator", "output_type", "callback_on_step_end")


@dataclass(frozen=True)
class Rules:
    """A pipeline class's defaults and limits, as its ``__call__`` and ``check_inputs`` set
    them; ``None`` where the pipeline takes the default from its transformer's config."""

    steps: int
    guidance: float
    fps: float
    frames: int | None
    height: int | None
    width: int | None
    max_frames: int
    size_multiple: int  # what check_inputs demands, before the VAE and patch factors


# tests/test_diffusers.py checks these defaults against the installed diffusers' signatures.
TESTED = {
    "WanPipeline": Rules(50, 5.0, 16.0, 81, 480, 832, 161, 16),
    "LTXPipeline": Rules(50, 3.0, 25.0, 161, 512, 704, 257, 32),
    "CogVideoXPipeline": Rules(50, 6.0, 8.0, None, None, None, 49, 8),
}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is missing.") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object.")
    return data


def check_folder(path: Path) -> dict:
    """Refuse a folder whose loading could run code; return its model_index.json."""
    refuse_pickles(path)
    for f in (f for f in folder_files(path) if f.suffix.lower() == ".py"):
        raise ModelError(
            f"Refusing to load {path}: it contains {f.relative_to(path)}, Python code; t2v "
            "runs only the code of diffusers and transformers, never a model's own."
        )
    index = _json(path / "model_index.json")
    name = index.get("_class_name")
    if not isinstance(name, str) or not name.isidentifier():
        raise ModelError(
            f"Refusing to load {path}: its model_index.json names the pipeline {name!r}, "
            "which is not a diffusers class (custom pipelines are not run)."
        )
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list):
            continue
        library = spec[0] if spec else None
        if spec != [None, None] and library not in LIBRARIES:
            raise ModelError(
                f"Refusing to load {path}: its model_index.json takes {component} from "
                f"{library!r}; t2v loads components from diffusers and transformers only."
            )
    return index


# --- knobs: from the folder's JSON alone --------------------------------------------------


def _factors(name: str, path: Path) -> tuple[int, int, int]:
    """(temporal factor, spatial factor, transformer patch) of a tested pipeline's folder."""
    vae = _json(path / "vae" / "config.json")
    transformer = _json(path / "transformer" / "config.json")
    if name == "WanPipeline":
        patch = transformer.get("patch_size", [1, 2, 2])[1]
        return vae.get("scale_factor_temporal", 4), vae.get("scale_factor_spatial", 8), patch
    if name == "LTXPipeline":
        levels = sum(vae.get("spatio_temporal_scaling", (True, True, True, False)))
        spatial = vae.get("spatial_compression_ratio") or vae.get("patch_size", 4) * 2**levels
        temporal = vae.get("temporal_compression_ratio") or vae.get("patch_size_t", 1) * 2**levels
        return temporal, spatial, transformer.get("patch_size", 1)
    spatial = 2 ** (len(vae.get("block_out_channels", (128, 256, 256, 512))) - 1)
    # CogVideoX's VAE decodes an even number of latent frames into twice too many frames
    # (its first batch must be odd), so the latent count is odd: 8k+1 frames for 4x.
    temporal = 2 * vae.get("temporal_compression_ratio", 4)
    return temporal, spatial, transformer.get("patch_size", 2)


def _generic_rules(name: str) -> Rules:
    """An untested class's defaults from its call signature (this imports diffusers)."""
    params = inspect.signature(_pipeline_class(name).__call__).parameters

    def default(key: str, fallback):
        value = params[key].default if key in params else None
        return fallback if value in (None, inspect.Parameter.empty) else value

    return Rules(
        steps=default("num_inference_steps", 50),
        guidance=float(default("guidance_scale", 5.0)),
        fps=float(default("frame_rate", default("fps", 16.0))),
        frames=default("num_frames", 49),
        height=default("height", 480),
        width=default("width", 832),
        max_frames=257,
        size_multiple=16,
    )


def read_knobs(path: Path) -> Knobs:
    """The knobs of the diffusers folder ``path``; for the tested classes from JSON alone."""
    name = check_folder(path)["_class_name"]
    rules = TESTED.get(name) or _generic_rules(name)
    if name in TESTED:
        temporal, spatial, patch = _factors(name, path)
    else:  # untested: what the VAE config says, in the common keys
        vae = _json(path / "vae" / "config.json") if (path / "vae").is_dir() else {}
        temporal = vae.get("temporal_compression_ratio") or vae.get("scale_factor_temporal") or 4
        spatial = vae.get("spatial_compression_ratio") or vae.get("scale_factor_spatial") or 8
        patch = 2
    size = math.lcm(rules.size_multiple, spatial * patch)
    transformer = _json(path / "transformer" / "config.json")
    frames = rules.frames or transformer.get("sample_frames", 49)
    height = rules.height or transformer.get("sample_height", 60) * spatial
    width = rules.width or transformer.get("sample_width", 90) * spatial
    max_frames = max(rules.max_frames, frames)
    if name == "CogVideoXPipeline" and transformer.get("patch_size_t") is not None:
        max_frames = 81  # CogVideoX 1.5
    max_width, max_height = max(MAX_SIZE, width), max(MAX_SIZE, height)
    if name == "WanPipeline":  # its rotary table places rope_max_seq_len positions an axis
        positions = transformer.get("rope_max_seq_len", 1024)
        most = positions * spatial * patch // size * size
        max_width, max_height = min(max_width, most), min(max_height, most)
        max_frames = min(max_frames, (positions - 1) * temporal + 1)
    return Knobs(
        steps=IntRange(rules.steps, 1, MAX_STEPS),
        guidance=FloatRange(rules.guidance, 0.0, MAX_GUIDANCE),
        frames=IntRange(min(frames, max_frames), temporal + 1, max_frames, temporal, 1),
        width=IntRange(min(width, max_width), size, max_width, size),
        height=IntRange(min(height, max_height), size, max_height, size),
        fps=FloatRange(rules.fps, MIN_FPS, MAX_FPS),
    )


# --- loading and generating --------------------------------------------------------------


def _diffusers():
    """The diffusers module, offline; a missing extra is one sentence."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is first imported
    try:
        import diffusers
    except ImportError:
        raise ModelError(
            f"This is a diffusers model folder, and running it needs the diffusers extra: "
            f"{INSTALL}."
        ) from None
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # t2v reports progress itself
    transformers.utils.logging.disable_progress_bar()
    return diffusers


def _pipeline_class(name: str):
    diffusers = _diffusers()
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ModelError(f"{name} is not a pipeline class of the installed diffusers.")
    missing = [p for p in CALL if p not in inspect.signature(cls.__call__).parameters]
    if missing:
        raise ModelError(
            f"{name} is not a text-to-video pipeline t2v can run: its call lacks "
            f"{', '.join(missing)}."
        )
    return cls


def _check_components(path: Path, index: dict) -> None:
    """Each component's class must exist in the library it names (checked before loading,
    so a misnamed class is one sentence, not a traceback from deep inside diffusers)."""
    import importlib

    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec == [None, None]:
            continue
        library, name = (spec + [None])[:2]
        if not isinstance(getattr(importlib.import_module(library), str(name), None), type):
            raise ModelError(
                f"Cannot load {path}: its model_index.json takes {component} from {library} as "
                f"{name!r}, which the installed {library} does not have."
            )


class DiffusersModel:
    """A diffusers text-to-video pipeline as a `t2v.model.VideoModel`. One generation runs
    at a time: diffusers' pipelines and schedulers keep state between steps."""

    def __init__(self, pipe, info: ModelInfo, knobs: Knobs, device):
        self.pipe, self.info, self.knobs, self.device = pipe, info, knobs, device
        self._lock = threading.Lock()
        params = inspect.signature(type(pipe).__call__).parameters
        self._frame_rate = "frame_rate" in params  # LTX conditions on the frame rate
        transformer = getattr(pipe, "transformer", None)
        # CogVideoX's positional embeddings fix the text length to its transformer's.
        self._text_length = getattr(
            getattr(transformer, "config", None), "max_text_seq_length", None
        )
        # The tokens its T5 text encoder reads: the call's max_sequence_length (CogVideoX's
        # transformer length, which generate passes); longer prompts lose their tail.
        reads = params.get("max_sequence_length")
        limit = self._text_length or (reads.default if reads is not None else None)
        t5 = hasattr(pipe, "_get_t5_prompt_embeds") and getattr(pipe, "tokenizer", None) is not None
        self._prompt_tokens = limit if t5 and isinstance(limit, int) else None  # None: no warning
        # Wan cleans a prompt (ftfy, HTML entities, spaces) before tokenizing it.
        self._clean = getattr(inspect.getmodule(type(pipe)), "prompt_clean", None)

    @classmethod
    def from_folder(
        cls, path: Path, device: str = "auto", precision: str = "fp32", offload: str = "none"
    ) -> DiffusersModel:
        knobs = read_knobs(path)  # refuses an unsafe folder before anything is loaded
        index = _json(path / "model_index.json")
        name = index["_class_name"]
        pipeline_class = _pipeline_class(name)
        _check_components(path, index)
        import torch

        target = resolve_device(device)
        check_offload(offload, target)
        try:
            pipe = pipeline_class.from_pretrained(
                str(path), dtype=dtype(precision), local_files_only=True, use_safetensors=True
            )
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            # a missing or mismatched file, or a config value of the wrong type
            raise ModelError(
                f"Cannot load the diffusers model at {path}: {_first_line(e)}"
            ) from None
        pipe.set_progress_bar_config(disable=True)
        vae = getattr(pipe, "vae", None)
        memory = [m for m in ("enable_slicing", "enable_tiling") if hasattr(vae, m)]
        for method in memory:  # the same frames, less memory for large sizes
            getattr(vae, method)()
        if offload == "model":
            pipe.enable_model_cpu_offload(device=target)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=target)
        else:
            pipe.to(target)
        tested = name in TESTED
        info = ModelInfo(
            id=path.name,
            kind=name,
            description=f"{name} (diffusers) from {path.name}"
            + ("" if tested else "; this pipeline class is untested with t2v"),
            tested=tested,
            extra={
                "path": str(path),
                "device": target.type,
                "precision": precision,
                "offload": offload,
                "vae": [m.removeprefix("enable_") for m in memory],
                "torch": torch.__version__,
            },
        )
        return cls(pipe, info, knobs, target)

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """See `t2v.model.VideoModel.resolve`; a prompt longer than the text encoder reads
        gets a warning naming the words it ignores (added once: a request resolved by knobs
        alone, as a server may, gets it here; one resolved here is not warned again)."""
        request = self.knobs.resolve(request)
        found = [
            self._cut_warning(what, text)
            for what, text in (
                ("prompt", request.prompt),
                ("negative prompt", request.negative_prompt),
            )
        ]
        new = tuple(w for w in found if w is not None and w not in request.warnings)
        return replace(request, warnings=request.warnings + new) if new else request

    def _cut_warning(self, what: str, text: str | None) -> str | None:
        """A sentence if ``text`` has more tokens than the model reads, else None. Tokens are
        counted as diffusers' ``_get_t5_prompt_embeds`` counts them (the end token included),
        so this warns exactly when diffusers truncates."""
        limit = self._prompt_tokens
        if not text or limit is None:
            return None
        tokenizer = self.pipe.tokenizer
        text = self._clean(text) if self._clean is not None else text
        full = tokenizer(text, add_special_tokens=True, return_offsets_mapping=tokenizer.is_fast)
        ids = full["input_ids"]
        if len(ids) <= limit:
            return None
        kept = tokenizer(text, add_special_tokens=True, max_length=limit, truncation=True)
        kept = kept["input_ids"]
        first = 0  # the first token cut: where the kept ids (ending in any end token) part
        while first < len(kept) and ids[first] == kept[first]:
            first += 1
        if tokenizer.is_fast:  # the words as typed, from where the first dropped token starts
            tail = text[full["offset_mapping"][first][0] :]
        else:
            tail = tokenizer.decode(
                ids[first : first + len(ids) - len(kept)], skip_special_tokens=True
            )
        tail = tail.strip()
        if len(tail) > TAIL_CHARS:
            tail = tail[:TAIL_CHARS].rsplit(" ", 1)[0] + " ..."
        return (
            f"The {what} is {len(ids)} tokens and this model reads the first {limit}, so it "
            f"ignores '{tail}'."
        )

    def generate(
        self,
        requests: list[GenerationRequest],
        progress: Progress | None = None,
        cancelled: IsCancelled | None = None,
    ) -> list:
        import torch

        from t2v.video import Video

        requests = [self.resolve(r) for r in requests]
        counter = StepCounter(sum(r.steps for r in requests), progress, cancelled)

        def on_step(pipe, step, timestep, tensors):
            counter.step()  # raises Cancelled, which ends the pipeline's call
            return {}

        videos = []
        for r in requests:
            options = {"frame_rate": int(round(r.fps))} if self._frame_rate else {}
            if self._text_length:
                options["max_sequence_length"] = self._text_length
            with self._lock, torch.no_grad(), out_of_memory_fails():
                frames = self.pipe(
                    prompt=r.prompt,
                    negative_prompt=r.negative_prompt or None,
                    height=r.height,
                    width=r.width,
                    num_frames=r.frames,
                    num_inference_steps=r.steps,
                    guidance_scale=r.guidance,
                    generator=torch.Generator("cpu").manual_seed(r.seed),
                    output_type="pt",
                    callback_on_step_end=on_step,
                    **options,
                ).frames[0]  # (T, 3, H, W) in [0, 1]
                # The one conversion to uint8, on the device.
                frames = (frames.float() * 255).round().clamp(0, 255).to(torch.uint8)
            videos.append(Video(frames.permute(0, 2, 3, 1).cpu().numpy(), fps=r.fps))
        return videos


def _first_line(e: BaseException) -> str:
    """A library error's first line, ended as a sentence."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip()
    return line if line.endswith((".", "!", "?")) else line + "."
