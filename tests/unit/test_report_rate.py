"""One job's reports are rate-limited on their own: a burst, then one per 1/per_second."""

from __future__ import annotations

from finetune_operator.report_rate import ReportRate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_a_flooding_job_waits_while_another_job_reports() -> None:
    clock = Clock()
    rate = ReportRate(burst=5, per_second=2.0, clock=clock)
    assert [rate.allow("flood") for _ in range(5)] == [None] * 5
    wait = rate.allow("flood")
    assert wait is not None and 0 < wait <= 0.5
    assert rate.allow("quiet") is None  # its own bucket
    clock.now += 0.5
    assert rate.allow("flood") is None
    assert rate.allow("flood") is not None


def test_an_honest_trainer_is_never_throttled() -> None:
    """A report per stage change (a handful at once) and one every 3 s while training."""
    clock = Clock()
    rate = ReportRate(clock=clock)
    assert all(rate.allow("job") is None for _ in range(8))
    for _ in range(1000):
        clock.now += 3.0
        assert rate.allow("job") is None


def test_buckets_of_jobs_that_went_quiet_are_dropped_not_kept_forever() -> None:
    import finetune_operator.report_rate as module

    clock = Clock()
    rate = ReportRate(clock=clock)
    for i in range(module.MAX_KEPT + 1):
        rate.allow(i)
    clock.now += 60
    rate.allow("late")
    assert len(rate._buckets) <= 2
