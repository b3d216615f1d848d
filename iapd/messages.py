"""
The IAP/0.2 messages of draft section 5.3 as values, each able to write itself.

Serialisation emits exactly the draft's forms (no reason phrase after a status code,
single space separators) because proxies and other implementations compare bytes.
"""

from __future__ import annotations

from typing import Union

import attr

PROTOCOL = "IAP/0.2"
IAP_VERSION = "0.2"
IDEF_ALERT = "application/x-idef-alert"
CRLF = b"\r\n"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ConnectRequest:
    """iap-connect-request: the host the client wants and the proxies it crossed."""

    version: str
    host: str
    via: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        lines = [f"{self.version} CONNECT {self.host}"]
        lines += [f"{self.version} VIA {hop}" for hop in self.via]
        return _block(lines)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Response:
    """iap-response; C{reason} is what a peer sent after the code, if anything."""

    version: str
    code: int
    reason: str | None = None

    def to_bytes(self) -> bytes:
        return _block([f"{self.version} {self.code:03d}"])


@attr.s(frozen=True, slots=True, auto_attribs=True)
class UpgradeRequest:
    """iap-upgrade-request: the client asks to start TLS."""

    version: str
    token: str = "TLS/1.0"

    def to_bytes(self) -> bytes:
        return _block([f"{self.version} Upgrade: {self.token}"])


@attr.s(frozen=True, slots=True, auto_attribs=True)
class VersionVerify:
    """
    iap-verify, sent inside TLS so that a downgraded plaintext CONNECT is detected.
    """

    version: str
    iap_version: str
    sender: bool = False

    def to_bytes(self) -> bytes:
        lines = [f"{self.version} IAP-Version: {self.iap_version}"]
        if self.sender:
            lines.append("IAP-Role: Sender")
        return _block(lines)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ContentHeader:
    """The header of an iap-content message; the body follows in raw mode."""

    content_type: str | None
    content_length: int | None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Content:
    """A whole iap-content message: one alert (or other typed content)."""

    content_type: str
    body: bytes

    def to_bytes(self) -> bytes:
        return b"".join(
            [
                f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n\r\n".encode(
                    "ascii"
                ),
                self.body,
                b"\r\n\r\n",
            ]
        )


SetupMessage = Union[ConnectRequest, Response, UpgradeRequest, VersionVerify]


def _block(lines: list[str]) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("ascii") + CRLF


def ok(version: str = PROTOCOL) -> bytes:
    """The bytes of C{IAP/0.2 200}: the answer sent most often."""
    return Response(version, 200).to_bytes()


def status(code: int, version: str = PROTOCOL) -> bytes:
    return Response(version, code).to_bytes()
