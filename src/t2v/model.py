"""The model protocol: all that generate, serve, eval and the page need from a model.

The bundled t2v pipeline and the diffusers backend both implement `VideoModel`; no caller
branches on which one it holds. A model states its knobs (defaults and limits) once, in
`Knobs`; the CLI help, the REST schema and the page read them from there.

How a caller uses a model::

    from t2v.backends import load_model, read_knobs
    knobs = read_knobs(path)              # JSON only: cheap enough for --help
    model = load_model(path, device="auto", precision="fp32", offload="none")
    req = model.resolve(GenerationRequest("a red circle", frames=16))  # UserError if bad
    [video] = model.generate([req], progress=on_step, cancelled=job.is_cancelled)
    video.save("out.mp4")                 # a t2v.video.Video: uint8 frames and fps

Errors: `UserError` (and its kinds below) carries one sentence for a person; the CLI exits 2
and the server answers 4xx at submission, or fails the job with the sentence once it runs.
`resolve` is cheap and raises only `UserError`, so a server calls it before queueing a job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from t2v.errors import UserError
from t2v.text import DEFAULT_MAX_CHARS

Progress = Callable[[int, int], None]  # (step done, total steps)
IsCancelled = Callable[[], bool]


class Cancelled(Exception):
    """Raised by `VideoModel.generate` when `cancelled()` turned true between two steps."""


class ModelError(UserError):
    """A model folder that cannot be loaded or is refused; the message says which file, why."""


class GenerationFailed(UserError):
    """A resolved request that the model could not carry out, such as one that ran out of
    memory; the message gives the reason. The server fails that job and serves the next."""


# t2v's limits on any model's steps, guidance and fps: beyond them a request is a mistake.
MAX_STEPS, MAX_GUIDANCE = 100, 20.0
MIN_FPS, MAX_FPS = 1.0, 60.0


@dataclass(frozen=True)
class IntRange:
    """Whole numbers ``lo..hi`` of the form ``offset + k * multiple`` (Wan frames: 4k+1)."""

    default: int
    lo: int
    hi: int
    multiple: int = 1
    offset: int = 0

    def allows(self, v: int) -> bool:
        return self.lo <= v <= self.hi and (v - self.offset) % self.multiple == 0

    def nearest(self, v: int) -> list[int]:
        """The one or two allowed values closest to ``v``."""
        below = self.offset + ((v - self.offset) // self.multiple) * self.multiple
        picks = {min(max(c, self._first()), self._last()) for c in (below, below + self.multiple)}
        return sorted(picks)

    def _first(self) -> int:
        return self.offset + -(-(self.lo - self.offset) // self.multiple) * self.multiple

    def _last(self) -> int:
        return self.offset + ((self.hi - self.offset) // self.multiple) * self.multiple

    @property
    def fixed(self) -> bool:
        """Whether the model takes exactly one value (the bundled model's 16 frames)."""
        return self._first() == self._last()

    def check(self, name: str, v) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"{name} must be a whole number, not {v!r}.")
        if self.allows(v):
            return v
        if self.multiple == 1 and not self.fixed:
            raise UserError(f"{name} must be a whole number from {self.lo} to {self.hi}, not {v}.")
        nearest = self.nearest(v)
        near = " or ".join(map(str, nearest))
        if self.fixed:
            raise UserError(f"{name} {v} is not possible for this model, which takes only {near}.")
        rule = (
            f" of the form {self.multiple}k+{self.offset}"
            if self.offset
            else (f" in multiples of {self.multiple}" if self.multiple > 1 else "")
        )
        raise UserError(
            f"{name} {v} is not possible for this model, which takes {self._first()} to "
            f"{self._last()}{rule}; the nearest {'are' if len(nearest) > 1 else 'is'} {near}."
        )


@dataclass(frozen=True)
class FloatRange:
    default: float
    lo: float
    hi: float

    def check(self, name: str, v) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise UserError(f"{name} must be a number, not {v!r}.")
        if self.lo == self.hi and v != self.lo:
            raise UserError(f"This model's {name} is fixed at {self.lo:g}, not {v!r}.")
        if not self.lo <= v <= self.hi:
            raise UserError(f"{name} must be from {self.lo:g} to {self.hi:g}, not {v!r}.")
        return float(v)


SEED = IntRange(0, 0, 2**32 - 1)


@dataclass(frozen=True)
class Knobs:
    """A model's knobs, their defaults and their limits: the one place they are stated."""

    steps: IntRange
    guidance: FloatRange
    frames: IntRange
    width: IntRange
    height: IntRange
    fps: FloatRange
    max_prompt_chars: int = DEFAULT_MAX_CHARS
    negative_prompt: bool = True  # whether the model uses a negative prompt at all

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with its prompts normalised (`t2v.text.normalize`) and each ``None``
        replaced by the default; a value out of limits raises `UserError`. Both backends'
        `resolve` start here, so the rules below are written once. A request that is already
        resolved is returned as it is (a server resolves once; its worker and `generate` do
        not normalise the prompt again)."""
        from t2v.text import normalize  # its PromptError is a UserError

        if request.resolved:
            return request
        negative = self.negative(request.negative_prompt)
        if negative and not self.negative_prompt:
            raise UserError("This model takes no negative prompt; leave it out.")
        return replace(
            request,
            resolved=True,
            prompt=normalize(request.prompt, self.max_prompt_chars),
            negative_prompt=negative,
            seed=SEED.check("seed", request.seed),
            steps=self.steps.check("steps", _or(request.steps, self.steps.default)),
            guidance=self.guidance.check("guidance", _or(request.guidance, self.guidance.default)),
            frames=self.frames.check("frames", _or(request.frames, self.frames.default)),
            width=self.width.check("width", _or(request.width, self.width.default)),
            height=self.height.check("height", _or(request.height, self.height.default)),
            fps=self.fps.check("fps", _or(request.fps, self.fps.default)),
        )

    def negative(self, text: str | None) -> str:
        """The negative prompt normalised; empty, blank or invisible-only text means none
        (""): `t2v.text.normalize_negative`, the one rule for every path."""
        from t2v.text import normalize_negative

        return normalize_negative(text, self.max_prompt_chars)


def _or(value, default):
    return default if value is None else value


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``None`` means the model's default."""

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    # Filled by `VideoModel.resolve` where a model reads prompts in its own words (the t2v
    # model, see `t2v.rewrite`): the prompt as the user typed it when ``prompt`` is now the
    # model's reading of it (None: taken as typed), and sentences to show the user, such as
    # the words the model does not know. Marked "resolved": no caller sets them.
    original_prompt: str | None = field(default=None, metadata={"resolved": True})
    warnings: tuple[str, ...] = field(default=(), metadata={"resolved": True})
    resolved: bool = field(default=False, metadata={"resolved": True})  # by `Knobs.resolve`


@dataclass(frozen=True)
class ModelInfo:
    """What the page and `GET /v1/models` show about a model."""

    id: str  # a short name, e.g. "t2v-moving-shapes" or the folder name
    kind: str  # "t2v" or the diffusers pipeline class, e.g. "WanPipeline"
    description: str = ""
    tested: bool = True  # False: a diffusers class that may run but is not tested
    extra: dict = field(default_factory=dict)  # e.g. {"device": "cuda", "precision": "bf16"}


@runtime_checkable
class VideoModel(Protocol):
    info: ModelInfo
    knobs: Knobs

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the prompts normalised and every default filled in; a value the
        model cannot take raises `UserError` that names the nearest values it can take."""
        ...

    def generate(
        self,
        requests: list[GenerationRequest],
        progress: Progress | None = None,
        cancelled: IsCancelled | None = None,
    ) -> list:
        """One `t2v.video.Video` per request, in order; the requests are resolved again
        here, so a caller may pass raw ones. ``progress(done, total)`` is called after each
        denoising step, counted over all requests; ``Cancelled`` is raised within one step
        of ``cancelled()`` turning true; `GenerationFailed` if the device ran out of memory."""
        ...
