"""`t2v serve` (the web app and REST API) and `t2v keys` (its API keys).

`register_cli(subparsers)` adds both commands to an argparse subparsers object; each parser
sets `func`, and `args.func(args)` runs the command; a `UserError` carries a one-sentence
message for the user (`t2v.cli.main` prints it and exits with status 2). Nothing heavy
(FastAPI, torch) is imported until a command runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from t2v.errors import UserError
from t2v.runtime import add_run_options

DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "t2v"


def register_cli(subparsers) -> None:
    """Add the `serve`, `keys` and `worker` subcommands to an `argparse` subparsers object."""
    from t2v.serve.config import DEFAULT_BLOCKLIST, ServeConfig

    serve = subparsers.add_parser(
        "serve",
        help="Serve the web page and REST API.",
        description="Serve the web page (/) and the REST API (/v1/videos, OpenAI's videos API "
        "with t2v's knobs as extra fields, described at /docs). "
        "The model is loaded once at start-up and --workers threads run the queued jobs in "
        "order; with --workers 0 and a shared --db, `t2v worker` processes run them. "
        "SIGTERM finishes the running job (up to --drain-timeout) before exiting; Ctrl-C "
        "puts it back in the queue for the next start.",
    )
    serve.add_argument(
        "--host",
        default=ServeConfig.host,
        help="address to listen on (default: %(default)s); any address other "
        "than loopback needs --auth",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=ServeConfig.port,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    serve.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help="the model folder (or bundled model id, see `t2v generate --help`) that this "
        "node's workers run (default: the model bundled with t2v); not with --workers 0, "
        "whose models are those `t2v worker` processes serve",
    )
    serve.add_argument(
        "--default-model",
        default=None,
        metavar="ID",
        help="the model a job that names none runs on (default: --model; with --workers 0, "
        "the only model that live `t2v worker` processes serve, and a job must name one "
        "when they serve several)",
    )
    add_run_options(serve)
    _data_dir_option(serve)
    _db_option(serve)
    serve.add_argument(
        "--auth",
        action="store_true",
        help="require an API key (from `t2v keys create`) on every API request",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a further name clients may use in the Host header, e.g. the "
        "machine's DNS name, without port; repeatable (always allowed: localhost, "
        "127.0.0.1, ::1, --host and the names of --public-url)",
    )
    serve.add_argument(
        "--public-url",
        action="append",
        default=[],
        metavar="URL",
        help="the address users open the page at when a proxy that terminates TLS "
        "forwards to this server, e.g. https://t2v.example.org; the page's requests "
        "from there are then not refused as cross-site; repeatable",
    )
    serve.add_argument(
        "--queue-size",
        type=int,
        default=ServeConfig.queue_size,
        metavar="N",
        help="queued jobs beyond which new ones get 429 (default: %(default)s)",
    )
    serve.add_argument(
        "--rate-limit",
        type=int,
        default=ServeConfig.rate_limit,
        metavar="N",
        help="new jobs per API key per minute, 0 for no limit; without --auth "
        "all callers share one limit (default: %(default)s)",
    )
    serve.add_argument(
        "--blocklist",
        type=Path,
        default=DEFAULT_BLOCKLIST,
        metavar="FILE",
        help="terms refused in prompts, one per line, '#' comments; an empty "
        "file turns the filter off (default: the bundled list)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=ServeConfig.drain_timeout,
        metavar="SECONDS",
        help="on SIGTERM, how long the running job may take to finish before it "
        "is put back in the queue (default: %(default)s)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="jobs run at once in this process; 0 serves the API only, for `t2v worker` "
        "processes sharing --db (default: %(default)s)",
    )
    serve.set_defaults(func=_serve)

    keys = subparsers.add_parser(
        "keys",
        help="Create, list and revoke API keys for `t2v serve --auth`.",
        description="Manage the API keys of a data directory. Keys are stored only as "
        "SHA-256 hashes; a new key is shown once, when it is created.",
    )
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="Create a key and print it (last line of output).",
        description="Create a key and print it as the last line of "
        "output; it is not stored and cannot be shown again.",
    )
    _data_dir_option(create)
    _db_option(create)
    create.add_argument(
        "--name",
        required=True,
        help="who or what uses the key, e.g. alice or ci-bot; unique among active keys",
    )
    create.set_defaults(func=_keys_create)
    listing = actions.add_parser(
        "list",
        help="List keys (names and ids, never the keys).",
        description="List keys: id, name, created, revoked.",
    )
    _data_dir_option(listing)
    _db_option(listing)
    listing.set_defaults(func=_keys_list)
    revoke = actions.add_parser(
        "revoke",
        help="Revoke a key by name or id.",
        description="Revoke a key; requests with it get 401 at once.",
    )
    _data_dir_option(revoke)
    _db_option(revoke)
    revoke.add_argument("key", metavar="NAME_OR_ID", help="the key's name or id (`t2v keys list`)")
    revoke.set_defaults(func=_keys_revoke)
    _register_worker(subparsers, _data_dir_option)


def _db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="a PostgreSQL store that API nodes and `t2v worker` processes share, "
        "postgresql://user@host/database (default: SQLite in --data-dir)",
    )


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help="where jobs, videos and API keys are kept (default: %(default)s)",
    )


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> None:
    from t2v.pipeline_config import model_folder
    from t2v.serve.config import ServeConfig

    if not args.auth and not _is_loopback(args.host):
        raise UserError(
            f"Refusing to serve on {args.host} without --auth; add --auth (keys come "
            "from `t2v keys create`) or listen on 127.0.0.1."
        )
    if args.model is not None and not model_folder(args.model).is_dir():
        raise UserError(f"The model directory {args.model} does not exist; check --model.")
    if not args.blocklist.is_file():
        raise UserError(f"The blocklist {args.blocklist} does not exist; check --blocklist.")
    if not 0 <= args.port <= 65535:
        raise UserError(
            f"--port {args.port} is not a port; give 1 to 65535, or 0 for any free one."
        )
    allowed_hosts = tuple(_host_name(name) for name in args.allowed_host)
    public_urls = tuple(_public_url(url) for url in args.public_url)
    if args.workers < 0 or (args.workers == 0 and args.db is None):
        raise UserError(
            "--workers must be at least 1, or 0 with a shared --db postgresql://... that"
            " `t2v worker` processes serve."
        )
    if args.workers == 0 and args.model is not None:
        raise UserError(
            "--model is the model this node's workers run; with --workers 0 the models are"
            " those `t2v worker --model` processes serve (name the default with --default-model)."
        )
    if args.queue_size < 1 or args.rate_limit < 0 or args.drain_timeout < 0:
        raise UserError(
            "--queue-size must be at least 1, --rate-limit and --drain-timeout at least 0."
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")

    if args.auth and not any(k.revoked_at is None for k in _keys(args).list()):
        logging.getLogger("t2v.serve").warning(
            "--auth is on but %s has no active API key; create one with "
            "`t2v keys create --data-dir %s --name NAME`",
            args.data_dir,
            args.data_dir,
        )
    _run(
        ServeConfig(
            data_dir=args.data_dir,
            model_dir=args.model,
            device=args.device,
            precision=args.precision,
            offload=args.offload,
            host=args.host,
            port=args.port,
            auth=args.auth,
            queue_size=args.queue_size,
            rate_limit=args.rate_limit,
            blocklist=args.blocklist,
            allowed_hosts=allowed_hosts,
            public_urls=public_urls,
            drain_timeout=args.drain_timeout,
            db=args.db,
            workers=args.workers,
            default_model=args.default_model,
        )
    )


def _host_name(value: str) -> str:
    """An --allowed-host as the Host check compares it: lower-case, without a port."""
    from t2v.serve.guard import hostname

    name = hostname(value.strip())
    if "/" in value or not re.fullmatch(r"[a-z0-9._:-]+", name) or not name.strip(".:"):
        raise UserError(
            f"--allowed-host {value!r} is not a host name; give a name such as"
            " t2v.example.org, without scheme or path."
        )
    return name


def _public_url(value: str) -> str:
    """A --public-url as an origin: scheme://host[:port], lower-case."""
    try:
        url = urlsplit(value.strip())
        port = url.port
    except ValueError:
        url, port = None, None
    if (
        url is None
        or url.scheme not in ("http", "https")
        or not url.hostname
        or url.path
        not in (
            "",
            "/",
        )
    ):
        raise UserError(
            f"--public-url {value!r} is not an origin; give the scheme and host users"
            " open, such as https://t2v.example.org."
        )
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return f"{url.scheme}://{host}" + (f":{port}" if port else "")


def _keys(args: argparse.Namespace):
    """The API keys of the store `--db` names, or of the data directory's SQLite file."""
    from t2v.serve.app import data_dir_errors
    from t2v.serve.auth import KeyStore
    from t2v.serve.store import open_store

    with data_dir_errors(args.data_dir):
        return KeyStore(open_store(getattr(args, "db", None), args.data_dir, wait_s=5))


def _keys_create(args: argparse.Namespace) -> None:
    key, secret = _keys(args).create(args.name)
    print(f"Created API key '{key.name}' (id {key.id}) in {args.data_dir}.")
    print("It is shown only now; send it as the header 'Authorization: Bearer <key>':")
    print(secret)


def _keys_list(args: argparse.Namespace) -> None:
    from datetime import datetime

    def day(t):
        return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else "-"

    keys = _keys(args).list()
    print(f"{'id':<12}  {'name':<24}  {'created':<16}  revoked")
    for key in keys:
        print(f"{key.id:<12}  {key.name:<24}  {day(key.created_at):<16}  {day(key.revoked_at)}")


def _keys_revoke(args: argparse.Namespace) -> None:
    key, cancelled = _keys(args).revoke(args.key)
    print(f"Revoked API key '{key.name}' (id {key.id}); {cancelled} of its jobs were cancelled.")


# --- running it --------------------------------------------------------------------------------

# Query parameters that carry credentials, and a t2v key anywhere in a URL: never logged.
_SECRET_PARAM = re.compile(
    r"(?i)([?&](?:api[_-]?key|key|token|access[_-]?token|secret|password|auth\w*|sig\w*)=)[^&#]*"
)
_T2V_KEY = re.compile(r"t2v_[0-9a-f]{12}_[A-Za-z0-9_-]+")


def _scrub_secrets(record: logging.LogRecord) -> bool:
    """A logging filter for uvicorn's access log: the request line's key-like query values
    and any t2v key are replaced by [redacted] (a refused key is still a key)."""
    if isinstance(record.args, tuple) and len(record.args) >= 3:
        args = list(record.args)
        path = _SECRET_PARAM.sub(r"\1[redacted]", str(args[2]))
        args[2] = _T2V_KEY.sub("[redacted]", path)
        record.args = tuple(args)
    return True


def _run(config) -> None:
    """Serve until SIGTERM (drain: finish the running job, up to `drain_timeout`) or Ctrl-C
    (stop: the running job goes back to the queue)."""
    import signal
    import threading

    import uvicorn

    from t2v.serve.app import create_app

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if sig != signal.SIGTERM or self.should_exit or draining.is_set():
                return super().handle_exit(sig, frame)
            draining.set()
            logging.getLogger("t2v.serve").info(
                "SIGTERM: finishing the running job (up to %.0f s), then exiting",
                config.drain_timeout,
            )
            threading.Thread(target=drain, name="t2v-drain", daemon=True).start()

    def drain():
        app.state.queue.drain(config.drain_timeout)
        server.should_exit = True

    def fatal():
        failed.set()
        server.should_exit = True

    draining, failed = threading.Event(), threading.Event()
    app = create_app(config, on_fatal=fatal)
    server = Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="info",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
    )
    logging.getLogger("uvicorn.access").addFilter(_scrub_secrets)  # after uvicorn's config
    server.run()
    if failed.is_set():
        raise UserError(app.state.queue.load_error)
    if not server.started:
        raise UserError("The server did not start; the log above says why.")


def _register_worker(subparsers, data_dir_option) -> None:
    """Add `t2v worker` to an argparse subparsers object (`data_dir_option(parser)` adds the
    shared --data-dir option)."""
    worker = subparsers.add_parser(
        "worker",
        help="Run queued jobs from a shared PostgreSQL store on one model.",
        description="Claim jobs for one model from the database that `t2v serve --db` nodes "
        "share, one at a time, and write their videos to --data-dir (which every node must "
        "share). SIGTERM finishes the running job, then exits; Ctrl-C puts it back in the "
        "queue.",
    )
    worker.add_argument(
        "--db",
        required=True,
        metavar="URL",
        help="the shared store, postgresql://user@host/database",
    )
    worker.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help="the model folder (or bundled model id, see `t2v generate --help`) this worker "
        "serves (default: the model bundled with t2v)",
    )
    data_dir_option(worker)
    add_run_options(worker)
    worker.add_argument(
        "--lease-seconds",
        type=float,
        default=60.0,
        metavar="S",
        help="how long a job stays this worker's without a renewal; a dead worker's job "
        "returns to the queue after it (default: %(default)s)",
    )
    worker.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> None:
    if not args.db.startswith(("postgresql://", "postgres://")):
        raise UserError(
            "t2v worker needs --db postgresql://...; the SQLite store is for one server."
        )
    if not 3 <= args.lease_seconds <= 86400:
        raise UserError("--lease-seconds must be from 3 to 86400.")
    from t2v.serve.worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    run_worker(
        args.db,
        args.model,
        args.data_dir,
        args.device,
        args.lease_seconds,
        precision=args.precision,
        offload=args.offload,
    )
