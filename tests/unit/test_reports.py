"""What the operator accepts from a trainer and keeps of it: pure, no cluster."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest

from finetune_api.report import ProgressEvent
from finetune_operator.reports import ProgressStore, check_report
from finetune_operator.tokens import peek_claims, reporter_from_review

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


def report(**fields: Any) -> ProgressEvent:
    body = {"seq": 1, "attempt": "job-abcde", "time": "2026-11-25T12:00:00Z", "stage": "training"}
    body.update(fields)
    # As the server reads it: Python's json accepts NaN and Infinity, and so would the model.
    return ProgressEvent.model_validate(json.loads(json.dumps(body)))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"loss": float("nan")}, "NotFinite"),
        ({"learningRate": float("inf")}, "NotFinite"),
        ({"stepsPerSecond": float("inf")}, "NotFinite"),
        ({"step": 101, "totalSteps": 100}, "OutOfRange"),
        ({"time": "9999"}, "BadTime"),
        ({"time": "yesterday"}, "BadTime"),
        ({"time": "2026-11-25T12:00:00"}, "BadTime"),  # no zone
        ({"time": "9999-12-31T23:59:59Z"}, "BadTime"),  # far ahead of our clock
    ],
)
def test_a_report_that_would_poison_the_status_is_refused_with_a_reason(fields: dict[str, Any], reason: str) -> None:
    problem = check_report(report(**fields), now=NOW)
    assert problem is not None and problem.reason == reason
    field = next(iter(fields))
    assert field in problem.message or (reason == "OutOfRange" and "totalSteps" in problem.message)


def test_a_sound_report_passes_and_small_clock_skew_is_fine() -> None:
    assert check_report(report(step=100, totalSteps=100, loss=0.1, learningRate=1e-5), now=NOW) is None
    assert check_report(report(time="2026-11-25T12:03:00+00:00"), now=NOW) is None
    assert check_report(report(time="2026-11-25T12:00:00.123456Z", step=0, totalSteps=0), now=NOW) is None


def test_reports_of_two_attempts_are_ordered_by_time_not_by_its_spelling() -> None:
    store = ProgressStore()
    assert store.accept(("ns", "a"), report(attempt="a-1", time="2026-11-25T12:00:09Z", step=9))
    # The same moment in another zone: later than 12:00:09Z, though "11:..." sorts before "12:...".
    assert store.accept(("ns", "a"), report(attempt="a-2", time="2026-11-25T11:00:10-01:00", step=1))
    assert not store.accept(("ns", "a"), report(attempt="a-1", time="2026-11-25T12:00:05Z", seq=9, step=10))


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
