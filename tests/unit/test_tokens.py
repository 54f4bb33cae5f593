"""Who may report progress: the token's claims, the TokenReview's answer, and the gate that
caches reviews and caps them.  No cluster: the TokenReview is the gate's ``review`` call."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from finetune_operator import tokens
from finetune_operator.tokens import Claims, TokenGate, Verdict, peek_claims, reporter_from_review

AUDIENCE = "finetune-operator"
EPOCH = 2_000_000_000.0


def _jwt(payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(payload)}.c2lnbmF0dXJl"


def test_only_a_pod_bound_token_is_worth_a_review() -> None:
    claims = {
        "aud": ["finetune-operator"],
        "exp": 2000000000,
        "kubernetes.io": {"namespace": "team-a", "pod": {"name": "nick-x1", "uid": "u-1"}},
        "sub": "system:serviceaccount:team-a:default",
    }
    peeked = peek_claims(_jwt(claims))
    assert peeked is not None
    assert (peeked.namespace, peeked.pod_name, peeked.pod_uid, peeked.audiences) == (
        "team-a",
        "nick-x1",
        "u-1",
        ("finetune-operator",),
    )
    assert peek_claims("0123456789abcdef") is None
    assert peek_claims("a.b.c") is None
    assert peek_claims(_jwt({**claims, "kubernetes.io": {"namespace": "team-a"}})) is None


def _review(**overrides: Any) -> dict[str, Any]:
    status = {
        "authenticated": True,
        "audiences": ["finetune-operator"],
        "user": {
            "username": "system:serviceaccount:team-a:default",
            "extra": {
                "authentication.kubernetes.io/pod-name": ["nick-x1"],
                "authentication.kubernetes.io/pod-uid": ["u-1"],
            },
        },
    }
    status.update(overrides)
    return status


def test_a_review_must_name_our_audience_and_a_pod() -> None:
    reporter = reporter_from_review(_review(), audience="finetune-operator", until=1.0)
    assert reporter is not None and (reporter.namespace, reporter.pod_name, reporter.pod_uid) == (
        "team-a",
        "nick-x1",
        "u-1",
    )
    # An authenticator that ignores audiences answers with none: good for the apiserver, not for us.
    assert reporter_from_review(_review(audiences=[]), audience="finetune-operator", until=1.0) is None
    assert reporter_from_review(_review(audiences=["api"]), audience="finetune-operator", until=1.0) is None
    assert reporter_from_review(_review(authenticated=False), audience="finetune-operator", until=1.0) is None
    person = _review(user={"username": "nick", "extra": {}})
    assert reporter_from_review(person, audience="finetune-operator", until=1.0) is None


# --- the gate -----------------------------------------------------------------------------------


class Clock:
    """Both of the gate's clocks: monotonic for its caches, wall time for a token's expiry."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return EPOCH + self.now


class FakeReview:
    """The TokenReview call: the apiserver's answer per token (where ``answers`` has none: bound
    to pod u-1 of team-a, for our audience), every call recorded."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any] | Exception] = {}
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, token: str) -> dict[str, Any]:
        self.calls.append(token)
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.get(token, _review())
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(tokens, "time", fake)
    return fake


def bound_to(pod_uid: str) -> dict[str, Any]:
    """The review of a token bound to the pod ``pod_uid`` of team-a."""
    return _review(
        user={
            "username": "system:serviceaccount:team-a:default",
            "extra": {
                "authentication.kubernetes.io/pod-name": ["nick-x1"],
                "authentication.kubernetes.io/pod-uid": [pod_uid],
            },
        }
    )


def claims(pod_uid: str = "u-1", *, namespace: str = "team-a", expires_in: float = 3600) -> Claims:
    return Claims(
        namespace=namespace, pod_name="nick-x1", pod_uid=pod_uid, audiences=(AUDIENCE,), expires=EPOCH + expires_in
    )


def gate(review: FakeReview, **options: Any) -> tuple[TokenGate, list[str]]:
    results: list[str] = []
    return TokenGate(review, audience=AUDIENCE, on_review=results.append, **options), results


def check(gate: TokenGate, token: str, claimed: Claims | None = None) -> tokens.Outcome:
    return asyncio.run(gate.check(token, claimed or claims()))


def test_an_accepted_token_is_reviewed_once_and_names_its_pod(clock: Clock) -> None:
    review = FakeReview()
    subject, results = gate(review)
    first = check(subject, "token-1")
    assert first.verdict == Verdict.ACCEPTED and first.reporter is not None
    assert (first.reporter.namespace, first.reporter.pod_name, first.reporter.pod_uid) == ("team-a", "nick-x1", "u-1")
    clock.now += 299
    assert check(subject, "token-1").verdict == Verdict.ACCEPTED
    assert review.calls == ["token-1"] and results == ["accepted"]


def test_an_accepted_token_is_reviewed_again_after_a_while_or_when_it_expires(clock: Clock) -> None:
    review = FakeReview()
    subject, _ = gate(review, accepted_seconds=300)
    check(subject, "token-1")
    clock.now += 301
    assert check(subject, "token-1").verdict == Verdict.ACCEPTED
    assert review.calls == ["token-1", "token-1"]
    # A token that expires sooner is trusted only until it expires.
    review.answers["short"] = bound_to("u-2")
    check(subject, "short", claims("u-2", expires_in=clock.now + 10))
    clock.now += 11
    check(subject, "short", claims("u-2", expires_in=clock.now + 10))
    assert review.calls.count("short") == 2


@pytest.mark.parametrize(
    "answer",
    [
        {"authenticated": False},
        # An authenticator that ignores audiences answers with none: good for the apiserver, not for us.
        {"audiences": []},
        {"audiences": ["https://kubernetes.default.svc"]},
        # A person's token, or a service account's not bound to a pod.
        {"user": {"username": "nick", "extra": {}}},
        {"user": {"username": "system:serviceaccount:team-a:default", "extra": {}}},
    ],
)
def test_a_token_the_review_does_not_prove_ours_is_refused_and_remembered(clock: Clock, answer: dict[str, Any]) -> None:
    review = FakeReview()
    review.answers["bad"] = _review(**answer)
    subject, results = gate(review, refused_seconds=60, per_pod_interval=2)
    assert check(subject, "bad") == tokens.Outcome(Verdict.REFUSED)
    clock.now += 59
    assert check(subject, "bad").verdict == Verdict.REFUSED
    assert review.calls == ["bad"] and results == ["refused"]
    clock.now += 2
    assert check(subject, "bad").verdict == Verdict.REFUSED
    assert review.calls == ["bad", "bad"]


@pytest.mark.parametrize(
    "claimed",
    [claims("u-other"), claims(namespace="team-b")],
    ids=["another pod", "another namespace"],
)
def test_a_token_is_good_only_for_the_pod_its_claims_name(clock: Clock, claimed: Claims) -> None:
    """The claims are read unverified; the review says whose token it is, and they must agree."""
    subject, results = gate(FakeReview())
    assert check(subject, "token-1", claimed).verdict == Verdict.REFUSED
    assert results == ["refused"]


def test_reviews_per_pod_are_spaced_except_for_a_pod_that_proved_itself(clock: Clock) -> None:
    review = FakeReview()
    review.answers["forged"] = _review(authenticated=False)
    subject, _ = gate(review, per_pod_interval=2)
    assert check(subject, "forged").verdict == Verdict.REFUSED
    # Another token for the same pod at once: not a second review.
    assert check(subject, "forged-again").verdict == Verdict.THROTTLED
    clock.now += 2
    assert check(subject, "good").verdict == Verdict.ACCEPTED
    # The pod proved itself: its next token (a rotation) is reviewed at once.
    assert check(subject, "rotated").verdict == Verdict.ACCEPTED
    assert review.calls == ["forged", "good", "rotated"]


def test_reviews_in_flight_are_capped_and_the_same_token_twice_is_one_review(clock: Clock) -> None:
    review = FakeReview()
    review.gate = asyncio.Event()
    subject, _ = gate(review, max_concurrent=1)

    async def scenario() -> list[tokens.Outcome]:
        first = asyncio.create_task(subject.check("token-1", claims("u-1")))
        twin = asyncio.create_task(subject.check("token-1", claims("u-1")))
        await asyncio.sleep(0)
        other = await subject.check("token-2", claims("u-2"))
        assert review.gate is not None
        review.gate.set()
        return [await first, await twin, other]

    first, twin, other = asyncio.run(scenario())
    assert first.verdict == twin.verdict == Verdict.ACCEPTED
    assert other.verdict == Verdict.THROTTLED
    assert review.calls == ["token-1"]


def test_a_review_that_fails_answers_everyone_waiting_and_caches_nothing(clock: Clock) -> None:
    review = FakeReview()
    review.answers["token-1"] = TimeoutError("the apiserver did not answer")
    review.gate = asyncio.Event()
    subject, results = gate(review, per_pod_interval=2)

    async def scenario() -> list[BaseException | tokens.Outcome]:
        waiting = [asyncio.create_task(subject.check("token-1", claims())) for _ in range(2)]
        await asyncio.sleep(0)
        assert review.gate is not None
        review.gate.set()
        return await asyncio.gather(*waiting, return_exceptions=True)

    answers = asyncio.run(scenario())
    assert all(isinstance(a, TimeoutError) for a in answers)
    assert review.calls == ["token-1"] and results == []
    review.answers.pop("token-1")
    review.gate = None
    clock.now += 2
    assert check(subject, "token-1").verdict == Verdict.ACCEPTED
    assert review.calls == ["token-1", "token-1"]


def test_what_the_gate_remembers_is_bounded(clock: Clock) -> None:
    review = FakeReview()
    subject, _ = gate(review, max_remembered=2)
    for number in range(3):
        review.answers[f"token-{number}"] = bound_to(f"u-{number}")
        check(subject, f"token-{number}", claims(f"u-{number}"))
    check(subject, "token-2", claims("u-2"))
    assert review.calls == ["token-0", "token-1", "token-2"]
    # The oldest was forgotten: it is reviewed again.
    check(subject, "token-0", claims("u-0"))
    assert review.calls[-1] == "token-0" and len(review.calls) == 4
