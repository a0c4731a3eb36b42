"""The JSON the REST API takes and gives, shaped as OpenAI's videos API, and the error body.

OpenAI-compatible clients send `model`, `prompt`, `size` ("WxH") and `seconds`; t2v's other
knobs (negative_prompt, seed, steps, guidance, frames, width, height, fps, format) are extra
fields. Numbers are strict: a string or a boolean where a number belongs is a 422. Limits
are the served model's (`t2v.model.Knobs`): shown at `GET /v1/models`, written into the
request schema at `/openapi.json` (`state_knobs`), and checked by the model on each request.

Every error is `{"error": {"message": "<one sentence>", "type", "code", "param"}}`, as
OpenAI's API answers, so that its clients raise it with the sentence.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StringConstraints,
    field_validator,
)

from t2v.model import SEED, Knobs, ModelInfo
from t2v.serve.queue import Job
from t2v.serve.store import API_STATUS
from t2v.video import FORMATS

VIDEO_FORMATS = {name: kind for name, kind in FORMATS.items() if name != "png"}  # files only
Format = Literal[tuple(VIDEO_FORMATS)]
Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
SIZE = r"^[0-9]{1,5}x[0-9]{1,5}$"
SECONDS = r"^[0-9]{1,4}(\.[0-9]{1,3})?$"
Seconds = (
    Annotated[str, StringConstraints(pattern=SECONDS)]
    | Annotated[StrictInt, Field(ge=0, le=9999)]
    | Annotated[StrictFloat, Field(ge=0, le=9999, allow_inf_nan=False)]
)


def _printable(text: str | None) -> str | None:
    """Text that UTF-8 can hold: a lone surrogate ("\\ud800" in JSON) is refused here, before
    it reaches the tokenizer or the database."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "it holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not"
                " text; send the characters themselves"
            ) from None
    return text


class VideoCreate(BaseModel):
    """POST /v1/videos: OpenAI's fields, then t2v's knobs. Null or absent: the default."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="What to show.", examples=["a large red circle moving right"])
    model: str | None = Field(
        None, description="A model's id from GET /v1/models; left out: the default model."
    )
    size: Annotated[str, StringConstraints(pattern=SIZE)] | None = Field(
        None, description="WIDTHxHEIGHT in pixels, e.g. 64x64; or give width and height."
    )
    seconds: Seconds | None = Field(
        None, description="Duration (OpenAI sends text); frames = seconds x fps. Or give frames."
    )
    negative_prompt: str | None = Field(None, description="What to steer away from.")
    seed: StrictInt = Field(0, ge=0, le=2**32 - 1, description="Same seed and knobs, same video.")
    steps: StrictInt | None = Field(None, ge=1, description="Sampling steps.")
    guidance: StrictFloat | None = Field(
        None, ge=0, allow_inf_nan=False, description="Classifier-free guidance."
    )
    frames: StrictInt | None = Field(None, ge=1, description="Frames in the clip.")
    width: StrictInt | None = Field(None, ge=1, description="Width in pixels.")
    height: StrictInt | None = Field(None, ge=1, description="Height in pixels.")
    fps: StrictFloat | None = Field(
        None, gt=0, allow_inf_nan=False, description="Frames per second of the file."
    )
    format: Format = Field("mp4", description="The container of the result.")

    _text = field_validator("prompt", "negative_prompt")(_printable)


class VideoError(BaseModel):
    code: str
    message: str = Field(description="Why the job failed, in one sentence.")


class VideoJob(BaseModel):
    """A generation job as OpenAI's video object, with t2v's knobs and progress as extra
    fields (not `t2v.video.Video`, which is the frames themselves)."""

    id: str
    object: Literal["video"] = "video"
    status: Status = Field(description="`cancelled` is t2v's addition to OpenAI's four.")
    progress: int = Field(ge=0, le=100, description="Percent of sampling steps done.")
    created_at: int = Field(description="Unix time, seconds.")
    completed_at: int | None = Field(description="When the job finished, if it has.")
    expires_at: int | None = None
    model: str
    prompt: str = Field(description="The prompt as it was sent.")
    revised_prompt: str = Field(
        description="The prompt the model was given: normalised, and read in the model's own"
        " words where it does that (the bundled model reads it as its nearest caption)."
    )
    warnings: list[str] = Field(description="Sentences for the user, e.g. words not understood.")
    size: str = Field(description="WIDTHxHEIGHT of the video.")
    seconds: str = Field(description="Duration: frames / fps.")
    error: VideoError | None = Field(description="Why the job failed, when it did.")
    # t2v's knobs, as resolved (defaults filled in) when the job was queued
    negative_prompt: str | None
    seed: int
    steps: int | None
    guidance: float | None
    frames: int | None = Field(description="Frames the video has (or will have).")
    width: int | None
    height: int | None
    fps: float | None
    format: Format
    # t2v's progress detail and links
    step: int
    total_steps: int | None
    eta_seconds: float | None = Field(description="Seconds left while in progress, else null.")
    started_at: int | None
    content_url: str | None = Field(description="The video, once the job has completed.")
    events_url: str = Field(description="Server-sent events of the job's progress.")


class VideoList(BaseModel):
    """A page of the caller's jobs, newest first, as OpenAI's cursor pages."""

    object: Literal["list"] = "list"
    data: list[VideoJob]
    first_id: str | None
    last_id: str | None = Field(description="Pass as `after` for the next page.")
    has_more: bool


class IntKnob(BaseModel):
    default: int
    min: int
    max: int
    multiple: int = Field(description="Allowed values are offset + k * multiple.")
    offset: int


class FloatKnob(BaseModel):
    default: float
    min: float
    max: float


class KnobsView(BaseModel):
    seed: IntKnob
    steps: IntKnob
    guidance: FloatKnob
    frames: IntKnob
    width: IntKnob
    height: IntKnob
    fps: FloatKnob
    max_prompt_chars: int
    negative_prompt: bool = Field(description="Whether the model uses a negative prompt.")
    formats: list[str]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "t2v"
    kind: str = Field(description='"t2v", or the diffusers pipeline class.')
    description: str
    tested: bool
    ready: bool = Field(description="Whether the model is loaded and jobs run.")
    knobs: KnobsView


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong and what to do, in one sentence.")
    type: str
    code: str | None
    param: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str


def _seconds(frames: int, fps: float) -> str:
    return f"{frames / fps:.3f}".rstrip("0").rstrip(".")


def _int(t: float | None) -> int | None:
    return None if t is None else int(t)


def job_view(job: Job, model: str, knobs: Knobs) -> VideoJob:
    """The API's view of a job; `model` and `knobs` fill in what a job queued before knobs
    were stored lacks (the model's defaults, which it ran with)."""
    url = f"/v1/videos/{job.id}"
    frames = job.frames or knobs.frames.default
    width, height = job.width or knobs.width.default, job.height or knobs.height.default
    fps = job.fps or knobs.fps.default
    failed = job.status == "failed"
    return VideoJob(
        id=job.id,
        status=API_STATUS[job.status],
        progress=100 if job.status == "succeeded" else int(job.progress * 100),
        created_at=int(job.created_at),
        completed_at=_int(job.finished_at),
        model=job.model or model,
        prompt=job.original_prompt or job.prompt,
        revised_prompt=job.prompt,
        warnings=list(job.warnings),
        size=f"{width}x{height}",
        seconds=_seconds(frames, fps),
        error=VideoError(code="generation_failed", message=job.error or "") if failed else None,
        negative_prompt=job.negative_prompt,
        seed=job.seed,
        steps=job.steps,
        guidance=job.guidance,
        frames=frames,
        width=width,
        height=height,
        fps=fps,
        format=job.format,
        step=job.step,
        total_steps=job.total_steps,
        eta_seconds=job.eta_seconds(time.time()),
        started_at=_int(job.started_at),
        content_url=f"{url}/content" if job.status == "succeeded" else None,
        events_url=f"{url}/events",
    )


def _int_knob(r) -> IntKnob:
    return IntKnob(default=r.default, min=r.lo, max=r.hi, multiple=r.multiple, offset=r.offset)


def model_card(info: ModelInfo, knobs: Knobs, ready: bool, created: float) -> ModelCard:
    return ModelCard(
        id=info.id,
        created=int(created),
        kind=info.kind,
        description=info.description,
        tested=info.tested,
        ready=ready,
        knobs=KnobsView(
            seed=_int_knob(SEED),
            steps=_int_knob(knobs.steps),
            guidance=FloatKnob(
                default=knobs.guidance.default, min=knobs.guidance.lo, max=knobs.guidance.hi
            ),
            frames=_int_knob(knobs.frames),
            width=_int_knob(knobs.width),
            height=_int_knob(knobs.height),
            fps=FloatKnob(default=knobs.fps.default, min=knobs.fps.lo, max=knobs.fps.hi),
            max_prompt_chars=knobs.max_prompt_chars,
            negative_prompt=knobs.negative_prompt,
            formats=list(VIDEO_FORMATS),
        ),
    )


def state_knobs(body_schema: dict, knobs: Knobs) -> None:
    """Write the served model's limits and defaults into the request body's JSON schema (at
    `/openapi.json`), so the API schema reads them from the model as the page does; the
    model still checks every request, and names the nearest values it can take."""
    for name in ("steps", "guidance", "frames", "width", "height", "fps"):
        knob, field = getattr(knobs, name), body_schema["properties"][name]
        number = field["anyOf"][0]  # the branch that is not null
        number.pop("exclusiveMinimum", None)
        number.update(minimum=knob.lo, maximum=knob.hi)
        rule = ""
        if getattr(knob, "multiple", 1) > 1:
            if knob.offset:
                rule = f", of the form {knob.multiple}k+{knob.offset}"
            else:
                number["multipleOf"] = knob.multiple
        field["default"] = knob.default
        field["description"] += f" This model: {knob.lo:g} to {knob.hi:g}{rule}."


_ERROR_CODES = {
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    422: "invalid_request",
    429: "rate_limit_exceeded",
    503: "unavailable",
}


def error_response(
    status: int, message: str, retry_after: int | None = None, param: str | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"message": message, "type": kind, "code": _ERROR_CODES.get(status), "param": param}
    return JSONResponse({"error": body}, status, headers)


def errors(*codes: int, json_route: bool = True) -> dict:
    """OpenAPI responses: these codes, plus the 403 and 422 the Guard may answer anywhere.

    A route whose success is not JSON (a file, an event stream) names the JSON error body by
    reference, which the JSON routes' `model` entries put into the schema's components."""
    if json_route:
        return {code: {"model": ErrorBody} for code in sorted({403, 422, *codes})}
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return {code: {"content": ref} for code in sorted({403, 422, *codes})}
