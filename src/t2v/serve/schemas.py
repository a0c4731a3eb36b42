"""The JSON the REST API takes and gives: pydantic models, and the one error body.

Every error is JSON `{"error": "<one sentence>"}`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from t2v.pipeline import MAX_GUIDANCE, MAX_STEPS
from t2v.serve.queue import Job
from t2v.video import FORMATS

VIDEO_FORMATS = {name: kind for name, kind in FORMATS.items() if name != "png"}  # files only
Format = Literal[tuple(VIDEO_FORMATS)]
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class VideoRequest(BaseModel):
    """The knobs of `t2v generate` and `TextToVideoPipeline.__call__`, with the same defaults."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(
        description="What to show; at most 500 characters once normalised.",
        examples=["a large red circle moving right"],
    )
    negative_prompt: str | None = Field(None, description="What to steer away from.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Same seed and knobs, same video.")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Null: the model's default.")
    guidance: float | None = Field(
        None,
        ge=0,
        le=MAX_GUIDANCE,
        allow_inf_nan=False,
        description="Classifier-free guidance; null: the model's default.",
    )
    format: Format = Field("mp4", description="The container of the result.")


class VideoJob(VideoRequest):
    """A generation job as the API shows it (not `t2v.video.Video`, the frames themselves)."""

    model_config = ConfigDict(extra="ignore")
    id: str
    status: Status
    progress: float = Field(ge=0, le=1, description="Share of sampling steps done.")
    step: int
    total_steps: int | None
    eta_seconds: float | None = Field(description="Seconds left while running, else null.")
    error: str | None = Field(description="Why the job failed, when it did.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    content_url: str | None = Field(description="The video, once the job has succeeded.")
    events_url: str


class VideoList(BaseModel):
    data: list[VideoJob] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: none.")


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong and what to do, in one sentence.")


class Health(BaseModel):
    status: str


def _time(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def job_view(job: Job) -> VideoJob:
    url = f"/v1/videos/{job.id}"
    fields = {k: getattr(job, k) for k in Job.__dataclass_fields__}
    times = {k: _time(fields[k]) for k in ("created_at", "started_at", "finished_at")}
    return VideoJob(
        **{**fields, **times},
        eta_seconds=job.eta_seconds(time.time()),
        content_url=f"{url}/content" if job.status == "succeeded" else None,
        events_url=f"{url}/events",
    )


def error_response(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": message}, status, headers)


def errors(*codes: int, json_route: bool = True) -> dict:
    """OpenAPI responses: these codes, plus the 403 and 422 the Guard may answer anywhere.

    A route whose success is not JSON (a file, an event stream) names the JSON error body by
    reference, which the JSON routes' `model` entries put into the schema's components."""
    if json_route:
        return {code: {"model": ErrorBody} for code in sorted({403, 422, *codes})}
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return {code: {"content": ref} for code in sorted({403, 422, *codes})}
