"""Prompt canonicalisation by retrieval: a prompt in the user's words, read as the nearest
caption the model was trained on, and the words it cannot place named.

The small-model analogue of the prompt extension that Wan and CogVideoX do with an LLM: each
object clause (split as the text encoder splits it, `split_objects`) is read word by word
against two tables, and rewritten in the canonical caption form when it is not already in
the form of a training caption.

- ``vocabulary.json`` in the model folder: the training captions' words, each with the
  attribute value it names ("ball" -> shape:circle, "rising" -> direction:up), the clause
  patterns of the training captions and the canonical form (tools/build_lexicon.py derives
  it from the caption grammar).
- ``lexicon.json`` beside this module: English words that WordNet relates to those words
  ("crimson" -> color:red, "descend" -> direction:down, "figure" -> an object of any shape),
  compass points as screen directions ("northwest" -> direction:up-left) and X11's colour
  names by hue ("turquoise" -> color:cyan), distilled from WordNet 3.0 and rgb.txt by
  tools/build_lexicon.py, so neither is needed here.

A word that neither table places, nor a function word, is reported: the model draws the
rest of the prompt and the caller shows the warning.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from t2v.models.text_encoders import split_objects

VOCABULARY_FILE = "vocabulary.json"
LEXICON_PATH = Path(__file__).parent / "lexicon.json"

# Closed-class English words (articles, pronouns, prepositions, auxiliaries, conjunctions,
# intensifiers, scene words for the frame): they carry no attribute, so none is reported.
FUNCTION_WORDS = frozenset(
    """a an the this that these those there here it its it's is are was were be been being
    am do does did has have had having of in on at to into onto from by with without for
    as while and or but nor so then than which who whom whose what where when how very quite
    rather really just also too somewhat slightly fairly pretty all some any each one another
    other same such only own we you they he she i me my our your their his her them us
    can could will would shall should may might must let lets let's show shows showing shown
    depict depicts depicting feature features featuring display displays displaying contain
    contains containing see seen watch video clip animation scene frame frames image picture
    across over through along around toward towards against within about above below between
    behind beside near next way whilst who's gets get getting keeps keep keeping itself
    slowly quickly steadily gently smoothly continuously constantly black background
    canvas screen dark empty plain solid filled""".split()
) | frozenset(  # words that name an attribute or an object, not which ("gold-coloured")
    """shape shapes shaped object objects thing things item items color colour colors colours
    colored coloured hued tinted size sized""".split()
)
NEGATIONS = frozenset({"not", "no", "never", "without", "nothing", "isn't", "doesn't"})
# Words that may open another object's noun phrase ("the" seldom does: "to the left").
ARTICLES = frozenset({"a", "an", "one", "another"})

# WordNet's rules of detachment (morphy), then adverb endings ("leftwards", "upwardly"): an
# inflected or derived form's ending, and what the base form ends in instead.
_DETACH = (
    ("ies", "y"), ("es", "e"), ("es", ""), ("s", ""), ("ed", "e"), ("ed", ""),
    ("ing", "e"), ("ing", ""), ("er", ""), ("est", ""), ("er", "e"), ("est", "e"),
    ("ly", ""), ("ward", ""), ("wards", ""), ("wardly", ""),
)  # fmt: skip
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")  # letters of any script


def words_of(text: str) -> list[str]:
    """Lower-case words; a hyphen or any punctuation separates words ("up-left": up, left)."""
    return _WORD.findall(text.lower())


def base_forms(word: str, forms: dict) -> list[str]:
    """``word``, its irregular base forms (``forms``: "rose" -> ["rise"]), then the bases
    that WordNet's rules of detachment give, a doubled final consonant undone ("sliding")."""
    out = [word, *forms.get(word, ())]
    for suffix, ending in _DETACH:
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            stem = word[: -len(suffix)]
            out.append(stem + ending)
            if not ending and len(stem) > 2 and stem[-1] == stem[-2]:
                out.append(stem[:-1])
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Reading:
    """How the rewriter read a prompt."""

    prompt: str  # the canonical prompt (the original when nothing was rewritten)
    original: str
    unknown: tuple[str, ...] = ()  # content words that no table places
    warnings: tuple[str, ...] = ()  # sentences for the user

    @property
    def changed(self) -> bool:
        return self.prompt != self.original


@dataclass
class _Object:
    values: dict[str, str] = field(default_factory=dict)
    axes: list[str] = field(default_factory=list)
    still: bool = False

    def placed(self) -> bool:
        return bool(self.values or self.axes or self.still)


class Rewriter:
    """Reads prompts against a model's ``vocabulary`` and a WordNet ``lexicon`` (see above)."""

    MAX_PHRASE = 3  # words in the longest table entry tried

    def __init__(self, vocabulary: dict, lexicon: dict | None = None):
        lexicon = lexicon or {"words": {}, "forms": {}}
        self.vocabulary = vocabulary
        known = {f"{a}:{v}" for a, values in vocabulary["values"].items() for v in values}
        known |= {"motion:", "object:"}
        # Only lexicon entries that name a label this model knows (another model folder may
        # have another vocabulary).
        self.words = {w: label for w, label in lexicon["words"].items() if label in known}
        self.forms = lexicon.get("forms", {})
        for word, label in vocabulary["words"].items():  # "rise" and "rises" as "rising"
            for base in base_forms(word, self.forms)[1:]:
                self.words.setdefault(base, label)
        self.words |= vocabulary["words"]
        self.patterns = frozenset(vocabulary.get("patterns", ()))

    @classmethod
    def for_model(cls, folder: str | Path) -> Rewriter | None:
        """The rewriter of the model in ``folder``; None when it has no vocabulary.json."""
        path = Path(folder) / VOCABULARY_FILE
        if not path.is_file():
            return None
        return cls(json.loads(path.read_text("utf-8")), _lexicon())

    def save(self, folder: str | Path) -> None:
        """Write the vocabulary into a model folder, beside the model it describes."""
        text = json.dumps(self.vocabulary, indent=1) + "\n"
        (Path(folder) / VOCABULARY_FILE).write_text(text, "utf-8")

    # --- reading ---------------------------------------------------------------------------
    def label(self, phrase: str) -> str | None:
        """The label of a word or phrase: a caption word's own, else the lexicon's."""
        words = phrase.split()
        for i, w in enumerate(words):  # each word's base forms in turn ("moves up")
            for base in base_forms(w, self.forms):
                candidate = " ".join([*words[:i], base, *words[i + 1 :]])
                if candidate in self.words:
                    return self.words[candidate]
        return None

    def pattern(self, words: list[str]) -> str | None:
        """The clause with each caption word replaced by its attribute, if all are caption
        words or function words: the shape of a training caption it may have."""
        out = []
        for w in words:
            if w in self.vocabulary["words"]:
                out.append(self.vocabulary["words"][w].split(":")[0])
            elif w in FUNCTION_WORDS or w in NEGATIONS:
                out.append(w)
            else:
                return None
        return " ".join(out)

    def objects(self, words: list[str]) -> tuple[list[_Object], list[str]]:
        """The objects a clause describes, and the words no table places."""
        objects, unknown = [_Object()], []
        i, negated = 0, False
        while i < len(words):
            w, obj = words[i], objects[-1]
            # "a red circle beside a blue square": a new article after a shape or colour
            # starts another object when a shape or colour follows.
            if w in ARTICLES and ("shape" in obj.values or "color" in obj.values):
                rest = [self.label(x) or "" for x in words[i + 1 :]]
                if any(x.startswith(("shape:", "color:")) for x in rest):
                    objects.append(obj := _Object())
            for n in range(min(self.MAX_PHRASE, len(words) - i), 0, -1):
                label = self.label(" ".join(words[i : i + n]))
                if label is not None:
                    break
            if label is None:
                if w in NEGATIONS:
                    negated = True
                elif w not in FUNCTION_WORDS:
                    unknown.append(w)
                i += 1
                continue
            attr, value = label.split(":")
            origin = i > 0 and words[i - 1] == "from"  # "from left to right": not the goal
            if attr == "direction" and value == "still" or (attr == "motion" and negated):
                obj.still = True
            elif attr == "direction" and not origin:
                obj.axes += value.split("-")  # "northwest" is up-left: both axes
            elif attr in ("color", "shape", "size"):
                obj.values.setdefault(attr, value)
            negated = False
            i += n
        return [o for o in objects if o.placed()] or objects[:1], unknown

    def direction(self, obj: _Object) -> str | None:
        vertical = next((a for a in obj.axes if a in ("up", "down")), None)
        horizontal = next((a for a in obj.axes if a in ("left", "right")), None)
        name = "-".join(a for a in (vertical, horizontal) if a)
        if name in self.vocabulary["values"]["direction"]:
            return name
        return "still" if obj.still else None

    def _caption(self, obj: _Object) -> str:
        """The canonical caption of ``obj``, without the words no table placed: on DEV
        prompts, keeping them in the empty slots ("a large red sphere") drew fewer right
        two-object clips (tools/dev_paraphrases.py)."""
        direction = self.direction(obj)
        slots = {a: obj.values.get(a, "") for a in ("size", "color", "shape")}
        motion = self.vocabulary["motion"][direction] if direction else ""
        text = " ".join(self.vocabulary["template"].format(**slots, motion=motion).split())
        if text.startswith("a ") and text[2:3] in "aeiou":
            text = "an" + text[1:]
        return text

    def rewrite(self, prompt: str) -> Reading:
        """``prompt`` read as the nearest caption the model was trained on."""
        captions, unknown = [], []
        for clause in split_objects(prompt):
            words = words_of(clause)
            if self.pattern(words) in self.patterns:  # already a training caption's form
                captions.append(clause)
                continue
            objects, missing = self.objects(words)
            unknown += missing
            if any(o.placed() for o in objects):
                captions += [self._caption(o) for o in objects]
            else:  # nothing to read it as: the model gets the words as they are
                captions.append(clause)
        text = captions[0]
        for more in captions[1:]:
            text = self.vocabulary["pair"].format(first=text, second=more)
        if captions == split_objects(prompt):  # every clause as typed, and their joins too
            text = prompt
        unknown = list(dict.fromkeys(unknown))
        warnings = ()
        if unknown:
            names = ", ".join(f"'{w[:30]}'" for w in unknown[:8])
            if len(unknown) > 8:
                names += f" and {len(unknown) - 8} more words"
            warnings = (
                f"This model does not know {names} (it knows coloured shapes, their size and "
                f"motion), so the video may not show {'it' if len(unknown) == 1 else 'them'}.",
            )
        return Reading(text, prompt, tuple(unknown), warnings)


@cache
def _lexicon() -> dict:
    """The WordNet table shipped with t2v (read once per process)."""
    return json.loads(LEXICON_PATH.read_text("utf-8"))
