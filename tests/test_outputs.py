"""The output policy: nothing the user did not ask to replace is deleted or replaced, and
nothing is left half-written."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from t2v import outputs
from t2v.outputs import MARKER, OutputError, check_dir, check_file, writing_dir, writing_file


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def one_sentence(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text.endswith(".")
    return text


def test_a_new_file_appears_only_when_complete(tmp_path):
    with writing_file(tmp_path / "a" / "clip.mp4") as tmp:
        assert tmp.parent == tmp_path / "a" and tmp.name.endswith(".part")
        tmp.write_bytes(b"video")
        assert not (tmp_path / "a" / "clip.mp4").exists()
    assert (tmp_path / "a" / "clip.mp4").read_bytes() == b"video"
    assert entries(tmp_path / "a") == ["clip.mp4"]


def test_a_file_of_the_same_kind_is_replaced(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"old")
    with writing_file(tmp_path / "clip.mp4") as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "clip.mp4").read_bytes() == b"new"


def test_a_file_of_another_kind_is_kept(tmp_path):
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(OutputError, match="not a .mp4 file"):
        check_file(tmp_path / "notes", [".mp4"])
    with pytest.raises(OutputError, match="will not replace it"):
        check_file(tmp_path / "notes")  # no suffix: never a file t2v would replace
    assert (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_part(tmp_path, interrupt):
    (tmp_path / "clip.mp4").write_bytes(b"old")
    with pytest.raises(type(interrupt)):
        with writing_file(tmp_path / "clip.mp4") as tmp:
            tmp.write_bytes(b"half")
            raise interrupt
    assert entries(tmp_path) == ["clip.mp4"]
    assert (tmp_path / "clip.mp4").read_bytes() == b"old"


def test_a_folder_t2v_did_not_write_is_refused_and_kept(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "a.txt").write_text("mine")
    with pytest.raises(OutputError) as e:
        with writing_dir(keep, "png frames"):
            pytest.fail("must refuse before writing")
    assert "t2v did not write" in one_sentence(e)
    assert entries(keep) == ["a.txt"] and entries(tmp_path) == ["keep"]


def test_a_folder_is_replaced_whole_only_while_it_is_t2vs(tmp_path):
    out = tmp_path / "frames"
    out.mkdir()  # an empty folder is fine
    with writing_dir(out, "png frames") as tmp:
        (tmp / "0000.png").write_bytes(b"a")
        (tmp / "0001.png").write_bytes(b"b")
    assert entries(out) == [MARKER, "0000.png", "0001.png"]
    with writing_dir(out, "png frames") as tmp:
        (tmp / "0000.png").write_bytes(b"c")
    assert entries(out) == [MARKER, "0000.png"] and entries(tmp_path) == ["frames"]
    (out / "mine.txt").write_text("added by the user")
    with pytest.raises(OutputError, match="'mine.txt', which t2v did not write"):
        check_dir(out, "png frames")
    (out / "mine.txt").unlink()
    with pytest.raises(OutputError, match="holds t2v's png frames, not an eval report"):
        check_dir(out, "an eval report")


def test_an_unmarked_folder_in_the_kinds_layout_is_recognised(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "0000.png").write_bytes(b"a")
    assert check_dir(tmp_path / "old", "png frames", ["[0-9][0-9][0-9][0-9].png"])
    (tmp_path / "old" / "x.txt").write_bytes(b"a")
    with pytest.raises(OutputError):
        check_dir(tmp_path / "old", "png frames", ["[0-9][0-9][0-9][0-9].png"])


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_folder_write_keeps_the_old_folder_and_no_part(tmp_path, interrupt):
    out = tmp_path / "frames"
    with writing_dir(out, "png frames") as tmp:
        (tmp / "0000.png").write_bytes(b"a")
    with pytest.raises(type(interrupt)):
        with writing_dir(out, "png frames") as tmp:
            (tmp / "0000.png").write_bytes(b"half")
            raise interrupt
    assert entries(tmp_path) == ["frames"]
    assert (out / "0000.png").read_bytes() == b"a"


def test_a_file_where_a_folder_goes_and_the_reverse_are_refused(tmp_path):
    (tmp_path / "notes").write_text("mine")
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(OutputError, match="is a file, and a folder goes here"):
        check_dir(tmp_path / "notes", "png frames")
    with pytest.raises(OutputError, match="is a folder, and a file goes here"):
        check_file(tmp_path / "dir.mp4")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_file(tmp_path / "notes" / "clip.mp4")
    assert (tmp_path / "notes").read_text() == "mine" and entries(tmp_path / "dir.mp4") == []


@pytest.mark.parametrize("name", [".", "", "..", "sub/.."])
def test_the_current_folder_is_refused(tmp_path, monkeypatch, name):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub" if name == ".." else tmp_path)
    with pytest.raises(OutputError) as e:
        check_dir(name, "png frames")
    assert "current folder" in one_sentence(e) or "folder you are in" in str(e.value)


def test_a_symlink_is_written_through_and_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with writing_dir(tmp_path / "link", "png frames") as tmp:
        (tmp / "0000.png").write_bytes(b"a")
    assert (tmp_path / "link").is_symlink()
    assert entries(tmp_path / "real") == [MARKER, "0000.png"]
    (tmp_path / "clip.mp4").symlink_to(tmp_path / "real.mp4")
    with pytest.raises(OutputError, match="does not exist"):  # dangling: refused
        check_file(tmp_path / "clip.mp4")
    (tmp_path / "real.mp4").write_bytes(b"old")
    with writing_file(tmp_path / "clip.mp4") as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "clip.mp4").is_symlink() and (tmp_path / "real.mp4").read_bytes() == b"new"
    assert entries(tmp_path) == ["clip.mp4", "link", "real", "real.mp4"]


def test_a_symlink_to_a_users_folder_is_refused_and_kept(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.txt").write_text("mine")
    (tmp_path / "linkdir").symlink_to(tmp_path / "keep")
    with pytest.raises(OutputError, match="did not write"):
        with writing_dir(tmp_path / "linkdir", "png frames"):
            pass
    assert entries(tmp_path) == ["keep", "linkdir"] and entries(tmp_path / "keep") == ["a.txt"]


def test_a_read_only_filesystem_error_becomes_one_sentence(tmp_path, monkeypatch):
    """Root ignores permission bits, so the error of a read-only mount is injected."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(outputs.os, "replace", read_only)
    with pytest.raises(OutputError) as e:
        with writing_file(tmp_path / "clip.mp4") as tmp:
            tmp.write_bytes(b"x")
    assert "Read-only file system" in one_sentence(e)
    assert entries(tmp_path) == []


@pytest.fixture
def immutable_dir(tmp_path):
    """A folder nobody, root included, can write in (chattr +i), where the file system has it."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", folder]).returncode:
        pytest.skip("chattr +i is not available here")
    yield folder
    subprocess.run(["chattr", "-i", folder], check=True)


def test_a_folder_nobody_can_write_is_refused_before_any_work(immutable_dir):
    with pytest.raises(OutputError) as e:
        check_file(immutable_dir / "clip.mp4")
    assert "read-only" in one_sentence(e)
    with pytest.raises(OutputError):
        check_dir(immutable_dir / "sub" / "frames", "png frames")
    assert entries(immutable_dir) == []
