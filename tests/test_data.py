"""Preparing real videos into shards, verifying them, and the clip sources the trainer reads."""

import csv
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from t2v import shapes
from t2v.data import DataError, prepare, verify
from t2v.sources import EVAL_CLIPS, ShapesSource, ShardSource, is_moving_shapes, open_source
from t2v.video import to_model_tensor, write_video

GOOD = 6
OPTIONS = dict(frames=8, size=32, fps=8.0, progress=False)


def clip(i: int) -> np.ndarray:
    """12 frames at 8 fps: flat colour i, with the frame index in the green channel."""
    frames = np.zeros((12, 32, 32, 3), np.uint8)
    frames[..., 0] = 30 + 30 * i
    frames[..., 1] = (np.arange(12) * 16)[:, None, None]
    frames[..., 2] = 200
    return frames


def red_levels(clips: np.ndarray) -> list[int]:
    """Which clip(i) each clip is, read back from its red level."""
    return [round((c[..., 0].mean() - 30) / 30) for c in clips]


def make_videos(folder, sidecars: bool = True):
    """GOOD good videos, then the three kinds of broken file, each with a caption."""
    folder.mkdir()
    for i in range(GOOD):
        write_video(clip(i), folder / f"clip{i}.mp4", fps=8)
        if sidecars:
            (folder / f"clip{i}.txt").write_text(f"  clip   number {i}\n", encoding="utf-8")
    (folder / "zero.mp4").touch()
    data = (folder / "clip0.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (folder / "text.mp4").write_text("not a video at all\n" * 50)
    if sidecars:
        for name in ("zero", "truncated", "text"):
            (folder / f"{name}.txt").write_text(f"a {name} file")
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    videos = make_videos(root / "videos")
    (videos / "nocaption.mp4").write_bytes((videos / "clip1.mp4").read_bytes())
    manifest = prepare(
        videos, root / "shards", shard_max_mb=0.06, max_failure_fraction=0.5, workers=2, **OPTIONS
    )
    return root, manifest


def test_prepare_writes_shards_and_skips_bad_inputs_with_reasons(prepared):
    root, manifest = prepared
    assert manifest["samples"] == GOOD and manifest["inputs"] == GOOD + 4
    reasons = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"zero.mp4", "truncated.mp4", "text.mp4", "nocaption.mp4"}
    assert "empty" in reasons["zero.mp4"]
    assert "not a video" in reasons["text.mp4"]
    assert reasons["truncated.mp4"]
    assert reasons["nocaption.mp4"] == "caption: no nocaption.txt next to the video"
    assert json.loads((root / "shards" / "manifest.json").read_text()) == manifest

    clips, captions, metas = [], [], []
    for shard in manifest["shards"]:
        with tarfile.open(root / "shards" / shard["name"]) as tar:
            names = tar.getnames()
            assert len(names) == 3 * shard["samples"]
            for name in names:
                data = tar.extractfile(name).read()
                if name.endswith(".npy"):
                    clips.append(np.load(io.BytesIO(data), allow_pickle=False))
                elif name.endswith(".txt"):
                    captions.append(data.decode("utf-8"))
                else:
                    metas.append(json.loads(data))
    assert captions == [f"clip number {i}" for i in range(GOOD)]  # normalised, input order
    assert red_levels(clips) == list(range(GOOD))
    assert all(c.shape == (8, 32, 32, 3) and c.dtype == np.uint8 for c in clips)
    assert np.abs(clips[2][..., 1].mean(axis=(1, 2)) - np.arange(8) * 16).max() < 3
    assert [m["source"] for m in metas] == [f"clip{i}.mp4" for i in range(GOOD)]
    assert metas[0]["frames"] == 8 and metas[0]["size"] == [32, 32] and metas[0]["fps"] == 8


def test_shards_respect_the_size_bound(prepared):
    root, manifest = prepared
    assert len(manifest["shards"]) > 1
    assert [s["name"] for s in manifest["shards"]][:2] == ["shard-000000.tar", "shard-000001.tar"]
    for shard in manifest["shards"]:
        assert (root / "shards" / shard["name"]).stat().st_size <= 0.06 * 2**20
    assert sum(s["samples"] for s in manifest["shards"]) == GOOD


def test_prepare_is_reproducible_with_one_worker(prepared, tmp_path):
    root, manifest = prepared
    again = prepare(
        root / "videos", tmp_path, shard_max_mb=0.06, max_failure_fraction=0.5, workers=1, **OPTIONS
    )
    assert again["shards"] == manifest["shards"]  # same bytes, whatever the scheduling


def test_verify_names_the_changed_or_missing_shard(prepared, tmp_path):
    root, manifest = prepared
    assert verify(root / "shards")["samples"] == GOOD
    copy = tmp_path / "shards"
    copy.mkdir()
    for path in (root / "shards").iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    shard = copy / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="^shard-000001.tar: SHA-256 mismatch"):
        verify(copy)
    with pytest.raises(DataError, match="shard-000001.tar"):
        ShardSource(copy)
    ShardSource(copy, rehash=False)  # opening without verification still works

    shard.unlink()
    with pytest.raises(DataError, match="^shard-000001.tar: missing"):
        verify(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        verify(copy)
    with pytest.raises(DataError, match="no manifest.json"):
        verify(tmp_path)


def test_verify_checks_sample_counts(prepared, tmp_path):
    root, manifest = prepared
    name = manifest["shards"][0]["name"]
    (tmp_path / name).write_bytes((root / "shards" / name).read_bytes())
    shards = [dict(manifest["shards"][0], samples=manifest["shards"][0]["samples"] + 1)]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest | {"shards": shards}))
    with pytest.raises(DataError, match=f"^{name}: holds 2 samples, manifest says 3"):
        verify(tmp_path)


def test_too_many_failures_stop_with_data_error_but_keep_the_record(prepared, tmp_path):
    root, _ = prepared
    with pytest.raises(DataError, match=r"of 10 inputs failed \(\d+%\), over the 10% limit"):
        prepare(root / "videos", tmp_path, max_failure_fraction=0.1, workers=1, **OPTIONS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["skipped"]) >= 2
    with pytest.raises(DataError, match="failed preparation"):
        verify(tmp_path)


def test_webvid_csv_and_jsonl_inputs(tmp_path):
    videos = make_videos(tmp_path / "videos", sidecars=False)
    for i in range(3):
        (videos / f"clip{i}.mp4").rename(videos / f"{1000 + i}.mp4")
    with open(tmp_path / "webvid.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for i in range(3):
            writer.writerow([1000 + i, "http://x", "PT00H00M12S", "000", f"Video {i}"])
        writer.writerow([9999, "http://x", "PT00H00M12S", "000", "a missing file"])
        writer.writerow([5555, "http://x", "PT00H00M12S", "000", "   "])
    manifest = prepare(
        videos, tmp_path / "a", tmp_path / "webvid.csv", max_failure_fraction=0.5, **OPTIONS
    )
    assert manifest["samples"] == 3
    reasons = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert list(reasons) == ["9999.mp4", "5555.mp4"]
    assert reasons["9999.mp4"] == "no such file"
    assert reasons["5555.mp4"].startswith("caption: The prompt is empty")
    captions = ShardSource(tmp_path / "a").batch(0, 3)[1]
    assert sorted(captions) == ["Video 0", "Video 1", "Video 2"]

    # JSONL beside the videos, custom column names, paths relative to the file's folder.
    lines = [{"clip": f"videos/clip{i}.mp4", "desc": f"jsonl {i}"} for i in range(3, GOOD)]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    manifest = prepare(
        None,
        tmp_path / "b",
        tmp_path / "list.jsonl",
        path_column="clip",
        caption_column="desc",
        workers=1,
        **OPTIONS,
    )
    assert manifest["samples"] == 3 and manifest["skipped"] == []
    with pytest.raises(DataError, match="no caption column"):
        prepare(None, tmp_path / "c", tmp_path / "list.jsonl", path_column="clip", **OPTIONS)


def test_shard_source_is_deterministic_and_splits_ranks(prepared):
    root, _ = prepared
    a, b = ShardSource(root / "shards", seed=3), ShardSource(root / "shards", seed=3)
    clips, captions = a.batch(5, 2, rank=1, world_size=2)
    assert clips.shape == (2, 8, 32, 32, 3) and clips.dtype == np.uint8
    again, same = b.batch(5, 2, rank=1, world_size=2)
    assert same == captions and np.array_equal(again, clips)
    assert red_levels(clips) == [int(c.split()[-1]) for c in captions]  # clip matches caption

    # One epoch (6 samples) over three ranks holds every sample once.
    epoch = [c for r in range(3) for c in a.batch(0, 2, rank=r, world_size=3)[1]]
    assert sorted(epoch) == sorted(f"clip number {i}" for i in range(GOOD))
    assert a.batch(0, 6)[1] != a.batch(1, 6)[1]  # each epoch is shuffled afresh
    assert ShardSource(root / "shards", seed=4).batch(0, 6)[1] != a.batch(0, 6)[1]


def test_held_out_shard_clips_are_never_trained_on(prepared):
    root, _ = prepared
    source = ShardSource(root / "shards", seed=3, held_out=0.3)  # 2 of the 6 clips
    clips, captions = source.held_out(8)
    assert len(captions) == 2 and red_levels(clips) == [int(c.split()[-1]) for c in captions]
    trained = {c for step in range(12) for c in source.batch(step, 4)[1]}
    assert len(trained) == 4 and not trained & set(captions)
    assert sorted(source.captions(4)) == sorted(trained)
    # The held-out clips do not depend on the data seed, so runs compare on the same clips.
    assert ShardSource(root / "shards", seed=9, held_out=0.3).held_out(8)[1] == captions
    with pytest.raises(DataError, match="too few to keep 6 of them out of training"):
        ShardSource(root / "shards", held_out=0.99)


def test_only_the_moving_shapes_names_mean_moving_shapes(prepared, tmp_path, monkeypatch):
    root, _ = prepared
    assert all(map(is_moving_shapes, ["shapes", "shapes:train", "shapes:eval"]))
    assert not any(map(is_moving_shapes, ["shapes_x", "./shapes", "shapes:test", "shapesx"]))
    (tmp_path / "shapes_x").symlink_to(root / "shards")
    monkeypatch.chdir(tmp_path)
    source = open_source("shapes_x")
    assert isinstance(source, ShardSource) and not source.black_background
    assert all(c.startswith("clip number") for c in source.captions(6))


def test_open_source_for_both_kinds(prepared):
    root, _ = prepared
    assert isinstance(open_source(str(root / "shards")), ShardSource)
    train = open_source("shapes", seed=1)
    assert isinstance(train, ShapesSource)
    clips, captions = train.batch(2, 2, rank=0, world_size=2)
    assert clips.shape == (2, 16, 64, 64, 3) and clips.dtype == np.uint8
    other, other_captions = train.batch(2, 2, rank=1, world_size=2)
    assert not np.array_equal(clips, other) and captions != other_captions
    again = open_source("shapes:train", seed=1).batch(2, 2, rank=0, world_size=2)
    assert np.array_equal(again[0], clips) and again[1] == captions

    evaluation = open_source("shapes:eval")
    first = evaluation.batch(0, 1)
    assert np.array_equal(evaluation.batch(EVAL_CLIPS, 1)[0], first[0])  # the list cycles
    assert first[1] != evaluation.batch(1, 1)[1]
    with pytest.raises(DataError, match="neither 'shapes'"):
        open_source("shapes:test")
    with pytest.raises(DataError, match="neither 'shapes'"):
        open_source(str(root / "nowhere"))


def test_shapes_source_draws_each_step_once_whatever_the_call_order():
    source = ShapesSource("train", seed=2, two_object_share=0.5)
    # boxes before batch, the same step twice, then another rank and step: each answer must
    # be the stream's own clips for its (step, rank), not the last step's reused.
    for step, rank in [(3, 0), (3, 0), (3, 1), (0, 1), (5, 0)]:
        start = (step * 2 + rank) * 4
        boxes = source.boxes(step, 4, rank, 2)
        clips, captions = source.batch(step, 4, rank, 2)
        want_clips, want_captions = shapes.train_batch(2, start, 4, 0.5)
        assert np.array_equal(clips, want_clips) and captions == want_captions
        specs = [shapes.train_spec(2, start + i, 0.5) for i in range(4)]
        np.testing.assert_array_equal(boxes, shapes.object_boxes(specs))
    assert source.device == "cpu"
    assert open_source("shapes", device="meta").device == "meta"


def test_to_model_tensor_layout_and_range():
    clips = np.zeros((2, 3, 4, 5, 3), np.uint8)
    clips[1, 2, 3, 4] = (255, 0, 128)
    x = to_model_tensor(clips)
    assert x.shape == (2, 3, 3, 4, 5) and x.dtype == torch.float32
    assert x[1, :, 2, 3, 4].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)
    assert x.min() == -1.0
    with pytest.raises(ValueError, match="uint8"):
        to_model_tensor(clips.astype(np.float32))


# --- cutting videos into clips ---------------------------------------------------------------


def two_shots(path, cut: float = 2.5, seconds: float = 6.0, fps: int = 24):
    """A red shot, a hard cut at ``cut`` seconds, then a blue shot; the frame index is in the
    green channel (frame * 2), so a clip tells where in the video it starts."""
    n = round(seconds * fps)
    frames = np.zeros((n, 32, 32, 3), np.uint8)
    frames[:, :, :, 1] = (np.arange(n) * 255 // n)[:, None, None]
    shot = np.arange(n) < round(cut * fps)
    frames[shot, ..., 0], frames[~shot, ..., 2] = 230, 230
    write_video(frames, path, fps=fps)
    return path


def clip_sources(manifest) -> list[tuple[str, float, float]]:
    return [(c["source"], c["start"], c["end"]) for c in manifest["clips"]]


def test_prepare_cuts_a_video_into_clips_at_a_stride(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    two_shots(folder / "a.mp4")
    (folder / "a.txt").write_text("a red then a blue frame")
    options = {**OPTIONS, "scene_cuts": False}
    manifest = prepare(folder, tmp_path / "every", **options)
    assert clip_sources(manifest) == [("a.mp4", s, s + 1.0) for s in range(6)]
    shards = ShardSource(tmp_path / "every")
    assert len(shards) == 6 and shards.manifest["config"]["clip_stride"] is None
    # Each clip holds its own second of the video: its green level rises with its start.
    starts = [int(c[0, ..., 1].mean()) for c in shards.batch(0, 6)[0]]
    assert len(set(starts)) == 6
    manifest = prepare(folder, tmp_path / "stride", clip_stride=2.0, **options)
    assert [c["start"] for c in manifest["clips"]] == [0.0, 2.0, 4.0]
    manifest = prepare(folder, tmp_path / "capped", max_clips_per_video=2, **options)
    assert [c["start"] for c in manifest["clips"]] == [0.0, 5.0]  # spread over the video


def test_no_clip_spans_a_scene_cut(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    two_shots(folder / "a.mp4")
    (folder / "a.txt").write_text("a red then a blue frame")
    manifest = prepare(folder, tmp_path / "shards", **OPTIONS)
    starts = [c["start"] for c in manifest["clips"]]
    assert starts == pytest.approx([0.0, 1.0, 2.5, 3.5, 4.5], abs=0.05)
    for clip_ in ShardSource(tmp_path / "shards").batch(0, 5)[0]:
        red, blue = clip_[..., 0].mean((1, 2)), clip_[..., 2].mean((1, 2))
        assert (red > 200).all() or (blue > 200).all()  # one shot only


def test_start_and_end_times_in_the_captions_file_bound_the_clips(tmp_path):
    two_shots(tmp_path / "a.mp4")
    rows = [
        {"path": "a.mp4", "caption": "a red frame", "start": 0.5, "end": "00:00:02.5"},
        {"path": "a.mp4", "caption": "a blue frame", "start": "2.5", "end": ""},
        {"path": "a.mp4", "caption": "backwards", "start": 3, "end": 2},
    ]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    options = {**OPTIONS, "max_failure_fraction": 0.5}
    manifest = prepare(None, tmp_path / "shards", tmp_path / "list.jsonl", **options)
    assert clip_sources(manifest) == [
        ("a.mp4", 0.5, 1.5),
        ("a.mp4", 1.5, 2.5),
        ("a.mp4", 2.5, 3.5),
        ("a.mp4", 3.5, 4.5),
        ("a.mp4", 4.5, 5.5),
    ]
    assert manifest["skipped"] == [
        {"source": "a.mp4", "reason": "times: 3 to 2 is not a span of seconds"}
    ]
    clips, captions = ShardSource(tmp_path / "shards").batch(0, 5)
    for clip_, caption in zip(clips, captions, strict=True):
        colour = 0 if caption == "a red frame" else 2
        assert (clip_[..., colour].mean((1, 2)) > 200).all()


def test_prepare_never_replaces_what_it_did_not_write(prepared, tmp_path, capsys):
    from t2v.cli import main

    root, _ = prepared
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    for out in ("notes.txt", "folder"):
        args = ["data", "prepare", "--videos", str(root / "videos"), "--out", str(tmp_path / out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("t2v: error: ") and err.count("\n") == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "folder" / "notes.txt").read_text() == "mine"
    # Shards t2v wrote are replaced on request.
    shutil.copytree(root / "shards", tmp_path / "shards")
    again = prepare(root / "videos", tmp_path / "shards", max_failure_fraction=0.5, **OPTIONS)
    assert again["samples"] == GOOD and len(list((tmp_path / "shards").glob("*.tar"))) == 1


def test_the_clip_format_defaults_to_the_bundled_models(tmp_path):
    from t2v.backends import read_knobs

    folder = tmp_path / "videos"
    folder.mkdir()
    two_shots(folder / "a.mp4", seconds=2.5)
    (folder / "a.txt").write_text("a red then a blue frame")
    manifest = prepare(folder, tmp_path / "shards", workers=1, progress=False)
    knobs, config = read_knobs(), manifest["config"]
    assert config["frames"] == knobs.frames.default and config["fps"] == knobs.fps.default
    assert config["size"] == [knobs.height.default, knobs.width.default]
    clips, _ = ShardSource(tmp_path / "shards").batch(0, 1)
    assert clips.shape[1:4] == (knobs.frames.default, knobs.height.default, knobs.width.default)
