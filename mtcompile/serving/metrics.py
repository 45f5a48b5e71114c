"""Per-tenant counters of a scheduler: requests done, failed and rejected, batch sizes,
calls by kind and latency percentiles (submit to result)."""

from __future__ import annotations

import threading
from collections import Counter, deque

import numpy as np

LATENCY_WINDOW = 10_000  # percentiles over the latest requests of a tenant
PERCENTILES = (50, 90, 99)


class TenantMetrics:
    """One tenant's counters; safe to update from the loop and the submitting threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()  # done, failed, rejected
        self._batches: Counter[int] = Counter()  # requests per call -> calls
        self._rows: Counter[int] = Counter()  # rows per call (a stacking tenant) -> calls
        self._calls: Counter[str] = Counter()  # run_all, run, retry -> calls
        self._latency: deque[float] = deque(maxlen=LATENCY_WINDOW)  # seconds

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self._counts[what] += n

    def call(self, kind: str, requests: int, rows: int) -> None:
        """A bundle call that carried `requests` of this tenant (`rows` rows in all)."""
        with self._lock:
            self._calls[kind] += 1
            self._batches[requests] += 1
            self._rows[rows] += 1

    def finished(self, ok: bool, seconds: float) -> None:
        with self._lock:
            self._counts["done" if ok else "failed"] += 1
            self._latency.append(seconds)

    def snapshot(self, queue_depth: int) -> dict:
        """A JSON-serializable view; latency in milliseconds (None before any request)."""
        with self._lock:
            lat = np.array(self._latency) * 1e3
            return {
                "queue_depth": queue_depth,
                "done": self._counts["done"],
                "failed": self._counts["failed"],
                "rejected": self._counts["rejected"],
                "batch_sizes": dict(sorted(self._batches.items())),
                "batch_rows": dict(sorted(self._rows.items())),
                "calls": dict(sorted(self._calls.items())),
                "latency_ms": {
                    f"p{q}": (float(np.percentile(lat, q)) if lat.size else None)
                    for q in PERCENTILES
                },
            }
