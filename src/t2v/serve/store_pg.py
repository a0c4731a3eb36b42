"""The shared state store: PostgreSQL, for API nodes and `t2v worker` processes on many
machines (``--db postgresql://...``). The SQL is `t2v.serve.store.SqlStore`'s; this module
adds the connections, the schema, the claim and the notifications.

- A worker claims a job with ``FOR UPDATE SKIP LOCKED``: two workers never take one row, and
  none waits for another's claim.
- Every job change sends ``NOTIFY t2v_jobs`` in its transaction; each API node LISTENs and
  wakes its server-sent-event streams, so progress from any worker reaches any node at once.
- A lost connection is retried with backoff (about 6 s in all) before a request gets a 503;
  workers and the listener retry for as long as it takes.
- The clock is the database's, so nodes whose clocks differ agree on leases.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from t2v.errors import UserError
from t2v.serve.store import SCHEMA_VERSION, SqlStore, StoreUnavailable, too_new

log = logging.getLogger("t2v.serve")

CHANNEL = "t2v_jobs"
_MIGRATION_LOCK = 7_402_017  # pg_advisory_xact_lock key: one node migrates at a time
_RETRIES = (0.2, 0.5, 1.0)  # seconds between attempts to reach the database

_MIGRATIONS = {
    1: """
CREATE TABLE jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT,
    seed BIGINT NOT NULL,
    steps INTEGER,
    guidance DOUBLE PRECISION,
    format TEXT NOT NULL,
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX jobs_owner ON jobs (owner, seq);
CREATE INDEX jobs_status ON jobs (status, seq);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;
""",
    2: """
ALTER TABLE jobs ADD COLUMN frames INTEGER;
ALTER TABLE jobs ADD COLUMN width INTEGER;
ALTER TABLE jobs ADD COLUMN height INTEGER;
ALTER TABLE jobs ADD COLUMN fps DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN model TEXT;
ALTER TABLE jobs ADD COLUMN worker TEXT;
ALTER TABLE jobs ADD COLUMN lease_until DOUBLE PRECISION;
CREATE TABLE rate_events (owner TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE INDEX rate_events_owner ON rate_events (owner, at);
CREATE TABLE workers (id TEXT PRIMARY KEY, model TEXT NOT NULL, info TEXT NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL);
""",
    3: """
ALTER TABLE jobs ADD COLUMN original_prompt TEXT;
ALTER TABLE jobs ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN resolved BOOLEAN NOT NULL DEFAULT false;
""",
}


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


class PgStore(SqlStore):
    """Jobs, keys, rate limits and workers in PostgreSQL; safe to share between processes."""

    NOW = "extract(epoch from clock_timestamp())::float8"

    def __init__(
        self,
        url: str,
        data_dir: Path,
        *,
        connect_timeout: float = 60.0,
        max_connections: int = 8,
        migrate_to: int = SCHEMA_VERSION,
    ):
        self.url = url
        self.videos = data_dir / "videos"
        self.videos.mkdir(parents=True, exist_ok=True)
        self._sql_cache: dict[str, str] = {}
        self._stop = threading.Event()
        _wait_for(url, connect_timeout)
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"row_factory": dict_row, "autocommit": True, "connect_timeout": 5},
            check=ConnectionPool.check_connection,  # a connection the server dropped is replaced
            timeout=1,  # per attempt to get a connection
            name="t2v",
            open=True,
        )
        self._migrate(migrate_to)

    def _migrate(self, target: int) -> None:
        with self._tx() as run:
            run("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            run("CREATE TABLE IF NOT EXISTS t2v_schema (version INTEGER NOT NULL)")
            rows = run("SELECT version FROM t2v_schema")
            found = rows[0]["version"] if rows else 0
            if found > SCHEMA_VERSION:
                raise too_new(found, f"The database at {safe_url(self.url)}")
            for version in range(found + 1, target + 1):
                run(_MIGRATIONS[version])
            if found < target:
                run("DELETE FROM t2v_schema")
                run("INSERT INTO t2v_schema VALUES (?)", (target,))
                log.info("database schema upgraded from version %d to %d", found, target)

    def schema_version(self) -> int:
        return self._one("SELECT version FROM t2v_schema")["version"]

    def _sql(self, sql: str) -> str:
        if sql not in self._sql_cache:
            self._sql_cache[sql] = super()._sql(sql).replace("?", "%s")
        return self._sql_cache[sql]

    @contextmanager
    def _tx(self, retry: bool = True) -> Iterator:
        """One transaction. Getting a connection is retried with backoff (the pool replaces
        dropped ones); a transaction the database drops midway is a 503 to retry."""
        delays = list(_RETRIES if retry else ())
        while True:
            try:
                conn = self._pool.getconn()
                break
            except PoolTimeout as e:
                if not delays:
                    raise _unavailable() from e
                log.warning("the database cannot be reached (%s); retrying", e)
                time.sleep(delays.pop(0))
        try:
            with conn.transaction(), conn.cursor() as cur:

                def run(sql: str, args: tuple = ()) -> list:
                    cur.execute(self._sql(sql), args, prepare=False)
                    return cur.fetchall() if cur.description else []

                yield run
        except psycopg.OperationalError as e:
            raise _unavailable() from e
        finally:
            self._pool.putconn(conn)

    def _integrity_errors(self) -> tuple[type[Exception], ...]:
        return (psycopg.errors.UniqueViolation,)

    def _claim_sql(self) -> str:
        return (
            "UPDATE jobs SET status = 'running', started_at = {now}, attempts = attempts + 1,"
            " lease_until = {now} + ?, worker = ?"
            " WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued'"
            " AND (model IS NULL OR model = ?) ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
            " RETURNING *"
        )

    def _changed(self, run) -> None:
        run(f"NOTIFY {CHANNEL}")

    def _lock_owner(self, run, owner: str) -> None:
        run("SELECT pg_advisory_xact_lock(hashtext(?))", (owner,))

    def ping(self) -> bool:
        try:
            with self._tx(retry=False) as run:
                run("SELECT 1")
            return True
        except StoreUnavailable:
            return False

    def listen(self, on_change) -> None:
        """Call `on_change()` on every job change any process makes, from a thread that
        reconnects with backoff; while disconnected it calls it every second (polling)."""
        threading.Thread(
            target=self._listen, args=(on_change,), name="t2v-listen", daemon=True
        ).start()

    def _listen(self, on_change) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.2
                    on_change()  # whatever changed while not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            on_change()
            except psycopg.OperationalError as e:
                log.warning("listening for job changes failed (%s); retrying", e)
                end = time.monotonic() + delay
                while time.monotonic() < end and not self._stop.wait(min(1.0, delay)):
                    on_change()
                delay = min(delay * 2, 10.0)

    def close(self) -> None:
        self._stop.set()
        self._pool.close()


def _unavailable() -> StoreUnavailable:
    return StoreUnavailable("The database cannot be reached; retry in a few seconds.", 5)


def _wait_for(url: str, timeout: float) -> None:
    """Wait, with backoff, for a database that is still starting; refuse a wrong URL at once."""
    deadline, delay = time.monotonic() + timeout, 0.2
    while True:
        try:
            psycopg.connect(url, connect_timeout=5).close()
            return
        except psycopg.OperationalError as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            permanent = any(w in reason for w in ("does not exist", "authentication failed"))
            if permanent or time.monotonic() + delay > deadline:
                raise UserError(
                    f"The database at {safe_url(url)} cannot be used ({reason.rstrip('.')});"
                    " check --db and that PostgreSQL is running."
                ) from None
            log.warning("waiting for the database at %s (%s)", safe_url(url), reason)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
