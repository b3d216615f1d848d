"""
Protocol errors as values, each bound to the IAP status code the peer is told.

The parser never raises on bad bytes: it returns a L{WireError}, and the role decides
what to do with it.  C{fatal} says whether the byte stream can still be framed after the
error: when it cannot (a lost Content-Length, an oversize body) the only safe answer is
the status code followed by a close; when it can (an unknown content type, draft 4.3)
the alert is refused and the connection kept.
"""

from __future__ import annotations

import attr

REASONS = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    505: "Version Not Supported",
}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class WireError:
    """
    What went wrong, in words for the log, and the status code that answers it.
    """

    code: int
    reason: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.code} {REASONS.get(self.code, '')}: {self.reason}".replace("  ", " ")


def bad_request(reason: str, fatal: bool = True) -> WireError:
    return WireError(400, reason, fatal)


class IAPFailure(Exception):
    """
    Raised to a local caller (the sensor API, the CLI) when a peer answered with an
    error status or broke the protocol; carries the status code when there was one.
    """

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def __str__(self) -> str:
        if self.code is None:
            return self.reason
        return f"{self.code} {REASONS.get(self.code, '')}: {self.reason}".replace("  ", " ")
