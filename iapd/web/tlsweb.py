"""
HTTPS for the dashboard (C{web.tls}): iapd's TLS profile, and client certificates when
C{web.auth.client_certificates} is set.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import crypto
from twisted.internet import ssl

from ..config import ConfigError
from ..tls import TLSSetupError, tls_profile, trust_root, to_pyopenssl, load_material
from .config import WebConfig


def web_tls_options(web: WebConfig, where: str) -> Any:
    """
    Server options for the web listener: TLS 1.2 or later with iapd's suites; a client
    certificate chained to C{web.tls.ca} is required only when client certificates
    are the (or an) authentication, otherwise none is asked for.
    """
    assert web.tls is not None
    try:
        material = load_material(web.tls.certificate, web.tls.key, web.tls.ca)
    except TLSSetupError as e:
        raise ConfigError(f"{where}: web.tls: {e}") from None
    options: dict[str, Any] = dict(
        privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, material.key_pem),
        certificate=to_pyopenssl(material.certificate),
        extraCertChain=[to_pyopenssl(c) for c in material.chain] or None,
        **tls_profile(),
    )
    if web.client_certificates:
        options["trustRoot"] = trust_root(material)  # a verified client certificate is required
    return ssl.CertificateOptions(**options)
