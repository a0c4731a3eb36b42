"""Video I/O with real encoders: round trips, resampling, resizing and unreadable inputs."""

from fractions import Fraction

import av
import numpy as np
import pytest

from t2v import video
from t2v.errors import UserError
from t2v.outputs import MARKER
from t2v.video import FORMATS, Video, VideoError, format_from_path, read_video, write_video

COLOURS = np.array([(230, 25, 25), (30, 200, 50), (40, 80, 255), (245, 225, 30)])


def quadrants(t: int, h: int, w: int) -> np.ndarray:
    """Four flat colour blocks, the same in every frame."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[:, : h // 2, : w // 2] = COLOURS[0]
    frames[:, : h // 2, w // 2 :] = COLOURS[1]
    frames[:, h // 2 :, : w // 2] = COLOURS[2]
    frames[:, h // 2 :, w // 2 :] = COLOURS[3]
    return frames


def block_error(got: np.ndarray, h: int, w: int, margin: int = 3) -> int:
    """Largest colour error inside each block, away from edges that chroma subsampling blurs."""
    errors = []
    for colour, (ys, xs) in zip(
        COLOURS,
        [
            (slice(0, h // 2), slice(0, w // 2)),
            (slice(0, h // 2), slice(w // 2, w)),
            (slice(h // 2, h), slice(0, w // 2)),
            (slice(h // 2, h), slice(w // 2, w)),
        ],
        strict=True,
    ):
        inner = got[:, ys, xs][:, margin:-margin, margin:-margin].astype(int)
        errors.append(np.abs(inner - colour).max())
    return max(errors)


def grey_index_video(path, count: int, fps: float, size: int = 32):
    """Frame i is flat grey 4*i, so a read frame tells which source frame it came from."""
    frames = np.repeat((np.arange(count) * 4).astype(np.uint8), size * size * 3)
    return write_video(frames.reshape(count, size, size, 3), path, fps=fps)


def frame_indices(clip: np.ndarray) -> list[int]:
    return [round(v) for v in clip[:, :, :, 0].mean(axis=(1, 2)) / 4]


@pytest.mark.parametrize(
    "fmt, codec, tol", [("mp4", "h264", 8), ("webm", "vp9", 8), ("gif", "gif", 0), ("png", "", 0)]
)
def test_round_trip_keeps_frames_size_and_colours(tmp_path, fmt, codec, tol):
    frames = quadrants(10, 48, 64)
    path = Video(frames, fps=8).save(tmp_path / ("clip" if fmt == "png" else f"clip.{fmt}"))
    assert format_from_path(path) == fmt
    back = read_video(path, num_frames=10, fps=8, size=(48, 64))
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert block_error(back, 48, 64) <= tol
    with pytest.raises(VideoError, match="too short: 10 frames"):
        read_video(path, num_frames=11, fps=8, size=(48, 64))
    if fmt == "png":
        names = sorted(p.name for p in path.iterdir())
        assert names == [MARKER] + [f"{i:04d}.png" for i in range(10)]
        assert [p.name for p in tmp_path.iterdir()] == [path.name]
        return
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == codec
        if fmt != "gif":
            assert stream.codec_context.pix_fmt == "yuv420p"  # what browsers play


def test_mp4_streams_from_the_start_and_gif_loops(tmp_path):
    mp4 = write_video(quadrants(4, 32, 32), tmp_path / "a.mp4").read_bytes()
    assert mp4.index(b"moov") < mp4.index(b"mdat")  # +faststart: playable while downloading
    gif = write_video(quadrants(4, 32, 32), tmp_path / "a.gif").read_bytes()
    assert b"NETSCAPE2.0" in gif


def test_gif_with_many_colours_stays_close(tmp_path):
    ramp = np.linspace(0, 255, 64).astype(np.uint8)
    red, green = np.meshgrid(ramp, ramp[::-1], indexing="ij")
    frames = np.stack([red, green, np.full_like(red, 128)], -1)  # 4096 colours
    frames = np.repeat(frames[None], 3, axis=0)
    back = read_video(write_video(frames, tmp_path / "ramp.gif"), 3, size=64)
    assert np.abs(back.astype(int) - frames).mean() < 6


def test_h264_odd_size_is_padded_by_edge_replication(tmp_path):
    frames = quadrants(8, 33, 47)
    path = write_video(frames, tmp_path / "odd.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.height, stream.width) == (34, 48)
    back = read_video(path, num_frames=8, size=(34, 48))
    assert block_error(back[:, :33, :47], 33, 47) <= 8
    assert np.abs(back[:, 33, :40].astype(int) - back[:, 32, :40]).max() <= 8


def test_webm_keeps_odd_size(tmp_path):
    path = write_video(quadrants(8, 33, 47), tmp_path / "odd.webm")
    with av.open(str(path)) as container:
        assert (container.streams.video[0].height, container.streams.video[0].width) == (33, 47)


def test_format_from_path():
    assert format_from_path("a/b.MP4") == "mp4"
    assert format_from_path("b.webm") == "webm"
    assert format_from_path("frames") == "png"
    assert format_from_path("b.mp4", format="GIF") == "gif"
    assert set(FORMATS) == {"mp4", "webm", "gif", "png"}
    with pytest.raises(UserError, match="mp4"):
        format_from_path("b.avi")
    with pytest.raises(UserError, match="Unknown video format 'mov'"):
        format_from_path("b.mp4", format="mov")


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((4, 8, 8, 3), np.float32),
        np.zeros((8, 8, 3), np.uint8),
        np.zeros((4, 8, 8, 4), np.uint8),
        np.zeros((0, 8, 8, 3), np.uint8),
        [[0]],
    ],
)
def test_write_rejects_bad_frames(tmp_path, frames):
    with pytest.raises(ValueError, match=r"uint8 array \(T, H, W, 3\)"):
        write_video(frames, tmp_path / "x.mp4")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    path = write_video(quadrants(4, 16, 16), tmp_path / "keep.mp4")
    before = path.read_bytes()

    def crash(frames, target, fps, fmt):
        with open(target, "wb") as f:
            f.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(video, "_encode", crash)
    with pytest.raises(RuntimeError):
        write_video(quadrants(4, 16, 16), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]


def test_png_folder_is_replaced_whole(tmp_path):
    write_video(quadrants(6, 16, 16), tmp_path / "frames")
    write_video(quadrants(2, 16, 16), tmp_path / "frames")
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == [MARKER, "0000.png", "0001.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]


def test_writing_never_replaces_what_the_user_made(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "0000.png").write_bytes(b"the user's own frame")
    (tmp_path / "notes").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    for path, fmt in (("mine", None), ("notes", None), ("notes", "mp4"), ("notes.txt", "mp4")):
        with pytest.raises(UserError, match="will not replace it|a folder goes here"):
            write_video(quadrants(2, 16, 16), tmp_path / path, format=fmt)
    assert (tmp_path / "mine" / "0000.png").read_bytes() == b"the user's own frame"
    assert (tmp_path / "notes").read_text() == (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes", "notes.txt"]
    (tmp_path / "clip.gif").write_bytes(b"an older clip")
    write_video(quadrants(2, 16, 16), tmp_path / "clip.gif", format="mp4")  # a video: replaced
    assert read_video(tmp_path / "clip.gif", num_frames=2).shape == (2, 64, 64, 3)


def test_sampling_30fps_at_8fps_picks_the_nearest_frames(tmp_path):
    path = grey_index_video(tmp_path / "idx.mp4", 60, fps=30)
    for start in (0.0, 0.5):
        got = frame_indices(read_video(path, num_frames=12, fps=8, start=start, size=32))
        for k, index in enumerate(got):
            exact = (start + k / 8) * 30
            if exact % 1 == 0.5:  # a tie: either neighbour is nearest
                assert index in (int(exact), int(exact) + 1)
            else:
                assert index == round(exact), (start, k, got)


def test_upsampling_repeats_frames(tmp_path):
    path = grey_index_video(tmp_path / "slow.mp4", 4, fps=2)
    assert frame_indices(read_video(path, num_frames=8, fps=4, size=32)) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_variable_frame_rate_uses_timestamps(tmp_path):
    times_ms = [0, 40, 300, 340, 700, 1000, 1010, 1500]
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 4 * i, np.uint8))
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    # Targets every 0.25 s take the frame nearest in time; the video ends at 1.5 + 0.49 s.
    got = frame_indices(read_video(path, num_frames=7, fps=4, size=32))
    assert got == [0, 2, 3, 4, 5, 6, 7]
    with pytest.raises(VideoError, match="too short"):
        read_video(path, num_frames=8, fps=4, size=32)


def test_resize_covers_then_centre_crops(tmp_path):
    frames = np.zeros((4, 48, 96, 3), np.uint8)
    frames[:, :, :24] = COLOURS[0]
    frames[:, :, 24:72] = COLOURS[1]
    frames[:, :, 72:] = COLOURS[2]
    path = write_video(frames, tmp_path / "wide")
    square = read_video(path, num_frames=4, size=32)  # 48x96 -> 32x64 -> middle 32x32
    assert square.shape == (4, 32, 32, 3)
    assert np.abs(square.astype(int) - COLOURS[1]).max() <= 2
    wide = read_video(path, num_frames=4, size=(16, 32))
    assert np.abs(wide[:, :, 2].astype(int) - COLOURS[0]).max() <= 2
    assert np.abs(wide[:, :, -3].astype(int) - COLOURS[2]).max() <= 2


def write_audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def make_bad(kind: str, tmp_path):
    path = tmp_path / f"{kind}.mp4"
    if kind == "zero-byte":
        path.touch()
    elif kind == "truncated":
        noise = np.random.default_rng(0).integers(0, 256, (30, 64, 64, 3), dtype=np.uint8)
        data = write_video(noise, tmp_path / "full.mp4", fps=30).read_bytes()
        path.write_bytes(data[: len(data) * 2 // 5])
    elif kind == "text":
        path.write_text("this is not a video\n" * 100)
    elif kind == "audio-only":
        write_audio_only(path)
    elif kind == "too-short":
        write_video(quadrants(5, 16, 16), path, fps=8)
    return path


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("zero-byte", "empty"),
        ("truncated", ""),
        ("text", "not a video"),
        ("audio-only", "no video stream"),
        ("too-short", "too short"),
        ("missing", "no such file"),
    ],
)
def test_unreadable_inputs_raise_video_error(tmp_path, kind, reason):
    path = make_bad(kind, tmp_path)
    with pytest.raises(VideoError) as caught:
        read_video(path, num_frames=30, fps=30, size=32)
    assert caught.value.path == path
    assert reason in caught.value.reason
    assert str(caught.value) == f"cannot read video {path}: {caught.value.reason}"


def test_empty_png_folder_raises_video_error(tmp_path):
    with pytest.raises(VideoError, match="no .png frames"):
        read_video(tmp_path)
