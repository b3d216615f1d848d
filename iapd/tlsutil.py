"""Small facts about a pyOpenSSL connection that pyOpenSSL has no public call for."""

from __future__ import annotations

from typing import Any


def session_reused(connection: Any) -> bool | None:
    """
    Whether a pyOpenSSL connection resumed a session; None when that cannot be told.

    pyOpenSSL has no public call for it, so this asks OpenSSL through the bindings
    pyOpenSSL itself uses; it is only ever used for logs and tests.
    """
    try:
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(connection._ssl))
    except (ImportError, AttributeError):
        return None
