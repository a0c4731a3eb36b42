"""Where t2v writes: the one policy of every command that writes a file or a folder.

The rule: t2v never deletes or replaces anything the user did not ask it to replace, and
never leaves anything half-written.

- A file output (a video, a report) replaces an existing file only when that file is of the
  same kind: the same suffix, as `ffmpeg -y` would. No ``--overwrite`` is needed: naming the
  file is the request. A file without a suffix is never replaced, and a folder never
  replaced by a file.
- A folder output (PNG frames, a batch, a data set, shards, a model, an eval report) goes
  into a missing or empty folder, or replaces a folder that t2v wrote for the same kind of
  output and that nobody has added to since. t2v marks the folders it writes with a small
  ``.t2v-output.json`` that names the kind and the entries it wrote. A non-empty folder t2v
  did not write, or one that holds something more, is refused with one sentence.
- A file where a folder is wanted, or a folder where a file is wanted, is refused; so is an
  output that is the current folder (``-o .``) or one that holds it.
- A symbolic link is followed: the output is written where it points, and the link stays.
  A link that points nowhere is refused.
- Everything is written to a hidden ``.NAME.<random>.part`` sibling and renamed into place
  at the end; on any failure, Ctrl-C included, the sibling is removed.
- Read-only places, full disks and the like become one sentence (`OutputError`).

Use::

    target = check_file("clip.mp4")          # early, before minutes of work: refuse now
    with writing_file("clip.mp4") as tmp:    # write to tmp; renamed onto the target on exit
        encode(tmp)

    check_dir("shards", "shards")
    with writing_dir("shards", "shards") as tmp:   # an empty folder; swapped in on exit
        (tmp / "manifest.json").write_text(...)

Both ``writing_*`` context managers check again at the end, since minutes may have passed.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from t2v.errors import UserError

MARKER = ".t2v-output.json"

# Errors of the place, not of t2v: they become one sentence.
_PLACE_ERRNOS = {
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.EXDEV,
    errno.EBUSY,
    errno.ELOOP,
}


class OutputError(UserError):
    """An output path t2v will not or cannot write; the message says why and what to do."""


def _real(path: str | Path) -> Path:
    """The path to write: symlinks followed, refused when dangling or the current folder."""
    path = Path(path)
    if str(path) in ("", ".") or path.name in ("", ".", ".."):
        raise OutputError(
            f"The output {str(path) or '.'!r} is a folder you are in, not a new name; "
            "give the name of a file or folder to write, e.g. out/clip.mp4."
        )
    try:
        if path.is_symlink() and not path.exists():
            raise OutputError(
                f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                "remove the link or give another name."
            )
        real = Path(os.path.realpath(path))
    except OSError as e:
        raise _place_error(path, e) from None
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputError(
            f"The output {str(path)!r} is the current folder or holds it; "
            "give the name of a new file or folder to write."
        )
    return real


def _place_error(path: Path, e: OSError) -> OutputError:
    reason = (e.strerror or str(e)).rstrip(".")
    return OutputError(f"Cannot write {path} ({reason}); choose a place you can write to.")


def _check_writable(path: Path, shown: Path) -> None:
    """The nearest existing folder above ``path`` must be a writable folder."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link on the way: mkdir would fail
            raise OutputError(f"Cannot write {shown}: {parent} is a link to nothing.")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(
            f"Cannot write {shown}: {parent} is a file, not a folder; choose another place."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"Cannot write {shown}: {parent} is read-only or not yours; "
            "choose a place you can write to."
        )


def check_file(path: str | Path, suffixes: Iterable[str] | None = None) -> Path:
    """Refuse ``path`` as a file output unless it is new or a file of the kind written.

    ``suffixes`` are the kind's suffixes (default: the path's own, e.g. ``.mp4``); a file
    whose suffix is not one of them is never replaced. Returns the real path to write.
    """
    shown = Path(path)
    real = _real(shown)
    kinds = {s.lower() for s in (suffixes if suffixes is not None else [shown.suffix]) if s}
    if real.is_dir():
        raise OutputError(
            f"{shown} is a folder, and a file goes here; give a file name such as "
            f"{shown / ('clip' + (sorted(kinds)[0] if kinds else '.mp4'))}."
        )
    if real.exists() and real.suffix.lower() not in kinds:
        raise OutputError(
            f"{shown} exists and is not a {'/'.join(sorted(kinds)) or 'file t2v wrote'} file, "
            "so t2v will not replace it; remove it or choose another name."
        )
    _check_writable(real, shown)
    return real


def check_dir(path: str | Path, kind: str, layout: Iterable[str] = ()) -> Path:
    """Refuse ``path`` as a folder output unless it is new, empty, or t2v's own ``kind``.

    ``layout`` are name patterns (fnmatch) that recognise a folder of this kind that an
    older t2v wrote without a marker: every entry must match one. Returns the real path.
    """
    shown = Path(path)
    real = _real(shown)
    if real.exists() and not real.is_dir():
        raise OutputError(
            f"{shown} is a file, and a folder goes here; remove it or choose another name."
        )
    if real.is_dir():
        problem = _foreign(real, kind, tuple(layout))
        if problem:
            raise OutputError(
                f"{shown} {problem}, so t2v will not replace it; "
                "choose a new folder name or empty it first."
            )
    _check_writable(real, shown)
    return real


def _foreign(folder: Path, kind: str, layout: tuple[str, ...]) -> str | None:
    """Why ``folder`` is not t2v's own folder of ``kind`` (None: it is, or it is empty)."""
    try:
        names = set(os.listdir(folder))
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not names:
        return None
    if MARKER in names:
        try:
            mark = json.loads((folder / MARKER).read_text(encoding="utf-8"))
            wrote, was = set(mark["entries"]), mark["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            return "has a damaged t2v marker"
        if was != kind:
            return f"holds t2v's {was}, not {kind}"
        extra = sorted(names - wrote - {MARKER})
        if extra:
            return f"holds {extra[0]!r}, which t2v did not write"
        return None
    if layout and all(any(fnmatch.fnmatch(n, p) for p in layout) for n in names):
        return None
    return "is a folder that t2v did not write and it is not empty"


def _part(real: Path) -> Path:
    """A unique hidden name beside ``real`` (not mkstemp, whose 0600 mode would stick)."""
    return real.with_name(f".{real.name}.{uuid.uuid4().hex[:12]}.part")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def writing_file(path: str | Path, suffixes: Iterable[str] | None = None) -> Iterator[Path]:
    """Yield a hidden sibling to write; on success it replaces ``path`` (see `check_file`)."""
    suffixes = list(suffixes) if suffixes is not None else None
    shown = Path(path)
    real = check_file(shown, suffixes)
    tmp = _part(real)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        check_file(shown, suffixes)
        os.replace(tmp, real)
    except OSError as e:
        if e.errno in _PLACE_ERRNOS:
            raise _place_error(shown, e) from None
        raise
    finally:
        _remove(tmp)


@contextmanager
def writing_dir(path: str | Path, kind: str, layout: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a new empty hidden folder to fill; on success it is marked as t2v's ``kind``
    and takes the place of ``path`` (see `check_dir`)."""
    layout = tuple(layout)
    shown = Path(path)
    real = check_dir(shown, kind, layout)
    tmp = _part(real)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        entries = sorted(n for n in os.listdir(tmp) if n != MARKER)
        marker = {"kind": kind, "entries": entries}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        check_dir(shown, kind, layout)
        _swap(tmp, real)
    except OSError as e:
        if e.errno in _PLACE_ERRNOS:
            raise _place_error(shown, e) from None
        raise
    finally:
        _remove(tmp)


def _swap(tmp: Path, real: Path) -> None:
    """Put folder ``tmp`` at ``real``; a rename replaces only an empty folder, so a full one
    (already checked to be t2v's own) is moved aside first and removed after."""
    try:
        os.replace(tmp, real)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = _part(real)
    os.replace(real, old)
    try:
        os.replace(tmp, real)
    except BaseException:
        os.replace(old, real)
        raise
    shutil.rmtree(old, ignore_errors=True)
