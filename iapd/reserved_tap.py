"""
Plugin names reserved for roles that later versions add (C{iap-proxy}, C{iap-sensor}).

Registering them now keeps C{twistd --help} honest about the suite's shape and makes a
premature C{twistd iap-proxy} fail with a sentence instead of "unknown command".
"""

from __future__ import annotations

from twisted.application import service
from twisted.python import usage


def reserved(name: str, instead: str) -> tuple[type[usage.Options], object]:
    class Options(usage.Options):
        synopsis = "-c CONFIG.yaml"
        optParameters = [["config", "c", None, "the role's YAML configuration"]]

        def postOptions(self) -> None:
            raise usage.UsageError(f"{name} is not available in this version of iapd; {instead}")

    def makeService(options: usage.Options) -> service.IService:  # never reached
        raise usage.UsageError(f"{name} is not available in this version of iapd")

    return Options, makeService
