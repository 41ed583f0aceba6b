"""Between nodes, over Redis: our python-socketio client manager (broker.py: room broadcasts and
cross-node messages) over one subscription set and pub/sub link (link.py) that a topology strategy
places: one Redis (single.py), a Sentinel-managed one (sentinel.py), or a Redis Cluster's sharded
channels (cluster.py); the bounded outbox in front of it; the presence board; Redis clients for
every URL form.

Guarantee: a node's messages for a session reach every other node in the order they were sent, or
the receiving node is told to resync from the store (it never silently skips one)."""
