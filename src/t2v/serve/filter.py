"""Prompt content filter: a blocklist matched on normalised text that resists spelling tricks.

Both the blocklist terms and the prompt go through the same `fold`: NFKC (fullwidth and
other compatibility forms become plain letters), casefold, accents stripped, zero-width and
control characters removed, a few Cyrillic/Greek look-alikes mapped to Latin. The folded
prompt is split into letter-or-digit tokens, and a term matches when its letters-only form
equals the concatenation of one or more *consecutive whole tokens*. So "b a d", "b.a.d",
"ｂａｄ" and "b\u200bad" all match the term "bad", while "badge" or "sinbad" do not
(matches start and end on word boundaries), and a multi-word term such as "child abuse"
matches "childabuse" as well as "child  abuse".
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

DEFAULT_BLOCKLIST = Path(__file__).with_name("blocklist.txt")

# Letters that look like Latin ones, so that "bаd" with a Cyrillic "а" is still "bad".
_LOOKALIKES = str.maketrans(
    "аеорсухіјѕԁӏαεικνορτυχ",  # Cyrillic, then Greek
    "aeopcyxijsdlaeikvoptux",
)
_TOKEN = re.compile(r"[^\W_]+")  # runs of letters or digits


def fold(text: str) -> str:
    """The form both prompt and blocklist are compared in (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = unicodedata.normalize("NFKD", text)
    # Combining marks (accents) and format characters (zero-width joiners, BOM, soft hyphen)
    # vanish; other control characters separate words, as whitespace would.
    text = "".join(
        " " if unicodedata.category(c) == "Cc" else c
        for c in text
        if not unicodedata.combining(c) and unicodedata.category(c) != "Cf"
    )
    return text.translate(_LOOKALIKES)


def _letters(text: str) -> str:
    return "".join(_TOKEN.findall(fold(text)))


class ContentFilter:
    """Blocks prompts that contain a term of the blocklist; see the module docstring."""

    def __init__(self, terms: list[str]):
        self._terms = {_letters(t): t.strip() for t in terms if _letters(t)}
        self._longest = max(map(len, self._terms), default=0)

    @classmethod
    def from_file(cls, path: str | Path = DEFAULT_BLOCKLIST) -> ContentFilter:
        """One term per line; blank lines and lines starting with '#' are ignored."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls([line for line in lines if line.strip() and not line.lstrip().startswith("#")])

    def __len__(self) -> int:
        return len(self._terms)

    def blocked_term(self, prompt: str) -> str | None:
        """The blocklist term the prompt contains, or None when it is allowed."""
        tokens = _TOKEN.findall(fold(prompt))
        for start in range(len(tokens)):
            joined = ""
            for token in tokens[start:]:
                joined += token
                if len(joined) > self._longest:
                    break
                if joined in self._terms:
                    return self._terms[joined]
        return None
