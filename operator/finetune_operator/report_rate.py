"""How often one job's trainer may report: a token bucket per FineTuneJob.

A trainer reports at every stage change and every few seconds while training; a pod that posts
faster (a bug, or a tenant who wants the operator's attention) gets 429 with Retry-After, as
Kubeflow's progress server answers, so that one job cannot take the progress endpoint, the
operator's memory or the other tenants' status writes.  The bucket fills at ``per_second`` up to
``burst``; the trainer's pusher backs off on 429 and keeps only its newest event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

# Far above an honest trainer (a report per stage change, one every 3 s while training).
BURST = 20
PER_SECOND = 2.0
# Buckets of jobs that stopped reporting are dropped once this many are kept.
MAX_KEPT = 10_000


class ReportRate:
    def __init__(
        self,
        *,
        burst: int = BURST,
        per_second: float = PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}

    def allow(self, key: Hashable) -> float | None:
        """None if ``key`` may report now (and takes a token); else the seconds until it may."""
        now = self.clock()
        tokens, then = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.per_second)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.per_second
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_KEPT:
            self._prune(now)
        return None

    def _prune(self, now: float) -> None:
        """Drop the buckets that have filled again: forgetting them changes nothing."""
        full = [
            k for k, (tokens, then) in self._buckets.items() if tokens + (now - then) * self.per_second >= self.burst
        ]
        for key in full:
            del self._buckets[key]
