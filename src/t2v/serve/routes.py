"""The routes: thin translations of HTTP to `JobQueue` calls, and the page and its docs.

`app.state` holds what `t2v.serve.app.create_app` built: `config`, `queue` and `keys`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response, Security
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent

from t2v.serve.queue import FINISHED, Job, JobError, JobQueue, JobRequest
from t2v.serve.schemas import (
    VIDEO_FORMATS,
    Health,
    VideoJob,
    VideoList,
    VideoRequest,
    errors,
    job_view,
)

STATIC = Path(__file__).with_name("static")
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob:; media-src 'self' blob:; object-src 'none';"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
EVENTS_WAIT_S = 60.0  # FastAPI sends its own keep-alive comment every 15 s of silence

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `t2v keys create`; needed when the server runs with --auth.",
)


def _queue(request: Request) -> JobQueue:
    return request.app.state.queue


def _caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> str:
    """The owner of the request's jobs: the API key's id, or '' when auth is off."""
    if not request.app.state.config.auth:
        return ""
    if credentials is None:
        raise JobError(
            401,
            "This server needs an API key: send the header 'Authorization:"
            " Bearer <key>' (an admin creates keys with `t2v keys create`).",
        )
    key = request.app.state.keys.verify(credentials.credentials)
    if key is None:
        raise JobError(401, "The API key is wrong or was revoked; ask for a new one.")
    return key.id


Queue = Annotated[JobQueue, Depends(_queue)]
Owner = Annotated[str, Depends(_caller)]


def _owned_job(video_id: str, owner: Owner, queue: Queue) -> Job:
    """The caller's job with this id, or a 404 (before any response, even a stream, starts)."""
    return queue.get(video_id, owner)


# --- the page, its docs and health -------------------------------------------------------------

site = APIRouter()


@site.get("/", include_in_schema=False)
def page():
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})


@site.get("/docs", include_in_schema=False)
def docs():
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="t2v API",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/docs-assets/favicon-32x32.png",
    )


@site.get("/healthz", response_model=Health, responses=errors(), tags=["health"])
def healthz():
    """200 while the process is alive."""
    return Health(status="ok")


@site.get("/readyz", response_model=Health, responses=errors(503), tags=["health"])
def readyz(queue: Queue):
    """200 once the model is loaded and jobs run; 503 while starting or shutting down."""
    state = queue.state
    if state != "ready":
        raise JobError(
            503,
            {
                "starting": "The model is still loading; retry in a few seconds.",
                "draining": "The server is shutting down and takes no new work.",
                "failed": queue.load_error
                or "The worker stopped unexpectedly; the server log has the details.",
            }[state],
            retry_after=5,
        )
    return Health(status="ready")


# --- videos ------------------------------------------------------------------------------------

videos = APIRouter(prefix="/v1/videos", tags=["videos"])


@videos.post("", status_code=202, response_model=VideoJob, responses=errors(401, 429, 503))
def create_video(
    body: VideoRequest,
    response: Response,
    owner: Owner,
    queue: Queue,
    idempotency_key: str | None = Header(
        None,
        min_length=1,
        max_length=255,
        description="Retrying with the same key returns the same job and queues no new work.",
    ),
):
    """Queue a generation; 202 with the job, whose status starts as `queued`."""
    job, replayed = queue.submit(owner, JobRequest(**body.model_dump()), idempotency_key)
    response.headers["Location"] = f"/v1/videos/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return job_view(job)


@videos.get("", response_model=VideoList, responses=errors(401))
def list_videos(
    owner: Owner,
    queue: Queue,
    limit: int = Query(20, ge=1, le=100, description="Jobs per page."),
    cursor: str | None = Query(
        None, pattern=r"^[0-9]{0,18}$", description="The `next_cursor` of the previous page."
    ),
):
    """The caller's jobs, newest first."""
    jobs = queue.list(owner, limit + 1, int(cursor) if cursor else None)
    more = len(jobs) > limit
    return VideoList(
        data=[job_view(j) for j in jobs[:limit]],
        next_cursor=str(jobs[limit - 1].seq) if more else None,
    )


@videos.get("/{video_id}", response_model=VideoJob, responses=errors(401, 404))
def get_video(job: Annotated[Job, Depends(_owned_job)]):
    """The job's status, progress (0 to 1) and, when it failed, the reason."""
    return job_view(job)


@videos.get(
    "/{video_id}/content",
    response_class=FileResponse,
    responses={
        200: {
            "content": {kind: {} for kind in VIDEO_FORMATS.values()},
            "description": "The video file.",
        },
        **errors(401, 404, 409, json_route=False),
    },
)
def get_content(video_id: str, owner: Owner, queue: Queue):
    """The video; 409 while the job has not succeeded (yet), 404 for an unknown id."""
    job, path = queue.video(video_id, owner)
    return FileResponse(
        path,
        media_type=VIDEO_FORMATS[job.format],
        filename=f"t2v-{job.id}.{job.format}",
        content_disposition_type="inline",
        headers={"Cache-Control": "private, max-age=86400"},
    )


@videos.get(
    "/{video_id}/events",
    response_class=EventSourceResponse,
    responses=errors(401, 404, json_route=False),
)
async def video_events(
    job: Annotated[Job, Depends(_owned_job)], owner: Owner, queue: Queue
) -> AsyncIterable[VideoJob]:
    """Server-sent events: `progress` with the job while it is queued or running, then one
    `done` when it has finished."""
    last = None
    while True:
        version = queue.changes.version
        job = queue.get(job.id, owner)
        if job != last:
            kind = "done" if job.status in FINISHED else "progress"
            yield ServerSentEvent(data=job_view(job), event=kind)
            last = job
        if job.status in FINISHED or queue.changes.closed:
            return
        await queue.changes.wait(version, EVENTS_WAIT_S)


@videos.delete("/{video_id}", response_model=VideoJob, responses=errors(401, 404, 409))
def cancel_video(video_id: str, owner: Owner, queue: Queue):
    """Cancel a queued or running job (a running one stops at its next sampling step)."""
    return job_view(queue.cancel(video_id, owner))
