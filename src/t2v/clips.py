"""Where the clips of a video are: its length, its scene cuts, and the start of every clip.

A video gives clips every ``stride`` seconds inside each of its scenes (PySceneDetect's
content detector finds the cuts), so no clip spans a cut, within the span its caption
describes when the captions file gives one, and at most ``max_clips`` of them, spread evenly
over the video. The frames of all its clips are decoded in one pass.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from t2v.video import VideoError, read_video


def duration(path: Path) -> float | None:
    """Seconds of the first video stream, from the container; None when it does not say."""
    if not path.is_file():
        return None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
    except (av.FFmpegError, OSError):
        return None  # read_video names what is wrong with the file
    return None


def scenes(path: Path, length: float) -> list[tuple[float, float]]:
    """(start, end) seconds of each shot (Castellano, PySceneDetect: a cut where the frames'
    HSV content changes by more than ContentDetector's threshold)."""
    from scenedetect import ContentDetector, detect

    found = detect(str(path), ContentDetector(), show_progress=False)
    spans = [(_seconds(a), _seconds(b)) for a, b in found]
    return spans or [(0.0, length)]


def _seconds(timecode) -> float:
    seconds = getattr(timecode, "seconds", None)  # PySceneDetect 0.7; get_seconds() before
    return float(seconds if seconds is not None else timecode.get_seconds())


def clip_starts(
    spans: list[tuple[float, float]], length: float, stride: float, max_clips: int
) -> list[float]:
    """Starts of the clips of ``length`` seconds, every ``stride`` seconds inside each span,
    at most ``max_clips`` of them spread evenly; [] when no span holds a whole clip."""
    starts = []
    for lo, hi in spans:
        # A hair of slack: container durations are rounded to their time base.
        count = int(np.floor((hi - lo - length) / stride + 1e-6)) + 1
        starts += [lo + k * stride for k in range(max(0, count))]
    if len(starts) > max_clips:
        starts = [starts[i] for i in np.linspace(0, len(starts) - 1, max_clips).round().astype(int)]
    return starts


def read_clips(
    path: Path,
    frames: int,
    fps: float,
    size: tuple[int, int],
    stride: float,
    max_clips: int,
    window: tuple[float, float | None] = (0.0, None),
    scene_cuts: bool = True,
) -> list[tuple[float, np.ndarray]]:
    """(start seconds, uint8 clip (T, H, W, 3)) of each clip of the video inside ``window``
    (start, end or None for the end of the video); one clip at the window's start when no
    whole clip fits between cuts. Raises VideoError when the video cannot give one."""
    length = frames / fps
    total = duration(path)
    lo, hi = window
    if total is not None:
        hi = total if hi is None else min(hi, total)
        spans = scenes(path, total) if scene_cuts else [(0.0, total)]
        spans = [(max(a, lo), min(b, hi)) for a, b in spans if min(b, hi) > max(a, lo)]
        starts = clip_starts(spans, length, stride, max_clips) or [lo]
    else:
        starts = [lo]
    # One decode for all clips: frames on a 1/fps grid from the first start; each clip's
    # start moves by under half a frame onto the grid.
    offsets = [round((s - starts[0]) * fps) for s in starts]
    try:
        video = read_video(path, offsets[-1] + frames, fps, starts[0], size)
    except VideoError:
        if len(starts) == 1:
            raise
        # The container claimed more than it holds: keep the first clip, as one would.
        return [(starts[0], read_video(path, frames, fps, starts[0], size))]
    return [(starts[0] + o / fps, video[o : o + frames]) for o in offsets]
