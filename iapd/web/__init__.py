"""
The manager's web listener (C{web.listen}): C{/metrics} for Prometheus, and the
dashboard and JSON API.

It runs in the manager's process on the same reactor, so it must never block: every
store read goes to a thread.  Everything it serves is read-only.
"""
