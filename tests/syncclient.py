"""
A blocking IAP sensor written with the standard library's socket and ssl modules.

Tests that drive a manager in another process use it to hold a connection open across
an event in that process (a SIGHUP), and to see exactly which certificate the manager
presented.  It is a second, independent implementation of the sensor side of the draft's
section 5.4 transcript: real TCP, real TLS (OpenSSL through Python's ssl module).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

CT = b"application/x-idef-alert"


class Refused(Exception):
    """The manager answered a setup step with C{code} (None: TLS failed or it hung up)."""

    def __init__(self, code: int | None, step: str) -> None:
        super().__init__(f"{step}: {code}")
        self.code, self.step = code, step


class SyncSensor:
    def __init__(
        self, port: int, manager: str, certificate: Path, key: Path, ca: Path, timeout: float = 10
    ) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(str(certificate), str(key))
        self.port, self.manager, self.timeout = port, manager, timeout
        self.sock: socket.socket | ssl.SSLSocket | None = None
        self._buffer = b""

    def _message(self) -> bytes:
        """One message ending in an empty line, or b"" if the peer hung up first."""
        assert self.sock is not None
        while b"\r\n\r\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except (ssl.SSLError, ConnectionError):
                chunk = b""
            if not chunk:
                return b""
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        return message

    def _status(self, step: str) -> int:
        message = self._message()
        if not message.startswith(b"IAP/0.2 "):
            raise Refused(None, step)
        return int(message.split()[1])

    def _expect(self, wanted: int, step: str) -> None:
        code = self._status(step)
        if code != wanted:
            raise Refused(code, step)

    def connect(self) -> "SyncSensor":
        """Setup through to the data phase; raises L{Refused} naming the failed step."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        self.sock = raw
        raw.sendall(b"IAP/0.2 CONNECT " + self.manager.encode() + b"\r\n\r\n")
        self._expect(200, "connect")
        raw.sendall(b"IAP/0.2 Upgrade: TLS/1.0\r\n\r\n")
        self._expect(101, "upgrade")
        try:
            self.sock = self.context.wrap_socket(raw, server_hostname=self.manager)
        except (ssl.SSLError, ConnectionError):
            raise Refused(None, "handshake") from None
        self.sock.sendall(b"IAP/0.2 IAP-Version: 0.2\r\nIAP-Role: Sender\r\n\r\n")
        self._expect(200, "verify")
        if not self._message().startswith(b"IAP/0.2 IAP-Version: 0.2"):
            raise Refused(None, "manager verify")
        self.sock.sendall(b"IAP/0.2 200\r\n\r\n")
        return self

    @property
    def manager_certificate(self) -> bytes:
        """The DER certificate the manager presented on this connection."""
        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return der

    def send(self, body: bytes, content_type: bytes = CT) -> int:
        """One alert, stop-and-wait: the status code the manager answered."""
        assert self.sock is not None
        self.sock.sendall(
            b"Content-Type: " + content_type + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body + b"\r\n\r\n"
        )
        return self._status("alert")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "SyncSensor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
