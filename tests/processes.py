"""
Running iapd's commands as real processes, with bounded waits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: Sequence[str], cwd: Path | None = None, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args] if not args[0].startswith("/") else list(args),
        cwd=cwd, env=env(), input=stdin.decode() if stdin is not None else None,
        capture_output=True, text=True, timeout=timeout,
    )


class Daemon:
    """A twistd process whose log goes to a file the test can wait on."""

    def __init__(self, args: Sequence[str], cwd: Path, extra_env: dict[str, str] | None = None) -> None:
        self.log_path = cwd / "twistd.log"
        self._log = open(self.log_path, "wb")
        e = env()
        e.update(extra_env or {})
        self.proc = subprocess.Popen(
            [*TWISTD, "--nodaemon", "--pidfile=", *args], cwd=cwd, env=e, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} before {text!r}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._log.close()
        return self.proc.returncode
