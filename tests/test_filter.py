"""The server's content filter: every evasion of the corpus is caught, no benign prompt is."""

from __future__ import annotations

import codecs
import time
from pathlib import Path

import pytest

from t2v.serve.filter import DEFAULT_BLOCKLIST, ContentFilter, fold

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


def test_filter_passes_every_benign_prompt(content_filter):
    blocked = [(p, content_filter.blocked_term(p)) for p in benign_prompts()]
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


def test_fold_drops_every_default_ignorable_code_point():
    """Derived from the Unicode property, so fillers nobody listed are gone too."""
    regex = pytest.importorskip("regex")
    ignorable = regex.compile(r"\p{Default_Ignorable_Code_Point}")
    codes = [c for c in range(0x110000) if ignorable.match(chr(c))]
    assert len(codes) > 4000  # the planes of tags and variation selectors are in it
    assert all(fold(f"a{chr(c)}b") == "ab" for c in codes[::7] + [0x3164, 0x115F, 0xFFA0])


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


def test_filter_is_fast(content_filter):
    """It runs on every POST: a long, hostile prompt still takes well under a millisecond."""
    prompts = [p for _, p in evasions()] + benign_prompts()
    prompts.append(("c " * 250)[:500])  # 250 one-letter tokens, each the start of a term
    for p in prompts:  # warm the fold table
        content_filter.blocked_term(p)
    start = time.perf_counter()
    for p in prompts:
        content_filter.blocked_term(p)
    per_prompt = (time.perf_counter() - start) / len(prompts)
    assert per_prompt < 2e-3, f"{per_prompt * 1e6:.0f} µs per prompt"
