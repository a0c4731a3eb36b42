"""The app factory: `create_app(config)` wires the job queue, the API keys, the content filter,
the Guard and the routes into one FastAPI app. The routes live in `routes.py`, the request
checks in `guard.py`, the JSON shapes in `schemas.py`.
"""

from __future__ import annotations

import copy
import logging
import os
import sqlite3
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.routing import Match
from swagger_ui_bundle import swagger_ui_path

from t2v.errors import UserError
from t2v.model import ModelInfo, VideoModel
from t2v.serve.auth import KeyStore, RateLimiter
from t2v.serve.config import ServeConfig
from t2v.serve.filter import ContentFilter
from t2v.serve.guard import LOOPBACK_NAMES, Guard, hostname
from t2v.serve.queue import JobError, JobQueue
from t2v.serve.routes import STATIC, Served, site, videos
from t2v.serve.schemas import VideoCreate, error_response, state_knobs
from t2v.serve.store import open_store

log = logging.getLogger("t2v.serve")

_NOT_JSON = 'The request body is not valid JSON; send an object like {"prompt": "a red circle"}.'


def _methods(scope) -> list[str]:
    """Every method some route takes at this path, for a 405's Allow header."""
    routes = [*site.routes, *videos.routes]
    matching = [route.methods for route in routes if route.matches(scope)[0] != Match.NONE]
    return sorted(set().union(*matching))


@contextmanager
def data_dir_errors(data_dir: Path):
    """Opening the store of `data_dir`: a directory that cannot hold it is one sentence."""
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(
            f"The data directory {data_dir} is a file; give a directory with --data-dir."
        )
    if data_dir.is_dir() and not os.access(data_dir, os.W_OK | os.X_OK):
        raise UserError(f"The data directory {data_dir} is read-only; give a writable --data-dir.")
    try:
        yield
    except sqlite3.OperationalError as e:  # read-only, or no permission to create the file
        raise UserError(
            f"Cannot write to the data directory {data_dir} ({e}); give a writable --data-dir."
        ) from None
    except sqlite3.DatabaseError as e:  # "file is not a database", "malformed"
        raise UserError(
            f"{data_dir / 't2v.sqlite3'} is not a t2v database ({e}); move it away to start"
            " afresh, or restore it from a backup."
        ) from None
    except OSError as e:  # EROFS, EACCES, ENOTDIR on the way to the file
        raise UserError(
            f"Cannot use the data directory {data_dir} ({e.strerror}); give a writable --data-dir."
        ) from None


def _validation_sentence(exc: RequestValidationError) -> str:
    err = exc.errors()[0]
    where = [str(p) for p in err["loc"][1:]]
    field = ".".join(where)
    if err["type"] == "json_invalid":
        reason = err.get("ctx", {}).get("error", "")
        if "escape" in reason or "surrogate" in reason:  # "\ud800" alone is no character
            return (
                "The request body holds a lone surrogate escape (\\ud800-\\udfff without its"
                " pair), which is not text; send the characters themselves."
            )
        return _NOT_JSON
    if not where:
        return 'The request body must be a JSON object like {"prompt": "a red circle"}.'
    if err["type"] == "missing":
        return f"The field '{field}' is required."
    if err["type"] == "extra_forbidden":
        return f"Unknown field '{field}'; the fields are {', '.join(VideoCreate.model_fields)}."
    msg = err["msg"].removeprefix("Value error, ")
    return f"Invalid {field}: {msg[0].lower()}{msg[1:]}."


def create_app(config: ServeConfig, model: VideoModel | None = None, on_fatal=lambda: None):
    """The t2v web app. `model` is loaded from `config.model_dir` (`t2v.backends.load_model`)
    on the worker thread at start-up when not given; its knobs are read from its files now,
    so that requests are checked, and the page built, while it loads."""

    def load_model() -> VideoModel:
        if model is not None:
            return model
        from t2v.backends import load_model

        return load_model(config.model_dir, config.device, config.precision, config.offload)

    if model is not None:
        knobs, info = model.knobs, model.info
    else:
        from t2v.backends import read_knobs
        from t2v.pipeline_config import model_folder, model_id

        knobs = read_knobs(config.model_dir)
        name = model_id(model_folder(config.model_dir))  # as load_model names it
        info = ModelInfo(id=name, kind="", description="Loading.")
    content_filter = ContentFilter.from_file(config.blocklist)
    with data_dir_errors(config.data_dir):
        store = open_store(config.db, config.data_dir)
    keys = KeyStore(store)
    queue = JobQueue(
        store,
        load_model,
        blocked_term=content_filter.blocked_term,
        rate_limit=RateLimiter(store, config.rate_limit),
        queue_size=config.queue_size,
        on_fatal=on_fatal,
        workers=config.workers,
        model_id=info.id,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        try:
            yield
        finally:
            await run_in_threadpool(queue.stop)
            store.close()  # the app opened it: its connections and listener end with the app

    app = FastAPI(
        title="t2v",
        version="1",
        summary="Text-to-video generation: queue a prompt, follow its progress, fetch the video.",
        lifespan=lifespan,
        docs_url=None,  # served by routes.docs from packaged Swagger UI files, never a CDN
        redoc_url=None,  # ReDoc loads its script and fonts from a CDN
    )
    app.state.config, app.state.queue, app.state.keys = config, queue, keys
    app.state.served = Served(
        knobs, info, time.time(), queue, own=config.workers > 0, default=config.default_model
    )
    generated_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:  # generated once, then kept by FastAPI
            schema = copy.deepcopy(generated_openapi())  # the routes' parts are shared
            post = schema["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
            for content in post.values():  # a node without a model: GET /v1/models says
                if config.workers > 0:
                    state_knobs(content["schema"], knobs)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    wildcard = config.host in ("0.0.0.0", "::", "")
    public_names = [urlsplit(url).hostname or "" for url in config.public_urls]
    names = {
        *LOOPBACK_NAMES,
        *([] if wildcard else [config.host]),
        *config.allowed_hosts,
        *public_names,
    }
    app.add_middleware(
        Guard,
        allowed_hosts=frozenset(hostname(n) for n in names),
        public_urls=config.public_urls,
    )

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError):
        return error_response(exc.status, exc.message, exc.retry_after)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):  # e.g. a knob the model cannot take
        return error_response(422, str(exc))

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
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Starlette names only the first route's methods
            response.headers["Allow"] = ", ".join(_methods(request.scope))
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
