"""The HTTP face of the job queue: the app factory, request guards, routes and the page.

Routes only translate HTTP to `JobQueue` calls. Every error is JSON `{"error": "<one
sentence>"}`. Before any route runs, `_Guard` refuses requests whose Host header is not one
of the server's names (DNS rebinding), whose Origin is another site (cross-site POSTs from a
browser), or whose body exceeds 64 KiB (counted as it arrives, chunked or not).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Header, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from swagger_ui_bundle import swagger_ui_path

from t2v.pipeline import MAX_GUIDANCE, MAX_STEPS
from t2v.serve.auth import KeyStore, RateLimiter
from t2v.serve.filter import DEFAULT_BLOCKLIST, ContentFilter
from t2v.serve.jobs import FINISHED, Job, JobError, JobQueue, JobRequest, JobStore
from t2v.video import FORMATS

log = logging.getLogger("t2v.serve")

STATIC = Path(__file__).with_name("static")
MAX_BODY = 64 * 1024
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
VIDEO_FORMATS = {name: kind for name, kind in FORMATS.items() if name != "png"}  # files only
SSE_KEEPALIVE_S = 15.0
_NOT_JSON = 'The request body is not valid JSON; send an object like {"prompt": "a red circle"}.'
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob:; media-src 'self' blob:; object-src 'none';"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


@dataclass
class ServeConfig:
    """Everything `t2v serve` is told; the CLI's options map onto these fields one to one."""

    data_dir: Path
    model_dir: Path | None = None  # None: t2v.pipeline.DEFAULT_MODEL_DIR
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    auth: bool = False
    queue_size: int = 100
    rate_limit: int = 30  # new jobs per API key per minute; 0: no limit
    blocklist: Path = DEFAULT_BLOCKLIST  # an empty file: no content filter
    allowed_hosts: tuple[str, ...] = ()
    drain_timeout: float = 30.0


# --- schemas -----------------------------------------------------------------------------------

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


class Video(VideoRequest):
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
    data: list[Video] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: none.")


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong and what to do, in one sentence.")


class Health(BaseModel):
    status: str


_SSE_EVENT = {  # one event (OpenAPI before 3.2 describes the events, not the stream)
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["progress", "done"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/Video"},
        },
    },
    "required": ["event", "data"],
}


class _EventStream(StreamingResponse):
    media_type = "text/event-stream"


def _errors(*codes: int) -> dict:
    """OpenAPI responses: these codes, plus the 403 and 422 `_Guard` may answer anywhere."""
    json_error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return {code: {"content": json_error} for code in sorted({403, 422, *codes})}


def _time(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def _view(job: Job) -> Video:
    url = f"/v1/videos/{job.id}"
    fields = {k: getattr(job, k) for k in Job.__dataclass_fields__}
    times = {k: _time(fields[k]) for k in ("created_at", "started_at", "finished_at")}
    return Video(
        **{**fields, **times},
        eta_seconds=job.eta_seconds(time.time()),
        content_url=f"{url}/content" if job.status == "succeeded" else None,
        events_url=f"{url}/events",
    )


# --- errors and guards -------------------------------------------------------------------------


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": message}, status, headers)


def _validation_sentence(exc: RequestValidationError) -> str:
    err = exc.errors()[0]
    where = [str(p) for p in err["loc"][1:]]
    field = ".".join(where)
    if err["type"] == "json_invalid":
        return _NOT_JSON
    if not where:
        return 'The request body must be a JSON object like {"prompt": "a red circle"}.'
    if err["type"] == "missing":
        return f"The field '{field}' is required."
    if err["type"] == "extra_forbidden":
        return f"Unknown field '{field}'; the fields are {', '.join(VideoRequest.model_fields)}."
    msg = err["msg"].removeprefix("Value error, ")
    return f"Invalid {field}: {msg[0].lower()}{msg[1:]}."


def _hostname(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0].lower()
    return (host.rpartition(":")[0] if host.count(":") == 1 else host).lower()


def _same_origin(origin: str, scheme: str, host: str) -> bool:
    default_port = {"http": 80, "https": 443}
    try:
        theirs, ours = urlsplit(origin), urlsplit(f"{scheme}://{host}")
        return (theirs.scheme, theirs.hostname, theirs.port or default_port.get(theirs.scheme)) == (
            ours.scheme,
            ours.hostname,
            ours.port or default_port.get(scheme),
        )
    except ValueError:  # a malformed port
        return False


class _Guard:
    """ASGI middleware: Host and Origin checks, the body cap, and headers for every response."""

    def __init__(self, app, allowed_hosts: frozenset[str]):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host, origin = headers.get("host", ""), headers.get("origin")
        refusal = None
        if _hostname(host) not in self.allowed_hosts:
            refusal = _error(
                403,
                f"The Host '{host[:100]}' is not a name of this server; add it"
                " with --allowed-host if it should be.",
            )
        elif origin is not None and not _same_origin(origin, scope["scheme"], host):
            refusal = _error(
                403,
                f"Requests from the web origin '{origin[:100]}' are refused;"
                " use the page this server serves.",
            )
        elif not headers.get("content-length", "0").isdigit():
            refusal = _error(422, "The Content-Length header is not a number.")
        elif int(headers.get("content-length", "0")) > MAX_BODY:
            refusal = _too_large()
        if refusal is not None:
            return await refusal(scope, receive, send)

        body, more = bytearray(), True
        while more:  # read it all (it is small), counting what arrives, not what was declared
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                return await _too_large()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                ]
            await send(message)

        await self.app(scope, replay, send_with_headers)


def _too_large() -> JSONResponse:
    return _error(422, f"The request body is over {MAX_BODY // 1024} KiB; send a shorter prompt.")


_bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `t2v keys create`; needed when the server runs with --auth.",
)


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


Owner = Annotated[str, Depends(_caller)]


# --- the app -----------------------------------------------------------------------------------


def create_app(config: ServeConfig, pipeline=None, on_fatal=lambda: None) -> FastAPI:
    """The t2v web app. `pipeline` (anything called like `TextToVideoPipeline`) is loaded from
    `config.model_dir` on the worker thread at start-up when not given."""

    def load_pipeline():
        if pipeline is not None:
            return pipeline
        from t2v.pipeline import TextToVideoPipeline

        return TextToVideoPipeline.from_pretrained(config.model_dir, device=config.device)

    content_filter = ContentFilter.from_file(config.blocklist)
    keys = KeyStore(config.data_dir)
    queue = JobQueue(
        JobStore(config.data_dir),
        load_pipeline,
        blocked_term=content_filter.blocked_term,
        rate_limit=RateLimiter(config.rate_limit),
        queue_size=config.queue_size,
        on_fatal=on_fatal,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        try:
            yield
        finally:
            await run_in_threadpool(queue.stop)

    app = FastAPI(
        title="t2v",
        version="1",
        summary="Text-to-video generation: queue a prompt, follow its progress, fetch the video.",
        lifespan=lifespan,
        docs_url=None,  # served below from packaged Swagger UI files, never from a CDN
    )
    app.state.config, app.state.queue, app.state.keys = config, queue, keys
    generated_openapi = app.openapi

    def openapi() -> dict:
        schema = generated_openapi()
        schema["components"]["schemas"].setdefault("ErrorBody", ErrorBody.model_json_schema())
        return schema

    app.openapi = openapi
    wildcard = config.host in ("0.0.0.0", "::", "")
    names = {*LOOPBACK_NAMES, *([] if wildcard else [config.host]), *config.allowed_hosts}
    app.add_middleware(_Guard, allowed_hosts=frozenset(n.lower().strip("[]") for n in names))

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError):
        return _error(exc.status, exc.message, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return _error(422, _validation_sentence(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 400:  # FastAPI could not decode the body (not UTF-8, say)
            return _error(422, _NOT_JSON)
        messages = {
            404: "There is nothing at this address; the API is described at /docs.",
            405: "This method is not allowed here; the API is described at /docs.",
        }
        return _error(exc.status_code, messages.get(exc.status_code, f"{exc.detail}."))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "The server hit an internal error; its log has the details.")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="t2v API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    @app.get("/healthz", response_model=Health, responses=_errors(), tags=["health"])
    def healthz():
        """200 while the process is alive."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses=_errors(503), tags=["health"])
    def readyz():
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

    @app.post(
        "/v1/videos",
        status_code=202,
        response_model=Video,
        tags=["videos"],
        responses=_errors(401, 429, 503),
    )
    def create_video(
        body: VideoRequest,
        response: Response,
        owner: Owner,
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
        return _view(job)

    @app.get("/v1/videos", response_model=VideoList, tags=["videos"], responses=_errors(401))
    def list_videos(
        owner: Owner,
        limit: int = Query(20, ge=1, le=100, description="Jobs per page."),
        cursor: str | None = Query(
            None, pattern=r"^[0-9]{0,18}$", description="The `next_cursor` of the previous page."
        ),
    ):
        """The caller's jobs, newest first."""
        jobs = queue.list(owner, limit + 1, int(cursor) if cursor else None)
        more = len(jobs) > limit
        return VideoList(
            data=[_view(j) for j in jobs[:limit]],
            next_cursor=str(jobs[limit - 1].seq) if more else None,
        )

    @app.get(
        "/v1/videos/{video_id}",
        response_model=Video,
        tags=["videos"],
        responses=_errors(401, 404),
    )
    def get_video(video_id: str, owner: Owner):
        """The job's status, progress (0 to 1) and, when it failed, the reason."""
        return _view(queue.get(video_id, owner))

    @app.get(
        "/v1/videos/{video_id}/content",
        tags=["videos"],
        response_class=FileResponse,
        responses={
            200: {
                "content": {kind: {} for kind in VIDEO_FORMATS.values()},
                "description": "The video file.",
            },
            **_errors(401, 404, 409),
        },
    )
    def get_content(video_id: str, owner: Owner):
        """The video; 409 while the job has not succeeded (yet), 404 for an unknown id."""
        job, path = queue.video(video_id, owner)
        return FileResponse(
            path,
            media_type=VIDEO_FORMATS[job.format],
            filename=f"t2v-{job.id}.{job.format}",
            content_disposition_type="inline",
            headers={"Cache-Control": "private, max-age=86400"},
        )

    @app.get(
        "/v1/videos/{video_id}/events",
        tags=["videos"],
        response_class=_EventStream,
        responses={
            200: {
                "content": {"text/event-stream": {"schema": _SSE_EVENT}},
                "description": "`progress` events with the job as JSON while it is"
                " queued or running, then one `done` event.",
            },
            **_errors(401, 404),
        },
    )
    def video_events(video_id: str, owner: Owner):
        """Server-sent events of the job's progress, until it has finished."""
        queue.get(video_id, owner)  # 404 before the stream starts

        async def stream():
            last = None
            while True:
                version = queue.changes.version
                job = queue.get(video_id, owner)
                if job != last:
                    kind = "done" if job.status in FINISHED else "progress"
                    yield f"event: {kind}\ndata: {_view(job).model_dump_json()}\n\n"
                    last = job
                if job.status in FINISHED or queue.changes.closed:
                    return
                if not await queue.changes.wait(version, SSE_KEEPALIVE_S):
                    yield ": keep-alive\n\n"

        return _EventStream(
            stream(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.delete(
        "/v1/videos/{video_id}",
        response_model=Video,
        tags=["videos"],
        responses=_errors(401, 404, 409),
    )
    def cancel_video(video_id: str, owner: Owner):
        """Cancel a queued or running job (a running one stops at its next sampling step)."""
        return _view(queue.cancel(video_id, owner))

    return app
