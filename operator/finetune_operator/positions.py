"""Where a waiting job stands in its Kueue LocalQueue, from Kueue's pending-workloads API.

A Workload's position changes without any change to the Workload (another one is admitted
ahead of it), so nothing the operator watches tells it: it asks.  One request per LocalQueue
answers for every job waiting there, and an answer is reused for ``ttl`` seconds.  Where the
API is not there (Kueue without its visibility server, or no permission), positions are left
out and the API is asked again only after ``retry_after`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.kubeapi import ApiError, KubeAPI, describe_error
from finetune_operator.queueing import Position, position_in

LOG = logging.getLogger("finetune_operator.positions")


@dataclass
class _Answer:
    at: float
    summary: dict[str, Any] | None


@dataclass
class PendingPositions:
    api: KubeAPI
    ttl: float = 2.0
    retry_after: float = 60.0
    _answers: dict[tuple[str, str], _Answer] = field(default_factory=dict)
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    _unavailable_until: float = 0.0

    async def of(self, namespace: str, queue: str, workload: str) -> Position | None:
        summary = await self._summary(namespace, queue)
        return position_in(summary, workload) if summary is not None else None

    async def _summary(self, namespace: str, queue: str) -> dict[str, Any] | None:
        now = time.monotonic()
        if now < self._unavailable_until:
            return None
        key = (namespace, queue)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            answer = self._answers.get(key)
            if answer is not None and time.monotonic() - answer.at < self.ttl:
                return answer.summary
            try:
                summary: dict[str, Any] | None = await self.api.pending_workloads(namespace, queue)
            except ApiError as exc:
                if exc.status == 404 and "localqueue" in (exc.message or "").lower():
                    # The API is there; the LocalQueue is not (yet): the Workload's own message says so.
                    summary = None
                else:
                    self._unavailable_until = time.monotonic() + self.retry_after
                    LOG.info(
                        "event=queue-positions-unavailable namespace=%s queue=%s retry_in=%.0fs error=%s",
                        namespace,
                        queue,
                        self.retry_after,
                        describe_error(exc),
                    )
                    return None
            self._answers[key] = _Answer(time.monotonic(), summary)
            return summary
