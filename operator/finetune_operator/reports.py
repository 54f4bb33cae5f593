"""The newest progress report of each FineTuneJob, in memory, and what makes a report acceptable.

The progress server puts accepted reports here; the reconciler reads the newest
when it computes a status.  Old or repeated reports are dropped: a retried
trainer's client may deliver an event twice or out of order, and a report from an
earlier attempt must not overwrite the current one.

What the store keeps per job is bounded, and smaller still once the job is final: a finished
job keeps a short loss curve and its headline numbers; only the most recently finished few keep
their sample thumbnails.  Memory does not grow with every job ever run.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from finetune_api.report import ProgressEvent
from finetune_api.v1alpha1 import Stage

Key = tuple[str, str]
FINAL_STAGES = {Stage.DONE, Stage.FAILED}


HISTORY_POINTS = 1000
# A finished job's loss curve: enough for the job page's chart and the list's sparkline.
FINISHED_HISTORY_POINTS = 120
# Finished jobs whose thumbnails stay (newest first); the others keep none.
FINISHED_WITH_THUMBNAILS = 32
# A trainer's clock may run ahead of ours by this much; a report from further ahead would make
# every later report look stale.
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass
class Entry:
    event: ProgressEvent
    received: float
    moment: dt.datetime


@dataclass(frozen=True)
class Rejection:
    """Why a report is refused: a reason (the metric's label) and a sentence for the trainer."""

    reason: str
    message: str


def parse_time(stamp: str) -> dt.datetime | None:
    """An RFC 3339 time with a zone (``Z`` or an offset), or None."""
    try:
        moment = dt.datetime.fromisoformat(stamp.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def check_report(event: ProgressEvent, *, now: dt.datetime | None = None) -> Rejection | None:
    """What the schema cannot say about a report: finite numbers, a step within the run, and a
    time that is a time and not in the future.  None: acceptable.

    A NaN would make the status patch invalid JSON (the apiserver refuses it, and the patch
    would be retried forever); a step past totalSteps a percent above 100, which the CRD
    refuses; a time far ahead would make every later report look stale."""
    for field, value in (
        ("loss", event.loss),
        ("learningRate", event.learning_rate),
        ("stepsPerSecond", event.steps_per_second),
    ):
        if value is not None and not math.isfinite(value):
            return Rejection("NotFinite", f"{field} must be a finite number or null; got {value}")
    if event.total_steps and event.step > event.total_steps:
        return Rejection(
            "OutOfRange", f"step {event.step} is past totalSteps {event.total_steps}: a step counts up to totalSteps"
        )
    moment = parse_time(event.time)
    if moment is None:
        return Rejection(
            "BadTime", f"time must be an RFC 3339 time with a zone, e.g. 2026-01-02T03:04:05Z; got {event.time!r}"
        )
    now = now or dt.datetime.now(dt.UTC)
    if moment - now > CLOCK_SKEW:
        return Rejection("BadTime", f"time {event.time} is in the future: check the clock of the trainer's node")
    return None


def _thin(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Halve a full history, keeping the first and the newest point: old detail goes first."""
    return [*points[:-1:2], points[-1]]


def _shrink(points: list[tuple[int, float]], size: int) -> list[tuple[int, float]]:
    while len(points) > size:
        points = _thin(points)
    return points


class ProgressStore:
    def __init__(self, *, on_update: Callable[[Key, bool], None] | None = None) -> None:
        self._entries: dict[Key, Entry] = {}
        self._history: dict[Key, list[tuple[int, float]]] = {}
        # Finished jobs that still have their thumbnails, oldest first: whose to drop next.
        self._finished: OrderedDict[Key, None] = OrderedDict()
        self._done: set[Key] = set()
        self.on_update = on_update

    def accept(self, key: Key, event: ProgressEvent) -> bool:
        """Keep ``event`` if it is newer than what we have; tell the reconciler.  False: stale.

        ``event`` must have passed ``check_report`` (its time parses)."""
        moment = parse_time(event.time) or dt.datetime.now(dt.UTC)
        current = self._entries.get(key)
        if current is not None:
            old = current.event
            if old.attempt == event.attempt and event.seq <= old.seq:
                return False
            if old.attempt != event.attempt and moment < current.moment:
                return False
        if event.settings:
            # Only the trainer's log and manifest need its settings; the status does not show them.
            event = event.model_copy(update={"settings": {}})
        self._entries[key] = Entry(event, time.monotonic(), moment)
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

    def finish(self, key: Key) -> None:
        """The job is final: keep only what the web page shows of a finished job."""
        if key in self._done:
            return
        self._done.add(key)
        self._finished[key] = None
        entry = self._entries.get(key)
        if entry is not None:
            entry.event = entry.event.model_copy(
                update={"files": [], "checkpoints": [], "samples": [], "settings": {}, "warnings": [], "message": ""}
            )
        history = self._history.get(key)
        if history:
            self._history[key] = _shrink(history, FINISHED_HISTORY_POINTS)
        while len(self._finished) > FINISHED_WITH_THUMBNAILS:
            oldest, _ = self._finished.popitem(last=False)
            old = self._entries.get(oldest)
            if old is not None and old.event.thumbnails:
                old.event = old.event.model_copy(update={"thumbnails": []})

    def latest(self, key: Key) -> ProgressEvent | None:
        entry = self._entries.get(key)
        return entry.event if entry else None

    def history(self, key: Key) -> list[tuple[int, float]]:
        """(step, loss) points reported so far, thinned to at most about a thousand."""
        return list(self._history.get(key, []))

    def forget(self, key: Key) -> None:
        self._entries.pop(key, None)
        self._history.pop(key, None)
        self._finished.pop(key, None)
        self._done.discard(key)

    def retained_bytes(self) -> int:
        """About how many bytes of reports and loss curves the store holds (for tests and
        /metrics): the JSON size of every kept event plus 16 bytes a history point."""
        events = sum(len(e.event.model_dump_json()) for e in self._entries.values())
        return events + 16 * sum(len(h) for h in self._history.values())

    def __len__(self) -> int:
        return len(self._entries)
