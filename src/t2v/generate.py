"""`t2v generate`: one prompt to one file, or a prompts file to a folder with index.jsonl."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tqdm import tqdm

from t2v.errors import UserError
from t2v.outputs import check_dir, writing_dir
from t2v.pipeline import DEFAULT_MODEL_DIR, TextToVideoPipeline
from t2v.text import PromptError
from t2v.video import Video, check_video_output

BATCH = "generated batch"  # the kind of folder `--out-dir` writes (see t2v.outputs)


def load_pipeline(
    model: str | Path | None, device: str = "auto", precision: str = "fp32"
) -> TextToVideoPipeline:
    return TextToVideoPipeline.from_pretrained(
        model or DEFAULT_MODEL_DIR, device=device, precision=precision
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "video"


def generate_one(
    prompt: str,
    output: str | Path | None = None,
    *,
    seed: int = 0,
    format: str | None = None,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    model: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> Path:
    """Generate one clip and write it; returns the path written."""
    if output is None:  # PNG frames go to a folder, named without a suffix
        output = Path("out") / (_slug(prompt) + ("" if format == "png" else f".{format or 'mp4'}"))
    fmt = check_video_output(output, format)  # refuse a path we would not write, before any work
    pipe = load_pipeline(model, device, precision)
    bars: list[tqdm] = []  # opened at the first step, so a bad input fails before a bar shows

    def progress(step: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="sampling", unit="step"))
        bars[0].update(1)

    try:
        video = pipe(
            prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            guidance=guidance,
            callback=progress,
        )
    finally:
        for bar in bars:
            bar.close()
    return video.save(output, format=fmt)


def generate_batch(
    prompts_file: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    format: str | None = None,
    batch_size: int = 16,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    model: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> Path:
    """Line i of the file becomes DIR/{i:04d}.{format} with seed + i. A bad line is recorded
    with its error in DIR/index.jsonl and the other lines are still generated."""
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
    pipe = load_pipeline(model, device, precision)
    records: list[dict] = []
    good: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        records.append({"file": None, "prompt": line, "seed": seed + i})
        try:
            good.append((i, pipe.check_prompt(line)))
        except PromptError as e:
            records[i]["error"] = str(e)
    # The folder appears whole at the end, or not at all.
    with (
        writing_dir(out_dir, BATCH) as tmp,
        tqdm(total=len(good), desc="generating", unit="clip") as bar,
    ):
        for start in range(0, len(good), batch_size):
            chunk = good[start : start + batch_size]
            frames = pipe.generate(
                [p for _, p in chunk],
                [seed + i for i, _ in chunk],
                steps=steps,
                guidance=guidance,
                negative_prompts=[negative_prompt or ""] * len(chunk),
            )
            for (i, _), clip in zip(chunk, frames, strict=True):
                name = f"{i:04d}" + ("" if fmt == "png" else f".{fmt}")
                Video(clip, pipe.config.fps).save(tmp / name, format=fmt)
                records[i]["file"] = name
            bar.update(len(chunk))
        text = "".join(json.dumps(r) + "\n" for r in records)
        (tmp / "index.jsonl").write_text(text, encoding="utf-8")
    return out_dir / "index.jsonl"
