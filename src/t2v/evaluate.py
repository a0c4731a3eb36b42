"""`t2v eval`: read the attributes of generated clips back and score them against the prompt.

The reading is done by t2v.reader, which knows only the numbers of the data-set contract.
Clips are scored per attribute and "all at once" in four groups: seen colour-shape pairs,
held-out pairs, two objects, and paraphrased prompts whose wording no training caption uses.
Next to the scores stand a temporal-consistency figure and a Frechet distance in the
reader's feature space.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t2v.errors import UserError
from t2v.reader import analyse, clip_features, frechet_distance, read_clip
from t2v.shapes import FPS, FRAMES, HEIGHT, WIDTH, ClipSpec, eval_specs, render

ATTRIBUTES = ("color", "shape", "size", "direction")
NOTE = (
    "These scores read the colour, shape, size and motion of Moving Shapes objects, so they "
    "mean something only for a model tuned on Moving Shapes."
)
EVAL_REPORT = "eval report"  # the kind of folder `--out` holds (see t2v.outputs)
GROUPS = ("single_seen", "single_heldout", "two_object", "paraphrase")

# --- paraphrases: wordings the training captions never use ------------------------------------
PARAPHRASE_SIZES = {
    "small": ("minuscule", "miniature", "teeny"),
    "large": ("huge", "massive", "enormous", "giant"),
}
PARAPHRASE_SHAPES = {
    "circle": ("orb", "disk", "round shape"),
    "square": ("tile", "square tile"),
    "triangle": ("triangular shape", "three-sided shape"),
    "cross": ("plus symbol", "plus-shaped figure"),
}
_CORNERS = {
    "up-left": "upper left",
    "up-right": "upper right",
    "down-left": "lower left",
    "down-right": "lower right",
}
PARAPHRASE_MOTIONS = {
    "left": ("travelling leftwards", "drifting to the left", "gliding left"),
    "right": ("travelling rightwards", "drifting to the right", "gliding right"),
    "up": ("ascending", "floating upwards", "climbing"),
    "down": ("descending", "sinking", "dropping"),
    **{
        d: (f"drifting towards the {c}", f"travelling diagonally to the {c}")
        for d, c in _CORNERS.items()
    },
    "still": ("motionless", "stationary", "frozen in place"),
}
PARAPHRASE_TEMPLATES = (
    "{a} {size} {color} {shape} {motion}",
    "{a} {size} {color} {shape} that is {motion}",
    "{a} {color} {shape}, {size} and {motion}",
)


def paraphrase_caption(label: dict[str, str], seed: int, index: int) -> str:
    """A caption for one object in a held-out wording, a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index, 0x9A4A])
    words = {
        "size": str(rng.choice(PARAPHRASE_SIZES[label["size"]])),
        "color": label["color"],
        "shape": str(rng.choice(PARAPHRASE_SHAPES[label["shape"]])),
        "motion": str(rng.choice(PARAPHRASE_MOTIONS[label["direction"]])),
    }
    template = str(rng.choice(PARAPHRASE_TEMPLATES))
    first = words["color"] if template.startswith("{a} {color}") else words["size"]
    return template.format(a="an" if first[0] in "aeiou" else "a", **words)


@dataclass(frozen=True)
class EvalClip:
    index: int  # also the generator seed
    group: str
    prompt: str
    spec: ClipSpec


def eval_set(count: int, seed: int = 0) -> list[EvalClip]:
    """``count`` prompts cycling over GROUPS; paraphrases re-caption unused seen-pair specs."""
    per = {g: len(range(i, count, len(GROUPS))) for i, g in enumerate(GROUPS)}
    # eval_specs cycles single_seen, single_heldout, two_object: the j-th clip of a group is
    # spec 3j + offset; paraphrases take the seen-pair specs after those the seen group uses.
    specs = eval_specs(3 * (per["single_seen"] + per["paraphrase"]) + 3, seed)
    taken = Counter()
    clips = []
    for i in range(count):
        group = GROUPS[i % len(GROUPS)]
        j = taken[group]
        taken[group] += 1
        if group == "paraphrase":
            spec = specs[3 * (per["single_seen"] + j)]
            prompt = paraphrase_caption(spec.labels()[0], seed, j)
        else:
            spec = specs[3 * j + GROUPS.index(group)]
            prompt = spec.caption
        clips.append(EvalClip(i, group, prompt, spec))
    return clips


# --- scoring --------------------------------------------------------------------------------


def _match(read: list[dict], truth: list[dict]) -> list[dict | None]:
    """For each true object, the read object of its colour, else the one agreeing most."""
    free = list(range(len(read)))
    matched: list[dict | None] = [None] * len(truth)
    for i, obj in enumerate(truth):
        for j in free:
            if read[j]["color"] == obj["color"]:
                matched[i] = read[j]
                free.remove(j)
                break
    pairs = sorted(
        (
            (-sum(read[j][a] == obj[a] for a in ATTRIBUTES), i, j)
            for i, obj in enumerate(truth)
            if matched[i] is None
            for j in free
        ),
    )
    for _, i, j in pairs:
        if matched[i] is None and j in free:
            matched[i] = read[j]
            free.remove(j)
    return matched


def _judge(read: list[dict], truth: list[dict]) -> dict:
    """Per-attribute hits over the true objects, and whether the clip is right all at once."""
    matched = _match(read, truth)
    hits = {
        a: sum(m is not None and m[a] == o[a] for m, o in zip(matched, truth, strict=True))
        for a in ATTRIBUTES
    }
    right = len(read) == len(truth) and all(hits[a] == len(truth) for a in ATTRIBUTES)
    return {
        "hits": hits,
        "objects": len(truth),
        "count_right": len(read) == len(truth),
        "correct": right,
        "consistency": float(np.mean([o["consistency"] for o in read])) if read else None,
    }


def _summarise(judged: list[dict]) -> dict:
    objects = max(sum(j["objects"] for j in judged), 1)
    consistency = [j["consistency"] for j in judged if j["consistency"] is not None]
    out = {"clips": len(judged)}
    out.update({a: sum(j["hits"][a] for j in judged) / objects for a in ATTRIBUTES})
    out["all"] = float(np.mean([j["correct"] for j in judged])) if judged else 0.0
    out["count_right"] = float(np.mean([j["count_right"] for j in judged])) if judged else 0.0
    out["temporal_consistency"] = float(np.mean(consistency)) if consistency else None
    return out


def _score(
    reads: list[list[dict]], labels: Sequence[list[dict]], groups: Sequence[str] | None
) -> dict:
    if len(reads) != len(labels):
        raise ValueError(f"Got {len(reads)} clips but {len(labels)} label lists; pass one each.")
    judged = [_judge(r, t) for r, t in zip(reads, labels, strict=True)]
    out = {"overall": _summarise(judged), "correct": [j["correct"] for j in judged]}
    if groups is not None:
        out["groups"] = {
            g: _summarise([j for j, h in zip(judged, groups, strict=True) if h == g])
            for g in dict.fromkeys(groups)
        }
    return out


def score_clips(
    clips: np.ndarray, labels: Sequence[list[dict]], groups: Sequence[str] | None = None
) -> dict:
    """Read (B, T, H, W, 3) clips and score them against their true objects' labels.

    Returns {"overall": summary, "correct": [bool per clip]} (plus "groups": {name: summary}
    when ``groups`` names each clip's group); a summary holds the per-attribute accuracy over
    true objects, "all" (clips with every attribute of every object right and no object
    missing or extra), "count_right" and the mean temporal consistency.
    """
    return _score([read_clip(c) for c in clips], labels, groups)


# --- the evaluation run ---------------------------------------------------------------------


def _rendered_features(clips: list[EvalClip], batch_size: int) -> np.ndarray:
    """Reader features of the rendered ground truth of ``clips``."""
    specs = [c.spec for c in clips]
    return np.concatenate(
        [clip_features(render(specs[i : i + batch_size])) for i in range(0, len(specs), batch_size)]
    )


def evaluate(
    pipe_or_generate_fn,
    count: int = 240,
    seed: int = 0,
    batch_size: int = 16,
    steps: int | None = None,
    guidance: float | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Generate the ``count`` prompts of ``eval_set(count, seed)``, read them back and score.

    ``pipe_or_generate_fn`` is a `t2v.model.VideoModel` (any backend; its clips are brought
    to 16 frames of 64x64, see `model_clips`), or an object with a ``generate`` or a function
    ``(prompts, seeds, *, steps, guidance) -> uint8 (B, 16, 64, 64, 3)``; clip i is generated
    with seed i. The Frechet distance to the rendered truth of the same
    prompts stands next to its floor, the distance between two disjoint rendered eval sets.
    For a pipeline, the report's "autoencoder_ceiling" scores the rendered truth after a round
    trip through its autoencoder (None for a bare function). With ``out_dir``, writes
    report.json, report.md and GIFs of two clips per group there.
    """
    from tqdm import tqdm

    if count < len(GROUPS):
        raise UserError(f"count must be at least {len(GROUPS)} (one clip per group), not {count}.")
    model = pipe_or_generate_fn
    if hasattr(model, "knobs") and hasattr(model, "resolve"):  # a VideoModel
        generate = model_clips(model)
    else:
        generate = getattr(model, "generate", model)
    clips = eval_set(count, seed)
    shown = {i for g in GROUPS for i in [c.index for c in clips if c.group == g][:2]}
    reads, feats, kept = [], [], {}
    gen_s = read_s = 0.0
    for start in tqdm(range(0, count, batch_size), disable=not progress, desc="eval", unit="batch"):
        batch = clips[start : start + batch_size]
        t0 = time.perf_counter()
        videos = generate(
            [c.prompt for c in batch], [c.index for c in batch], steps=steps, guidance=guidance
        )
        t1 = time.perf_counter()
        if getattr(videos, "shape", (None,))[0] != len(batch):
            raise ValueError(
                f"The generator returned {len(videos)} clips for {len(batch)} "
                "prompts; it must return one clip per prompt."
            )
        for c, video in zip(batch, videos, strict=True):
            objects, f = analyse(video)
            reads.append(objects)
            feats.append(f)
            if c.index in shown:
                kept[c.index] = video
        gen_s, read_s = gen_s + t1 - t0, read_s + time.perf_counter() - t1
    labels, groups = [c.spec.labels() for c in clips], [c.group for c in clips]
    scores = _score(reads, labels, groups)
    rendered = _rendered_features(clips, batch_size)
    ceiling = None
    if hasattr(pipe_or_generate_fn, "reconstruct"):  # a pipeline: score its autoencoder too
        specs = [c.spec for c in clips]
        round_trip = [
            read_clip(v)
            for i in range(0, count, batch_size)
            for v in pipe_or_generate_fn.reconstruct(render(specs[i : i + batch_size]))
        ]
        ceiling = _score(round_trip, labels, groups)
    info = getattr(model, "info", None)
    report = {
        "model": None if info is None else {"id": info.id, "kind": info.kind},
        "note": NOTE,
        "count": count,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "overall": scores["overall"],
        "groups": scores["groups"],
        # All-at-once scores of the rendered truth passed through the model's autoencoder:
        # what the generator could reach at best, since it only makes latents.
        "autoencoder_ceiling": None
        if ceiling is None
        else {
            "overall": ceiling["overall"]["all"],
            **{g: s["all"] for g, s in ceiling["groups"].items()},
        },
        "frechet_distance": frechet_distance(np.stack(feats), rendered),
        "frechet_floor": frechet_distance(
            _rendered_features(eval_set(count, seed + 1), batch_size), rendered
        ),
        "seconds_per_clip": {"generate": gen_s / count, "read": read_s / count},
        "clips": [
            {
                "index": c.index,
                "group": c.group,
                "prompt": c.prompt,
                "expected": c.spec.labels(),
                "read": [{a: o[a] for a in ATTRIBUTES} for o in r],
                "correct": ok,
            }
            for c, r, ok in zip(clips, reads, scores["correct"], strict=True)
        ],
    }
    if out_dir is not None:
        _write_report(report, {i: (clips[i].spec, v) for i, v in kept.items()}, Path(out_dir))
    return report


def model_clips(model):
    """A generate function over a `VideoModel` that returns clips the reader can read:
    the model makes the allowed length and size nearest above 16 frames and 64 px (the
    bundled model makes exactly those), and the clip is sampled down to 16 x 64 x 64."""
    from t2v.model import GenerationRequest

    k = model.knobs
    frames, height, width = (
        _at_least(r, n) for r, n in ((k.frames, FRAMES), (k.height, HEIGHT), (k.width, WIDTH))
    )

    def generate(prompts, seeds, *, steps=None, guidance=None) -> np.ndarray:
        requests = [
            GenerationRequest(
                p, seed=s, steps=steps, guidance=guidance, frames=frames, height=height, width=width
            )
            for p, s in zip(prompts, seeds, strict=True)
        ]
        return np.stack([_resample(v.frames) for v in model.generate(requests)])

    return generate


def _at_least(allowed, n: int) -> int:
    """The allowed value nearest to ``n`` from above, else the largest allowed."""
    if allowed.allows(n):
        return n
    return max(allowed.nearest(n))


def _resample(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) -> Moving Shapes' (16, 64, 64, 3), picking evenly spaced frames, rows
    and columns."""
    t, h, w, _ = frames.shape
    if (t, h, w) == (FRAMES, HEIGHT, WIDTH):
        return frames
    ti = np.linspace(0, t - 1, FRAMES).round().astype(int)
    hi = ((np.arange(HEIGHT) + 0.5) * h / HEIGHT).astype(int)
    wi = ((np.arange(WIDTH) + 0.5) * w / WIDTH).astype(int)
    return np.ascontiguousarray(frames[ti][:, hi][:, :, wi])


def format_table(report: dict) -> str:
    """The per-group scores as a Markdown table (readable in a terminal too)."""
    cols = ("clips", *ATTRIBUTES, "all", "temporal_consistency")
    ceiling = report.get("autoencoder_ceiling")
    head = [*cols, "autoencoder_ceiling"] if ceiling else list(cols)
    lines = ["| group | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, s in [*report["groups"].items(), ("overall", report["overall"])]:
        cells = [str(s["clips"])] + [
            "-" if s[k] is None else f"{100 * s[k]:.1f}%" for k in cols[1:]
        ]
        if ceiling:
            cells.append(f"{100 * ceiling[name]:.1f}%")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    fd, floor = report["frechet_distance"], report["frechet_floor"]
    lines.append(f"\nFrechet distance to rendered clips: {fd:.3f} (rendered floor: {floor:.3f})")
    return "\n".join(lines)


def _write_report(report: dict, shown: dict[int, tuple[ClipSpec, np.ndarray]], out: Path) -> None:
    """report.json, and report.md with the table and GIFs of generated and rendered clips."""
    from t2v.outputs import writing_dir

    with writing_dir(out, EVAL_REPORT) as tmp:  # the report appears whole, or not at all
        _write_report_files(report, shown, tmp)


def _write_report_files(
    report: dict, shown: dict[int, tuple[ClipSpec, np.ndarray]], out: Path
) -> None:
    from t2v.video import write_video

    rows = ["| group | prompt | generated | rendered | read |", "|---|---|---|---|---|"]
    for i, (spec, video) in sorted(shown.items()):
        clip = report["clips"][i]
        write_video(video, out / "clips" / f"{i:04d}.gif", fps=FPS, format="gif")
        write_video(render([spec])[0], out / "clips" / f"{i:04d}_rendered.gif", fps=FPS)
        read = "; ".join(" ".join(o[a] for a in ATTRIBUTES) for o in clip["read"]) or "nothing"
        rows.append(
            f"| {clip['group']} | {clip['prompt']} | ![](clips/{i:04d}.gif) | "
            f"![](clips/{i:04d}_rendered.gif) | {'right' if clip['correct'] else 'wrong'}: {read} |"
        )
    sec = report["seconds_per_clip"]
    text = [
        "# t2v eval\n",
        f"{report['count']} prompts, seed {report['seed']}, steps {report['steps']}, guidance "
        f"{report['guidance']}; {sec['generate']:.3f} s/clip to generate, {sec['read']:.4f} s/clip"
        " to read.\n",
        "Accuracy per attribute is over objects; `all` counts clips with every attribute of every"
        " object right and no object missing or extra. Temporal consistency is the share of"
        " frames whose colour, shape and size reading matches the object's. The autoencoder"
        " ceiling is `all` for the rendered truth passed through the model's autoencoder: the"
        " best the generator could reach.\n",
        format_table(report),
        f"\n{report['note']}\n",
        "\n## Clips\n",
        *rows,
    ]
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text("\n".join(text) + "\n", encoding="utf-8")


def eval_cli(
    model: str | None,
    count: int,
    out: str,
    steps: int | None,
    guidance: float | None,
    seed: int,
    batch_size: int,
    device: str,
    precision: str = "fp32",
    offload: str = "none",
) -> dict:
    """`t2v eval`: load the model (any kind `t2v.backends.load_model` takes), evaluate it,
    print the table, what the scores mean, and where the report is."""
    from t2v.backends import load_model
    from t2v.outputs import check_dir

    check_dir(out, EVAL_REPORT)  # refuse a folder we would not replace, before any work
    report = evaluate(
        load_model(model, device, precision, offload),
        count=count,
        seed=seed,
        batch_size=batch_size,
        steps=steps,
        guidance=guidance,
        out_dir=out,
    )
    print(format_table(report))
    print(report["note"])
    print(f"report: {Path(out) / 'report.md'}")
    return report
