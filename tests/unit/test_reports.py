"""What the operator accepts from a trainer and keeps of it: pure, no cluster."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest

from finetune_api.report import MAX_FILES_IN_EVENT, MAX_SAMPLES_IN_EVENT, ProgressEvent, Thumbnail
from finetune_operator.reports import ProgressStore, check_report

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
            samples=[f"/data/out/samples/step-{i:06d}-0.png" for i in range(MAX_SAMPLES_IN_EVENT)],
            files=[{"path": f"diffusers/f{i}", "sizeBytes": 1, "sha256": "ab" * 32} for i in range(MAX_FILES_IN_EVENT)],
        )
        store.accept(key, last)
        return last

    running = run(0)
    a_running_job = store.retained_bytes()
    assert a_running_job > len(running.model_dump_json()) > 150_000
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
    # 150+ KB of its last report and curve.
    assert (store.retained_bytes() - after_100) / 100 < 4000
    newest, oldest = ("ns", "job-199"), ("ns", "job-0")
    assert store.latest(newest).thumbnails  # type: ignore[union-attr]
    assert not store.latest(oldest).thumbnails  # type: ignore[union-attr]
    assert store.latest(oldest).loss == 0.001  # type: ignore[union-attr]
    assert 2 <= len(store.history(oldest)) <= 120


# --- what the store keeps -----------------------------------------------------------------------


class Updates:
    """The store's calls to the reconciler: (key, final) per accepted report."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, str], bool]] = []

    def __call__(self, key: tuple[str, str], final: bool) -> None:
        self.calls.append((key, final))


KEY = ("ns", "a")


def test_within_an_attempt_a_repeated_or_older_report_is_dropped() -> None:
    updates = Updates()
    store = ProgressStore(on_update=updates)
    assert store.accept(KEY, report(seq=2, step=2))
    assert not store.accept(KEY, report(seq=2, step=2))  # a client's retry: delivered twice
    assert not store.accept(KEY, report(seq=1, step=1, time="2026-11-25T12:00:30Z"))  # late, though its time is later
    assert store.latest(KEY).step == 2  # type: ignore[union-attr]
    # Within an attempt the sequence orders, not the clock.
    assert store.accept(KEY, report(seq=3, step=3, time="2026-11-25T11:59:00Z"))
    assert store.latest(KEY).step == 3  # type: ignore[union-attr]
    assert updates.calls == [(KEY, False), (KEY, False)]


def test_a_report_of_an_earlier_attempt_never_overwrites_the_current_one() -> None:
    store = ProgressStore()
    assert store.accept(KEY, report(attempt="a-1", seq=50, step=50, time="2026-11-25T12:00:00Z"))
    # The retried pod starts counting again: a new attempt at a later time wins.
    assert store.accept(KEY, report(attempt="a-2", seq=1, step=40, time="2026-11-25T12:05:00Z"))
    # The old pod's last words, sent before the new pod started, arrive late.
    assert not store.accept(KEY, report(attempt="a-1", seq=51, step=51, time="2026-11-25T12:00:05Z"))
    assert store.latest(KEY).attempt == "a-2"  # type: ignore[union-attr]
    # At the same moment the newcomer is taken.
    assert store.accept(KEY, report(attempt="a-3", seq=1, step=1, time="2026-11-25T12:05:00Z"))


def test_a_final_report_tells_the_reconciler_so_and_jobs_are_kept_apart() -> None:
    updates = Updates()
    store = ProgressStore(on_update=updates)
    other = ("ns", "b")
    store.accept(KEY, report(seq=1, step=3))
    store.accept(other, report(seq=1, step=7))
    store.accept(KEY, report(seq=2, step=3, stage="done"))
    store.accept(other, report(seq=2, step=7, stage="failed"))
    assert updates.calls == [(KEY, False), (other, False), (KEY, True), (other, True)]
    assert store.latest(KEY).stage == "done" and store.latest(other).stage == "failed"  # type: ignore[union-attr]
    assert len(store) == 2
    assert store.latest(("ns", "nobody")) is None


def test_the_loss_curve_follows_the_run_that_is_going_on() -> None:
    store = ProgressStore()
    for seq, step, loss in ((1, 1, 0.9), (2, 2, 0.8), (3, 2, 0.7), (4, 3, None), (5, 4, 0.6)):
        store.accept(KEY, report(seq=seq, step=step, loss=loss))
    # A repeated step adds no point; a report without a loss adds none.
    assert store.history(KEY) == [(1, 0.9), (2, 0.8), (4, 0.6)]
    # Resumed from the checkpoint of step 2: the steps after it are those of the new run.
    store.accept(KEY, report(attempt="a-2", seq=1, step=3, loss=0.65, time="2026-11-25T12:01:00Z"))
    assert store.history(KEY) == [(1, 0.9), (2, 0.8), (3, 0.65)]


def test_a_long_curve_is_thinned_keeping_its_ends() -> None:
    store = ProgressStore()
    for step in range(1, 2501):
        store.accept(KEY, report(seq=step, step=step, loss=1.0 / step))
    history = store.history(KEY)
    assert len(history) <= 1000
    assert history[0] == (1, 1.0) and history[-1] == (2500, 1.0 / 2500)


def test_a_forgotten_job_starts_afresh() -> None:
    store = ProgressStore()
    store.accept(KEY, report(seq=9, step=9, loss=0.5))
    store.finish(KEY)
    store.forget(KEY)
    assert store.latest(KEY) is None and store.history(KEY) == [] and len(store) == 0
    # A FineTuneJob of the same name, created again: its first report counts.
    assert store.accept(KEY, report(seq=1, step=1, time="2026-11-25T11:00:00Z"))
