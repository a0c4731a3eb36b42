"""The one error type whose message is meant for a person.

A `UserError` says, in one sentence, what was wrong with the input and what to do. The CLI
prints it without a traceback and exits 2; the server answers it with a 4xx. Every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a missing file, a refused folder: one sentence a person can act on."""
