"""How busy the GPU is: NVML read where present, carried on the reports, status and metrics; a
warning when a training GPU idles for minutes."""

from __future__ import annotations

import ctypes
import time

import pytest

from finetune_api.v1alpha1 import Stage
from finetune_operator.metrics import JobView, Metrics, prometheus_text
from finetune_trainer import gpu_load
from finetune_trainer.report import ProgressReporter


def test_an_idle_gpu_over_the_window_is_warned_about_once() -> None:
    watch = gpu_load.IdleWatch(idle_percent=50, window_s=300)
    assert [watch.observe(t, 20.0, training=True) for t in (0, 100, 200)] == [None, None, None]
    warning = watch.observe(300, 30.0, training=True)
    assert warning is not None and "busy only 22% of the time over 5 minutes" in warning
    assert "spec.training.cacheLatents" in warning
    assert watch.observe(400, 10.0, training=True) is None  # once


def test_a_busy_gpu_or_a_stretch_broken_by_other_stages_is_not() -> None:
    busy = gpu_load.IdleWatch(idle_percent=50, window_s=300)
    assert all(busy.observe(t, 95.0, training=True) is None for t in range(0, 700, 50))
    broken = gpu_load.IdleWatch(idle_percent=50, window_s=300)
    for t in (0, 100, 200):
        broken.observe(t, 5.0, training=True)
    broken.observe(250, 0.0, training=False)  # sampling or checkpointing: the GPU may idle
    assert all(broken.observe(t, 5.0, training=True) is None for t in (300, 400, 500))
    assert broken.observe(600, 5.0, training=True) is not None


def test_without_the_drivers_library_there_is_no_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert gpu_load.nvml_reader(0) is None


def test_reports_carry_the_reading_and_the_idle_warning() -> None:
    reporter = ProgressReporter(job="team-a/x", attempt="x-abc")
    reporter.gpu_load = lambda: (12.0, 5 * 2**30)
    # Four and two minutes of training at 12% already seen (the reporter reads the monotonic clock).
    now = time.monotonic()
    reporter.idle_watch = gpu_load.IdleWatch(idle_percent=50, window_s=300)
    reporter.idle_watch.readings.extend([(now - 290, 12.0), (now - 150, 12.0)])
    reporter.stage = Stage.TRAINING
    event = reporter.emit()
    assert event is not None and event.gpu_utilization == 12.0
    assert event.gpu_memory_bytes == 5 * 2**30
    assert any("busy only 12%" in w for w in reporter.warnings)


def test_the_metric_is_per_job() -> None:
    metrics = Metrics(per_job=True)
    view = JobView(namespace="team-a", name="x", phase="Training", gpu_utilization=87.5, best_scores={"dino": 0.66})
    metrics.bind_jobs(lambda: [view])
    text = prometheus_text(metrics)[0].decode()
    assert 'finetune_job_gpu_utilization{name="x",namespace="team-a"} 87.5' in text
    assert 'finetune_job_best_score{name="x",namespace="team-a",score="dino"} 0.66' in text


def test_the_status_shows_it() -> None:
    from finetune_operator.status import Observed
    from tests.unit.test_status import event, job, pod, status_of

    progress = event().model_copy(update={"gpu_utilization": 64.0})
    status = status_of(Observed(job=job(active=1), pods=[pod()], progress=progress))
    assert status["progress"]["gpuUtilization"] == 64.0
