"""The app factory: `create_app(config)` wires the job queue, the API keys, the content filter,
the Guard and the routes into one FastAPI app. The routes live in `routes.py`, the request
checks in `guard.py`, the JSON shapes in `schemas.py`.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from swagger_ui_bundle import swagger_ui_path

from t2v.serve.auth import KeyStore, RateLimiter
from t2v.serve.filter import DEFAULT_BLOCKLIST, ContentFilter
from t2v.serve.guard import LOOPBACK_NAMES, Guard
from t2v.serve.queue import JobError, JobQueue
from t2v.serve.routes import STATIC, site, videos
from t2v.serve.schemas import VideoRequest, error_response
from t2v.serve.store_sqlite import SqliteStore

log = logging.getLogger("t2v.serve")

_NOT_JSON = 'The request body is not valid JSON; send an object like {"prompt": "a red circle"}.'


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
    public_urls: tuple[str, ...] = ()  # origins of the page behind a proxy, e.g. https://t2v.org
    drain_timeout: float = 30.0


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


def create_app(config: ServeConfig, pipeline=None, on_fatal=lambda: None) -> FastAPI:
    """The t2v web app. `pipeline` (anything called like `TextToVideoPipeline`) is loaded from
    `config.model_dir` on the worker thread at start-up when not given."""

    def load_pipeline():
        if pipeline is not None:
            return pipeline
        from t2v.pipeline import TextToVideoPipeline

        return TextToVideoPipeline.from_pretrained(config.model_dir, device=config.device)

    content_filter = ContentFilter.from_file(config.blocklist)
    store = SqliteStore(config.data_dir)
    keys = KeyStore(store)
    queue = JobQueue(
        store,
        load_pipeline,
        blocked_term=content_filter.blocked_term,
        rate_limit=RateLimiter(store, config.rate_limit),
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
        docs_url=None,  # served by routes.docs from packaged Swagger UI files, never a CDN
        redoc_url=None,  # ReDoc loads its script and fonts from a CDN
    )
    app.state.config, app.state.queue, app.state.keys = config, queue, keys
    wildcard = config.host in ("0.0.0.0", "::", "")
    names = {*LOOPBACK_NAMES, *([] if wildcard else [config.host]), *config.allowed_hosts}
    app.add_middleware(
        Guard,
        allowed_hosts=frozenset(n.lower().strip("[]") for n in names),
        public_urls=config.public_urls,
    )

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError):
        return error_response(exc.status, exc.message, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return error_response(422, _validation_sentence(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 400:  # FastAPI could not decode the body (not UTF-8, say)
            return error_response(422, _NOT_JSON)
        messages = {
            404: "There is nothing at this address; the API is described at /docs.",
            405: "This method is not allowed here; the API is described at /docs.",
        }
        response = error_response(exc.status_code, messages.get(exc.status_code, f"{exc.detail}."))
        response.headers.update(exc.headers or {})  # 405 keeps its Allow
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "The server hit an internal error; its log has the details.")

    app.include_router(site)
    app.include_router(videos)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")
    return app
