"""The DEV paraphrase set: the only prompts the rewriter (`t2v.rewrite`) is tuned on.

Its words are disjoint from the training captions and from the evaluation paraphrases of
`t2v.evaluate` (tests/test_rewrite.py checks both), so the evaluation group stays a test of
wording that neither the model nor the rewriter was fitted to.

    .venv/bin/python tools/dev_paraphrases.py     # rewriter accuracy on the DEV set
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from t2v import shapes

COLORS = {
    "red": ("scarlet", "cherry-red", "red"),
    "green": ("emerald", "green", "grass-green"),
    "blue": ("azure", "navy", "blue"),
    "yellow": ("golden", "lemon", "yellow"),
    "magenta": ("fuchsia", "magenta"),
    "cyan": ("turquoise", "aqua", "cyan"),
    "white": ("ivory", "snowy", "white"),
}
SIZES = {
    "small": ("petite", "wee", "diminutive", "itty-bitty"),
    "large": ("gigantic", "colossal", "hefty", "oversized"),
}
SHAPES = {
    "circle": ("sphere", "blob", "dot", "ring"),
    "square": ("cube", "quadrate", "checker", "boxy slab"),
    "triangle": ("trigon", "wedge", "pyramid"),
    "cross": ("crucifix", "saltire", "plus mark"),
}
_COMPASS = {"up-left": "northwest", "up-right": "northeast", "down-left": "southwest"}
_COMPASS["down-right"] = "southeast"
MOTIONS = {
    "left": ("heading leftward", "scooting to the left", "shifting left", "going westward"),
    "right": ("heading rightward", "scooting to the right", "shifting right", "going eastward"),
    "up": ("soaring", "lifting skyward", "mounting", "going uphill"),
    "down": ("plummeting", "plunging", "tumbling down", "going downhill"),
    **{
        d: (f"headed {c}", f"going toward the {c} corner", f"scooting {d.replace('-', ' and ')}")
        for d, c in _COMPASS.items()
    },
    "still": ("immobile", "resting", "idle", "holding its position"),
}
FRAMES = (
    "{x}",
    "there is {x}",
    "{x} on a black background",
    "a video of {x}",
    "watch {x}",
    "i see {x}",
)
JOINS = ("{a} and {b}", "{a} next to {b}", "{a} alongside {b}", "{a}; {b}", "{a} as well as {b}")
# Everyday words no Moving Shapes caption can place: a prompt of them must be reported.
UNRELATED = (
    "dog cat horse bird tree house car boat person child city street beach ocean forest "
    "mountain sandwich guitar phone computer book chair table dance sing cook laugh sleep "
    "eat happy angry loud ancient wooden metallic fluffy river cloud flower garden kitchen"
).split()


def dev_words() -> set[str]:
    """Every word of the DEV vocabulary."""
    phrases = [p for t in (COLORS, SIZES, SHAPES, MOTIONS) for ps in t.values() for p in ps]
    phrases += [*FRAMES, *JOINS, *UNRELATED]
    return {w for p in phrases for w in re.sub(r"\{\w+\}|-", " ", p).split()}


def _clause(rng, label: dict) -> str:
    size = str(rng.choice(SIZES[label["size"]]))
    color = str(rng.choice(COLORS[label["color"]]))
    shape = str(rng.choice(SHAPES[label["shape"]]))
    motion = str(rng.choice(MOTIONS[label["direction"]]))
    body = f"{size} {color} {shape} {motion}"
    if rng.random() < 0.3:
        body = f"{color} {shape}, {size}, {motion}"
    return ("an " if body[0] in "aeiou" else "a ") + body


def dev_set(count: int, seed: int = 0) -> list[tuple[str, list[dict]]]:
    """``count`` DEV prompts with their true objects; one in three names two objects."""
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, i, 0xDE7])
        n = 2 if i % 3 == 2 else 1
        colors = rng.choice(list(shapes.COLORS), n, replace=False)
        labels = [
            {
                "color": str(c),
                "shape": str(rng.choice(shapes.SHAPES)),
                "size": str(rng.choice(list(shapes.SIZES))),
                "direction": str(rng.choice(list(shapes.DIRECTIONS))),
            }
            for c in colors
        ]
        clauses = [_clause(rng, lab) for lab in labels]
        x = clauses[0] if n == 1 else str(rng.choice(JOINS)).format(a=clauses[0], b=clauses[1])
        out.append((str(rng.choice(FRAMES)).format(x=x), labels))
    return out


def read_labels(rewriter, prompt: str) -> list[dict]:
    """What the rewriter makes of ``prompt``, as object labels."""
    from t2v.rewrite import words_of

    objects, _ = rewriter.objects(words_of(prompt))
    labels = []
    for o in objects:
        labels.append({**o.values, "direction": rewriter.direction(o)})
    return labels


def measure(rewriter, count: int = 600, seed: int = 0) -> dict:
    """Share of DEV prompts read right per attribute and all at once, and the share of
    everyday words that the rewriter wrongly places."""
    hits, right = Counter(), 0
    objects = 0
    for prompt, truth in dev_set(count, seed):
        read = read_labels(rewriter, prompt)
        ok = len(read) == len(truth)
        for k, t in enumerate(truth):
            r = read[k] if k < len(read) else {}
            objects += 1
            for a in ("color", "shape", "size", "direction"):
                hits[a] += r.get(a) == t[a]
                ok &= r.get(a) == t[a]
        right += ok
    placed = [w for w in UNRELATED if rewriter.label(w) is not None]
    return {
        **{a: hits[a] / objects for a in ("color", "shape", "size", "direction")},
        "all": right / count,
        "unrelated_placed": len(placed) / len(UNRELATED),
        "placed": placed,
    }


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from t2v.rewrite import Rewriter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("src/t2v/default_model"))
    p.add_argument("--show", type=int, default=0, help="print this many wrong readings")
    a = p.parse_args()
    rewriter = Rewriter.for_model(a.model)
    print(measure(rewriter))
    shown = 0
    for prompt, truth in dev_set(600):
        if shown < a.show and read_labels(rewriter, prompt) != truth:
            print(prompt, "->", rewriter.rewrite(prompt).prompt)
            shown += 1


if __name__ == "__main__":
    main()
