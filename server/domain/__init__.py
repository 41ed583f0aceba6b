"""The domain: sessions and their state machine, per-session ordering, the status trail, presence,
the wire contract's payloads and error codes, tokens, disconnect reasons and rate limits.

Guarantee: pure rules, no I/O of its own. It imports no socketio, engineio, starlette, redis or
sqlalchemy (the layer contract in pyproject.toml says so, and CI checks it); what it needs from the
outside it asks for through the Protocols in sessions.py (EventLog, SessionStore, ...)."""
