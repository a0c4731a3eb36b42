"""The model protocol: all that generate, serve, eval and the page need from a model.

The bundled t2v pipeline and the diffusers backend both implement `VideoModel`; no caller
branches on which one it holds. A model states its knobs (defaults and limits) once, in
`Knobs`; the CLI help, the REST schema and the page read them from there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from t2v.errors import UserError

Progress = Callable[[int, int], None]  # (step done, total steps)
IsCancelled = Callable[[], bool]


class Cancelled(Exception):
    """Raised by `VideoModel.generate` when `cancelled()` turned true between two steps."""


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

    def check(self, name: str, v) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"{name} must be a whole number, not {v!r}.")
        if self.allows(v):
            return v
        near = " or ".join(map(str, self.nearest(v)))
        if self._first() == self._last():
            raise UserError(f"{name} {v} is not possible for this model, which takes only {near}.")
        rule = (
            f" of the form {self.multiple}k+{self.offset}"
            if self.offset
            else (f" in multiples of {self.multiple}" if self.multiple > 1 else "")
        )
        raise UserError(
            f"{name} {v} is not possible for this model, which takes {self._first()} to "
            f"{self._last()}{rule}; the nearest are {near}."
        )


@dataclass(frozen=True)
class FloatRange:
    default: float
    lo: float
    hi: float

    def check(self, name: str, v) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise UserError(f"{name} must be a number, not {v!r}.")
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
    max_prompt_chars: int = 500
    negative_prompt: bool = True  # whether the model uses a negative prompt at all


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


@dataclass(frozen=True)
class ModelInfo:
    """What the page and `GET /v1/models` show about a model."""

    id: str  # a short name, e.g. "t2v-moving-shapes" or the folder name
    kind: str  # "t2v" or the diffusers pipeline class, e.g. "WanPipeline"
    description: str = ""
    tested: bool = True  # False: a diffusers class that may run but is not tested
    extra: dict = field(default_factory=dict)


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
        """One `t2v.video.Video` per request; raises `Cancelled` within one step of
        ``cancelled()`` turning true."""
        ...
