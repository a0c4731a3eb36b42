"""API keys (stored as hashes only) and the per-key rate limit.

A key reads `t2v_<id>_<secret>`: the id is public (it names the key in `t2v keys list` and
owns the key's jobs), the secret is 256 random bits of which only the SHA-256 is stored.
A slow password hash buys nothing for secrets this long, and checking a request stays cheap.
The key itself is shown once, by `t2v keys create`, and never stored or logged.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from t2v.serve.jobs import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_name ON api_keys (name) WHERE revoked_at IS NULL;
"""
_KEY = re.compile(r"t2v_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_NAME = re.compile(r"[\w.@+-]{1,64}")
_DUMMY_HASH = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: float
    revoked_at: float | None


class KeyStore:
    """The API keys of a data directory (the same SQLite file as its jobs)."""

    def __init__(self, data_dir: Path):
        self._db = open_db(data_dir)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def create(self, name: str) -> tuple[ApiKey, str]:
        """A new key named `name`; returns it and the full key, which exists only in memory."""
        if not _NAME.fullmatch(name):
            raise ValueError(
                "A key name is 1-64 letters, digits or . _ @ + -, e.g. 'alice' or 'ci-bot'."
            )
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO api_keys (id, name, secret_sha256, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (key_id, name, _sha256(secret), time.time()),
                )
        except sqlite3.IntegrityError:
            raise ValueError(
                f"An active key named '{name}' exists; revoke it first or pick another name."
            ) from None
        return self._get(key_id), f"t2v_{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY created_at"
            ).fetchall()
        return [ApiKey(*r) for r in rows]

    def revoke(self, name_or_id: str) -> ApiKey:
        """Revoke the key with this id, or the active key with this name."""
        with self._lock:
            row = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE revoked_at IS NULL"
                " AND (id = ? OR name = ?) RETURNING id",
                (time.time(), name_or_id, name_or_id),
            ).fetchone()
        if row is None:
            raise ValueError(
                f"No active key has the name or id '{name_or_id}'; see `t2v keys list`."
            )
        return self._get(row[0])

    def verify(self, presented: str) -> ApiKey | None:
        """The active key `presented` is, or None; the secret is compared in constant time."""
        match = _KEY.fullmatch(presented)
        with self._lock:
            row = (
                match
                and self._db.execute(
                    "SELECT secret_sha256 FROM api_keys WHERE id = ? AND revoked_at IS NULL",
                    (match[1],),
                ).fetchone()
            )
        stored = row[0] if row else _DUMMY_HASH
        given = _sha256(match[2]) if match else _sha256("")
        if hmac.compare_digest(stored, given) and row:
            return self._get(match[1])
        return None

    def _get(self, key_id: str) -> ApiKey:
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, created_at, revoked_at FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        return ApiKey(*row)


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class RateLimiter:
    """At most `per_minute` events per key in any 60-second window (0: no limit)."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute, self._clock = per_minute, clock
        self._events: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> float:
        """Record one event for `key`; returns 0, or the seconds to wait when over the limit."""
        if self.per_minute <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            events = self._events.setdefault(key, collections.deque())
            while events and events[0] <= now - 60:
                events.popleft()
            if len(events) >= self.per_minute:
                return max(events[0] + 60 - now, 0.001)
            events.append(now)
            return 0.0
