"""/metrics has no authentication: by default it names no FineTuneJob, only counts."""

from __future__ import annotations

import pytest

from finetune_operator.metrics import JobView, Metrics, prometheus_text
from finetune_operator.settings import add_arguments, from_arguments

JOBS = [
    JobView(namespace="team-secret", name="acme-launch-face", phase="Running", step=5, total_steps=10, loss=0.25,
            steps_per_second=1.5, gpus=1, queue="gpus"),
    JobView(namespace="team-a", name="nick", phase="Succeeded", step=10, total_steps=10),
]  # fmt: skip


@pytest.mark.parametrize("per_job", [False, True])
def test_jobs_are_named_on_metrics_only_when_asked(per_job: bool) -> None:
    metrics = Metrics(per_job=per_job)
    metrics.bind_jobs(lambda: JOBS)
    metrics.gpu_running("team-secret", "acme-launch-face", 1, True)
    text = prometheus_text(metrics)[0].decode()
    # The counts are there either way.
    assert 'finetune_jobs{phase="Running"} 1.0' in text
    assert 'finetune_jobs{phase="Succeeded"} 1.0' in text
    assert 'finetune_queue_jobs{namespace="team-secret",phase="Running",queue="gpus"} 1.0' in text
    assert 'finetune_gpu_seconds_total{namespace="team-secret"}' in text
    for name in ("acme-launch-face", "nick"):
        assert (f'name="{name}"' in text) == per_job
    assert ("finetune_job_loss" in text) == per_job
    if per_job:
        assert 'finetune_job_step{name="acme-launch-face",namespace="team-secret"} 5.0' in text


def test_the_switch_is_a_flag_and_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    def parsed(*argv: str) -> bool:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return from_arguments(parser.parse_args(list(argv))).metrics_per_job

    assert parsed() is False
    assert parsed("--metrics-per-job") is True
    monkeypatch.setenv("FINETUNE_METRICS_PER_JOB", "true")
    assert parsed() is True
