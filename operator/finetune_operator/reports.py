"""The newest progress report of each FineTuneJob, in memory.

The progress server puts accepted reports here; the reconciler reads the newest
when it computes a status.  Old or repeated reports are dropped: a retried
trainer's client may deliver an event twice or out of order, and a report from an
earlier attempt must not overwrite the current one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from finetune_api.report import ProgressEvent
from finetune_api.v1alpha1 import Stage

Key = tuple[str, str]
FINAL_STAGES = {Stage.DONE, Stage.FAILED}


HISTORY_POINTS = 1000


@dataclass
class Entry:
    event: ProgressEvent
    received: float


def _thin(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Halve a full history, keeping the first and the newest point: old detail goes first."""
    return [*points[:-1:2], points[-1]]


class ProgressStore:
    def __init__(self, *, on_update: Callable[[Key, bool], None] | None = None) -> None:
        self._entries: dict[Key, Entry] = {}
        self._history: dict[Key, list[tuple[int, float]]] = {}
        self.on_update = on_update

    def accept(self, key: Key, event: ProgressEvent) -> bool:
        """Keep ``event`` if it is newer than what we have; tell the reconciler.  False: stale."""
        current = self._entries.get(key)
        if current is not None:
            old = current.event
            if old.attempt == event.attempt and event.seq <= old.seq:
                return False
            if old.attempt != event.attempt and event.time < old.time:
                return False
        self._entries[key] = Entry(event, time.monotonic())
        if event.loss is not None:
            history = self._history.setdefault(key, [])
            if not history or event.step > history[-1][0]:
                history.append((event.step, event.loss))
            elif event.step < history[-1][0]:
                # A resumed run repeats steps: keep the curve of the run that is going on.
                history[:] = [p for p in history if p[0] < event.step]
                history.append((event.step, event.loss))
            if len(history) > HISTORY_POINTS:
                history[:] = _thin(history)
        if self.on_update is not None:
            self.on_update(key, event.stage in FINAL_STAGES)
        return True

    def latest(self, key: Key) -> ProgressEvent | None:
        entry = self._entries.get(key)
        return entry.event if entry else None

    def history(self, key: Key) -> list[tuple[int, float]]:
        """(step, loss) points reported so far, thinned to at most about a thousand."""
        return list(self._history.get(key, []))

    def forget(self, key: Key) -> None:
        self._entries.pop(key, None)
        self._history.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
