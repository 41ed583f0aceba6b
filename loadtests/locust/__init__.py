"""Locust scenarios that drive a testpulse cluster through its proxy and fail when an objective is missed.

Locustfiles (one per scenario, runnable with `locust -f loadtests/locust/<scenario>.py`): storm.py,
fanout.py, reconnect.py, steady.py. Shared parts: client.py (the Socket.IO client as Locust sees
it), delivery.py (the per-session seq check), users.py (viewer, detector and operator behaviour),
control.py (options, run phases, cross-process counters, the load shape, the summary) and slo.py
(the objectives gate). Run them with `testpulse loadtest` (see loadtests/README.md).
"""
