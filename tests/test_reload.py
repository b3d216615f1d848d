"""
ReloadOnHangup with real signals sent to this process: SIGHUP is taken from the moment
the listeners bind (privilegedStartService), and a reload asked for before the services
have started runs once they all have.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application import service
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest

from iapd.reload import ReloadOnHangup


class Later(service.Service):
    """A service started after ReloadOnHangup, as the daemons' listeners are."""


class ReloadOnHangupTests(unittest.TestCase):
    @inlineCallbacks
    def test_a_sighup_before_start_is_held_until_every_service_has_started(self) -> Any:
        before = signal.getsignal(signal.SIGHUP)
        top = service.MultiService()
        later = Later()
        seen: list[bool] = []
        ReloadOnHangup(reactor, lambda: seen.append(later.running), "test").setServiceParent(top)
        later.setServiceParent(top)
        top.privilegedStartService()
        self.assertIsNot(signal.getsignal(signal.SIGHUP), before)
        os.kill(os.getpid(), signal.SIGHUP)  # this process would end without the handler
        yield deferLater(reactor, 0.1)
        self.assertEqual(seen, [])  # held: nothing has started
        top.startService()
        yield deferLater(reactor, 0.1)
        self.assertEqual(seen, [True])  # once, after every service started
        os.kill(os.getpid(), signal.SIGHUP)
        yield deferLater(reactor, 0.1)
        self.assertEqual(seen, [True, True])
        yield top.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)
