"""A real PostgreSQL server for the tests: Debian's binaries, `initdb` into a temp dir (as
an unprivileged user when the tests run as root), a Unix socket only (no TCP port), stopped
at teardown. Skips with the reason when the binaries are missing (`make test` installs them:
Debian package `postgresql`)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

USER = "t2vtest"  # the unprivileged user that owns the cluster when the tests run as root


def find_binaries() -> Path | None:
    found = shutil.which("initdb")
    if found and Path(found).with_name("pg_ctl").exists():
        return Path(os.path.realpath(found)).parent
    for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(path, "initdb").exists():
            return Path(path)
    return None


class Postgres:
    """A throwaway cluster; `url(db)` names a database in it, `fresh()` makes a new one."""

    def __init__(self, root: Path, bin_dir: Path):
        self.root, self.bin = root, bin_dir
        self.data, self.socket = root / "data", root / "socket"
        self._count = 0
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(USER)
            except KeyError:
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", USER],
                    check=True,
                    capture_output=True,
                )
            shutil.chown(root, USER)
            self.as_user = ["runuser", "-u", USER, "--"]
        self.socket.mkdir()
        if self.as_user:
            shutil.chown(self.socket, USER)

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "t2v",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        options = (
            f"-c listen_addresses='' -k {self.socket} -c fsync=off -c synchronous_commit=off"
            " -c full_page_writes=off -c max_connections=200"
        )
        log = str(self.root / "server.log")  # not a pipe: the server outlives pg_ctl
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        subprocess.run(
            [
                *self.as_user,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
            capture_output=True,
            timeout=60,
        )

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://t2v@/{db}?host={self.socket}"

    def fresh(self) -> str:
        """A new, empty database's URL."""
        self._count += 1
        name = f"t{self._count}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres():
    bin_dir = find_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="t2v-pg-"))
    os.chmod(root, 0o755)
    server = Postgres(root, bin_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
