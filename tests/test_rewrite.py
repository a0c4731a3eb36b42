"""The prompt rewriter (t2v.rewrite): free wording read as the nearest training caption, the
words it cannot place named, and the evaluation's paraphrases kept apart from its tuning."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from t2v.pipeline_config import DEFAULT_MODEL_DIR
from t2v.rewrite import FUNCTION_WORDS, VOCABULARY_FILE, Rewriter, words_of

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="module")
def rewriter() -> Rewriter:
    return Rewriter.for_model(DEFAULT_MODEL_DIR)


def read(rewriter: Rewriter, prompt: str) -> list[dict]:
    objects, _ = rewriter.objects(words_of(rewriter.rewrite(prompt).prompt))
    return [{**o.values, "direction": rewriter.direction(o)} for o in objects]


# --- the tables ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocabulary() -> dict:
    from t2v.shapes import caption_vocabulary

    return caption_vocabulary()


def test_a_model_trained_on_moving_shapes_carries_the_vocabulary(tmp_path):
    from t2v.sources import save_vocabulary

    save_vocabulary(tmp_path / "shards-model", str(tmp_path))  # a shard folder: nothing
    assert not (tmp_path / "shards-model").exists()
    (tmp_path / "model").mkdir()
    save_vocabulary(tmp_path / "model", "shapes")  # what the trainer and `t2v export` call
    written = json.loads((tmp_path / "model" / VOCABULARY_FILE).read_text("utf-8"))
    assert written == json.loads((DEFAULT_MODEL_DIR / VOCABULARY_FILE).read_text("utf-8"))


def test_the_shipped_vocabulary_is_the_caption_grammars(vocabulary):
    shipped = json.loads((DEFAULT_MODEL_DIR / VOCABULARY_FILE).read_text("utf-8"))
    assert shipped == json.loads(json.dumps(vocabulary))


def test_wordnet_relations_place_words_no_table_was_given(tmp_path, vocabulary):
    """A tiny WordNet in its own file format: the builder finds a satellite adjective, a
    hyponym and a derivation of caption words, and a word that only resembles them it
    leaves alone."""
    from build_lexicon import Settings, expand, read_wordnet

    def data(lines):
        return "".join(line + " | gloss\n" for line in lines)

    (tmp_path / "data.adj").write_text(
        data(
            [
                "00000001 00 a 01 red 0 001 & 00000002 a 0000",
                "00000002 00 s 01 vermilion 0 001 & 00000001 a 0000",
            ]
        )
    )
    (tmp_path / "data.noun").write_text(
        data(
            [
                "00000010 25 n 01 circle 0 002 ~ 00000011 n 0000 + 00000020 a 0101",
                "00000011 25 n 01 roundel 0 001 @ 00000010 n 0000",
                "00000012 05 n 01 dog 0 000",
            ]
        )
    )
    (tmp_path / "data.adj").write_text(
        (tmp_path / "data.adj").read_text()
        + data(["00000020 01 a 01 circular 0 001 + 00000010 n 0101"])
    )
    (tmp_path / "data.verb").write_text("")
    (tmp_path / "data.adv").write_text("")
    (tmp_path / "index.adj").write_text(
        "red a 1 1 & 1 1 00000001\nvermilion a 1 1 & 1 0 00000002\ncircular a 1 1 + 1 0 00000020\n"
    )
    (tmp_path / "index.noun").write_text(
        "circle n 1 2 ~ + 1 1 00000010\nroundel n 1 1 @ 1 0 00000011\ndog n 1 0 1 1 00000012\n"
    )
    for name in ("index.verb", "index.adv", "cntlist.rev"):
        (tmp_path / name).write_text("")
    for name in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"{name}.exc").write_text("")
    (tmp_path / "rgb.txt").write_text("")
    lexicon = expand(vocabulary, Settings(), read_wordnet(tmp_path), tmp_path / "rgb.txt")
    assert lexicon["words"] == {
        "vermilion": "color:red",
        "roundel": "shape:circle",
        "circular": "shape:circle",
    }
    reading = Rewriter(vocabulary, lexicon).rewrite("a large vermilion roundel moving left")
    assert reading.prompt == "a large red circle moving left"
    assert reading.changed and not reading.unknown


def test_words_found_only_through_wordnet_are_read(rewriter):
    """Words in no caption and in no list of ours (neither the DEV nor the evaluation
    paraphrases): the shipped lexicon has them from WordNet and X11's colour names."""
    from dev_paraphrases import dev_words

    from t2v import evaluate

    lists = dev_words() | _eval_words(evaluate)
    captions = set(rewriter.vocabulary["words"])
    cases = {
        "a lilliputian carmine equilateral triangle heading downwards": {
            "size": "small",
            "color": "red",
            "shape": "triangle",
            "direction": "down",
        },
        "an elephantine chartreuse circlet that is inert": {
            "size": "large",
            "color": "green",
            "shape": "circle",
            "direction": "still",
        },
    }
    for prompt, truth in cases.items():
        novel = set(words_of(prompt)) - FUNCTION_WORDS - captions
        assert len(novel) >= 3 and not novel & lists, prompt
        assert read(rewriter, prompt) == [truth], rewriter.rewrite(prompt)


def test_compass_points_are_screen_directions(rewriter):
    """North is up and east is right on the screen, as on a map; an intercardinal point
    names both axes, and WordNet's forms of the points are read too."""
    cases = {
        "a red circle headed north": "up",
        "a red circle drifting southwards": "down",
        "a red circle bound due east": "right",
        "a red circle going northwest": "up-left",
        "a red circle travelling to the southeast": "down-right",
        "a red circle heading south-west": "down-left",
        "a red circle flying northeasterly": "up-right",
    }
    for prompt, direction in cases.items():
        assert [o["direction"] for o in read(rewriter, prompt)] == [direction], prompt


def test_colour_names_are_read_by_hue_and_by_their_head_word(rewriter):
    """An X11 colour's measured hue beats WordNet's "a kind of blue", and its WordNet
    synonyms share it; a colour name that ends in a caption colour is that colour, and so
    are its synonyms; a negated one ("non-white") is none."""
    from dev_paraphrases import dev_words

    from t2v import evaluate

    cases = {
        "aquamarine": "cyan",  # X11 hue 160; WordNet files it under blue
        "aureate": "yellow",  # a synonym of X11's "gold"
        "pearly": "white",  # a synonym of "pearly white"
        "mahogany": "red",  # a synonym of "reddish brown"
        "sky blue": "blue",  # by its head word, though its hue is nearer cyan
    }
    clash = sorted(set(cases) & (dev_words() | _eval_words(evaluate)))
    assert clash == []
    for word, colour in cases.items():
        assert read(rewriter, f"a {word} triangle") == [
            {"color": colour, "shape": "triangle", "direction": None}
        ], word
    assert rewriter.label("non white") is None and rewriter.label("coloured") is None


def test_a_body_is_read_by_the_shape_its_definition_names(rewriter):
    """WordNet relates "regular tetrahedron" to no caption shape; its definition ("... four
    triangular faces") names one. A plane curve whose definition names one ("hyperbola":
    "... a right circular cone") is not drawn as it."""
    from dev_paraphrases import dev_words

    from t2v import evaluate

    novel = {"regular", "tetrahedron", "hyperbola", "fold", "bead"}
    clash = sorted(novel & (dev_words() | _eval_words(evaluate)))
    assert clash == []
    assert read(rewriter, "a small regular tetrahedron moving left") == [
        {"size": "small", "shape": "triangle", "direction": "left"}
    ]
    assert rewriter.label("hyperbola") is None and rewriter.label("fold") is None
    # "a shape that is spherical and small": an adjective similar to "circular" names it.
    assert read(rewriter, "a bead")[0]["shape"] == "circle"


def test_a_way_of_moving_with_a_direction_is_read_as_the_direction(rewriter):
    """WordNet files "climb" both under moving (a generic motion word) and under rising: the
    direction is what it adds, so it is read, not dropped as a tie."""
    from dev_paraphrases import dev_words

    from t2v import evaluate

    clash = sorted({"slumps", "settling"} & (dev_words() | _eval_words(evaluate)))
    assert clash == []  # only the clash is shown: the evaluation's words stay unseen
    assert read(rewriter, "a red square slumps") == [
        {"color": "red", "shape": "square", "direction": "down"}
    ]
    assert read(rewriter, "a red square settling")[0]["direction"] == "down"


def test_no_abbreviation_or_number_is_a_table_word():
    """WordNet's "w" (west) or "78" (a record, round) would place stray letters and digits."""
    lexicon = json.loads((ROOT / "src/t2v/lexicon.json").read_text("utf-8"))
    assert not [w for w in lexicon["words"] if len(w) < 3 or re.search(r"\d", w)]


def _tiny_wordnet(root: Path, noun: list[str], index_noun: str) -> Path:
    """A WordNet of a few nouns, in WordNet's own file format."""
    (root / "data.noun").write_text("".join(line + " | gloss\n" for line in noun))
    (root / "index.noun").write_text(index_noun)
    for name in ("data.adj", "data.verb", "data.adv", "index.adj", "index.verb", "index.adv"):
        (root / name).write_text("")
    for name in ("cntlist.rev", "noun.exc", "verb.exc", "adj.exc", "adv.exc", "rgb.txt"):
        (root / name).write_text("")
    return root


def test_a_kind_of_shape_outranks_a_thing_of_a_shape(tmp_path, vocabulary):
    """ "shim" is both a kind of triangle (noun.shape) and a kind of block (noun.artifact):
    the shape sense says what it looks like, so it is read as a triangle, not dropped."""
    from build_lexicon import Settings, expand, read_wordnet

    root = _tiny_wordnet(
        tmp_path,
        [
            "00000030 25 n 01 triangle 0 001 ~ 00000040 n 0000",
            "00000031 06 n 01 block 0 001 ~ 00000041 n 0000",
            "00000040 25 n 01 shim 0 001 @ 00000030 n 0000",
            "00000041 06 n 01 shim 0 001 @ 00000031 n 0000",
        ],
        "triangle n 1 1 ~ 1 0 00000030\nblock n 1 1 ~ 1 0 00000031\n"
        "shim n 2 1 @ 2 0 00000040 00000041\n",
    )
    lexicon = expand(vocabulary, Settings(), read_wordnet(root), root / "rgb.txt")
    assert lexicon["words"] == {"shim": "shape:triangle"}


# --- reading prompts ---------------------------------------------------------------------


def test_training_captions_are_left_as_typed(rewriter):
    from t2v import shapes

    for caption in shapes.caption_corpus(seed=3, count=400):
        reading = rewriter.rewrite(caption)
        assert reading.prompt == caption and not reading.warnings


def test_a_reading_reads_as_itself(rewriter):
    """A server stores the reading and a worker resolves it again: nothing may drift."""
    from dev_paraphrases import dev_set

    for prompt, _ in dev_set(200, seed=5):
        once = rewriter.rewrite(prompt).prompt
        assert rewriter.rewrite(once).prompt == once, prompt


def test_two_objects_are_read_apart_in_any_joining_words(rewriter):
    reading = rewriter.rewrite("a tiny scarlet box rising beside a colossal cobalt blue circlet")
    assert reading.prompt == "a small red square moving up and a large blue circle"


def test_from_names_the_start_not_the_goal(rewriter):
    assert read(rewriter, "a red disc scooting from right to left") == [
        {"color": "red", "shape": "circle", "direction": "left"}
    ]


def test_unknown_words_are_named_and_the_prompt_still_generates(rewriter):
    reading = rewriter.rewrite("a dog running on the beach")
    assert reading.unknown == ("dog", "beach")  # "running" is a motion, without a direction
    assert "'dog', 'beach'" in reading.warnings[0]
    assert reading.prompt == "a dog running on the beach"  # nothing to read it as
    # Words the model knows next to ones it does not: the known ones are read.
    reading = rewriter.rewrite("a crimson giraffe moving left")
    assert reading.unknown == ("giraffe",)
    assert reading.prompt == "a red moving left"  # the unknown word left out


def test_words_that_name_an_attribute_are_not_reported(rewriter):
    """ "A gold-coloured shape" names no word the model does not know."""
    reading = rewriter.rewrite("a gold-coloured shape, small-sized, moving left")
    assert reading.prompt == "a small yellow moving left" and reading.unknown == ()


def test_the_warning_stays_short_and_reads_any_script(rewriter):
    reading = rewriter.rewrite("a " + "x" * 400 + " " + " ".join(f"w{c}q" for c in "abcdefghij"))
    assert len(reading.warnings[0]) < 300 and "and 3 more words" in reading.warnings[0]
    assert rewriter.rewrite("un cercle écarlate").unknown == ("un", "cercle", "écarlate")


def test_resolve_returns_the_reading_and_the_original(tiny_model_dir, tmp_path):
    from t2v.backends import load_model
    from t2v.model import GenerationRequest

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    shutil.copy(DEFAULT_MODEL_DIR / VOCABULARY_FILE, folder / VOCABULARY_FILE)
    model = load_model(folder, device="cpu")
    request = model.resolve(GenerationRequest("a  scarlet disc plummeting, on a dog"))
    assert request.prompt == "a red circle moving down"
    assert request.original_prompt == "a scarlet disc plummeting, on a dog"
    assert "'dog'" in request.warnings[0]
    assert model.resolve(request) == request  # resolving again changes nothing
    same = model.resolve(GenerationRequest("a small red circle moving left"))
    assert same.original_prompt is None and same.warnings == ()
    [video] = model.generate([request])
    assert video.frames.shape[0] > 0


def test_the_cli_prints_how_it_read_the_prompt(tiny_model_dir, tmp_path, capsys):
    from t2v.cli import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    shutil.copy(DEFAULT_MODEL_DIR / VOCABULARY_FILE, folder / VOCABULARY_FILE)
    argv = ["generate", "a scarlet disc on a beach", "--model", folder, "--steps", "2"]
    assert main([str(a) for a in [*argv, "-o", tmp_path / "x.gif"]]) == 0
    err = capsys.readouterr().err
    assert "t2v: read as: a red circle\n" in err
    assert "t2v: warning: This model does not know 'beach'" in err


def test_a_batch_records_each_reading(tiny_model_dir, tmp_path):
    from t2v.generate import generate_batch
    from t2v.model import GenerationRequest

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    shutil.copy(DEFAULT_MODEL_DIR / VOCABULARY_FILE, folder / VOCABULARY_FILE)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle moving left\na scarlet disc beside a sandcastle\n")
    template = GenerationRequest("", steps=2)
    index = generate_batch(prompts, tmp_path / "out", template, model=folder, format="gif")
    first, second = [json.loads(line) for line in index.read_text().splitlines()]
    assert "read_as" not in first and "warnings" not in first
    assert second["read_as"] == "a red circle"
    assert "'sandcastle'" in second["warnings"][0]


@pytest.mark.skipif(
    not (
        Path("/usr/share/wordnet/data.noun").is_file() and Path("/usr/share/X11/rgb.txt").is_file()
    ),
    reason="needs Debian's wordnet-base and x11-common",
)
def test_the_shipped_lexicon_is_what_the_builder_makes(vocabulary):
    """Needs Debian's wordnet-base and x11-common (build time only): a stale lexicon fails."""
    from build_lexicon import expand

    shipped = json.loads((ROOT / "src/t2v/lexicon.json").read_text("utf-8"))
    assert shipped == json.loads(json.dumps(expand(vocabulary)))


def test_inference_imports_no_training_code():
    code = (
        "import sys, t2v.rewrite, t2v.generate, t2v.pipeline; "
        "print(sorted({'t2v.data', 't2v.train', 't2v.shapes'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- evaluation honesty --------------------------------------------------------------------


def _eval_words(evaluate) -> set[str]:
    tables = (evaluate.PARAPHRASE_SIZES, evaluate.PARAPHRASE_SHAPES, evaluate.PARAPHRASE_MOTIONS)
    phrases = [p for t in tables for ps in t.values() for p in ps]
    phrases += [re.sub(r"\{\w+\}", " ", t) for t in evaluate.PARAPHRASE_TEMPLATES]
    return {w for p in phrases for w in words_of(p)}


def test_the_eval_paraphrases_share_no_word_with_training_or_tuning():
    """Each evaluation paraphrase says its size, shape or motion in at least one word that
    no training caption uses, and none of those words is in the DEV set the rewriter was
    tuned on (nor in the caption vocabulary the rewriter reads)."""
    from dev_paraphrases import dev_words

    from t2v import evaluate, shapes

    captions = shapes.caption_corpus(seed=0, count=5000)
    training = {w for c in captions for w in words_of(c)}
    tables = (evaluate.PARAPHRASE_SIZES, evaluate.PARAPHRASE_SHAPES, evaluate.PARAPHRASE_MOTIONS)
    for table in tables:
        for phrases in table.values():
            for phrase in phrases:
                assert set(words_of(phrase)) - training - FUNCTION_WORDS, phrase
    new = _eval_words(evaluate) - training - FUNCTION_WORDS
    assert new and not new & dev_words()
    assert not new & set(Rewriter.for_model(DEFAULT_MODEL_DIR).vocabulary["words"])
