"""
The line-collecting half that every role's protocol shares.

Setup-phase messages are lines ending in CRLF, closed by an empty line.  Manager, proxy
and sensor all collect them the same way, with the same bounds (line length, lines per
message), and parse them with the same sans-IO parser; what differs is what each does
with a message and with an error, which subclasses say in two hooks.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols.basic import LineReceiver

from .errors import WireError, bad_request
from .parser import MAX_LINE, MAX_SETUP_LINES, parse_setup


class SetupReceiver(LineReceiver):
    """A C{LineReceiver} that delivers whole, parsed setup messages."""

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_LINE
    _setup_lines: list[bytes] | None = None

    def setup_active(self) -> bool:
        """Whether lines are wanted now; overridden where a state ignores them."""
        return True

    def setup_received(self, message: Any, lines: list[bytes]) -> None:
        """One parsed message, with the raw lines it came from (a proxy relays them)."""
        raise NotImplementedError

    def setup_failed(self, error: WireError) -> None:
        """A message that could not be read; C{error.code} is what a peer is told."""
        raise NotImplementedError

    def lineReceived(self, line: bytes) -> None:
        if not self.setup_active():
            return
        if self._setup_lines is None:
            self._setup_lines = []
        if line:
            if len(self._setup_lines) >= MAX_SETUP_LINES:
                self.setup_failed(bad_request(f"more than {MAX_SETUP_LINES} lines in a setup message"))
                return
            self._setup_lines.append(line)
            return
        lines, self._setup_lines = self._setup_lines, []
        message = parse_setup(lines)
        if isinstance(message, WireError):
            self.setup_failed(message)
        else:
            self.setup_received(message, lines)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.setup_failed(bad_request(f"line longer than {MAX_LINE} octets"))


def describe_peer(transport: Any) -> tuple[str, str]:
    """The peer's host, and C{host:port} for logs."""
    peer = transport.getPeer()
    host = getattr(peer, "host", "")
    return host, f"{host}:{getattr(peer, 'port', '')}"
