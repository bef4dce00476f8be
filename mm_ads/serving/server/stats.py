"""Thread-safe counters of the prediction server (requests, errors, unknown items), read by `/v1/stats`."""

import collections
import threading


class ServingStats:
    """Named integer counters, incremented from request threads.

    Example:

    >>> s = ServingStats()
    >>> s.add(rank_requests=1, candidates=200, candidates_unknown=3)
    >>> s.snapshot()["candidates_unknown"]
    3
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = collections.Counter()

    def add(self, **counts):
        with self._lock:
            self._counts.update({k: int(v) for k, v in counts.items()})

    def snapshot(self):
        """`{counter: value}` (a copy)."""
        with self._lock:
            return dict(self._counts)
