"""
Password hashes for the dashboard's HTTP Basic authentication (C{web.auth.password_hash}).

The hash is scrypt (RFC 7914, C{hashlib.scrypt}: the standard library, no extra
package) written in the PHC string format that passlib and others use::

    $scrypt$ln=15,r=8,p=1$<salt, base64 without padding>$<32-octet key, same>

C{ln} is log2 of scrypt's N.  The default (N=2**15, r=8, p=1) costs about 32 MiB and
some 60 ms per check here; the dashboard checks a password once and then remembers the
credentials it accepted for a while (L{iapd.web.auth}), so the cost is paid per login,
not per request.

Make a hash with::

    python3 -m iapd.web.password            # asks twice, prints the line for manager.yaml
    printf '%s' "$PW" | python3 -m iapd.web.password --stdin
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import re
import sys

import attr

SCHEME = "scrypt"
DEFAULT_LOG_N = 15
DEFAULT_R = 8
DEFAULT_P = 1
KEY_LENGTH = 32
SALT_LENGTH = 16

# Bounds on what a hash in a configuration file may ask for: a typo must not make each
# check cost gigabytes of memory or minutes of CPU.
_MAX_LOG_N = 20
_MAX_R = 32
_MAX_P = 16
_MAX_MEMORY = 1 << 31

_PHC = re.compile(
    r"\$scrypt\$ln=(?P<ln>\d{1,2}),r=(?P<r>\d{1,3}),p=(?P<p>\d{1,3})"
    r"\$(?P<salt>[A-Za-z0-9+/]{11,88})\$(?P<key>[A-Za-z0-9+/]{22,88})\Z"
)


class PasswordHashError(ValueError):
    """A C{password_hash} that is not one this module wrote; the message says why."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@attr.s(frozen=True, auto_attribs=True)
class PasswordHash:
    """A parsed C{$scrypt$...} string."""

    log_n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, text: str) -> "PasswordHash":
        if not isinstance(text, str):
            raise PasswordHashError(f"must be a string like $scrypt$ln=15,r=8,p=1$SALT$KEY, got {text!r}")
        m = _PHC.match(text.strip())
        if m is None:
            raise PasswordHashError(
                "not an scrypt hash like $scrypt$ln=15,r=8,p=1$SALT$KEY "
                "(make one with: python3 -m iapd.web.password)"
            )
        log_n, r, p = int(m["ln"]), int(m["r"]), int(m["p"])
        if not (1 <= log_n <= _MAX_LOG_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
            raise PasswordHashError(f"scrypt parameters out of bounds (ln 1-{_MAX_LOG_N}, r 1-{_MAX_R}, p 1-{_MAX_P})")
        if _memory(log_n, r) > _MAX_MEMORY:
            raise PasswordHashError("scrypt parameters would need more than 2 GiB per check")
        key = _unb64(m["key"])
        if len(key) < 16:
            raise PasswordHashError("the derived key is shorter than 16 octets")
        return cls(log_n, r, p, _unb64(m["salt"]), key)

    def __str__(self) -> str:
        return f"${SCHEME}$ln={self.log_n},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.key)}"

    def verify(self, password: str) -> bool:
        """Whether C{password} derives this key; the comparison takes constant time."""
        candidate = _derive(password.encode("utf-8"), self.salt, self.log_n, self.r, self.p, len(self.key))
        return hmac.compare_digest(candidate, self.key)


def _memory(log_n: int, r: int) -> int:
    return 128 * r * (1 << log_n)


def _derive(password: bytes, salt: bytes, log_n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=1 << log_n, r=r, p=p, dklen=length, maxmem=_memory(log_n, r) * 2 + (1 << 20)
    )


def hash_password(password: str, log_n: int = DEFAULT_LOG_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    """A new C{$scrypt$...} string for C{password}, with a random salt."""
    salt = os.urandom(SALT_LENGTH)
    return str(PasswordHash(log_n, r, p, salt, _derive(password.encode("utf-8"), salt, log_n, r, p, KEY_LENGTH)))


def hash_problem(text: object) -> str | None:
    """Why C{text} cannot be used as C{web.auth.password_hash}, or None."""
    try:
        PasswordHash.parse(text)  # type: ignore[arg-type]
    except PasswordHashError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m iapd.web.password",
        description="Print an scrypt hash of a dashboard password, for web.auth.password_hash in manager.yaml.",
    )
    parser.add_argument("--stdin", action="store_true", help="read the password from standard input (one line)")
    args = parser.parse_args(argv)
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("dashboard password: ")
        if getpass.getpass("again: ") != password:
            print("the two passwords differ", file=sys.stderr)
            return 1
    if len(password) < 8:
        print("refusing a password shorter than 8 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
