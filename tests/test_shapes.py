"""Moving Shapes follows its contract (shared/moving-shapes.md), read back from the frames."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from t2v import shapes
from t2v.cli import main
from t2v.shapes import COLORS, HELD_OUT_PAIRS, SIZES, ClipSpec, ObjectSpec, render
from t2v.sources import ShapesSource

TRAIN = [shapes.train_spec(0, i) for i in range(3000)]


def one(color="red", shape="square", size="large", direction="right", x0=5.0, y0=10.0):
    return ClipSpec((ObjectSpec(color, shape, size, direction, x0, y0),), "")


def masks(clip: np.ndarray) -> np.ndarray:
    """(T, H, W) bool: pixels at least half covered (brightness over half the colour's)."""
    return clip.max(axis=-1) >= 100


@pytest.mark.parametrize("color", list(COLORS))
def test_flat_colour_on_pure_black(color):
    # An integer position: no edge is blended.
    clip = render([one(color=color, direction="still", x0=10.0, y0=10.0)])[0]
    inside = clip[:, 12:34, 12:34].reshape(-1, 3)
    assert (inside == COLORS[color]).all()
    outside = clip.copy()
    outside[:, 10:36, 10:36] = 0
    assert outside.max() == 0  # background is pure black


@pytest.mark.parametrize("shape", shapes.SHAPES)
@pytest.mark.parametrize("size", list(SIZES))
def test_box_size_and_fill(shape, size):
    """Every shape spans its whole box (triangle base, cross arms) and fills its share."""
    clip = render([one(shape=shape, size=size, direction="still", x0=20.0, y0=20.0)])[0]
    m = masks(clip)[0]
    ys, xs = np.nonzero(m)
    side = SIZES[size]
    assert xs.max() - xs.min() + 1 == pytest.approx(side, abs=1)
    assert ys.max() - ys.min() + 1 == pytest.approx(side, abs=1)
    fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "cross": 5 / 9}[shape]
    assert m.sum() / side**2 == pytest.approx(fill, abs=0.08)


def test_triangle_apex_at_top_centre_and_cross_arms_a_third():
    tri = masks(render([one(shape="triangle", direction="still", x0=20.0, y0=20.0)])[0])[0]
    rows = np.nonzero(tri.any(axis=1))[0]
    top_row = np.nonzero(tri[rows[0]])[0]
    assert rows[0] <= 22 and abs(top_row.mean() - 32.5) <= 1.0 and len(top_row) <= 3  # apex
    assert tri[45, 20:46].all()  # base along the bottom of the box
    cross = masks(render([one(shape="cross", direction="still", x0=20.0, y0=20.0)])[0])[0]
    arm = np.nonzero(cross[21])[0]  # the top arm's width
    assert len(arm) == pytest.approx(26 / 3, abs=1)


@pytest.mark.parametrize("direction", list(shapes.DIRECTIONS))
def test_travel_is_linear_and_the_spec_distance(direction):
    dx, dy = shapes.DIRECTIONS[direction]
    start = {-30: 40.0, -21: 40.0, 0: 25.0, 21: 5.0, 30: 5.0}  # keeps the box inside
    spec = one(shape="square", size="small", direction=direction, x0=start[dx], y0=start[dy])
    m = masks(render([spec])[0])
    centroids = np.array([[np.nonzero(f)[1].mean(), np.nonzero(f)[0].mean()] for f in m])
    travel = centroids[-1] - centroids[0]
    assert travel == pytest.approx([dx, dy], abs=0.6)
    assert abs(dx) in (0, 21, 30) and abs(dy) in (0, 21, 30)
    steps = np.diff(centroids, axis=0)  # constant speed from frame 0 to 15
    assert np.abs(steps - np.array([dx, dy]) / 15).max() < 0.6


def test_boxes_stay_inside_the_canvas_in_every_frame():
    for spec in TRAIN[:500]:
        for o in spec.objects:
            s, (dx, dy) = SIZES[o.size], shapes.DIRECTIONS[o.direction]
            for t in (0, 1):
                assert 0 <= o.x0 + dx * t <= 64 - s and 0 <= o.y0 + dy * t <= 64 - s


def test_held_out_pairs_never_in_the_train_stream_but_in_eval():
    seen = {(o.color, o.shape) for s in TRAIN for o in s.objects}
    assert not seen & HELD_OUT_PAIRS
    assert len(seen) == len(COLORS) * len(shapes.SHAPES) - len(HELD_OUT_PAIRS)
    evals = shapes.eval_specs(300)
    assert {(o.color, o.shape) for s in evals for o in s.objects} >= HELD_OUT_PAIRS
    assert {s.group for s in evals} == set(shapes.EVAL_GROUPS)


def test_one_and_two_objects_and_two_never_overlap():
    counts = {len(s.objects) for s in TRAIN}
    assert counts == {1, 2}
    pairs = [s for s in TRAIN if len(s.objects) == 2][:300]
    frames = render(pairs)
    for spec, clip in zip(pairs, frames, strict=True):
        a, b = spec.objects
        assert a.color != b.color
        assert shapes._box_gap(a, b) >= shapes.MIN_GAP
        # Read back: the two colours' pixel boxes keep at least 1 px of black between them.
        for f in clip:
            near = [np.abs(f.astype(int) - COLORS[o.color]).sum(-1) < 60 for o in spec.objects]
            boxes = [np.argwhere(n) for n in near]
            if all(len(bx) for bx in boxes):
                (ay0, ax0), (ay1, ax1) = boxes[0].min(0), boxes[0].max(0)
                (by0, bx0), (by1, bx1) = boxes[1].min(0), boxes[1].max(0)
                gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
                assert gap >= 1


def test_streams_are_seeded_and_index_addressable():
    assert shapes.train_spec(0, 123) == TRAIN[123]
    assert shapes.train_spec(1, 123) != TRAIN[123]
    a, caps_a = shapes.train_batch(0, 100, 4)
    b, caps_b = shapes.train_batch(0, 102, 2)
    assert (a[2:] == b).all() and caps_a[2:] == caps_b
    assert shapes.eval_specs(30) == shapes.eval_specs(30)


REQUIRED = [
    *itertools.chain.from_iterable(shapes.SHAPE_WORDS.values()),
    *itertools.chain.from_iterable(shapes.SIZE_WORDS.values()),
    "moving left",
    "moves to the left",
    "sliding left",
    "going from right to left",
    "moving right",
    "moves to the right",
    "sliding right",
    "going from left to right",
    "moving up",
    "moves upward",
    "rising",
    "going from bottom to top",
    "moving down",
    "moves downward",
    "falling",
    "going from top to bottom",
    "moving up and to the left",
    "moving diagonally up-left",
    "heading to the top left",
    "staying still",
    "not moving",
    "standing still",
    "at rest",
    " and ",
    ", while ",
]


def test_required_phrasings_all_occur_in_captions():
    text = "\n".join(s.caption for s in TRAIN)
    missing = [p for p in REQUIRED if p not in text]
    assert not missing


def test_captions_name_every_attribute_and_canonical_form_occurs():
    for spec in TRAIN[:500]:
        cap = spec.caption
        for o in spec.objects:
            assert o.color in cap
            assert any(w in cap for w in shapes.SHAPE_WORDS[o.shape])
            assert any(w in cap for w in shapes.SIZE_WORDS[o.size])
            assert any(p in cap for p in shapes.MOTION_PHRASES[o.direction])
    canon = {shapes.canonical_caption(**s.labels()[0]) for s in TRAIN if len(s.objects) == 1}
    assert canon & {s.caption for s in TRAIN}
    assert shapes.canonical_caption("red", "circle", "large", "still") == (
        "a large red circle staying still"
    )
    assert shapes.canonical_caption("cyan", "cross", "small", "up-left") == (
        "a small cyan cross moving up-left"
    )


def test_data_shapes_cli_writes_numbered_mp4s_and_index(tmp_path):
    from t2v.outputs import MARKER

    out = tmp_path / "eval"
    assert main(["data", "shapes", "--count", "5", "--split", "eval", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == [
        f"{i:04d}.mp4" for i in range(5)
    ] + ["index.jsonl"]
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == [f"{i:04d}.mp4" for i in range(5)]
    assert rows[0]["objects"] == shapes.eval_specs(5)[0].labels()
    assert set(rows[0]["objects"][0]) == {"color", "shape", "size", "direction"}


def test_the_two_object_share_sets_the_mix_of_the_training_stream():
    counts = {
        share: sum(len(shapes.train_spec(0, i, share).objects) == 2 for i in range(400))
        for share in (0.0, 0.4, 0.7, 1.0)
    }
    assert counts[0.0] == 0 and counts[1.0] == 400
    assert 130 < counts[0.4] < 190 and 250 < counts[0.7] < 310
    assert shapes.train_spec(3, 17) == shapes.train_spec(3, 17, shapes.TWO_OBJECT_SHARE)
    with pytest.raises(ValueError, match="two_object_share"):
        ShapesSource("train", 0, two_object_share=1.5)
