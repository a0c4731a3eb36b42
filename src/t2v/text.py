"""Text preparation: prompt normalisation and the word-level tokenizer for from-scratch encoders."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from t2v.errors import UserError

DEFAULT_MAX_CHARS = 500

# Zero-width and invisible formatting characters that NFKC keeps but a reader never sees.
_INVISIBLE = dict.fromkeys(
    map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad\u180e"),
    None,
)
_SPACE = re.compile(r"\s+")


class PromptError(UserError):
    """A prompt that cannot be used; the message is one sentence a user can act on."""


def _clean(text: str, what: str) -> str:
    """NFKC, control and zero-width characters out, whitespace collapsed; may be empty."""
    if not isinstance(text, str):
        raise PromptError(f"{what} must be text, not {type(text).__name__}.")
    if bad := next((c for c in text if "\ud800" <= c <= "\udfff"), None):
        # A lone surrogate (e.g. from a mis-decoded "\ud800" escape) is no character at
        # all: no tokenizer, database or terminal can take it.
        raise PromptError(
            f"{what} holds U+{ord(bad):04X}, a lone surrogate that is not a character; "
            "remove it or send the text as valid UTF-8."
        )
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    # Control characters (Cc) and other format characters (Cf) become spaces so that
    # "red\x00circle" still reads as two words.
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)
    return _SPACE.sub(" ", text).strip()


def _capped(text: str, max_chars: int | None, what: str) -> str:
    if max_chars is not None and len(text) > max_chars:
        raise PromptError(
            f"{what} is {len(text)} characters long; the limit is {max_chars}, so shorten it."
        )
    return text


def normalize(text: str, max_chars: int | None = DEFAULT_MAX_CHARS) -> str:
    """NFKC, drop control and zero-width characters, collapse whitespace, enforce the cap.

    Raises PromptError when the result is empty or longer than ``max_chars``, or when the
    text holds a lone surrogate.
    """
    text = _clean(text, "The prompt")
    if not text:
        raise PromptError("The prompt is empty; describe the video you want, e.g. 'a red circle'.")
    return _capped(text, max_chars, "The prompt")


def normalize_negative(text: str | None, max_chars: int | None = DEFAULT_MAX_CHARS) -> str:
    """The negative prompt, normalised as `normalize` does; nothing visible (None, empty,
    blank or only zero-width characters) means no negative prompt, "". The one rule for
    the CLI, the Python API and the server."""
    if text is None:
        return ""
    return _capped(_clean(text, "The negative prompt"), max_chars, "The negative prompt")


# --- tokenizer -----------------------------------------------------------------------------

PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
SPECIAL_TOKENS = [PAD, UNK, CLS]


class Tokenizer:
    """Word-level tokenizer (Hugging Face `tokenizers`) trained on the caption corpus.

    Lower-cases, splits on whitespace and punctuation, maps unseen words to [UNK], and
    prepends [CLS] whose embedding the encoders use as a pooled summary.
    """

    def __init__(self, backend):
        self._tok = backend
        self.pad_id = backend.token_to_id(PAD)
        self.unk_id = backend.token_to_id(UNK)
        self.cls_id = backend.token_to_id(CLS)

    @staticmethod
    def _new(vocab: dict[str, int] | None = None):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, normalizers, pre_tokenizers

        tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
        )
        return tok

    @classmethod
    def train(cls, texts: Iterable[str]) -> Tokenizer:
        from tokenizers import trainers

        tok = cls._new()
        trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, texts: list[str], max_len: int) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids (with [CLS] first, padded to the longest, cut at max_len) and masks."""
        ids = [[self.cls_id] + self._tok.encode(t).ids for t in texts]
        ids = [row[:max_len] for row in ids]
        width = max(len(r) for r in ids)
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in ids]
        ids = [r + [self.pad_id] * (width - len(r)) for r in ids]
        return ids, mask

    def known_fraction(self, text: str) -> float:
        """Share of the prompt's words that the tokenizer knows (0 when it has none)."""
        ids = self._tok.encode(text).ids
        return sum(i != self.unk_id for i in ids) / len(ids) if ids else 0.0
