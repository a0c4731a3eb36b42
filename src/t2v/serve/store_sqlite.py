"""The embedded state store: one SQLite file in the data directory (see `t2v.serve.store`)."""

from __future__ import annotations

import fcntl
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from t2v.errors import UserError
from t2v.serve.store import SCHEMA_VERSION, SqlStore, StoreUnavailable, too_new

# Version 1 is the schema before versioning (CREATE ... IF NOT EXISTS: such files upgrade).
_SQLITE_MIGRATIONS = {
    1: """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT,
    seed INTEGER NOT NULL,
    steps INTEGER,
    guidance REAL,
    format TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;
""",
    2: """
ALTER TABLE jobs ADD COLUMN frames INTEGER;
ALTER TABLE jobs ADD COLUMN width INTEGER;
ALTER TABLE jobs ADD COLUMN height INTEGER;
ALTER TABLE jobs ADD COLUMN fps REAL;
ALTER TABLE jobs ADD COLUMN model TEXT;
ALTER TABLE jobs ADD COLUMN worker TEXT;
ALTER TABLE jobs ADD COLUMN lease_until REAL;
CREATE TABLE rate_events (owner TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX rate_events_owner ON rate_events (owner, at);
CREATE TABLE workers (id TEXT PRIMARY KEY, model TEXT NOT NULL, info TEXT NOT NULL,
    seen_at REAL NOT NULL);
""",
    3: """
ALTER TABLE jobs ADD COLUMN original_prompt TEXT;
ALTER TABLE jobs ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN resolved INTEGER NOT NULL DEFAULT 0;
""",
}
# SQLite's clock in seconds since the epoch, with milliseconds (unixepoch() has none).
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_FULL = ("full", "disk i/o", "readonly", "read-only", "unable to open")


class SqliteStore(SqlStore):
    """The embedded store: one SQLite file in the data directory, one connection, one lock."""

    NOW = _SQLITE_NOW

    def __init__(self, data_dir: Path, *, migrate_to: int = SCHEMA_VERSION):
        self.data_dir = data_dir
        self.videos = data_dir / "videos"
        self.videos.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._lock_file = None
        path = data_dir / "t2v.sqlite3"
        try:
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=10
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the worker
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a killed process
            self._migrate(migrate_to)
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            raise UserError(
                f"{path} is not a t2v database or is damaged ({e}); move it away, or give"
                " another --data-dir."
            ) from None

    def _migrate(self, target: int) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("CREATE TABLE IF NOT EXISTS t2v_schema (version INTEGER)")
                row = self._db.execute("SELECT version FROM t2v_schema").fetchone()
                found = row[0] if row else 0
                if found > SCHEMA_VERSION:
                    raise too_new(found, str(self.data_dir / "t2v.sqlite3"))
                for version in range(found + 1, target + 1):
                    for statement in _SQLITE_MIGRATIONS[version].split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                if found < target:
                    self._db.execute("DELETE FROM t2v_schema")
                    self._db.execute("INSERT INTO t2v_schema VALUES (?)", (target,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _tx(self) -> Iterator:
        def run(sql: str, args: tuple = ()) -> list:
            return self._db.execute(self._sql(sql), args).fetchall()

        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield run
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if any(word in str(e).lower() for word in _FULL):
                    raise StoreUnavailable(
                        f"The server cannot write its job store ({e}); retry in a minute."
                    ) from e
                raise

    def _integrity_errors(self) -> tuple[type[Exception], ...]:
        return (sqlite3.IntegrityError,)

    def _claim_sql(self) -> str:
        return (
            "UPDATE jobs SET status = 'running', started_at = {now}, attempts = attempts + 1,"
            " lease_until = {now} + ?, worker = ?"
            " WHERE seq = (SELECT MIN(seq) FROM jobs WHERE status = 'queued'"
            " AND (model IS NULL OR model = ?)) RETURNING *"
        )

    def lock(self) -> None:
        """Take the data directory for this process alone; a second server is refused."""
        if self._lock_file is not None:
            return
        handle = open(self.data_dir / "t2v.lock", "a+")  # noqa: SIM115 - held until exit
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(
                f"Another t2v server is using {self.data_dir}; stop it, or give this one"
                " another --data-dir (or share a --db postgresql://... between them)."
            ) from None
        self._lock_file = handle

    def unlock(self) -> None:
        """Let the next server have the data directory."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self.unlock()
