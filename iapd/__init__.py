"""
iapd: the Intrusion Alert Protocol (IAP/0.2) on Twisted.

Sensors deliver intrusion alerts to managers, possibly through chained proxies, over
TLS with mutual certificate authentication.  See ``docs/model.rst`` for the model.
"""

__version__ = "0.1.0"
