"""Data throughput: Moving Shapes rendering on one core, and `prepare` on real H.264 videos.

Run: .venv/bin/python bench/data.py   (about half a minute; prints a markdown table)
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from t2v.data import prepare
from t2v.video import write_video

RENDER_SECONDS, RENDER_BATCH = 8.0, 64
# Small WebVid-like sources: UNIQUE encoded clips, each copied so prepare sees VIDEOS files
# (decoding a copy costs the same, and encoding them all would dominate the run).
UNIQUE, VIDEOS, SECONDS, SOURCE_FPS, SOURCE_HW = 8, 240, 3, 24, (144, 256)


def render_rate() -> float:
    """Training clips per second from shapes.train_batch on one thread."""
    # Imported here: prepare's spawned workers re-import this file and need no torch.
    import torch

    from t2v import shapes

    torch.set_num_threads(1)
    shapes.train_batch(0, 0, RENDER_BATCH)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < RENDER_SECONDS:
        shapes.train_batch(0, count, RENDER_BATCH)
        count += RENDER_BATCH
    return count / (time.perf_counter() - start)


def make_videos(folder: Path) -> None:
    """Moving colour gradients with sidecar captions, so the decoder has real work to do."""
    h, w = SOURCE_HW
    y, x = np.mgrid[0:h, 0:w]
    t = np.arange(SECONDS * SOURCE_FPS)[:, None, None]
    for i in range(UNIQUE):
        frames = np.stack(
            [(x + 3 * t + 10 * i) % 256, (y + 2 * t) % 256, (x + y + i * t) % 256], -1
        ).astype(np.uint8)  # (T, H, W, 3)
        write_video(frames, folder / f"{i:04d}.mp4", fps=SOURCE_FPS)
    for i in range(VIDEOS):
        if i >= UNIQUE:
            shutil.copyfile(folder / f"{i % UNIQUE:04d}.mp4", folder / f"{i:04d}.mp4")
        (folder / f"{i:04d}.txt").write_text(f"a moving gradient number {i}")


def prepare_rate(videos: Path, out: Path, workers: int) -> float:
    start = time.perf_counter()
    manifest = prepare(videos, out, workers=workers, progress=False)
    assert manifest["samples"] == VIDEOS  # a 3 s video holds one 2 s clip
    return manifest["samples"] / (time.perf_counter() - start)


def main() -> None:
    rows = [
        ("Moving Shapes render (train_batch)", f"1 thread, batch {RENDER_BATCH}", render_rate())
    ]
    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(tmp) / "videos"
        videos.mkdir()
        make_videos(videos)
        source = f"{SOURCE_HW[1]}x{SOURCE_HW[0]} {SOURCE_FPS} fps {SECONDS} s H.264"
        for workers in (1, 2):
            rate = prepare_rate(videos, Path(tmp) / f"shards{workers}", workers)
            setting = f"{workers} worker(s), {VIDEOS} x {source}, scene cuts, incl. start-up"
            rows.append(("prepare -> 16x64x64 @ 8 fps", setting, rate))
    print(f"CPU cores: {os.cpu_count()}\n")
    print("| benchmark | setting | clips/s |\n|---|---|---:|")
    for name, setting, rate in rows:
        print(f"| {name} | {setting} | {rate:.1f} |")


if __name__ == "__main__":  # prepare's workers are spawned and re-import this file
    main()
