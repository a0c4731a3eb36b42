"""Moving Shapes v1: the built-in captioned data set (contract: shared/moving-shapes.md).

Clip attributes are drawn per clip from ``np.random.default_rng([seed, index])``, so clip
``index`` of a stream is a pure function of (seed, index). Pixels are rendered for a whole
batch at once with broadcast coverage maps in torch (CPU or CUDA).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# --- the contract --------------------------------------------------------------------------
FRAMES, HEIGHT, WIDTH, FPS = 16, 64, 64, 8
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 200, 50),
    "blue": (40, 80, 255),
    "yellow": (245, 225, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 215, 225),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES: dict[str, int] = {"small": 14, "large": 26}
# Total travel (dx, dy) in pixels from frame 0 to frame 15; +y is down.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-30, 0),
    "right": (30, 0),
    "up": (0, -30),
    "down": (0, 30),
    "up-left": (-21, -21),
    "up-right": (21, -21),
    "down-left": (-21, 21),
    "down-right": (21, 21),
    "still": (0, 0),
}
HELD_OUT_PAIRS = frozenset(
    {("magenta", "triangle"), ("cyan", "square"), ("yellow", "cross"), ("green", "circle")}
)
MIN_GAP = 2  # px between the two objects' boxes, in every frame

# --- captions ------------------------------------------------------------------------------
SHAPE_WORDS = {
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
_DIAG = {
    "up-left": ("up", "left", "top left"),
    "up-right": ("up", "right", "top right"),
    "down-left": ("down", "left", "bottom left"),
    "down-right": ("down", "right", "bottom right"),
}
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("moving left", "moves to the left", "sliding left", "going from right to left"),
    "right": ("moving right", "moves to the right", "sliding right", "going from left to right"),
    "up": ("moving up", "moves upward", "rising", "going from bottom to top"),
    "down": ("moving down", "moves downward", "falling", "going from top to bottom"),
    **{
        d: (
            f"moving {v} and to the {h}",
            f"moving diagonally {d}",
            f"heading to the {corner}",
            f"moving {d}",
        )
        for d, (v, h, corner) in _DIAG.items()
    },
    "still": ("staying still", "not moving", "standing still", "at rest"),
}
PAIR_TEMPLATES = ("{first} and {second}", "{first}, while {second}")


def canonical_caption(color: str, shape: str, size: str, direction: str) -> str:
    """The form the spec says is always accepted."""
    motion = "staying still" if direction == "still" else f"moving {direction}"
    return f"a {size} {color} {shape} {motion}"


@dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str
    size: str
    direction: str
    x0: float  # top-left corner of the box at frame 0, in pixels
    y0: float

    def label(self) -> dict[str, str]:
        return {
            "color": self.color,
            "shape": self.shape,
            "size": self.size,
            "direction": self.direction,
        }


@dataclass(frozen=True)
class ClipSpec:
    objects: tuple[ObjectSpec, ...]
    caption: str
    group: str = "train"  # eval groups: single_seen, single_heldout, two_object

    def labels(self) -> list[dict[str, str]]:
        return [o.label() for o in self.objects]


def _describe(rng: np.random.Generator, o: ObjectSpec) -> str:
    if rng.random() < 0.25:
        return canonical_caption(o.color, o.shape, o.size, o.direction)
    size = rng.choice(SIZE_WORDS[o.size])
    shape = rng.choice(SHAPE_WORDS[o.shape])
    motion = rng.choice(MOTION_PHRASES[o.direction])
    article = "an" if size[0] in "aeiou" else "a"
    if rng.random() < 0.15:  # colour before size
        article = "an" if o.color[0] in "aeiou" else "a"
        return f"{article} {o.color} {size} {shape} {motion}"
    return f"{article} {size} {o.color} {shape} {motion}"


def _box_gap(a: ObjectSpec, b: ObjectSpec) -> float:
    """Smallest gap in px between the two boxes over all frames (negative when they overlap)."""
    t = np.arange(FRAMES) / (FRAMES - 1)
    sa, sb = SIZES[a.size], SIZES[b.size]
    (adx, ady), (bdx, bdy) = DIRECTIONS[a.direction], DIRECTIONS[b.direction]
    ax, ay = a.x0 + adx * t, a.y0 + ady * t
    bx, by = b.x0 + bdx * t, b.y0 + bdy * t
    gap_x = np.maximum(bx - (ax + sa), ax - (bx + sb))
    gap_y = np.maximum(by - (ay + sa), ay - (by + sb))
    return float(np.max([gap_x, gap_y], axis=0).min())


def _draw_object(rng: np.random.Generator, color: str, shape: str) -> ObjectSpec:
    size = str(rng.choice(list(SIZES)))
    direction = str(rng.choice(list(DIRECTIONS)))
    s, (dx, dy) = SIZES[size], DIRECTIONS[direction]
    # Uniform among start positions keeping the whole box inside the canvas for all frames.
    x0 = rng.uniform(max(0, -dx), WIDTH - s - max(0, dx))
    y0 = rng.uniform(max(0, -dy), HEIGHT - s - max(0, dy))
    return ObjectSpec(color, shape, size, direction, round(float(x0), 3), round(float(y0), 3))


def _pair_ok(color: str, shape: str, held_out: bool | None) -> bool:
    return held_out is None or ((color, shape) in HELD_OUT_PAIRS) == held_out


def _draw_clip(
    rng: np.random.Generator, n_objects: int, held_out: bool | None, group: str
) -> ClipSpec:
    """held_out: False = never a held-out pair, True = every object held-out, None = any."""
    pairs = [(c, s) for c in COLORS for s in SHAPES if _pair_ok(c, s, held_out)]
    while True:
        objs: list[ObjectSpec] = []
        for _ in range(n_objects):
            used = {o.color for o in objs}
            choices = [p for p in pairs if p[0] not in used]
            c, s = choices[rng.integers(len(choices))]
            for _attempt in range(20):  # re-draw the start position until the boxes fit
                o = _draw_object(rng, c, s)
                if all(_box_gap(o, p) >= MIN_GAP for p in objs):
                    objs.append(o)
                    break
            else:
                break  # re-draw all attributes
        if len(objs) == n_objects:
            break
    parts = [_describe(rng, o) for o in objs]
    caption = (
        parts[0]
        if n_objects == 1
        else str(rng.choice(PAIR_TEMPLATES)).format(first=parts[0], second=parts[1])
    )
    return ClipSpec(tuple(objs), caption, group)


TWO_OBJECT_SHARE = 0.4  # of the training stream, by default


def train_spec(seed: int, index: int, two_object_share: float = TWO_OBJECT_SHARE) -> ClipSpec:
    """Clip ``index`` of the endless training stream: one or two objects, no held-out pair."""
    rng = np.random.default_rng([seed, index, 0x7A11])
    objects = 1 if rng.random() < 1.0 - two_object_share else 2
    return _draw_clip(rng, objects, held_out=False, group="train")


EVAL_GROUPS = ("single_seen", "single_heldout", "two_object")


def eval_specs(count: int, seed: int = 0) -> list[ClipSpec]:
    """The fixed evaluation list: seen single objects, held-out pairs, and two-object clips."""
    specs = []
    for i in range(count):
        rng = np.random.default_rng([seed, i, 0xE7A1])
        group = EVAL_GROUPS[i % 3]
        if group == "two_object":
            specs.append(_draw_clip(rng, 2, held_out=None, group=group))
        else:
            specs.append(_draw_clip(rng, 1, held_out=group == "single_heldout", group=group))
    return specs


# --- rendering -----------------------------------------------------------------------------


def _coverage(
    shape: str,
    x: torch.Tensor,
    y: torch.Tensor,
    bx: torch.Tensor,
    by: torch.Tensor,
    s: torch.Tensor,
) -> torch.Tensor:
    """Anti-aliased coverage (N, T, H, W) of a shape whose box is at (bx, by) of side s.

    x: (W,) and y: (H,) pixel left/top edges; bx, by: (N, T); s: (N, 1). Squares and crosses
    use exact pixel-area coverage; circles and triangles a signed-distance ramp.
    """
    bx, by, s = bx[..., None], by[..., None], s[..., None]  # (N, T, 1)

    def span(p, lo, hi):  # overlap of pixel [p, p+1] with [lo, hi]  -> (N, T, P)
        return (torch.minimum(p + 1, hi) - torch.maximum(p, lo)).clamp(0, 1)

    if shape == "square":
        return span(y, by, by + s)[..., :, None] * span(x, bx, bx + s)[..., None, :]
    if shape == "cross":
        a0, a1 = s / 3, 2 * s / 3
        fx, fy = span(x, bx, bx + s), span(y, by, by + s)
        mx, my = span(x, bx + a0, bx + a1), span(y, by + a0, by + a1)
        horiz = my[..., :, None] * fx[..., None, :]
        vert = fy[..., :, None] * mx[..., None, :]
        return horiz + vert - my[..., :, None] * mx[..., None, :]
    cx = (x + 0.5 - bx - s / 2)[..., None, :]  # (N, T, 1, W): pixel centre minus box centre
    if shape == "circle":
        cy = (y + 0.5 - by - s / 2)[..., :, None]  # (N, T, H, 1)
        dist = s[..., None] / 2 - torch.sqrt(cx * cx + cy * cy)
        return (dist + 0.5).clamp(0, 1)
    if shape == "triangle":
        ty = (y + 0.5 - by)[..., :, None]  # distance below the apex
        # Sides run from the apex (top centre) to the bottom corners: |cx| <= ty / 2.
        side = (ty / 2 - cx.abs()) / 1.118034  # divide by sqrt(1 + 1/4): true distance
        base = s[..., None] - ty
        return (torch.minimum(side, base) + 0.5).clamp(0, 1)
    raise ValueError(f"unknown shape {shape!r}")


def render(specs: Sequence[ClipSpec], device: str | torch.device = "cpu") -> np.ndarray:
    """Render clips to uint8 (B, 16, 64, 64, 3)."""
    # Chunks of 16 keep the working set in cache: ~5x faster than one big pass on a CPU.
    chunks = [_render_chunk(specs[i : i + 16], device) for i in range(0, len(specs), 16)]
    if not chunks:
        return np.zeros((0, FRAMES, HEIGHT, WIDTH, 3), np.uint8)
    return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]


def _render_chunk(specs: Sequence[ClipSpec], device: str | torch.device) -> np.ndarray:
    """Every object of one shape is drawn in one pass over the chunk."""
    dev = torch.device(device)
    t = torch.linspace(0, 1, FRAMES, device=dev)
    x = torch.arange(WIDTH, device=dev, dtype=torch.float32)
    y = torch.arange(HEIGHT, device=dev, dtype=torch.float32)
    flat = [(b, o) for b, spec in enumerate(specs) for o in spec.objects]
    frames = torch.zeros(len(specs) * 3, FRAMES * HEIGHT * WIDTH, device=dev)  # (B*3, T*H*W)
    for shape in SHAPES:
        items = [(b, o) for b, o in flat if o.shape == shape]
        if not items:
            continue
        # (N, 6): clip index, x0, y0, dx, dy, side
        p = torch.tensor(
            [[b, o.x0, o.y0, *DIRECTIONS[o.direction], SIZES[o.size]] for b, o in items],
            device=dev,
            dtype=torch.float32,
        )
        bx = p[:, 1:2] + p[:, 3:4] * t  # (N, T)
        by = p[:, 2:3] + p[:, 4:5] * t
        cov = _coverage(shape, x, y, bx, by, p[:, 5:6]).flatten(1)  # (N, T*H*W)
        # Objects never overlap and the canvas is black, so a frame is the sum of each
        # object's coverage times its colour: one (B*3, N) @ (N, T*H*W) product.
        mix = torch.zeros(len(specs), 3, len(items), device=dev)
        color = torch.tensor(
            [COLORS[o.color] for _, o in items], device=dev, dtype=torch.float32
        )  # (N, 3)
        mix[p[:, 0].long(), :, torch.arange(len(items), device=dev)] = color
        frames.addmm_(mix.flatten(0, 1), cov)
    frames = frames.view(len(specs), 3, FRAMES, HEIGHT, WIDTH).permute(0, 2, 3, 4, 1)
    return frames.round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


def train_batch(
    seed: int, start: int, count: int, two_object_share: float = TWO_OBJECT_SHARE
) -> tuple[np.ndarray, list[str]]:
    """Clips start..start+count-1 of the training stream and their captions."""
    specs = [train_spec(seed, start + i, two_object_share) for i in range(count)]
    return render(specs), [s.caption for s in specs]


MAX_OBJECTS = 2


def object_boxes(specs: Sequence[ClipSpec]) -> np.ndarray:
    """Each object's box in every frame, in caption order: float32 (B, MAX_OBJECTS, FRAMES, 4)
    as (left, top, right, bottom) pixels; NaN where a clip has fewer objects."""
    boxes = np.full((len(specs), MAX_OBJECTS, FRAMES, 4), np.nan, np.float32)
    t = np.arange(FRAMES) / (FRAMES - 1)
    for b, spec in enumerate(specs):
        for k, o in enumerate(spec.objects):
            dx, dy = DIRECTIONS[o.direction]
            x, y, side = o.x0 + dx * t, o.y0 + dy * t, SIZES[o.size]
            boxes[b, k] = np.stack([x, y, x + side, y + side], axis=1)
    return boxes


def caption_corpus(seed: int = 0, count: int = 20000) -> list[str]:
    """Captions of the training stream (for fitting the tokenizer)."""
    return [train_spec(seed, i).caption for i in range(count)]


def write_dataset(
    out: str | Path, count: int, split: str = "train", seed: int = 0, progress: bool = True
) -> Path:
    """Write DIR/0000.mp4, ... and DIR/index.jsonl (one JSON object per clip, in order)."""
    from tqdm import tqdm

    from t2v.outputs import writing_dir
    from t2v.video import write_video

    if split not in ("train", "eval"):
        raise ValueError(f"Unknown split {split!r}; use 'train' or 'eval'.")
    out = Path(out)
    specs = (
        eval_specs(count, seed) if split == "eval" else [train_spec(seed, i) for i in range(count)]
    )
    digits = max(4, len(str(count - 1)))
    # The folder appears whole at the end; a folder the user made is never replaced.
    with (
        writing_dir(out, "Moving Shapes clips") as tmp,
        open(tmp / "index.jsonl", "w", encoding="utf-8") as index,
    ):
        for start in tqdm(
            range(0, count, 64), disable=not progress, desc="rendering", unit="batch"
        ):
            chunk = specs[start : start + 64]
            for i, (spec, clip) in enumerate(zip(chunk, render(chunk), strict=True)):
                name = f"{start + i:0{digits}d}.mp4"
                write_video(clip, tmp / name, fps=FPS)
                index.write(
                    json.dumps({"file": name, "caption": spec.caption, "objects": spec.labels()})
                    + "\n"
                )
    return out


# --- the caption vocabulary: what the prompt rewriter (t2v.rewrite) maps free wording onto ----


def caption_vocabulary() -> dict:
    """Each caption word's label, derived from the grammar (no word is listed by hand): the
    ``vocabulary.json`` that a Moving Shapes model folder carries for `t2v.rewrite`."""
    from t2v.models.text_encoders import split_objects
    from t2v.rewrite import FUNCTION_WORDS, NEGATIONS, Rewriter, words_of

    words: dict[str, set[str]] = defaultdict(set)
    for c in COLORS:
        words[c].add(f"color:{c}")
    for attr, table in (("shape", SHAPE_WORDS), ("size", SIZE_WORDS)):
        for value, phrases in table.items():
            for phrase in phrases:
                for w in words_of(phrase):
                    words[w].add(f"{attr}:{value}")
    # A motion word names the axes that every direction whose phrases hold it shares: "left"
    # is in left, up-left and down-left (axis left); "moving" is in all (no axis). The word
    # after "from" names where the object comes from, not where it goes, so it is dropped.
    axes = {d: set(d.split("-")) for d in DIRECTIONS}
    seen: dict[str, list[set[str]]] = defaultdict(list)
    for d, phrases in MOTION_PHRASES.items():
        for phrase in phrases:
            for w in set(words_of(re.sub(r"\bfrom \w+", "", phrase))) - FUNCTION_WORDS - NEGATIONS:
                seen[w].append(axes[d])
    for w, sets in seen.items():
        common = set.intersection(*sets)
        if len(common) == 1:
            words[w].add(f"direction:{common.pop()}")
        elif not common:
            words[w].add("motion:")  # a motion word that names no axis
    phrases = {
        p: f"{attr}:{value}"
        for attr, table in (("shape", SHAPE_WORDS), ("size", SIZE_WORDS))
        for value, ps in table.items()
        for p in ps
        if " " in p
    }
    ambiguous = sorted(w for w, labels in words.items() if len(labels) > 1)
    if ambiguous:
        raise SystemExit(f"caption words with two meanings: {ambiguous}")
    first, second = "{first}", "{second}"
    vocabulary = {
        "values": {
            "color": list(COLORS),
            "shape": list(SHAPES),
            "size": list(SIZES),
            "direction": list(DIRECTIONS),
        },
        "words": {w: labels.pop() for w, labels in sorted(words.items())},
        "phrases": phrases,
        # The form every caption may take (canonical_caption), with a slot per value.
        "template": canonical_caption(
            color="{color}", shape="{shape}", size="{size}", direction="{direction}"
        ).replace("moving {direction}", "{motion}"),
        "motion": {d: canonical_caption("s", "c", "x", d).split(" ", 4)[4] for d in DIRECTIONS},
        "rgb": COLORS,
        "pair": PAIR_TEMPLATES[0].format(first=first, second=second),
    }
    # The clause patterns of the training stream ("a size color shape direction"): a
    # prompt clause of one of these forms is left as typed.
    reader = Rewriter(vocabulary)
    clauses = {c for caption in caption_corpus(0, 3000) for c in split_objects(caption)}
    vocabulary["patterns"] = sorted({reader.pattern(words_of(c)) for c in clauses})
    return vocabulary
