"""Who may report progress for a FineTuneJob: the trainer pod of its current Job, proven by a
service-account token the kubelet projected into it for the operator's audience.

Checking a token costs the apiserver a TokenReview, and anyone who reaches the progress port
can send tokens.  So a token is looked at for free first and reviewed only when it could be
good, and reviews are few, capped, and on a connection pool of their own (``KubeAPI``):

1. the token's claims (it is a JWT; read here, trusted only after the review) must name a
   pod of the job's current Job that has not finished (the caller checks that against its
   index): a random string, another job's pod, or a pod someone labelled to look like ours
   never reaches the apiserver;
2. a token the apiserver refused is remembered for a while, one it accepted too, and the same
   token sent twice at once is reviewed once;
3. per claimed pod, one review at a time and at most one per ``per_pod_interval``; in all at
   most ``max_concurrent`` at once.  Beyond that the answer is "try again" (429), never a
   queue that grows.

The apiserver's answer is then checked (``reporter_from_review``): authenticated, for our
audience, a service account, bound to the very pod the claims name.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class Claims:
    """What a projected service-account token says about itself, unverified."""

    namespace: str
    pod_name: str
    pod_uid: str
    audiences: tuple[str, ...]
    expires: float


@dataclass(frozen=True)
class Reporter:
    """Who a report token belongs to, as the apiserver's TokenReview says."""

    namespace: str
    pod_name: str
    pod_uid: str
    until: float


def _segment(part: str) -> Any:
    padded = part + "=" * (-len(part) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def peek_claims(token: str) -> Claims | None:
    """The claims of a pod-bound service-account token, or None when ``token`` is not one.
    Nothing here is trusted: it only decides whether a token is worth a TokenReview."""
    parts = token.split(".")
    if len(parts) != 3 or len(token) > 16384:
        return None
    try:
        payload = _segment(parts[1])
    except (ValueError, UnicodeError, binascii.Error):
        return None
    if not isinstance(payload, dict):
        return None
    kube = payload.get("kubernetes.io")
    if not isinstance(kube, dict):
        return None
    pod = kube.get("pod")
    if not isinstance(pod, dict):
        return None
    audiences = payload.get("aud")
    if isinstance(audiences, str):
        audiences = [audiences]
    if not isinstance(audiences, list):
        return None
    expires = payload.get("exp")
    namespace, name, uid = kube.get("namespace"), pod.get("name"), pod.get("uid")
    if not (isinstance(expires, int | float) and isinstance(namespace, str) and name and uid):
        return None
    return Claims(
        namespace=namespace,
        pod_name=str(name),
        pod_uid=str(uid),
        audiences=tuple(str(a) for a in audiences),
        expires=float(expires),
    )


def reporter_from_review(status: dict[str, Any], *, audience: str, until: float) -> Reporter | None:
    """A TokenReview's ``status`` -> the pod the token is bound to, or None when the review
    does not prove a pod-bound token for ``audience``.

    The audiences are checked too: an authenticator that ignores them answers with none, and
    such a token would be good for the apiserver, not for us."""
    if not status.get("authenticated"):
        return None
    if audience not in (status.get("audiences") or []):
        return None
    user = status.get("user") or {}
    extra = user.get("extra") or {}
    username = str(user.get("username", ""))
    pod_uid = (extra.get(POD_UID_EXTRA) or [""])[0]
    pod_name = (extra.get(POD_NAME_EXTRA) or [""])[0]
    if not username.startswith(SERVICE_ACCOUNT_PREFIX) or not pod_uid or not pod_name:
        return None
    namespace = username.removeprefix(SERVICE_ACCOUNT_PREFIX).split(":")[0]
    return Reporter(namespace=namespace, pod_name=pod_name, pod_uid=pod_uid, until=until)


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    REFUSED = "refused"
    THROTTLED = "throttled"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    reporter: Reporter | None = None


Review = Callable[[str], Awaitable[dict[str, Any]]]


class TokenGate:
    """The TokenReviews of report tokens: cached both ways, capped per pod and in all.

    ``review`` is the TokenReview call (``KubeAPI.review_token`` with the audience bound); it
    may raise, and then nothing is cached."""

    def __init__(
        self,
        review: Review,
        *,
        audience: str,
        accepted_seconds: float = 300,
        refused_seconds: float = 60,
        per_pod_interval: float = 2.0,
        max_concurrent: int = 4,
        max_remembered: int = 20000,
        on_review: Callable[[str], None] | None = None,
    ) -> None:
        self._review = review
        self.audience = audience
        self.accepted_seconds = accepted_seconds
        self.refused_seconds = refused_seconds
        self.per_pod_interval = per_pod_interval
        self.max_concurrent = max_concurrent
        self.max_remembered = max_remembered
        self.on_review = on_review or (lambda result: None)
        self._accepted: OrderedDict[str, Reporter] = OrderedDict()
        self._refused: OrderedDict[str, float] = OrderedDict()
        self._last_review: dict[str, float] = {}
        self._pending: dict[str, asyncio.Future[Outcome]] = {}
        self._in_flight = 0

    @staticmethod
    def digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def _remember(self, table: OrderedDict[str, Any], digest: str, value: Any) -> None:
        table[digest] = value
        table.move_to_end(digest)
        while len(table) > self.max_remembered:
            table.popitem(last=False)

    async def check(self, token: str, claims: Claims) -> Outcome:
        now = time.monotonic()
        digest = self.digest(token)
        known = self._accepted.get(digest)
        if known is not None and known.until > now:
            return Outcome(Verdict.ACCEPTED, known)
        refused_until = self._refused.get(digest)
        if refused_until is not None and refused_until > now:
            return Outcome(Verdict.REFUSED)
        pending = self._pending.get(digest)
        if pending is not None:
            # The same token twice at once (a client's retry): one review answers both.
            return await asyncio.shield(pending)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            outcome = await self._check(token, digest, claims, now)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        else:
            future.set_result(outcome)
            return outcome
        finally:
            self._pending.pop(digest, None)

    async def _check(self, token: str, digest: str, claims: Claims, now: float) -> Outcome:
        pod = claims.pod_uid
        last = self._last_review.get(pod)
        if self._in_flight >= self.max_concurrent or (last is not None and now - last < self.per_pod_interval):
            return Outcome(Verdict.THROTTLED)
        self._last_review[pod] = now
        if len(self._last_review) > self.max_remembered:
            self._last_review = {k: v for k, v in self._last_review.items() if now - v < self.per_pod_interval}
        self._in_flight += 1
        try:
            status = await self._review(token)
        finally:
            self._in_flight -= 1
        until = min(now + self.accepted_seconds, time.monotonic() + max(0.0, claims.expires - time.time()))
        reporter = reporter_from_review(status, audience=self.audience, until=until)
        if reporter is None or reporter.pod_uid != claims.pod_uid or reporter.namespace != claims.namespace:
            self.on_review("refused")
            self._remember(self._refused, digest, now + self.refused_seconds)
            return Outcome(Verdict.REFUSED)
        self.on_review("accepted")
        # The pod proved itself: a new token of it (a rotation) is not held back by the limit.
        self._last_review.pop(pod, None)
        self._remember(self._accepted, digest, reporter)
        return Outcome(Verdict.ACCEPTED, reporter)
