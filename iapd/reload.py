"""
SIGHUP: re-read the configuration file and swap in new certificates, keys, CAs and
allow-lists without a restart.

The signal handler itself only schedules the work on the reactor (a handler may run
between any two bytecodes of reactor code).  The reload then runs as one step: the new
configuration is loaded and checked completely, and only if all of it is good does it
replace the running one, so a half-edited file or a key that does not match its
certificate leaves the daemon exactly as it was, with one log line saying why.
Listeners, stores and other wiring are not rebuilt: when those keys changed, the log
says that a restart is needed for them.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Callable

from twisted.application import service
from twisted.logger import Logger

from .config import ConfigError

log = Logger(namespace="iapd.reload")


class ReloadOnHangup(service.Service):
    """
    Calls C{reload()} on the reactor each time the process gets SIGHUP.

    The handler goes in at L{privilegedStartService}, and the daemons add this service
    before their listeners: twistd binds listening ports there, before the reactor
    runs and long before L{startService}, and SIGHUP's default action ends the
    process.  A SIGHUP in between (a log rotation, an operator who saw the port open)
    took the daemon down.  One that comes before the services have started reloads
    once they all have.
    """

    def __init__(self, reactor: Any, reload: Callable[[], None], what: str) -> None:
        self.reactor = reactor
        self.reload = reload
        self.what = what
        self._previous: Any = None
        self._held = False  # a SIGHUP came before startService

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._install()

    def startService(self) -> None:
        super().startService()
        self._install()
        log.info("{what}: send SIGHUP to reload certificates, keys, CAs and allow-lists", what=self.what)
        if self._held:
            # once every service has started (they start one after the other, now)
            self._held = False
            self.reactor.callLater(0, self._run)

    def _install(self) -> None:
        if self._previous is None:
            self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._run)

    def _run(self) -> None:
        if not self.running:
            self._held = True
            return
        try:
            self.reload()
        except Exception:
            # a reload must never take a running daemon down
            log.failure("{what}: reload failed; the running configuration stays", what=self.what)


def changed_keys(old: Any, new: Any, keys: tuple[str, ...]) -> list[str]:
    """The attributes among C{keys} that differ between two configurations."""
    return [k for k in keys if getattr(old, k) != getattr(new, k)]


def load_again(path: Path, load: Callable[[Path], Any], tls: bool = True, failed: Any = None,
               web: Any = None) -> tuple[Any, Any] | None:
    """
    C{(config, TLS material)} read afresh from C{path}, or None when any of it is
    wrong: then one log line names the key and why, and C{failed()} counts it.  With
    C{web} (the HTTPS listener's L{iapd.web.tlsweb.ReloadableWebTLS}), its files are
    read again too, for the caller to L{commit<iapd.web.tlsweb.ReloadableWebTLS.commit>}
    once it has applied the rest.
    """
    try:
        config = load(path)
        material = config.tls.load(str(path)) if tls else None
        if web is not None:
            web.prepare()
    except ConfigError as e:
        if failed is not None:
            failed()
        log.error("reload of {path} refused, the running configuration stays: {error}", path=str(path), error=str(e))
        return None
    return config, material


def web_reloaded(web: Any) -> None:
    """Serve the files L{load_again} read for the HTTPS listener C{web}, and say so."""
    web.commit()
    log.info(
        "reloaded web.tls: {subject} (valid until {until}) for new connections to {listen}",
        subject=web.material.certificate.subject.rfc4514_string(), listen=web.web.listen,
        until=f"{web.material.not_after():%Y-%m-%d %H:%M} UTC",
    )


def warn_restart_keys(old: Any, new: Any, keys: tuple[str, ...], path: Path) -> None:
    """Say which changed keys a reload could not apply."""
    stale = changed_keys(old, new, keys)
    if stale:
        log.warn(
            "reload: {keys} changed in {path}; they take effect only after a restart",
            keys=", ".join(k.replace("_", ".") for k in stale), path=str(path),
        )
