"""The routes: thin translations of HTTP to `JobQueue` calls, and the page and its docs.

`app.state` holds what `t2v.serve.app.create_app` built: `config`, `queue`, `keys` and
`served` (the models jobs can name: the node's own, with its knobs and once loaded the model
itself, and those live `t2v worker` processes serve).

POST /v1/videos takes JSON or a multipart form (the official OpenAI clients send forms). Its
OpenAI fields map onto t2v's knobs: `size` "WxH" is width and height; `seconds` is frames at
the request's fps (or the model's). The named model (or the default) then checks every knob,
once, so a value it cannot take is a 422 that names the nearest it can, and no job is
created; the queue and the worker take the resolved request as it is.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import ValidationError

from t2v.errors import UserError
from t2v.model import GenerationRequest, IntRange, Knobs, ModelInfo, VideoModel
from t2v.serve.queue import FINISHED, Job, JobError, JobQueue, JobRequest, not_served
from t2v.serve.schemas import (
    VIDEO_FORMATS,
    Health,
    ModelCard,
    ModelList,
    VideoCreate,
    VideoJob,
    VideoList,
    errors,
    job_view,
    model_card,
)
from t2v.serve.worker import card_knobs

STATIC = Path(__file__).with_name("static")
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob:; media-src 'self' blob:; object-src 'none';"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
EVENTS_WAIT_S = 60.0  # FastAPI sends its own keep-alive comment every 15 s of silence
_FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


@dataclass
class Served:
    """The models this node takes jobs for: its own (`t2v serve --model`, which its worker
    threads run; its knobs are read from its files before the weights load, so requests are
    checked, and the page built, while it loads), and those that live `t2v worker`
    processes sharing its store serve (their knobs from the workers' heartbeats). A node
    with `--workers 0` has no model of its own."""

    knobs: Knobs  # the own model's; on a node without one, only to show jobs of old schemas
    info: ModelInfo  # until the model is loaded: its id as the folder gives it
    created: float
    queue: JobQueue
    own: bool = True  # False: `--workers 0`, this node runs no model
    default: str | None = None  # `--default-model`: the model of a job that names none

    @property
    def model(self) -> VideoModel | None:
        model = self.queue.model
        return model if isinstance(model, VideoModel) else None

    @property
    def id(self) -> str:
        return self.model.info.id if self.model is not None else self.info.id

    def live(self) -> dict[str, tuple[ModelInfo, Knobs]]:
        """The models that live workers serve and whose knobs they stated, by id."""
        found = {}
        for m in self.queue.live_models():
            if (knobs := card_knobs(m.info)) is not None:
                info = ModelInfo(
                    id=m.id,
                    kind=m.info.get("kind", ""),
                    description=m.info.get("description", ""),
                    tested=m.info.get("tested", True),
                )
                found[m.id] = (info, knobs)
        return found

    def default_id(self, live: dict) -> str:
        """The model of a job that names none: `--default-model`, else this node's own, else
        the only model that live workers serve."""
        if self.default is not None:
            return self.default
        if self.own:
            return self.id
        if len(live) == 1:
            return next(iter(live))
        if not live:
            raise not_served(None, [])
        names = ", ".join(f"'{m}'" for m in live)
        raise UserError(f"Name the model: the workers serve {names} (GET /v1/models lists them).")

    def checker(self, model_id: str, live: dict) -> VideoModel | Knobs:
        """What checks a request for `model_id`: this node's model once loaded (it may know
        more, e.g. its vocabulary) or its knobs, else a live worker's knobs."""
        if self.own and model_id == self.id:
            return self.model or self.knobs
        if model_id in live:
            return live[model_id][1]
        raise not_served(model_id, sorted({*live, *([self.id] if self.own else [])}))

    def cards(self) -> list[ModelCard]:
        """GET /v1/models: the default model first (the page builds its form from it)."""
        live = self.live()
        cards = {}
        if self.own:
            info = self.model.info if self.model is not None else self.info
            ready = self.queue.state == "ready"
            cards[info.id] = model_card(info, self.knobs, ready, self.created)
        for model_id, (info, knobs) in live.items():
            cards.setdefault(model_id, model_card(info, knobs, True, self.created))
        try:
            first = self.default_id(live)
        except (UserError, JobError):  # none served, or several and no default
            first = None
        return sorted(cards.values(), key=lambda card: card.id != first)


_bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `t2v keys create`; needed when the server runs with --auth.",
)


def _queue(request: Request) -> JobQueue:
    return request.app.state.queue


def _served(request: Request) -> Served:
    return request.app.state.served


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
Model = Annotated[Served, Depends(_served)]
Owner = Annotated[str, Depends(_caller)]


def _owned_job(video_id: str, owner: Owner, queue: Queue) -> Job:
    """The caller's job with this id, or a 404 (before any response, even a stream, starts)."""
    return queue.get(video_id, owner)


def _view(job: Job, served: Served) -> VideoJob:
    return job_view(job, served.id, served.knobs)


# --- the page, its docs, health and the model --------------------------------------------------

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
                "unavailable": "The job store cannot be reached; retry in a few seconds.",
            }.get(state)
            or queue.load_error
            or "The worker stopped unexpectedly; the server log has the details.",
            retry_after=5,
        )
    return Health(status="ready")


@site.get("/v1/models", response_model=ModelList, responses=errors(401), tags=["models"])
def list_models(served: Model, owner: Owner):
    """The models jobs can name: this node's own and those that live `t2v worker` processes
    serve, the default first; each with its knobs, their defaults and limits (the page
    builds its form from them), and whether it is ready to run jobs."""
    return ModelList(data=served.cards())


@site.get(
    "/v1/models/{model_id}", response_model=ModelCard, responses=errors(401, 404), tags=["models"]
)
def get_model(model_id: str, served: Model, owner: Owner):
    """One model by id, as OpenAI's `models.retrieve` asks for it."""
    for card in served.cards():
        if card.id == model_id:
            return card
    raise JobError(404, f"No model has the id '{model_id[:100]}'; GET /v1/models lists them.")


# --- videos ------------------------------------------------------------------------------------

videos = APIRouter(prefix="/v1/videos", tags=["videos"])


def _form_values(form) -> dict:
    """A form's fields as JSON would give them: numbers for the numeric knobs (forms carry
    only text); anything else stays text, for the strict schema to refuse."""
    numeric = {"seed", "steps", "frames", "width", "height", "guidance", "fps"}
    values = {}
    for name, value in form.multi_items():
        if not isinstance(value, str):  # an upload: no field takes one, so the schema refuses it
            values[name] = {"file": value.filename}
        elif name in numeric and _NUMBER.fullmatch(value):
            values[name] = float(value) if "." in value else int(value)
        else:
            values[name] = value
    if isinstance(values.get("guidance"), int):
        values["guidance"] = float(values["guidance"])
    if isinstance(values.get("fps"), int):
        values["fps"] = float(values["fps"])
    return values


async def _video_create(request: Request) -> VideoCreate:
    """The body of POST /v1/videos, as JSON or as a multipart (or urlencoded) form."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    try:
        if kind in _FORMS:
            return VideoCreate.model_validate(_form_values(await request.form()))
        return VideoCreate.model_validate_json(await request.body())
    except ValidationError as e:
        errs = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        raise RequestValidationError(errs) from None


_BODY_SCHEMA = VideoCreate.model_json_schema()


def _frames_for(seconds: float, fps: float, frames: IntRange) -> int:
    """Frames for `seconds` at `fps`: the allowed count nearest seconds x fps, if it is
    within one frame step of it; otherwise a sentence naming the durations on offer."""
    wanted = seconds * fps
    best = min(frames.nearest(round(wanted)), key=lambda n: abs(n - wanted))
    if abs(best - wanted) <= max(1, frames.multiple) and frames.allows(best):
        return best
    near = " or ".join(f"{n / fps:g}" for n in frames.nearest(round(wanted)))
    raise UserError(
        f"seconds {seconds:g} is not possible for this model at {fps:g} fps; the nearest"
        f" durations it makes are {near} s (frames {frames.lo} to {frames.hi})."
    )


def _job_request(body: VideoCreate, served: Served) -> JobRequest:
    """The request in t2v's knobs, checked and with every default filled in by the model it
    names (or the default model)."""
    wanted = body.model if body.model is not None else served.default
    live = {} if served.own and wanted in (None, served.id) else served.live()
    model_id = wanted if wanted is not None else served.default_id(live)
    checker = served.checker(model_id, live)
    limits = checker.knobs if hasattr(checker, "knobs") else checker
    width, height = body.width, body.height
    if body.size is not None:
        size = tuple(int(n) for n in body.size.split("x"))
        if (width, height) not in ((None, None), size):
            raise UserError("Give size, or width and height, not both.")
        width, height = size
    frames = body.frames
    if body.seconds is not None:
        if frames is not None:
            raise UserError("Give seconds or frames, not both.")
        fps = body.fps if body.fps is not None else limits.fps.default
        frames = _frames_for(float(body.seconds), fps, limits.frames)
    knobs = checker.resolve(
        GenerationRequest(
            body.prompt,
            body.negative_prompt,
            body.seed,
            body.steps,
            body.guidance,
            frames,
            width,
            height,
            body.fps,
        )
    )
    return JobRequest(
        prompt=knobs.prompt,
        negative_prompt=knobs.negative_prompt or None,
        seed=knobs.seed,
        steps=knobs.steps,
        guidance=knobs.guidance,
        format=body.format,
        frames=knobs.frames,
        width=knobs.width,
        height=knobs.height,
        fps=knobs.fps,
        model=model_id,  # only workers serving this model take the job
        original_prompt=knobs.original_prompt,
        warnings=knobs.warnings,
        resolved=knobs.resolved,
    )


@videos.post(
    "",
    status_code=202,
    response_model=VideoJob,
    responses=errors(401, 429, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                kind: {"schema": _BODY_SCHEMA}
                for kind in ("application/json", "multipart/form-data")
            },
        }
    },
)
def create_video(
    body: Annotated[VideoCreate, Depends(_video_create)],
    response: Response,
    owner: Owner,
    queue: Queue,
    served: Model,
    idempotency_key: str | None = Header(
        None,
        min_length=1,
        max_length=255,
        description="Retrying with the same key returns the same job and queues no new work.",
    ),
):
    """Queue a generation; 202 with the job, whose status starts as `queued`."""
    job, replayed = queue.submit(owner, _job_request(body, served), idempotency_key)
    response.headers["Location"] = f"/v1/videos/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return _view(job, served)


@videos.get("", response_model=VideoList, responses=errors(401, 404))
def list_videos(
    owner: Owner,
    queue: Queue,
    served: Model,
    limit: int = Query(20, ge=1, le=100, description="Jobs per page."),
    after: str | None = Query(
        None, max_length=64, description="The `last_id` of the previous page."
    ),
    order: Literal["desc"] = Query("desc", description="Newest first (the only order)."),
):
    """The caller's jobs, newest first, `limit` at a time."""
    before = queue.get(after, owner).seq if after else None
    jobs = queue.list(owner, limit + 1, before)
    page = jobs[:limit]
    return VideoList(
        data=[_view(j, served) for j in page],
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(jobs) > limit,
    )


@videos.get("/{video_id}", response_model=VideoJob, responses=errors(401, 404))
def get_video(job: Annotated[Job, Depends(_owned_job)], served: Model):
    """The job's status, progress (0 to 100) and, when it failed, the reason."""
    return _view(job, served)


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
def get_content(
    video_id: str,
    owner: Owner,
    queue: Queue,
    variant: Literal["video"] = Query("video", description="Only the video itself."),
):
    """The video; 409 while the job has not completed (yet), 404 for an unknown id."""
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
    job: Annotated[Job, Depends(_owned_job)], owner: Owner, queue: Queue, served: Model
) -> AsyncIterable[VideoJob]:
    """Server-sent events: `progress` with the job while it is queued or in progress, then
    one `done` when it has finished."""
    last = None
    while True:
        version = queue.changes.version
        job = queue.get(job.id, owner)
        if job != last:
            kind = "done" if job.status in FINISHED else "progress"
            yield ServerSentEvent(data=_view(job, served), event=kind)
            last = job
        if job.status in FINISHED or queue.changes.closed:
            return
        await queue.changes.wait(version, EVENTS_WAIT_S)


@videos.delete("/{video_id}", response_model=VideoJob, responses=errors(401, 404, 409))
def cancel_video(video_id: str, owner: Owner, queue: Queue, served: Model):
    """Cancel a queued or running job (a running one stops before its next sampling step);
    t2v's addition: its status becomes `cancelled`."""
    return _view(queue.cancel(video_id, owner), served)
