"""API keys (stored as hashes only, in the state store) and the per-key rate limit.

A key reads `t2v_<id>_<secret>`: the id is public (it names the key in `t2v keys list` and
owns the key's jobs), the secret is 256 random bits of which only the SHA-256 is stored.
A slow password hash buys nothing for secrets this long, and checking a request stays cheap.
The key itself is shown once, by `t2v keys create`, and never stored or logged.

Every request is checked against the store, with no cache, so a key revoked on one node is
refused by every node at once. Revoking a key also cancels its queued and running jobs (a
running one stops before its next sampling step): nobody could cancel them through the API
any more, and whoever revokes a key wants its work stopped.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from t2v.errors import UserError
from t2v.serve.store import ApiKey, SqlStore

__all__ = ["ApiKey", "KeyStore", "RateLimiter"]

_KEY = re.compile(r"t2v_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_NAME = re.compile(r"[\w.@+-]{1,64}")
_DUMMY_HASH = hashlib.sha256(b"").hexdigest()


class KeyStore:
    """The API keys of a state store (SQLite in the data directory, or PostgreSQL)."""

    def __init__(self, store: SqlStore):
        self.store = store

    def create(self, name: str) -> tuple[ApiKey, str]:
        """A new key named `name`; returns it and the full key, which exists only in memory."""
        if not _NAME.fullmatch(name):
            raise UserError(
                "A key name is 1-64 letters, digits or . _ @ + -, e.g. 'alice' or 'ci-bot'."
            )
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        return self.store.add_key(key_id, name, _sha256(secret)), f"t2v_{key_id}_{secret}"

    def list(self) -> list[ApiKey]:
        return self.store.keys()

    def revoke(self, name_or_id: str) -> tuple[ApiKey, int]:
        """Revoke the key with this id, or the active key with this name, and cancel its
        queued and running jobs; returns the key and how many jobs were cancelled."""
        revoked = self.store.revoke_key(name_or_id)
        if revoked is None:
            raise UserError(
                f"No active key has the name or id '{name_or_id}'; see `t2v keys list`."
            )
        return revoked

    def verify(self, presented: str) -> ApiKey | None:
        """The active key `presented` is, or None; the secret is compared in constant time."""
        match = _KEY.fullmatch(presented)
        stored = self.store.key_hash(match[1]) if match else None
        given = _sha256(match[2]) if match else _sha256("")
        if hmac.compare_digest(stored or _DUMMY_HASH, given) and stored:
            return self.store.key(match[1])
        return None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class RateLimiter:
    """At most `per_minute` new jobs per key in any 60-second window (0: no limit), counted
    in the store so that every API node shares one count."""

    def __init__(self, store: SqlStore, per_minute: int):
        self.store, self.per_minute = store, per_minute

    def __call__(self, key: str) -> float:
        """Record one event for `key`; returns 0, or the seconds to wait when over the limit."""
        if self.per_minute <= 0:
            return 0.0
        return self.store.rate_hit(key, self.per_minute)
