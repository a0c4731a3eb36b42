"""`t2v generate`: one prompt to one file, or a prompts file to a folder with index.jsonl.

Both talk to a model only through `t2v.model.VideoModel` (`t2v.backends.load_model`), so
a t2v model folder and a diffusers one behave alike. Every path is checked (`t2v.outputs`)
and every number against the model's knobs before the weights load, so a mistake costs
no minutes of loading.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from t2v.backends import load_model, read_knobs
from t2v.errors import UserError
from t2v.model import SEED, GenerationRequest, Knobs
from t2v.outputs import check_dir, writing_dir
from t2v.video import check_video_output

BATCH = "generated batch"  # the kind of folder `--out-dir` writes (see t2v.outputs)
NUMBERS = ("steps", "guidance", "frames", "width", "height", "fps")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "video"


def _check_numbers(knobs: Knobs, request: GenerationRequest) -> None:
    """Refuse a number the model cannot take, naming the nearest it can, before loading.
    The prompts are left to the model, which normalises them once, as it generates."""
    SEED.check("seed", request.seed)
    for name in NUMBERS:
        if (value := getattr(request, name)) is not None:
            getattr(knobs, name).check(name, value)


def tell_reading(request: GenerationRequest) -> None:
    """Show on stderr how the model read a resolved prompt, and its warnings."""
    if request.original_prompt is not None:
        print(f"t2v: read as: {request.prompt}", file=sys.stderr)
    for warning in request.warnings:
        print(f"t2v: warning: {warning}", file=sys.stderr)


def generate_one(
    request: GenerationRequest,
    output: str | Path | None = None,
    *,
    format: str | None = None,
    model: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    offload: str = "none",
) -> Path:
    """Generate one clip with a progress bar and write it; returns the path written."""
    if output is None:  # PNG frames go to a folder, named without a suffix
        name = _slug(request.prompt) if isinstance(request.prompt, str) else "video"
        output = Path("out") / (name + ("" if format == "png" else f".{format or 'mp4'}"))
    fmt = check_video_output(output, format)  # refuse a path we would not write, before work
    _check_numbers(read_knobs(model), request)
    video_model = load_model(model, device=device, precision=precision, offload=offload)
    bars: list[tqdm] = []  # opened at the first step, so a bad prompt fails before a bar shows

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="sampling", unit="step"))
        bars[0].update(done - bars[0].n)

    request = video_model.resolve(request)
    tell_reading(request)
    try:
        [video] = video_model.generate([request], progress=progress)
    finally:
        for bar in bars:
            bar.close()
    return video.save(output, format=fmt)


def generate_batch(
    prompts_file: str | Path,
    out_dir: str | Path,
    template: GenerationRequest,
    *,
    format: str | None = None,
    batch_size: int = 16,
    model: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    offload: str = "none",
) -> Path:
    """Line i of the file becomes DIR/{i:04d}.{format}, made from ``template`` with that
    line as the prompt and seed ``template.seed + i``. A bad line is recorded with its error
    in DIR/index.jsonl and the other lines are still generated. DIR appears whole at the
    end, or not at all."""
    try:
        lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "not UTF-8 text"
        raise UserError(f"Cannot read the prompts file {prompts_file} ({reason}).") from None
    if not lines:
        raise UserError(f"{prompts_file} holds no prompts; write one prompt per line.")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    fmt = format or "mp4"
    out_dir = Path(out_dir)
    check_dir(out_dir, BATCH)
    _check_numbers(read_knobs(model), template)
    video_model = load_model(model, device=device, precision=precision, offload=offload)
    records: list[dict] = []
    good: list[tuple[int, GenerationRequest]] = []
    for i, line in enumerate(lines):
        records.append({"file": None, "prompt": line, "seed": template.seed + i})
        try:  # resolved here so that one bad line is recorded, not fatal to the batch
            good.append(
                (i, video_model.resolve(replace(template, prompt=line, seed=template.seed + i)))
            )
        except UserError as e:
            records[i]["error"] = str(e)
            continue
        if good[-1][1].original_prompt is not None:
            records[i]["read_as"] = good[-1][1].prompt
        if good[-1][1].warnings:
            records[i]["warnings"] = list(good[-1][1].warnings)
    with (
        writing_dir(out_dir, BATCH) as tmp,
        tqdm(total=len(good), desc="generating", unit="clip") as bar,
    ):
        for start in range(0, len(good), batch_size):
            chunk = good[start : start + batch_size]
            videos = video_model.generate([r for _, r in chunk])
            for (i, _), video in zip(chunk, videos, strict=True):
                name = f"{i:04d}" + ("" if fmt == "png" else f".{fmt}")
                video.save(tmp / name, format=fmt)
                records[i]["file"] = name
            bar.update(len(chunk))
        text = "".join(json.dumps(r) + "\n" for r in records)
        (tmp / "index.jsonl").write_text(text, encoding="utf-8")
    return out_dir / "index.jsonl"
