"""Between nodes, over Redis: our python-socketio client manager (broker.py: room broadcasts and
cross-node messages), on one Redis, a Sentinel-managed one, or a Redis Cluster's sharded channels
(shards.py); the bounded outbox in front of it; the presence board; Redis clients for every URL form.

Guarantee: a node's messages for a session reach every other node in the order they were sent, or
the receiving node is told to resync from the store (it never silently skips one)."""
