"""What the operator accepts from a trainer and keeps of it: pure, no cluster."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest

from finetune_api.report import ProgressEvent, Thumbnail
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


def _thumbnail(step: int) -> Thumbnail:
    return Thumbnail(name=f"step-{step:06d}-0.png", step=step, jpeg_base64=base64.b64encode(b"j" * 6000).decode())


def test_what_is_kept_of_finished_jobs_stays_bounded() -> None:
    store = ProgressStore()

    def run(number: int) -> ProgressEvent:
        key = ("ns", f"job-{number}")
        for step in range(1, 1001):
            store.accept(key, report(seq=step, step=step, totalSteps=1000, loss=1.0 / step))
        last = report(
            seq=2000,
            stage="done",
            step=1000,
            totalSteps=1000,
            loss=0.001,
            thumbnails=[_thumbnail(1000).model_dump(by_alias=True) for _ in range(16)],
            samples=[f"/data/out/samples/step-{i:06d}-0.png" for i in range(500)],
            files=[{"path": f"diffusers/f{i}", "sizeBytes": 1, "sha256": "ab" * 32} for i in range(500)],
        )
        store.accept(key, last)
        return last

    running = run(0)
    a_running_job = store.retained_bytes()
    assert a_running_job > len(running.model_dump_json()) > 200_000
    store.finish(("ns", "job-0"))
    for number in range(1, 100):
        run(number)
        store.finish(("ns", f"job-{number}"))
        store.finish(("ns", f"job-{number}"))  # every reconcile of a final job says so again: no harm
    after_100 = store.retained_bytes()
    for number in range(100, 200):
        run(number)
        store.finish(("ns", f"job-{number}"))
    # Past the newest few (which keep their thumbnails), a finished job costs a few KB, not the
    # 200+ KB of its last report and curve.
    assert (store.retained_bytes() - after_100) / 100 < 4000
    newest, oldest = ("ns", "job-199"), ("ns", "job-0")
    assert store.latest(newest).thumbnails  # type: ignore[union-attr]
    assert not store.latest(oldest).thumbnails  # type: ignore[union-attr]
    assert store.latest(oldest).loss == 0.001  # type: ignore[union-attr]
    assert 2 <= len(store.history(oldest)) <= 120


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
