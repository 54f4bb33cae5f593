"""A work queue of keys, as client-go's rate-limited delaying queue has it, with priorities.

Watches add the key of whatever changed; workers ``get`` a key, process it and say ``done``.
What the queue promises:

- A key waits at most once: adding it again while it waits changes nothing, except that a more
  urgent priority moves it up (a thousand events of one object cost one reconcile).
- A key is handed to one worker at a time: added while a worker holds it, it waits until that
  worker is ``done`` and is then handed out again (the worker may have read the state from
  before the change), never to a second worker meanwhile.
- Lower priority numbers go first; keys of one priority go in the order they were added.
- ``add(key, delay=s)`` adds it ``s`` seconds from now (on the event loop's clock); of several
  such requests for one key the earliest is kept.
- ``retry(key)`` adds it after a pause that doubles with each failure of that key, up to
  ``max_delay``, with jitter so that keys that failed together do not all return together;
  ``forget(key)`` ends its run of failures.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


def _jitter() -> float:
    return 0.8 + 0.4 * random.random()


class WorkQueue(Generic[K]):
    """Keys waiting to be processed.  ``priority(key)`` is asked when a key is added."""

    def __init__(
        self,
        *,
        priority: Callable[[K], int] = lambda key: 0,
        base_delay: float = 0.5,
        max_delay: float = 60.0,
        jitter: Callable[[], float] = _jitter,
    ) -> None:
        self._priority = priority
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._jitter = jitter
        # (priority, sequence, key); an entry whose key now waits under another (priority,
        # sequence) is stale and skipped: moving a key up leaves its old entry behind.
        self._heap: list[tuple[int, int, K]] = []
        self._waiting: dict[K, tuple[int, int]] = {}
        self._by_priority: Counter[int] = Counter()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[K, int] = {}
        self._sequence = itertools.count()
        self._added = asyncio.Event()

    def __len__(self) -> int:
        """The number of keys waiting (not those being processed or due later)."""
        return len(self._waiting)

    def waiting(self, *, priority: int) -> int:
        """The number of keys waiting with ``priority`` or a more urgent one."""
        return sum(count for number, count in self._by_priority.items() if number <= priority)

    def is_processing(self, key: K) -> bool:
        return key in self._processing

    def due(self, key: K) -> float | None:
        """When (on the loop's clock) a delayed add of ``key`` is due, if one is pending."""
        timer = self._timers.get(key)
        return timer[0] if timer else None

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    # --- adding ----------------------------------------------------------------------------------

    def add(self, key: K, *, delay: float = 0.0) -> None:
        """Have ``key`` processed (after ``delay`` seconds); repeated requests coalesce."""
        if delay > 0:
            self._add_after(key, delay)
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        priority = self._priority(key)
        current = self._waiting.get(key)
        if current is not None:
            if current[0] <= priority:
                return
            self._by_priority[current[0]] -= 1
        entry = (priority, next(self._sequence))
        self._waiting[key] = entry
        self._by_priority[priority] += 1
        # Entries never tie on (priority, sequence), so keys are never compared.
        heapq.heappush(self._heap, (*entry, key))
        self._added.set()

    def _add_after(self, key: K, delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._fire, key))

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def retry(self, key: K) -> float:
        """Add ``key`` again after its backoff; the pause, in seconds."""
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(self.max_delay, self.base_delay * 2 ** min(failures, 16)) * self._jitter()
        self.add(key, delay=delay)
        return delay

    def forget(self, key: K) -> None:
        """The key was processed without a failure: its next failure starts the backoff afresh."""
        self._failures.pop(key, None)

    # --- taking ----------------------------------------------------------------------------------

    async def get(self) -> K:
        """The most urgent waiting key, once there is one; it is the caller's until ``done``."""
        while True:
            while self._heap:
                priority, sequence, key = heapq.heappop(self._heap)
                if self._waiting.get(key) != (priority, sequence):
                    continue
                del self._waiting[key]
                self._by_priority[priority] -= 1
                self._processing.add(key)
                return key
            self._added.clear()
            await self._added.wait()

    def done(self, key: K) -> None:
        """The worker is finished with ``key``; if it was added meanwhile, it waits again."""
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def close(self) -> None:
        """Cancel the delayed adds (the keys waiting stay, for nobody)."""
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
