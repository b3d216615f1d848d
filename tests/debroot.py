"""
A throw-away Debian 12 root for testing the .deb, and bounded commands around it.

Not a test module.  The root comes from a debootstrap tarball cached per day (the first
run of a day makes it, in about a minute; later runs unpack it in seconds).  Commands
run in it through C{unshare --mount-proc=ROOT/proc chroot ROOT ...}: the /proc mount
lives in the command's own mount namespace and disappears with it, so there is nothing
to unmount afterwards, even when a test dies half-way, and deleting the root can never
reach into a host file system.  The root shares the host's network namespace, so
daemons in it are reachable on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SOURCES = f"""\
deb {MIRROR} {SUITE} main
deb {MIRROR} {SUITE}-updates main
deb http://deb.debian.org/debian-security {SUITE}-security main
"""
# Bump when base_tarball() changes what goes into the tarball.
RECIPE = 1
CACHE_DIR = Path(os.environ.get("IAPD_DEBROOT_CACHE", "/var/cache/iapd-tests"))
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def clean_env(**extra: str) -> dict[str, str]:
    """
    A minimal environment for Debian's own tools: no virtualenv or pyenv on PATH (a
    build must use /usr/bin/python3 and Debian's libraries), no PYTHONPATH.
    """
    env = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}
    env.update(extra)
    return env


def run(
    args: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    input: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """
    Run C{args} with output captured (stderr into stdout) and a bounded wait: past
    C{timeout} seconds the command's whole process group is killed and the test fails
    with the end of its output.  With C{check}, a non-zero exit fails too.
    """
    proc = subprocess.Popen(
        list(args), cwd=cwd, env=env if env is not None else clean_env(),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"{' '.join(args)} did not finish within {timeout}s:\n{out[-4000:]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited with {proc.returncode}:\n{out[-6000:]}")
    return subprocess.CompletedProcess(list(args), proc.returncode, out)


class Root:
    """A Debian root directory and the commands run inside it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __truediv__(self, inside: str) -> Path:
        """The host path of C{inside} (an absolute path within the root)."""
        return self.path / inside.lstrip("/")

    def command(self, args: Sequence[str], user: str | None = None, **env: str) -> list[str]:
        """The host command line that runs C{args} in the root, as C{user} if given."""
        inner = ["env", "-i", *(f"{k}={v}" for k, v in clean_env(**env).items())]
        if user is not None:
            # setpriv execs (runuser would fork): the pid we hold is the daemon's own.
            inner += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        return ["unshare", f"--mount-proc={self.path}/proc", "chroot", str(self.path), *inner, *args]

    def run(
        self, args: Sequence[str], *, timeout: float = 120, user: str | None = None,
        check: bool = True, input: str | None = None, **env: str,
    ) -> subprocess.CompletedProcess[str]:
        return run(self.command(args, user, **env), timeout=timeout, check=check, input=input)

    def spawn(self, args: Sequence[str], log: IO[bytes], user: str | None = None, **env: str) -> subprocess.Popen[bytes]:
        """Start a long-running command in the root, its output going to C{log}."""
        return subprocess.Popen(
            self.command(args, user, **env), env=clean_env(), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def base_tarball() -> Path:
    """
    A tarball of a minimal Debian root with apt sources for the suite, its updates and
    its security archive, and their package lists fetched: made with debootstrap on the
    first call of the day, reused after.  Older tarballs are deleted.
    """
    stamp = datetime.date.today().strftime("%Y%m%d")
    path = CACHE_DIR / f"{SUITE}-minbase-r{RECIPE}-{stamp}.tar"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="making-", dir=CACHE_DIR))
        try:
            target = work / "root"
            # in its own mount namespace: what debootstrap mounts in the target cannot
            # outlive it, even if it is killed
            run(["unshare", "--mount", "debootstrap", "--variant=minbase", SUITE, str(target), MIRROR], timeout=900)
            (target / "etc/apt/sources.list").write_text(SOURCES)
            Root(target).run(["apt-get", "update", "-q"], timeout=300)
            run(["tar", "--numeric-owner", "-C", str(target), "-cf", str(work / "root.tar"), "."], timeout=300)
            os.replace(work / "root.tar", path)  # atomic: a concurrent run sees all or nothing
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for old in CACHE_DIR.glob(f"{SUITE}-minbase-*.tar"):
        if old != path:
            old.unlink(missing_ok=True)
    for stale in CACHE_DIR.glob("making-*"):  # left by a run that was killed
        if time.time() - stale.stat().st_mtime > 3600:
            remove(Root(stale))
    return path


def unpack(tarball: Path, directory: Path) -> Root:
    directory.mkdir(parents=True)
    run(["tar", "--numeric-owner", "-xpf", str(tarball), "-C", str(directory)], timeout=300)
    return Root(directory)


def remove(root: Root) -> None:
    """Delete a root, after checking that nothing is mounted below it."""
    prefix = str(root.path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        mounted = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    if mounted:
        raise AssertionError(f"not deleting {root.path}: still mounted below it: {mounted}")
    shutil.rmtree(root.path)


def snapshot(root: Root, skip: Iterable[str]) -> dict[str, tuple[object, ...]]:
    """
    Every path in the root (but those under C{skip}) with its type, mode and owner, and
    for files and links their size and modification time or target: two snapshots
    differ wherever anything was created, removed, rewritten or re-permissioned.
    A directory's own mtime is left out, as it changes whenever an entry comes and goes.
    """
    skipped = {"/" + s.strip("/") for s in skip}
    out: dict[str, tuple[object, ...]] = {}
    base = str(root.path)
    for directory, dirs, files in os.walk(base):
        rel_dir = directory[len(base):] or "/"
        dirs[:] = [d for d in dirs if os.path.join(rel_dir, d) not in skipped]
        for name in dirs + files:
            rel = os.path.join(rel_dir, name)
            if rel in skipped:
                continue
            st = os.lstat(os.path.join(directory, name))
            kind = stat.S_IFMT(st.st_mode)
            entry: tuple[object, ...] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(os.path.join(directory, name)),)
            elif not stat.S_ISDIR(st.st_mode):
                entry += (st.st_size, st.st_mtime_ns)
            out[rel] = entry
    return out
