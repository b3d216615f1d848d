"""
HTTPS for the dashboard (C{web.tls}): iapd's TLS profile, and client certificates when
C{web.auth.client_certificates} is set; the files are read again on SIGHUP, like the
daemon's own.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from ..config import ConfigError
from ..tls import (
    TLSSetupError,
    chain_to_send,
    load_material,
    send_own_chain_only,
    tls_profile,
    to_pyopenssl,
    trust_root,
)
from .config import WebConfig


def web_tls_options(web: WebConfig, where: str) -> tuple[Any, Any]:
    """
    Server options for the web listener, and the material they were made of: TLS 1.2
    or later with iapd's suites; a client certificate chained to C{web.tls.ca} is
    required only when client certificates are the (or an) authentication, otherwise
    none is asked for.  Raises L{ConfigError} naming C{web.tls}.
    """
    assert web.tls is not None
    try:
        material = load_material(web.tls.certificate, web.tls.key, web.tls.ca)
    except TLSSetupError as e:
        raise ConfigError(f"{where}: web.tls: {e}") from None
    options: dict[str, Any] = dict(
        privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, material.key_pem),
        certificate=to_pyopenssl(material.certificate),
        extraCertChain=[to_pyopenssl(c) for c in chain_to_send(material)] or None,
        **tls_profile(),
    )
    if web.client_certificates:
        options["trustRoot"] = trust_root(material)  # a verified client certificate is required
    made = ssl.CertificateOptions(**options)
    try:
        send_own_chain_only(made.getContext())  # made at first use otherwise: check everything now
    except SSL.Error as e:
        raise ConfigError(f"{where}: web.tls: OpenSSL refuses it: {e}") from None
    return made, material


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableWebTLS:
    """
    The web listener's TLS options, which a SIGHUP replaces while it listens.

    An operator who rotates the dashboard's certificate (or, with C{tls: manager}, the
    manager's own pair) sends SIGHUP as for the daemon's: before, the daemon took the
    new files and the dashboard went on serving the old certificate, expired or
    revoked, until a restart.  Each new connection takes the options of the moment;
    open connections keep the session they have.  The files are those the running
    C{web.tls} names: other paths need a restart, like the rest of C{web}.
    """

    def __init__(self, web: WebConfig, where: str) -> None:
        self.web = web
        self.where = where
        self.options, self.material = web_tls_options(web, where)
        self._staged: tuple[Any, Any] | None = None

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return SSL.Connection(self.options.getContext(), None)

    def prepare(self) -> None:
        """
        Read the files again, for L{commit}; raises L{ConfigError} naming C{web.tls}
        when they cannot be used.  Nothing changes yet: a reload is refused whole when
        any part of it fails.
        """
        self._staged = web_tls_options(self.web, self.where)

    def commit(self) -> None:
        """Serve what L{prepare} read to the connections that come next."""
        if self._staged is not None:
            (self.options, self.material), self._staged = self._staged, None
