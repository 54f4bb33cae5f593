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

from finetune_operator.api.report import ProgressEvent
from finetune_operator.api.v1alpha1 import Stage

Key = tuple[str, str]
FINAL_STAGES = {Stage.DONE, Stage.FAILED}


@dataclass
class Entry:
    event: ProgressEvent
    received: float


class ProgressStore:
    def __init__(self, *, on_update: Callable[[Key, bool], None] | None = None) -> None:
        self._entries: dict[Key, Entry] = {}
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
        if self.on_update is not None:
            self.on_update(key, event.stage in FINAL_STAGES)
        return True

    def latest(self, key: Key) -> ProgressEvent | None:
        entry = self._entries.get(key)
        return entry.event if entry else None

    def forget(self, key: Key) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
