"""Build the two tables the prompt rewriter (`t2v.rewrite`) reads; run once, at build time.

1. ``vocabulary.json`` in a model folder: what the model was trained on, derived from the
   Moving Shapes caption grammar (`t2v.shapes`): each caption word with the attribute value
   it names ("ball" -> shape:circle, "rising" -> direction:up), the generic words that name
   no value ("moving", "diagonally"), and the canonical caption form.
2. ``src/t2v/lexicon.json``: English words that WordNet relates to those caption words
   (synonyms, similar-to adjectives, hyponyms, derivations, pertainyms; hypernyms for the
   generic "a shape" words), each with the label it reaches first; the compass points as
   screen directions (COMPASS: north is up) and their WordNet forms; X11's colour names read
   as the caption colour nearest in hue, with their WordNet colour synonyms; bodies read by
   the shape their definition names ("pyramid": triangular sides); and the irregular forms
   of those words. Users need no WordNet at run time. The settings and rules were chosen on
   the DEV set (tools/dev_paraphrases.py) only.

Needs Debian's WordNet database and X11's colour names at build time only
(``apt-get install -y wordnet-base x11-common``: /usr/share/wordnet, /usr/share/X11/rgb.txt);
nothing is downloaded.

    .venv/bin/python tools/build_lexicon.py            # both tables, for the bundled model
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from t2v.rewrite import (
    FUNCTION_WORDS,
    LEXICON_PATH,
    VOCABULARY_FILE,
    base_forms,
)
from t2v.shapes import caption_vocabulary

WORDNET = Path("/usr/share/wordnet")
RGB_TXT = Path("/usr/share/X11/rgb.txt")
GENERIC_MOTION, GENERIC_OBJECT = "motion:", "object:"

# --- 2. WordNet and X11's colour names ----------------------------------------------------

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
LEXFILES = {  # lexicographer files (WordNet's lexnames) an attribute's words may come from
    "color": {0, 7},  # adj.all, noun.attribute
    "shape": {0, 1, 6, 25},  # adj.all, adj.pert ("circular"), noun.artifact, noun.shape
    "size": {0},  # adj.all
    "direction": {0, 2, 38},  # adj.all, adv.all, verb.motion
    "motion": {38},  # verb.motion
    "object": {25},  # noun.shape
    "compass": {0, 2, 24},  # adj.all, adv.all, noun.relation ("northwest", a compass point)
}
# Screen directions by the map convention (north at the top, east on the right): one table,
# and the intercardinal points composed from it ("northwest" -> up-left).
COMPASS = {"north": "up", "south": "down", "east": "right", "west": "left"}
ARTIFACT = 6  # noun.artifact
# WordNet's bodies (noun.shape): one is drawn as its outline, read from its definition.
BODIES = ("solid", "round shape")
SEED_POS = {"shape": "n"}  # a shape word's own senses: nouns ("cross" the adjective is angry)
# Pointers followed from a caption word's senses: the first step may take any of FIRST (and a
# hypernym from a shape: "sphere" is above "ball"); later steps only NEXT, and only after a
# step of NEXT, so a derivation never opens a family of hyponyms.
FIRST = {"&": "similar to", "~": "hyponym", "+": "derivation", "\\": "pertainym", "^": "also see"}
NEXT = {"&", "~"}


@dataclass
class Synset:
    lexfile: int
    lemmas: list[str]
    pointers: list[tuple[str, str]]  # (symbol, synset key)
    gloss: str = ""  # the definition, without its examples


@dataclass
class WordNet:
    synsets: dict[str, Synset]  # by key "pos:offset"
    index: dict[str, list[str]]  # a lemma's synset keys, most frequent sense first per pos
    tags: dict[str, dict[str, int]]  # lemma -> pos -> times its senses were tagged (SemCor)
    forms: dict[str, set[str]]  # irregular forms: "rose" -> {"rise"}

    def usual(self, lemma: str, pos: str, share: float) -> bool:
        """Whether ``pos`` is a usual part of speech of ``lemma``: "dog" is seldom a verb."""
        counts = self.tags.get(lemma)
        return not counts or counts.get(pos, 0) >= share * sum(counts.values())


def _lemma(word: str) -> str:
    return re.sub(r"\(.*\)$", "", word).replace("_", " ").replace("-", " ").lower()


def read_wordnet(root: Path = WORDNET) -> WordNet:
    synsets: dict[str, Synset] = {}
    index: dict[str, list[str]] = defaultdict(list)
    for pos, name in POS_FILES.items():
        for line in (root / f"data.{name}").read_text("utf-8", "replace").splitlines():
            if line.startswith("  "):
                continue  # the licence header
            head, _, gloss = line.partition(" | ")
            f = head.split()
            n = int(f[3], 16)
            lemmas = [_lemma(f[4 + 2 * i]) for i in range(n)]
            k = 4 + 2 * n
            pointers = []
            for i in range(int(f[k])):
                sym, off, p = f[k + 1 + 4 * i : k + 4 + 4 * i]
                pointers.append((sym, f"{'a' if p == 's' else p}:{off}"))
            gloss = gloss.split(";")[0].strip()
            synsets[f"{pos}:{f[0]}"] = Synset(int(f[1]), lemmas, pointers, gloss)
        for line in (root / f"index.{name}").read_text("utf-8", "replace").splitlines():
            if line.startswith("  "):
                continue
            f = line.split()
            index[_lemma(f[0])] += [f"{pos}:{o}" for o in f[6 + int(f[3]) :]]
    tags: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for line in (root / "cntlist.rev").read_text("utf-8", "replace").splitlines():
        key, _, count = line.split()
        lemma, sense = key.split("%")
        tags[_lemma(lemma)]["nvara"[int(sense[0]) - 1]] += int(count)  # 5: satellite adj
    forms: dict[str, set[str]] = defaultdict(set)
    for name in POS_FILES.values():
        for line in (root / f"{name}.exc").read_text("utf-8", "replace").splitlines():
            form, *bases = line.split()
            forms[_lemma(form)] |= {_lemma(b) for b in bases}
    return WordNet(synsets, index, tags, forms)


@dataclass(frozen=True)
class Settings:
    senses: int = 2  # of a caption word, its most frequent senses per part of speech
    depth: int = 2  # pointer steps from a caption word's sense
    hypernym_depth: int = 3  # generic "a shape" words: hypernyms of the shape senses
    share: float = 0.25  # a word's part of speech must have this share of its tagged uses
    hue: float = 25.0  # degrees: a colour name further from every caption colour is unknown


def _seed_synsets(wn: WordNet, word: str, attr: str, settings: Settings) -> list[str]:
    keys: list[str] = []
    for base in base_forms(word, {}):  # regular forms only: "left" is no form of "leave"
        by_pos: dict[str, list[str]] = defaultdict(list)
        for key in wn.index.get(base, ()):
            if wn.synsets[key].lexfile in LEXFILES[attr] and key[0] in SEED_POS.get(attr, key[0]):
                by_pos[key[0]].append(key)
        keys += [k for ks in by_pos.values() for k in ks[: settings.senses]]
    return list(dict.fromkeys(keys))


def _hsv(rgb) -> tuple[float, float, float]:
    import colorsys

    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    return 360 * h, s, v


def colour_names(
    vocabulary: dict, settings: Settings, path: Path = RGB_TXT
) -> dict[str, tuple[str, bool]]:
    """X11's colour names (rgb.txt), each read as the nearest caption colour, and whether by
    hue: by hue for a saturated colour, white for a light unsaturated one (not by hue);
    none for dark, grey or far hues."""
    palette = {c: _hsv(rgb) for c, rgb in vocabulary["rgb"].items()}
    white = [c for c, (_, s, v) in palette.items() if s < 0.2]
    out = {}
    for line in path.read_text("utf-8", "replace").splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+([A-Za-z ]+)$", line)
        if not m or m[4] != m[4].lower():
            continue  # "NavyBlue" repeats "navy blue"
        name = m[4].strip()
        h, s, v = _hsv([int(m[i]) for i in (1, 2, 3)])
        if s < 0.2 and v > 0.85:
            out[name] = (white[0], False)
            continue
        if v < 0.3 or s < 0.25:
            continue  # black, grey, dark: no caption colour is near
        dist = {c: min(abs(h - ch), 360 - abs(h - ch)) for c, (ch, cs, _) in palette.items()}
        nearest = min((c for c in dist if palette[c][1] >= 0.2), key=dist.get)
        if dist[nearest] <= settings.hue:
            out[name] = (nearest, True)
    return out


def colour_synsets(wn: WordNet) -> set[str]:
    """WordNet's colour senses: nouns under "color" (the visual property), adjectives similar
    to "chromatic" or "achromatic" or derived from such a noun ("golden", not "gloomy")."""
    roots = {k for k in wn.index.get("color", ()) if "visual property" in _hypernyms(wn, k)}
    nouns = {k for k in wn.synsets if k[0] == "n" and roots & _ancestors(wn, k)}
    heads = {k for w in ("chromatic", "achromatic") for k in wn.index.get(w, ()) if k[0] == "a"}
    adjs = {
        k
        for k, s in wn.synsets.items()
        if k[0] == "a" and any(t in heads or t in nouns for sym, t in s.pointers if sym in "&+")
    }
    return nouns | adjs


def _hypernyms(wn: WordNet, key: str) -> set[str]:
    return {
        lemma for sym, t in wn.synsets[key].pointers if sym == "@" for lemma in wn.synsets[t].lemmas
    }


def _ancestors(wn: WordNet, key: str) -> set[str]:
    out, frontier = set(), {key}
    while frontier:
        frontier = {t for k in frontier for sym, t in wn.synsets[k].pointers if sym == "@"} - out
        out |= frontier
    return out | {key}


def seeds(vocabulary: dict) -> dict[str, str]:
    """The caption words and phrases to look up in WordNet: a phrase ("plus sign") whole,
    not its words, whose own senses ("sign": a billboard) say nothing of the shape."""
    out = dict(vocabulary["words"])
    for phrase, label in vocabulary["phrases"].items():
        for w in phrase.split():
            out.pop(w, None)
        out[phrase] = label
    return out


def compass_points(vocabulary: dict) -> dict[str, str]:
    """The compass points as screen directions (COMPASS), "northwest" as up-left: each is
    looked up in WordNet like a caption word ("westward", "northeasterly")."""
    out = {w: f"direction:{d}" for w, d in COMPASS.items()}
    for v in ("north", "south"):
        for h in ("east", "west"):
            name = f"{COMPASS[v]}-{COMPASS[h]}"
            if name in vocabulary["values"]["direction"]:
                out[v + h] = f"direction:{name}"
    return out


def expand(
    vocabulary: dict,
    settings: Settings = Settings(),
    wn: WordNet | None = None,
    rgb: Path = RGB_TXT,
) -> dict:
    """The lexicon: each English word WordNet relates to a caption word, with its label."""
    wn = wn or read_wordnet()
    best: dict[str, tuple[float, set[str]]] = {}

    def reach(lemma: str, pos: str, cost: float, label: str, usual: bool = True) -> None:
        if usual and not wn.usual(lemma, pos, settings.share):
            return
        old = best.get(lemma)
        if old is None or cost < old[0]:
            best[lemma] = (cost, {label})
        elif cost == old[0]:
            old[1].add(label)

    # Colours: a colour sense whose name ends in a caption colour is that colour ("cobalt
    # blue"). An X11 name read by its measured hue beats WordNet's "a kind of blue"
    # ("turquoise"); a light tint read as white does not ("azure" stays blue). Its WordNet
    # colour synonyms share its reading ("gold": "golden"; "aqua" beside "aquamarine"), and
    # synonyms of names that disagree are left out (a tie).
    colours, senses = vocabulary["values"]["color"], colour_synsets(wn)
    for key in senses:
        for lemma in wn.synsets[key].lemmas:
            first, *_, last = lemma.split() if " " in lemma else ("", "")
            if last in colours and first not in ("non", "not"):  # "non-white" is no white
                reach(lemma, key[0], 0.5, f"color:{last}")
                for other in wn.synsets[key].lemmas:  # "snowy" beside "snow white"
                    reach(other, key[0], 1.8, f"color:{last}")
    for name, (colour, by_hue) in colour_names(vocabulary, settings, rgb).items():
        if name.split()[-1] in colours:  # "sky blue" is a blue, whatever its hue
            colour = name.split()[-1]
        reach(name, "a", 1.5 if by_hue else 2.5, f"color:{colour}")
        if not by_hue or name in colours:
            continue
        for key in wn.index.get(name, ()):
            if key in senses:
                for lemma in wn.synsets[key].lemmas:
                    reach(lemma, key[0], 1.75, f"color:{colour}")
    shape_senses: list[str] = []
    adjectives: dict[str, str] = {}  # a shape's derived adjectives: "triangular"
    starts = [(w, label.split(":")[0], label) for w, label in seeds(vocabulary).items()]
    starts += [(w, "compass", label) for w, label in compass_points(vocabulary).items()]
    for word, attr, label in starts:
        frontier = {k: "" for k in _seed_synsets(wn, word, attr, settings)}
        if attr == "shape":
            shape_senses += frontier
            for key in frontier:
                for sym, target in wn.synsets[key].pointers:
                    if sym == "+" and target[0] == "a":  # and those similar: "spherical"
                        similar = [t for p, t in wn.synsets[target].pointers if p == "&"]
                        for adj in (target, *similar):
                            for lemma in wn.synsets[adj].lemmas:
                                adjectives.setdefault(lemma, label)
        seen = set(frontier)
        for step in range(settings.depth + 1):
            nxt: dict[str, str] = {}
            for key, via in frontier.items():
                if wn.synsets[key].lexfile not in LEXFILES[attr]:
                    continue
                # A thing of a shape ("chock, wedge": a block) names it less surely than a
                # shape does ("wedge": a triangle).
                thing = 0.5 if wn.synsets[key].lexfile == ARTIFACT else 0.0
                for lemma in wn.synsets[key].lemmas:
                    reach(lemma, key[0], step + 1 + thing, label)
                allowed = FIRST.keys() | ({"@"} if attr == "shape" else set()) if not via else NEXT
                if via and via not in NEXT:
                    continue
                for sym, target in wn.synsets[key].pointers:
                    if sym == "@" and wn.synsets[target].lexfile not in LEXFILES["object"]:
                        continue  # "sphere" above "ball", not "game equipment"
                    if sym in allowed and target not in seen:
                        seen.add(target)
                        nxt[target] = sym
            frontier = nxt
    # A body (BODIES) that WordNet relates to no caption shape is drawn as the shape its
    # definition names by an adjective of a caption shape, its outline on the screen:
    # "pyramid" ("... triangular sides"), "sphere" ("... a spherical surface"); not a plane
    # curve ("hyperbola": "... a right circular cone"), nor a fold ("... an angular shape").
    # After every relation, before "a shape"; a noun.shape sense is a noun, however seldom
    # SemCor tagged it so ("pyramid": once, as a verb).
    bodies = {k for w in BODIES for k in wn.index.get(w, ()) if wn.synsets[k].lexfile == 25}
    for key, synset in wn.synsets.items():
        if synset.lexfile not in LEXFILES["object"] or not bodies & _ancestors(wn, key):
            continue
        named = {adjectives[w] for w in re.findall(r"[a-z]+", synset.gloss) if w in adjectives}
        if len(named) == 1:
            for lemma in set(synset.lemmas) - best.keys():
                reach(lemma, "n", settings.depth + 1.5, *named, usual=False)
    # Hypernyms of the shapes ("figure", "polygon", "shape") name an object, not its shape.
    frontier = set(shape_senses)
    for step in range(1, settings.hypernym_depth + 1):
        frontier = {t for k in frontier for sym, t in wn.synsets[k].pointers if sym == "@"}
        for key in frontier:
            if wn.synsets[key].lexfile in LEXFILES["object"]:
                for lemma in wn.synsets[key].lemmas:
                    reach(lemma, "n", settings.depth + 1 + step, GENERIC_OBJECT)
    for _, labels in best.values():  # "climb": a way of moving, and upward: up
        if len(labels - {GENERIC_MOTION, GENERIC_OBJECT}) == 1:
            labels -= {GENERIC_MOTION, GENERIC_OBJECT}
    words = {
        w: labels.pop()
        for w, (_, labels) in sorted(best.items())
        if len(labels) == 1
        and w not in vocabulary["words"]
        and w not in FUNCTION_WORDS
        and len(w) > 2
        and not any(c.isdigit() for c in w)  # "s", "lp", "78"
    }
    forms = {
        form: sorted(bases & words.keys())
        for form, bases in sorted(wn.forms.items())
        if bases & words.keys()
    }
    return {
        "source": "WordNet 3.0 (Debian wordnet-base), X11 rgb.txt (x11-common)",
        "words": words,
        "forms": forms,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("src/t2v/default_model"))
    p.add_argument("--lexicon", type=Path, default=LEXICON_PATH)
    a = p.parse_args()
    vocabulary = caption_vocabulary()
    (a.model / VOCABULARY_FILE).write_text(json.dumps(vocabulary, indent=1) + "\n", "utf-8")
    lexicon = expand(vocabulary)
    a.lexicon.write_text(json.dumps(lexicon, separators=(",", ":")) + "\n", "utf-8")
    print(f"{a.model / VOCABULARY_FILE}: {len(vocabulary['words'])} caption words")
    print(f"{a.lexicon}: {len(lexicon['words'])} words, {len(lexicon['forms'])} forms")


if __name__ == "__main__":
    main()
