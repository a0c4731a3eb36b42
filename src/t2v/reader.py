"""The attribute reader: what a Moving Shapes clip shows, read from its pixels alone.

It knows only the numbers of the Moving Shapes contract (shared/moving-shapes.md), not the
renderer's code: it segments bright pixels, labels their connected components in each frame,
names each component's colour by a coverage-weighted vote over the nearest palette colour of
each pixel, its shape by the fill ratio of its box and the vertical offset of its centroid,
and its size by the side of its box; it links components across frames by position and reads
the motion from a Theil-Sen line fit (Sen 1968) of the centroid track. Its per-clip features
feed a Frechet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule").
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from t2v.shapes import COLORS, DIRECTIONS, SIZES

# --- the spec's numbers, as the reader uses them ---------------------------------------------
_COLOR_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], np.float32)  # (7, 3)
# Shape prototypes in (fill ratio of the box, 2 x centroid offset below the box centre / side):
# a square fills its box, a disc pi/4 of it, a plus sign with arms a third wide 5/9, and a
# triangle with its apex at the top 1/2 with its centroid a sixth of the side below centre.
_SHAPE_NAMES = ("square", "circle", "cross", "triangle")
_SHAPE_PROTOS = np.array([[1.0, 0.0], [np.pi / 4, 0.0], [5 / 9, 0.0], [0.5, 1 / 3]])
_SIZE_SPLIT = float(np.sqrt(np.prod(list(SIZES.values()))))  # geometric mean of 14 and 26
_DIR_NAMES = list(DIRECTIONS)
_DIR_VECS = np.array([DIRECTIONS[d] for d in _DIR_NAMES], np.float64)  # (9, 2) px per clip
_MIN_LEVEL = 16  # darker pixels (< 8% coverage of any colour) count as canvas
_MIN_COVERAGE = 0.5  # a pixel is foreground when it is at least half covered by a colour
_MIN_AREA = 12.0  # px of coverage; smaller components are specks (a small triangle has 98)
_LINK_PX = 8.0  # a component continues a track when this close (objects move <= 2 px/frame)
# Per-object Frechet features and the scale that makes each of order 1.
_SCALES = {
    "presence": 1,
    "area": SIZES["large"] ** 2,
    "side": SIZES["large"],
    "fill": 1,
    "offset": 1,
    "area_cv": 1,
    "jitter": 4,
    "consistency": 1,
}


# --- the reader -----------------------------------------------------------------------------


def _max3x3(a: np.ndarray) -> np.ndarray:
    """3x3 maximum filter over the last two axes of (T, H, W), zero outside."""
    m = a.copy()
    np.maximum(m[:, :, 1:], a[:, :, :-1], out=m[:, :, 1:])
    np.maximum(m[:, :, :-1], a[:, :, 1:], out=m[:, :, :-1])
    out = m.copy()
    np.maximum(out[:, 1:], m[:, :-1], out=out[:, 1:])
    np.maximum(out[:, :-1], m[:, 1:], out=out[:, :-1])
    return out


def _group_max(keys: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """out[i] = max of ``values`` where ``keys == i`` (0 where none); ufunc.at is slow."""
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    out = np.zeros(size, values.dtype)
    out[keys[starts]] = np.maximum.reduceat(values, starts)
    return out


def _label(mask: np.ndarray) -> np.ndarray:
    """8-connected components of each frame of a (T, H, W) mask: int labels, 0 = background.

    Each pixel takes the largest label among its neighbours, and then the label of the pixel
    its label names (pointer jumping), until nothing changes.
    """
    flat_ids = np.arange(1, mask.size + 1).reshape(mask.shape)
    lab = np.where(mask, flat_ids, 0)
    while True:
        new = np.where(mask, _max3x3(lab), 0)
        flat = new.reshape(-1)
        fg = flat > 0
        flat[fg] = flat[flat[fg] - 1]
        if np.array_equal(new, lab):
            return lab
        lab = new


def _fit_palette(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pixel as coverage x palette colour (anti-aliased edges blend with the black canvas).

    Returns alpha (m + 1, 7), the coverage of every colour for the m lit pixels and a zero
    row for dark ones; row (T, H, W), each pixel's row of alpha; and best (T, H, W), the
    colour that fits each pixel best.
    """
    t, h, w, _ = frames.shape
    rgb = frames.reshape(-1, 3).astype(np.float32)
    lit = np.flatnonzero(rgb.max(1) >= _MIN_LEVEL)  # the rest is black canvas: skip it
    row = np.full(len(rgb), len(lit))
    row[lit] = np.arange(len(lit))
    dots = rgb[lit] @ _PALETTE.T  # (m, 7)
    alpha = np.clip(dots / (_PALETTE**2).sum(1), 0, 1)
    resid = alpha**2 * (_PALETTE**2).sum(1) - 2 * alpha * dots  # |p - a c|^2 - |p|^2
    best = np.zeros(len(rgb), np.int64)
    best[lit] = resid.argmin(1)
    alpha = np.concatenate([alpha, np.zeros((1, len(_PALETTE)), np.float32)])
    return alpha, row.reshape(t, h, w), best.reshape(t, h, w)


def _components(frames: np.ndarray) -> list[list[dict]]:
    """Per frame, the bright components: colour, shape, size, area, box side and centroid."""
    t, h, w, _ = frames.shape
    alpha, row, best = _fit_palette(frames)
    best_alpha = alpha[row, best]  # (T, H, W)
    lab = _label(best_alpha >= _MIN_COVERAGE)
    ids, comp = np.unique(lab[lab > 0], return_inverse=True)
    if len(ids) == 0:
        return [[] for _ in range(t)]
    index = np.zeros(lab.size + 1, np.int64)
    index[ids] = np.arange(len(ids)) + 1
    n = len(ids)
    # Colour: the palette colour with the most coverage over the component's core pixels.
    core = lab > 0
    n_col = len(_PALETTE)
    votes = np.bincount(comp * n_col + best[core], best_alpha[core], n * n_col).reshape(n, n_col)
    color = votes.argmax(1)  # (n,)
    # Soft measures over the core grown by one pixel, as coverage of the component's colour.
    grown = np.where(core, lab, _max3x3(lab))
    sel = grown > 0
    k = index[grown[sel]] - 1  # component of each selected pixel
    cov = alpha[row[sel], color[k]]
    fi, yi, xi = np.nonzero(sel)
    area = np.bincount(k, cov, n)
    rowmax = _group_max(k * h + yi, cov, n * h).reshape(n, h)
    colmax = _group_max(k * w + xi, cov, n * w).reshape(n, w)
    bw, bh = colmax.sum(1), rowmax.sum(1)
    cx = np.bincount(k, cov * xi, n) / np.maximum(area, 1e-6)
    cy = np.bincount(k, cov * yi, n) / np.maximum(area, 1e-6)
    box_cy = rowmax @ np.arange(h) / np.maximum(bh, 1e-6)
    fill = area / np.maximum(bw * bh, 1e-6)
    offset = 2 * (cy - box_cy) / np.maximum(bh, 1e-6)
    shape = ((np.stack([fill, offset], 1)[:, None] - _SHAPE_PROTOS) ** 2).sum(-1).argmin(1)
    side = np.sqrt(bw * bh)
    frame_of = np.zeros(n, np.int64)
    frame_of[k] = fi
    size = np.where(side >= _SIZE_SPLIT, "large", "small")
    out: list[list[dict]] = [[] for _ in range(t)]
    for i in np.flatnonzero(area >= _MIN_AREA):
        read = dict(color=_COLOR_NAMES[color[i]], shape=_SHAPE_NAMES[shape[i]], size=str(size[i]))
        out[frame_of[i]].append(
            dict(
                read, area=area[i], side=side[i], fill=fill[i], offset=offset[i], xy=(cx[i], cy[i])
            )
        )
    return out


def _theil_sen(t: np.ndarray, v: np.ndarray) -> float:
    """Median of the pairwise slopes (Sen 1968): a line fit that ignores a few wild frames."""
    i, j = np.triu_indices(len(t), 1)
    return float(np.median((v[j] - v[i]) / (t[j] - t[i]))) if len(i) else 0.0


def _tracks(per_frame: list[list[dict]]) -> list[list[tuple[int, dict]]]:
    """Link components into tracks by nearest position; keep those seen in half the frames."""
    tracks: list[list[tuple[int, dict]]] = []
    for t, comps in enumerate(per_frame):
        pairs = sorted(
            (float(np.hypot(*np.subtract(c["xy"], tr[-1][1]["xy"]))), a, b)
            for a, tr in enumerate(tracks)
            for b, c in enumerate(comps)
        )
        used_t, used_c = set(), set()
        for dist, a, b in pairs:
            gap = t - tracks[a][-1][0]
            if a in used_t or b in used_c or dist > _LINK_PX + 2 * (gap - 1):
                continue
            tracks[a].append((t, comps[b]))
            used_t.add(a)
            used_c.add(b)
        tracks += [[(t, c)] for b, c in enumerate(comps) if b not in used_c]
    return [tr for tr in tracks if 2 * len(tr) >= len(per_frame)]


def _read_track(track: list[tuple[int, dict]], n_frames: int) -> dict:
    """Majority colour, shape and size over the frames, and the direction of the fitted line."""
    out: dict = {}
    agree = []
    for attr in ("color", "shape", "size"):
        value, n = Counter(c[attr] for _, c in track).most_common(1)[0]
        out[attr] = value
        agree.append(n / len(track))
    t = np.array([f for f, _ in track], np.float64)
    xy = np.array([c["xy"] for _, c in track])  # (n, 2)
    slope = np.array([_theil_sen(t, xy[:, 0]), _theil_sen(t, xy[:, 1])])
    move = slope * (n_frames - 1)  # displacement over the clip, px
    out["direction"] = _DIR_NAMES[int(((_DIR_VECS - move) ** 2).sum(1).argmin())]
    fit = xy - (np.median(xy - slope * t[:, None], 0) + slope * t[:, None])
    area = np.array([c["area"] for _, c in track])
    med = {k: float(np.median([c[k] for _, c in track])) for k in ("side", "fill", "offset")}
    out.update(
        consistency=float(np.mean(agree)),
        presence=len(track) / n_frames,
        displacement=[round(float(m), 2) for m in move],
        area=float(np.median(area)),
        area_cv=float(area.std() / max(area.mean(), 1e-6)),
        **med,
        position=[float(v) for v in xy.mean(0)],
        jitter=float(np.sqrt((fit**2).sum(1).mean())),
    )
    return out


def analyse(frames: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """The objects of one clip (largest first) and its fixed-length feature vector."""
    if getattr(frames, "dtype", None) != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", None)
        raise ValueError(f"A clip must be a uint8 array (T, H, W, 3), not shape {shape}.")
    per_frame = _components(frames)
    objects = sorted(
        (_read_track(tr, len(frames)) for tr in _tracks(per_frame)), key=lambda o: -o["area"]
    )
    comps = [c for f in per_frame for c in f]
    mass = np.zeros(len(_COLOR_NAMES))
    for c in comps:
        mass[_COLOR_NAMES.index(c["color"])] += c["area"]
    feats = [len(objects), mass.sum() / len(frames) / _SCALES["area"], len(comps) / len(frames)]
    feats += list(mass / max(mass.sum(), 1e-6))  # colour histogram
    for o in objects[:2] + [None] * (2 - len(objects[:2])):  # the two largest objects
        feats += (
            [0.0] * 12
            if o is None
            else [o[k] / v for k, v in _SCALES.items()]
            + [*np.divide(o["displacement"], 30), *np.divide(o["position"], 64)]
        )
    return objects, np.array(feats)


def read_clip(frames: np.ndarray) -> list[dict]:
    """Objects read from uint8 (T, H, W, 3) frames: color, shape, size, direction, and the
    measurements behind them (consistency = share of frames agreeing with the reading)."""
    return analyse(frames)[0]


def clip_features(clips: np.ndarray) -> np.ndarray:
    """(B, 34) reader features of (B, T, H, W, 3) clips, the space of the Frechet distance."""
    return np.stack([analyse(c)[1] for c in clips])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (Heusel et al.
    2017): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), a symmetric matrix whose root is
    taken by eigendecomposition, which stays real where a general matrix root may not.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross
    return max(float(fd), 0.0)  # round-off can take identical sets a hair below zero
