"""Garbage-collector settings for a node that holds thousands of long-lived connections."""

from __future__ import annotations

import gc

# CPython collects the young generation after every 700 net allocations of tracked objects. A
# connection storm allocates tens of thousands per second, so young collections run hundreds of
# times a second, and each older collection walks every live connection's objects again. Almost
# everything a node frees is freed by reference counting; the cyclic collector only has to catch
# rare cycles, so it can run far less often. Measured with `./scripts/bench cluster --scenarios
# storm --systems testpulse`: node CPU per join -17%.
YOUNG_THRESHOLD = 20_000
MIDDLE_EVERY = 20  # young collections per middle-generation collection
OLD_EVERY = 10  # middle collections per full collection (CPython also waits for 25% growth)


def tune_for_long_lived_connections() -> None:
    """Move everything created by imports and start-up into the permanent generation (never
    scanned again), then collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_EVERY, OLD_EVERY)
