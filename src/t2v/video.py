"""Video I/O: write clips as MP4, WebM, GIF or a folder of PNG frames, and read any video
PyAV decodes as a fixed-size, fixed-rate uint8 clip.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from t2v.errors import UserError
from t2v.outputs import check_dir, check_file, writing_dir, writing_file

FORMATS: dict[str, str] = {
    "mp4": "video/mp4",
    "webm": "video/webm",
    "gif": "image/gif",
    "png": "image/png",  # a folder of 0000.png, 0001.png, ...
}

# codec, pixel format, codec options, container options. crf 12 keeps tiny flat-colour clips
# close enough to the source that a checker can read colours back; the files stay small.
_ENCODERS: dict[str, tuple[str, str, dict[str, str], dict[str, str]]] = {
    "mp4": ("libx264", "yuv420p", {"crf": "12"}, {"movflags": "+faststart"}),
    "webm": ("libvpx-vp9", "yuv420p", {"crf": "12", "b": "0", "cpu-used": "4", "row-mt": "1"}, {}),
    "gif": ("gif", "pal8", {}, {"loop": "0"}),
}


# A video file may replace only another video file (see t2v.outputs); PNG frames are a folder.
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")
PNG_FRAMES = "png frames"


class VideoError(UserError):
    """An input that cannot be read as a video; ``reason`` says why in words."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read video {path}: {reason}")
        self.path = path
        self.reason = reason


# What a caller that names no rate or size gets; a model's own values come from its Knobs.
DEFAULT_FPS, DEFAULT_FRAMES, DEFAULT_SIZE = 8.0, 16, 64


@dataclass
class Video:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    fps: float = DEFAULT_FPS

    def save(self, path, format: str | None = None) -> Path:
        return write_video(self.frames, path, self.fps, format)


def format_from_path(path, format: str | None = None) -> str:
    """The explicit ``format`` if given, else the one the file name implies (no suffix: png)."""
    names = ", ".join(FORMATS)
    if format is not None:
        if format.lower() not in FORMATS:
            raise UserError(f"Unknown video format {format!r}; use one of {names}.")
        return format.lower()
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("mp4", "webm", "gif"):
        return suffix
    if not suffix or path.is_dir():
        return "png"
    raise UserError(
        f"Cannot tell the video format of {path.name!r}; name it .mp4, .webm or .gif, "
        f"give a folder name for PNG frames, or pass one of {names} as the format."
    )


def _check_frames(frames) -> np.ndarray:
    shape = getattr(frames, "shape", None)
    if (
        not isinstance(frames, np.ndarray)
        or frames.dtype != np.uint8
        or frames.ndim != 4
        or frames.shape[-1] != 3
        or 0 in frames.shape
    ):
        kind = f"{frames.dtype} array of shape {shape}" if shape else type(frames).__name__
        raise ValueError(
            f"Video frames must be a uint8 array (T, H, W, 3) with T >= 1, not {kind}."
        )
    return np.ascontiguousarray(frames)


def write_video(
    frames: np.ndarray, path, fps: float = DEFAULT_FPS, format: str | None = None
) -> Path:
    """Write uint8 (T, H, W, 3) frames; the file appears under ``path`` only once complete.

    Follows t2v.outputs: a video file replaces only a video file, PNG frames replace only a
    folder of frames t2v wrote, and nothing the user made is ever removed.
    """
    frames = _check_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps must be positive, not {fps}.")
    path = Path(path)
    fmt = format_from_path(path, format)
    if fmt == "png":
        with writing_dir(path, PNG_FRAMES) as tmp:
            for i, image in enumerate(frames):
                av.VideoFrame.from_ndarray(image, format="rgb24").save(tmp / f"{i:04d}.png")
        return path
    with writing_file(path, VIDEO_SUFFIXES) as tmp:
        _encode(frames, str(tmp), fps, fmt)
    return path


def check_video_output(path, format: str | None = None) -> str:
    """Refuse now, before any work, an output that `write_video` would refuse; returns
    the format."""
    fmt = format_from_path(path, format)
    check_dir(path, PNG_FRAMES) if fmt == "png" else check_file(path, VIDEO_SUFFIXES)
    return fmt


def _encode(frames: np.ndarray, target: str, fps: float, fmt: str) -> None:
    codec, pix_fmt, codec_options, container_options = _ENCODERS[fmt]
    if codec == "libx264":
        # x264 cannot code odd sizes in 4:2:0; repeat the last row/column to make them even.
        _, h, w, _ = frames.shape
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(target, "w", format=fmt, options=container_options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = codec_options
        if pix_fmt == "yuv420p":
            # Tag what we convert with (BT.601, limited range) so browsers decode it alike.
            stream.codec_context.colorspace = 6  # AVCOL_SPC_SMPTE170M
            stream.codec_context.color_range = 1  # AVCOL_RANGE_MPEG
        for frame in _av_frames(frames, pix_fmt):
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _av_frames(frames: np.ndarray, pix_fmt: str) -> Iterator[av.VideoFrame]:
    if pix_fmt == "pal8":
        indices, palette = _palettize(frames)
        for image in indices:
            yield av.VideoFrame.from_ndarray((image, palette), format="pal8")
        return
    for image in frames:
        rgb = av.VideoFrame.from_ndarray(image, format="rgb24")
        yield rgb.reformat(format=pix_fmt, dst_colorspace="itu601", dst_color_range="MPEG")


def _palettize(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One 256-colour palette for the whole clip: exact when it has at most 256 colours."""
    r, g, b = (frames[..., c].astype(np.uint32) for c in range(3))
    packed = (r << 16) | (g << 8) | b
    colours, index = np.unique(packed, return_inverse=True)
    if len(colours) > 256:
        # The 256 most common cells of a 16x16x16 colour grid become the palette (at their
        # mean colour); every other cell maps to its nearest palette colour.
        cell = ((r >> 4) << 8) | ((g >> 4) << 4) | (b >> 4)
        counts = np.bincount(cell.ravel(), minlength=4096)
        top = np.argsort(-counts, kind="stable")[:256]
        top = top[counts[top] > 0]
        flat = cell.ravel()
        sums = np.stack([np.bincount(flat, ch.ravel(), minlength=4096) for ch in (r, g, b)], 1)
        mean = sums[top] / counts[top, None]  # (K, 3)
        grid = np.arange(4096)
        centres = np.stack([(grid >> 8) & 15, (grid >> 4) & 15, grid & 15], axis=1) * 16 + 8
        lut = ((centres[:, None, :] - mean[None]) ** 2).sum(-1).argmin(1)  # (4096,)
        lut[top] = np.arange(len(top))
        index = lut[cell]
        rgb = np.clip(np.rint(mean), 0, 255).astype(np.uint32)
        colours = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    palette = np.zeros((256, 4), np.uint8)  # ARGB
    palette[:, 0] = 255
    palette[: len(colours), 1] = colours >> 16
    palette[: len(colours), 2] = (colours >> 8) & 255
    palette[: len(colours), 3] = colours & 255
    return index.reshape(frames.shape[:3]).astype(np.uint8), palette


# --- reading -------------------------------------------------------------------------------


def read_video(
    path,
    num_frames: int = DEFAULT_FRAMES,
    fps: float = DEFAULT_FPS,
    start: float = 0.0,
    size: int | tuple[int, int] = DEFAULT_SIZE,
) -> np.ndarray:
    """``num_frames`` frames at ``fps`` from ``start`` seconds, as uint8 (T, H, W, 3).

    Each output frame is the source frame whose timestamp is nearest (so variable frame rates
    work); frames are scaled so the shorter side fits, then centre-cropped to ``size``.
    Raises VideoError for anything that cannot give those frames.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if num_frames < 1 or not fps > 0 or start < 0 or height < 1 or width < 1:
        raise ValueError(
            f"Need num_frames >= 1, fps > 0, start >= 0 and a positive size, "
            f"not {num_frames}, {fps}, {start}, {size}."
        )
    path = Path(path)
    targets = start + np.arange(num_frames) / fps
    source = _png_frames(path, fps) if path.is_dir() else _file_frames(path)
    with closing(source):
        picked, count, duration = _pick(source, targets, 1.0 / fps)
    if len(picked) < num_frames:
        raise VideoError(
            path,
            f"too short: {count} frame{'s' * (count != 1)} ({duration:.2f} s), but {num_frames} "
            f"frames at {fps:g} fps from {start:g} s need {start + num_frames / fps:.2f} s",
        )
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for i, frame in enumerate(picked):
        # Picks are in time order, so a frame used twice is used twice in a row.
        out[i] = out[i - 1] if i and frame is picked[i - 1] else _fit(frame, height, width)
    return out


def _pick(
    frames: Iterator[tuple[float, av.VideoFrame]], targets: np.ndarray, step: float
) -> tuple[list[av.VideoFrame], int, float]:
    """The frame nearest each target time (seconds from the first frame), stopping early
    when the frames run out; also the number of frames seen and the seconds they cover."""
    picked: list[av.VideoFrame] = []
    count, t0, prev_t, prev = 0, 0.0, 0.0, None
    # The video ends one gap (as before its last frame; one step if alone) after its last
    # frame, and a target nearer that end than to the last frame is past the end.
    gap = step
    for t, frame in frames:
        t0 = t if prev is None else t0
        t -= t0
        count += 1
        while len(picked) < len(targets) and targets[len(picked)] <= t:
            tk = targets[len(picked)]
            picked.append(prev if prev is not None and tk - prev_t <= t - tk else frame)
        if len(picked) == len(targets):
            return picked, count, t
        gap = t - prev_t if prev is not None and t > prev_t else gap
        prev_t, prev = t, frame
    if prev is None:
        return picked, count, 0.0
    while len(picked) < len(targets) and targets[len(picked)] <= prev_t + gap / 2 + 1e-6:
        picked.append(prev)
    return picked, count, prev_t + gap


def _fit(frame: av.VideoFrame, height: int, width: int) -> np.ndarray:
    """Scale so the frame covers height x width (shorter side fits), then centre-crop."""
    scale = max(height / frame.height, width / frame.width)
    h, w = max(height, round(frame.height * scale)), max(width, round(frame.width * scale))
    rgb = frame.reformat(
        width=w, height=h, format="rgb24", interpolation="AREA", src_color_range=frame.color_range
    ).to_ndarray()
    top, left = (h - height) // 2, (w - width) // 2
    return rgb[top : top + height, left : left + width]


def _ffmpeg_reason(e: av.FFmpegError) -> str:
    return (e.strerror or str(e)).rstrip(".")


def _file_frames(path: Path) -> Iterator[tuple[float, av.VideoFrame]]:
    """(time in seconds, frame) of the first video stream, in presentation order."""
    if not path.is_file():
        raise VideoError(path, "no such file")
    if path.stat().st_size == 0:
        raise VideoError(path, "the file is empty (0 bytes)")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise VideoError(path, f"not a video file FFmpeg can read ({_ffmpeg_reason(e)})") from None
    except OSError as e:
        raise VideoError(path, e.strerror or str(e)) from None
    with container:
        if not container.streams.video:
            raise VideoError(path, "the file has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        last = None
        try:
            for frame in container.decode(stream):
                # Frames without a timestamp follow the previous one at the nominal rate.
                t = frame.time if frame.time is not None else (last or 0.0) + 1.0 / rate
                last = t
                yield t, frame
        except av.FFmpegError as e:
            raise VideoError(
                path, f"corrupt or truncated video data ({_ffmpeg_reason(e)})"
            ) from None


def _png_frames(folder: Path, fps: float) -> Iterator[tuple[float, av.VideoFrame]]:
    """A folder of PNG frames, sorted by name, shown at ``fps``."""
    files = sorted(folder.glob("*.png"))
    if not files:
        raise VideoError(folder, "the folder holds no .png frames")
    for i, file in enumerate(files):
        try:
            with av.open(str(file)) as container:
                frame = next(container.decode(video=0))
        except (av.FFmpegError, StopIteration, OSError):
            raise VideoError(folder, f"frame {file.name} is not a readable PNG") from None
        yield i / fps, frame


# --- frames <-> model tensors: shared by the pipeline and the trainer ----------------------


def to_model_tensor(clips: np.ndarray):
    """uint8 (B, T, H, W, 3) -> float torch tensor (B, 3, T, H, W) in [-1, 1]."""
    import torch  # here, so decoding workers that import this module skip torch

    ok = isinstance(clips, np.ndarray) and clips.dtype == np.uint8 and clips.ndim == 5
    if not ok or clips.shape[-1] != 3:
        raise ValueError("Clips must be a uint8 array (B, T, H, W, 3).")
    x = torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 4, 1, 2, 3)  # (B, 3, T, H, W)
    return x.contiguous().float().div_(127.5).sub_(1.0)


def to_uint8_clips(x) -> np.ndarray:
    """The inverse of to_model_tensor: (B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3)."""
    frames = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return frames.permute(0, 2, 3, 4, 1).cpu().numpy()
