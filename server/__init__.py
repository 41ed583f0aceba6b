"""testpulse: a real-time test-execution hub on a Redis-backed Socket.IO cluster."""

__version__ = "0.1.0"
