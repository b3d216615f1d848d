"""
Reading a store where the reader may not write (iapd.store.open_reader).

A store in WAL mode that no manager has open has no C{-wal} and C{-shm} beside it, and
SQLite creates both before it reads, even read-only.  Two readers cannot: an operator
of the manager's group, who may read the files but not write in their directory, while
the manager is stopped; and anyone reading a copy of the store on a read-only
filesystem.  Both get an answer that says why and what to do, and nothing is read
without the alerts a WAL holds.  Real processes: a real store written by the manager's
code, read by a non-root user through setpriv, and inside a mount namespace of its own
(unshare) where its directory is a read-only bind mount.  Both need root, as CI has;
elsewhere they skip, under CI they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from iapd.store import AlertRecord, Row, SQLiteBackend

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
DEBIAN_PYTHON = "/usr/bin/python3"

READ = """
import json, sys
from pathlib import Path
from iapd.store import StoreError, read_alerts
try:
    print(json.dumps({"bodies": [a["body"].decode() for a in read_alerts(Path(sys.argv[1]), with_body=True)]}))
except StoreError as e:
    print(json.dumps({"error": str(e)}))
"""


def _unavailable(problem: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture
def stopped_store() -> Iterator[Path]:
    """A store the manager's code wrote and closed, in a directory others may enter
    and read but not write, as /var/lib/iapd is for the iapd group."""
    if os.geteuid() != 0:
        _unavailable("needs root (setpriv, unshare)")
    directory = Path(tempfile.mkdtemp(prefix="iapd-access-"))
    try:
        db = directory / "alerts.db"
        backend = SQLiteBackend(db)
        backend.open()
        try:
            rows = [Row(AlertRecord(sensor="s1.test", content_type="application/x-idef-alert", body=b), None)
                    for b in (b"first", b"second")]
            assert backend.commit(rows, {}) == [True, True]
        finally:
            backend.close()
        assert not (directory / "alerts.db-wal").exists()  # a clean close leaves no WAL
        directory.chmod(0o755)
        for path in directory.iterdir():
            if path.is_file():
                path.chmod(0o644)
        yield db
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _read(command: list[str], db: Path, source: Path = ROOT) -> dict[str, object]:
    done = subprocess.run([*command, "-c", READ, str(db)], capture_output=True, text=True, timeout=60, cwd="/",
                          env={**os.environ, "PYTHONPATH": str(source)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def world_readable_source() -> Iterator[Path]:
    """This checkout's iapd where any user can import it: the checkout itself may be
    under a directory only root may enter."""
    directory = Path(tempfile.mkdtemp(prefix="iapd-source-"))
    try:
        shutil.copytree(ROOT / "iapd", directory / "iapd", ignore=shutil.ignore_patterns("__pycache__"))
        for path in [directory, *directory.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_operator_of_the_group_told_why_and_what_to_do(stopped_store: Path, world_readable_source: Path) -> None:
    if shutil.which("setpriv") is None:
        _unavailable("setpriv (util-linux) is not installed")
    # root's interpreter may live where another user cannot go (pyenv under /root)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", DEBIAN_PYTHON]
    probe = subprocess.run([*as_nobody, "-c", "import iapd.store"], capture_output=True, text=True, timeout=60,
                           cwd="/", env={**os.environ, "PYTHONPATH": str(world_readable_source)})
    if probe.returncode != 0:
        _unavailable(f"{DEBIAN_PYTHON} cannot import iapd.store as another user: {probe.stderr.strip()[-200:]}")
    before = sorted(p.name for p in stopped_store.parent.iterdir())
    found = _read(as_nobody, stopped_store, world_readable_source)
    assert found == {"error": _told(stopped_store, stopped_store.parent)}
    assert sorted(p.name for p in stopped_store.parent.iterdir()) == before
    # the same user reads it once the WAL's files are there, as while a manager runs
    opened = SQLiteBackend(stopped_store)
    opened.open()
    try:
        for name in ("alerts.db-wal", "alerts.db-shm"):
            (stopped_store.parent / name).chmod(0o644)
        assert _read(as_nobody, stopped_store, world_readable_source) == {"bodies": ["first", "second"]}
    finally:
        opened.close()


def _told(store: Path, directory: Path) -> str:
    return (f"cannot read store {store}: no manager has it open, and SQLite must create alerts.db-wal and"
            f" alerts.db-shm in {directory} before anyone reads it, which this user may not do there (or the"
            " filesystem is read-only); read it while the manager runs, as root or as the user the manager runs as"
            " (the Debian package's: sudo -u iapd iapctl ...), or read a copy of its files made somewhere writable")


def _read_only(directory: Path) -> list[str]:
    """A command prefix: in a mount namespace of its own, C{directory} bound onto itself
    read-only and checked unwritable, then the rest of the command.  Only ever
    C{remount,bind,ro}: without C{bind}, the remount would reach the host's filesystem."""
    if shutil.which("unshare") is None:
        _unavailable("unshare (util-linux) is not installed")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && '
            '( touch "$1/probe" 2>/dev/null && echo "$1 is writable" >&2 && exit 9 || true ) && shift && exec "$@"',
            "sh", str(directory), sys.executable]


def test_store_on_a_read_only_filesystem(stopped_store: Path, tmp_path: Path) -> None:
    """Told why and what to do, even as root, directly or through a symbolic link from
    a writable directory (SQLite keeps the WAL's files beside the real file)."""
    directory = stopped_store.parent
    link = tmp_path / "link.db"
    link.symlink_to(stopped_store)
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert _read(_read_only(directory), stopped_store) == {"error": _told(stopped_store, directory)}
    assert _read(_read_only(directory), link) == {"error": _told(link, directory)}
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before


def test_read_only_copy_with_alerts_still_in_its_wal(stopped_store: Path) -> None:
    """
    A copy taken while a manager ran: the newest alerts are in the -wal file only, and
    the -shm was not copied.  On a read-only filesystem it is refused, never read
    without them; made writable, it gives all three.
    """
    directory = stopped_store.parent
    copy = Path(tempfile.mkdtemp(prefix="iapd-access-copy-"))
    try:
        running = SQLiteBackend(stopped_store)
        running.open()
        try:
            rows = [Row(AlertRecord(sensor="s1.test", content_type="application/x-idef-alert", body=b"third"), None)]
            assert running.commit(rows, {}) == [True]
            for name in ("alerts.db", "alerts.db-wal", "alerts.db-bodies"):
                shutil.copy2(directory / name, copy / name)
        finally:
            running.close()
        copy.chmod(0o755)
        assert _read(_read_only(copy), copy / "alerts.db") == {"error": _told(copy / "alerts.db", copy)}
        assert _read([sys.executable], copy / "alerts.db") == {"bodies": ["first", "second", "third"]}
    finally:
        shutil.rmtree(copy, ignore_errors=True)
