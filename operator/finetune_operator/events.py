"""Kubernetes Events posted in the background, never in a reconcile's way.

A new FineTuneJob gets a few Events (Queued, a first pod scheduled, ...) at the moment its Job is
created; awaited inline, each was another round trip before the next job's Job.  The reconciler
hands them to an ``EventEmitter`` instead: a bounded queue that one task drains, one Event at a
time, pausing while ``defer()`` says more urgent writes wait (Job creates).  When the queue is
full an Event is dropped with a warning and counted: a reconcile never waits for an Event.
Each Event keeps the time it was emitted, not the time it was posted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator.kubeapi import KubeAPI

LOG = logging.getLogger("finetune_operator.events")

CAPACITY = 4096
# While more urgent writes wait, an Event waits too, this long at a time, up to DEFER_LIMIT
# in all: a steady stream of new jobs must not keep Events back for ever.
DEFER_PAUSE = 0.05
DEFER_LIMIT = 5.0


@dataclass(frozen=True)
class PendingEvent:
    involved: dict[str, Any]  # what post_event needs of the object: apiVersion, kind, metadata
    type: str
    reason: str
    message: str
    time: dt.datetime


def involved_object(body: Mapping[str, Any]) -> dict[str, Any]:
    """The little of ``body`` an Event names, so that a waiting Event holds no spec or status."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid") if k in meta},
    }


class EventEmitter:
    def __init__(
        self,
        api: KubeAPI,
        *,
        capacity: int = CAPACITY,
        defer: Callable[[], bool] = lambda: False,
        on_drop: Callable[[], None] = lambda: None,
    ) -> None:
        self.api = api
        self.defer = defer
        self.on_drop = on_drop
        self.dropped = 0
        self.posted = 0
        self._queue: asyncio.Queue[PendingEvent] = asyncio.Queue(maxsize=capacity)
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return self._queue.qsize()

    def emit(self, body: Mapping[str, Any], *, type: str, reason: str, message: str) -> bool:
        """Queue an Event on ``body``; False when the queue is full and it was dropped."""
        meta = body.get("metadata", {})
        event = PendingEvent(involved_object(body), type, reason, message, dt.datetime.now(dt.UTC))
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            self.on_drop()
            LOG.warning(
                "event=event-dropped namespace=%s name=%s reason=%s dropped=%d",
                meta.get("namespace"),
                meta.get("name"),
                reason,
                self.dropped,
            )
            return False
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="event-emitter")

    async def stop(self, *, timeout: float = 5.0) -> None:
        """Post what waits (for at most ``timeout`` seconds), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            event = await self._queue.get()
            try:
                deadline = loop.time() + DEFER_LIMIT
                while self.defer() and loop.time() < deadline:
                    await asyncio.sleep(DEFER_PAUSE)
                await self.api.post_event(
                    event.involved, type=event.type, reason=event.reason, message=event.message, at=event.time
                )
                self.posted += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # post_event logs the apiserver's refusals; this is the rest
                meta = event.involved["metadata"]
                LOG.warning(
                    "event=event-post-failed namespace=%s name=%s reason=%s error=%r",
                    meta.get("namespace"),
                    meta.get("name"),
                    event.reason,
                    exc,
                )
            finally:
                self._queue.task_done()
