"""Prompt normalisation and the word-level tokenizer."""

from __future__ import annotations

import pytest

from t2v.errors import UserError
from t2v.text import PromptError, Tokenizer, normalize, normalize_negative


def test_nfkc_folds_fullwidth_and_ligatures():
    assert normalize("ａ ｒｅｄ　ｃｉｒｃｌｅ") == "a red circle"
    assert normalize("ﬁne") == "fine"


def test_zero_width_and_control_characters_are_removed():
    assert normalize("re\u200bd cir\u200dcle\ufeff") == "red circle"
    assert normalize("red\x00circle\x07 moving\tleft\r\n") == "red circle moving left"


def test_whitespace_collapses():
    assert normalize("  a   red \n\n circle  ") == "a red circle"


@pytest.mark.parametrize("text", ["", "   ", "\u200b\u200c", "\x00\x01"])
def test_empty_prompts_get_one_sentence(text):
    with pytest.raises(PromptError, match="empty"):
        normalize(text)


def test_length_cap_is_configurable_and_counts_after_normalising():
    assert normalize("a" * 500) == "a" * 500
    with pytest.raises(PromptError, match="501 characters long; the limit is 500"):
        normalize("a" * 501)
    assert normalize("ab  cd", max_chars=5) == "ab cd"  # collapsed first
    with pytest.raises(PromptError, match="limit is 4"):
        normalize("abcde", max_chars=4)
    assert normalize("x" * 10_000, max_chars=None)


def test_tokenizer_round_trip_and_unknown_words(tmp_path):
    tok = Tokenizer.train(["a red circle moving left", "a big blue box rising"])
    ids, mask = tok.encode(["a red circle", "a purple hexagon"], max_len=8)
    assert ids[0][0] == tok.cls_id and ids[1][0] == tok.cls_id
    assert ids[1][2] == tok.unk_id and ids[1][3] == tok.unk_id  # unknown words never crash
    assert mask == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert tok.known_fraction("a purple hexagon") == pytest.approx(1 / 3)
    assert tok.known_fraction("zzz") == 0
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(["A RED, circle!"], 8) == tok.encode(["a red , circle !"], 8)
    long_ids, _ = tok.encode(["a " * 50], max_len=8)
    assert len(long_ids[0]) == 8


@pytest.mark.parametrize("text", ["\ud800", "a red\udfff circle", "\udc80"])
def test_a_lone_surrogate_is_one_sentence_not_a_crash(text):
    for check in (normalize, normalize_negative):
        with pytest.raises(PromptError, match="lone surrogate") as e:
            check(text)
        assert "\n" not in str(e.value) and str(e.value).endswith(".")
        str(e.value).encode("utf-8")  # the message itself is printable and storable
    with pytest.raises(UserError):
        normalize("\ud800")


@pytest.mark.parametrize("text", [None, "", "   ", "\u200b", "\u200b\u200c\ufeff", "\x00\t"])
def test_a_negative_prompt_with_nothing_visible_is_no_negative_prompt(text):
    assert normalize_negative(text) == ""


def test_a_negative_prompt_is_normalised_and_capped_like_a_prompt():
    assert normalize_negative("  a   ｂｌｕｅ\u200b square ") == "a blue square"
    with pytest.raises(PromptError, match="The negative prompt is 501 characters long"):
        normalize_negative("b" * 501)
    assert normalize_negative("b" * 501, max_chars=None) == "b" * 501
