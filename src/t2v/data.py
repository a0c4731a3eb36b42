"""Training data: real videos prepared into verified tar shards (read by t2v.sources).

Shards use the WebDataset layout: ``shard-000000.tar`` holds ``KEY.npy`` (uint8 clip
(T, H, W, 3)), ``KEY.txt`` (caption) and ``KEY.json`` (where the clip came from), and
``manifest.json`` lists every shard with its SHA-256 and every input that was skipped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from t2v.clips import read_clips
from t2v.errors import UserError
from t2v.outputs import check_dir, writing_dir
from t2v.text import PromptError, normalize
from t2v.video import VideoError, to_model_tensor, to_uint8_clips  # noqa: F401

MANIFEST = "manifest.json"
SHARD_LAYOUT = (MANIFEST, "shard-*.tar", "shard-*.tar.part")  # a shard folder t2v wrote
FORMAT, VERSION = "t2v-shards", 1
VIDEO_SUFFIXES = frozenset(
    ".mp4 .webm .mkv .mov .avi .gif .m4v .mpg .mpeg .ogv .flv .wmv .ts".split()
)
PATH_COLUMNS = ("path", "file", "video", "videoid")
CAPTION_COLUMNS = ("caption", "text", "name")
START_COLUMNS, END_COLUMNS = ("start", "start_time"), ("end", "end_time")  # seconds, optional


class DataError(UserError):
    """Data that cannot be prepared or used; the message says what to do in one sentence."""


@dataclass
class PrepareConfig:
    """How clips are cut from the source videos; saved, resolved, in the manifest."""

    # The clip format; None: the bundled model's (its frames, height x width and fps), so
    # that prepared data fits the recipe unless told otherwise.
    frames: int | None = None
    size: int | tuple[int, int] | None = None  # (H, W), or one number for both
    fps: float | None = None
    # Seconds from one clip's start to the next one's in a video; None: the clip's length,
    # so a video's clips follow each other without overlap.
    clip_stride: float | None = None
    max_clips_per_video: int = 16  # spread evenly over the video when it holds more
    scene_cuts: bool = True  # no clip spans a cut between shots
    shard_max_mb: float = 256  # MiB
    max_failure_fraction: float = 0.1
    path_column: str | None = None
    caption_column: str | None = None

    def __post_init__(self):
        if None in (self.frames, self.size, self.fps):
            from t2v.backends import read_knobs  # JSON only: no torch, no weights

            knobs = read_knobs()
            if self.frames is None:
                self.frames = knobs.frames.default
            if self.size is None:
                self.size = (knobs.height.default, knobs.width.default)
            if self.fps is None:
                self.fps = knobs.fps.default
        if isinstance(self.size, int):
            self.size = (self.size, self.size)
        self.size = tuple(self.size)
        if not (
            self.frames >= 1
            and len(self.size) == 2
            and min(self.size) >= 1
            and self.fps > 0
            and (self.clip_stride is None or self.clip_stride > 0)
            and self.max_clips_per_video >= 1
            and self.shard_max_mb > 0
            and 0 <= self.max_failure_fraction <= 1
        ):
            raise DataError(
                "Need frames >= 1, a positive size, fps > 0, a positive clip stride, at least "
                "one clip per video, shard_max_mb > 0 and 0 <= max_failure_fraction <= 1, "
                f"not {self}."
            )

    @property
    def stride(self) -> float:
        return self.frames / self.fps if self.clip_stride is None else self.clip_stride


# --- listing the inputs --------------------------------------------------------------------


@dataclass
class _Input:
    path: Path
    source: str  # how the manifest names it
    caption: str | None = None
    error: str | None = None  # why it is skipped before decoding, if it is
    start: float = 0.0  # the span of the video the caption describes, in seconds
    end: float | None = None  # None: to the end of the video


def _caption_input(path: Path, root: Path, text: str | None, missing: str) -> _Input:
    source = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    if text is None:
        return _Input(path, source, error=f"caption: {missing}")
    try:
        return _Input(path, source, caption=normalize(text))
    except PromptError as e:
        return _Input(path, source, error=f"caption: {e}")


def _folder_inputs(videos: Path) -> list[_Input]:
    """Every video under ``videos`` (sorted), captioned by its sidecar ``.txt``."""
    inputs = []
    for path in sorted(videos.rglob("*")):
        if path.suffix.lower() not in VIDEO_SUFFIXES or path.name.startswith("."):
            continue
        sidecar = path.with_suffix(".txt")
        try:
            text, missing = sidecar.read_text(encoding="utf-8"), ""
        except FileNotFoundError:
            text, missing = None, f"no {sidecar.name} next to the video"
        except (OSError, UnicodeDecodeError):
            text, missing = None, f"{sidecar.name} is not readable UTF-8 text"
        inputs.append(_caption_input(path, videos, text, missing))
    return inputs


def _table_rows(table: Path) -> list[dict]:
    suffix = table.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson"):
        raise DataError(f"Captions file {table} must be a .csv, .tsv or .jsonl file.")
    try:
        with open(table, encoding="utf-8-sig", newline="") as f:
            if suffix in (".csv", ".tsv"):
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise DataError(f"Captions file {table} does not exist.") from None
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(
            f"Captions file {table} cannot be parsed ({e}); fix it and retry."
        ) from None
    if not all(isinstance(row, dict) for row in rows):
        raise DataError(f"Every line of {table} must be a JSON object with path and caption keys.")
    return rows


def _column(rows: list[dict], chosen: str | None, candidates: tuple[str, ...], what: str) -> str:
    found = list(rows[0]) if rows else []
    for name in [chosen] if chosen else candidates:
        if name in found:
            return name
    wanted = repr(chosen) if chosen else "any of " + ", ".join(candidates)
    raise DataError(
        f"The captions file has no {what} column ({wanted}); its columns are {found}, so pass "
        f"{what}_column=."
    )


def _table_inputs(
    table: Path, videos: Path | None, path_column: str | None, caption_column: str | None
) -> list[_Input]:
    """One input per row; a path without a suffix (WebVid's ``videoid``) gets ``.mp4``. A
    row's start and end columns, when the file has them, bound the span its caption tells
    of, so one video can appear in several rows with a caption per span."""
    rows = _table_rows(table)
    path_col = _column(rows, path_column, PATH_COLUMNS, "path")
    caption_col = _column(rows, caption_column, CAPTION_COLUMNS, "caption")
    found = list(rows[0]) if rows else []
    start_col = next((c for c in START_COLUMNS if c in found), None)
    end_col = next((c for c in END_COLUMNS if c in found), None)
    root = videos if videos is not None else table.parent
    inputs = []
    for row in rows:
        name = str(row.get(path_col) or "").strip()
        if not name:
            inputs.append(_Input(root, f"row {len(inputs) + 1}", error="no video path"))
            continue
        path = root / (name if Path(name).suffix else name + ".mp4")
        text = row.get(caption_col)
        item = _caption_input(path, root, None if text is None else str(text), "missing")
        try:
            item.start = _seconds(row.get(start_col)) or 0.0
            item.end = _seconds(row.get(end_col))
            if item.start < 0 or (item.end is not None and item.end <= item.start):
                raise ValueError
        except ValueError:
            times = f"{row.get(start_col)!r} to {row.get(end_col)!r}"
            item.error = item.error or f"times: {times} is not a span of seconds"
        inputs.append(item)
    return inputs


def _seconds(value) -> float | None:
    """Seconds from 12.5, "12.5" or "00:01:02.5"; None when empty."""
    if value is None or str(value).strip() == "":
        return None
    total = 0.0
    for part in str(value).strip().split(":"):
        total = total * 60 + float(part)
    if total != total or total in (float("inf"), float("-inf")):  # NaN or infinite
        raise ValueError(value)
    return total


# --- decoding ------------------------------------------------------------------------------


def _decode(job: tuple) -> list[tuple[float, np.ndarray]] | str:
    """The clips (start seconds, frames), or why the video cannot give one (runs in a
    worker process)."""
    path, config, window = job
    try:
        return read_clips(
            Path(path),
            config.frames,
            config.fps,
            config.size,
            config.stride,
            config.max_clips_per_video,
            window,
            config.scene_cuts,
        )
    except VideoError as e:
        return e.reason
    except Exception as e:  # one odd file must not end a long run
        return f"unexpected {type(e).__name__}: {e}"


def _decode_all(jobs: list, workers: int) -> Iterator[list | str]:
    """Results in job order; at most a few jobs per worker in flight, to bound memory."""
    if workers <= 1:
        yield from map(_decode, jobs)
        return
    # spawn: workers must not inherit the parent's threads (torch, tqdm) through fork.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(_decode, job))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --- shards --------------------------------------------------------------------------------


def _tar_size(payload: int) -> int:
    """Bytes of a tar file whose members take ``payload`` bytes (end blocks, 10 KiB records)."""
    return -(-(payload + 1024) // 10240) * 10240


class _ShardWriter:
    """Writes samples into shard-000000.tar, ... each at most ``max_bytes`` (unless one
    sample alone is larger); a shard gets its final name only once complete."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._payload = self._count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(512 + -(-len(data) // 512) * 512 for data in members.values())
        if self._tar is not None and _tar_size(self._payload + size) > self.max_bytes:
            self.close()
        if self._tar is None:
            self._name = f"shard-{len(self.shards):06d}.tar"
            self._tar = tarfile.open(
                self.out / f"{self._name}.part", "w", format=tarfile.USTAR_FORMAT
            )
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: reproducible
            self._tar.addfile(info, io.BytesIO(data))
        self._payload += size
        self._count += 1

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self.out / self._name
        os.replace(path.with_name(f"{self._name}.part"), path)
        self.shards.append({"name": self._name, "sha256": _sha256(path), "samples": self._count})
        self._tar, self._payload, self._count = None, 0, 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _json_bytes(data: dict, indent: int | None = None) -> bytes:
    return json.dumps(data, indent=indent, ensure_ascii=False).encode("utf-8")


def _write_json(path: Path, data: dict) -> None:
    part = path.with_name(path.name + ".part")
    part.write_bytes(_json_bytes(data, indent=1) + b"\n")
    os.replace(part, path)


# --- prepare and verify --------------------------------------------------------------------


def prepare(
    videos: Path | None,
    out: Path,
    captions: Path | None = None,
    *,
    workers: int = 2,
    progress: bool = True,
    **settings,
) -> dict:
    """Cut each video into clips, write them into tar shards in the folder ``out`` and
    return the manifest.

    Inputs are the videos in the folder ``videos`` with sidecar ``.txt`` captions, or the
    rows of ``captions`` (CSV/TSV/JSONL with path and caption columns, and optional start and
    end seconds; relative paths are under ``videos``, else beside the captions file).
    ``settings`` are fields of PrepareConfig: a video gives a clip every ``clip_stride``
    seconds inside each scene (``scene_cuts``), at most ``max_clips_per_video``. Unreadable
    inputs are skipped and listed in the manifest; more than ``max_failure_fraction`` of
    them raises DataError. ``out`` must be new, empty or shards t2v wrote. ``workers`` > 1
    decodes in that many processes.
    """
    # 1. Check the options and the output folder, and list the inputs.
    config = PrepareConfig(**settings)
    frames, fps = config.frames, config.fps
    check_dir(out, "shards", SHARD_LAYOUT)
    videos = Path(videos) if videos is not None else None
    if captions is not None:
        inputs = _table_inputs(Path(captions), videos, config.path_column, config.caption_column)
    elif videos is not None and videos.is_dir():
        inputs = _folder_inputs(videos)
    else:
        raise DataError(f"Give a folder of videos (not {videos}) or a captions file to prepare.")
    if not inputs:
        raise DataError(f"Found no videos in {captions or videos}; add some and run again.")

    # 2. Decode in worker processes; write samples in input order, whatever the scheduling.
    jobs = [(str(i.path), config, (i.start, i.end)) for i in inputs if i.error is None]
    limit = config.max_failure_fraction * len(inputs) + 1e-9
    skipped: list[dict] = []
    clips: list[dict] = []  # where each sample came from
    with (
        writing_dir(out, "shards", SHARD_LAYOUT) as tmp,
        closing(_decode_all(jobs, workers)) as results,
        tqdm(total=len(inputs), disable=not progress, unit="video", desc="preparing") as bar,
    ):
        writer = _ShardWriter(tmp, int(config.shard_max_mb * 2**20))
        for index, item in enumerate(inputs):
            result = item.error or next(results)
            if isinstance(result, str):
                skipped.append({"source": item.source, "reason": result})
                if len(skipped) > limit:
                    break  # the run has failed whatever the rest holds
            else:
                for k, (start, clip) in enumerate(result):
                    key = f"{index:09d}-{k:04d}"
                    where = {"source": item.source, "start": round(start, 3)}
                    where["end"] = round(start + frames / fps, 3)
                    meta = where | {"frames": frames, "fps": fps, "size": [*config.size]}
                    npy, txt = _npy_bytes(clip), item.caption.encode("utf-8")
                    writer.add(key, {"npy": npy, "txt": txt, "json": _json_bytes(meta)})
                    clips.append({"key": key, **where})
            bar.update()
        writer.close()

        # 3. Record everything, including what was skipped, even when the run failed.
        complete = len(skipped) <= limit
        settings = asdict(config) | {"size": [*config.size]}  # JSON has lists, not tuples
        settings |= {"videos": videos and str(videos), "captions": captions and str(captions)}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "complete": complete,
            "inputs": len(inputs),
            "samples": sum(s["samples"] for s in writer.shards),
            "config": settings,
            "shards": writer.shards,
            "skipped": skipped,
            "clips": clips,
        }
        _write_json(tmp / MANIFEST, manifest)
    if not complete:
        raise DataError(
            f"{len(skipped)} of {len(inputs)} inputs failed "
            f"({100 * len(skipped) / len(inputs):.0f}%), over the "
            f"{100 * config.max_failure_fraction:g}% limit, so prepare stopped; see 'skipped' in "
            f"{Path(out) / MANIFEST} for the reasons."
        )
    return manifest


def load_manifest(shards_dir: Path) -> dict:
    path = shards_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{shards_dir} has no {MANIFEST}; run prepare to create it.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); run prepare again.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a t2v shard manifest; run prepare to create one.")
    if manifest.get("version") != VERSION:
        raise DataError(
            f"{path} has version {manifest.get('version')}, not {VERSION}; rerun prepare."
        )
    if not manifest.get("complete"):
        raise DataError(
            f"{path} records a failed preparation; fix the inputs and run prepare again."
        )
    return manifest


def index_shard(path: Path) -> list[tuple[int, int, int, int]]:
    """(npy offset, npy size, txt offset, txt size) of each sample, in file order."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = member
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path.name}: not a readable tar file ({e}); run prepare again.") from None
    index = []
    for key, members in samples.items():
        if "npy" not in members or "txt" not in members:
            raise DataError(f"{path.name}: sample {key} lacks its .npy or .txt; run prepare again.")
        npy, txt = members["npy"], members["txt"]
        index.append((npy.offset_data, npy.size, txt.offset_data, txt.size))
    return index


def verify(shards_dir: Path) -> dict:
    """Re-hash every shard and count its samples against the manifest; returns the manifest."""
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    total = 0
    for shard in manifest["shards"]:
        name = shard["name"]
        path = shards_dir / name
        if not path.is_file():
            raise DataError(f"{name}: missing from {shards_dir}; run prepare again.")
        if _sha256(path) != shard["sha256"]:
            raise DataError(f"{name}: SHA-256 mismatch, so the file changed; run prepare again.")
        count = len(index_shard(path))
        if count != shard["samples"]:
            raise DataError(f"{name}: holds {count} samples, manifest says {shard['samples']}.")
        total += count
    if total != manifest["samples"]:
        raise DataError(f"The shards hold {total} samples, manifest says {manifest['samples']}.")
    return manifest
