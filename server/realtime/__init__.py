"""The Socket.IO side of a node: the event handlers (handlers.py: authenticate, rate-limit, validate,
call the hub, answer) and the per-node session feeds that write to local viewers (feeds.py).

Guarantee: a viewer receives its sessions' detections in seq order, each exactly once, replay first."""
