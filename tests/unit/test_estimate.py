"""status.estimate: from finished jobs of the same kind, kept in a ConfigMap, written once before
a job runs and never for one that has started."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_api import parse_manifest
from finetune_api.v1alpha1 import FineTuneJobSpec
from finetune_operator.speeds import SpeedBook, kind_of
from finetune_operator.status import Observed
from finetune_operator.usage import Prices
from tests.bad_specs import good_manifest
from tests.unit.test_status import event, job, pod, status_of

PRICES = Prices({"NVIDIA-L4": 0.8}, "EUR")


def spec(**training: Any) -> FineTuneJobSpec:
    body = good_manifest()
    body["spec"]["training"] = {"maxSteps": 1000, **training}
    return parse_manifest(body).spec


def book_with(*samples: tuple[float, float], product: str = "NVIDIA-L4") -> SpeedBook:
    """Finished jobs of spec()'s kind: (steps per second, the pod's running seconds) at 500 steps."""
    book = SpeedBook()
    for rate, seconds in samples:
        assert book.record(spec(), steps=500, steps_per_second=rate, run_seconds=seconds, product=product)
    return book


def test_two_finished_jobs_of_the_kind_give_the_estimate() -> None:
    # 0.5 s and 0.25 s a step with 100 s and 50 s of the rest (loading, export): a mean of
    # 0.375 s a step and 75 s; 1000 steps then take 450 s, at 0.8 an hour on one GPU.
    book = book_with((2.0, 500 * 0.5 + 100), (4.0, 500 * 0.25 + 50))
    estimate = book.estimate(spec(), PRICES)
    assert estimate is not None
    assert estimate.duration_seconds == 450 and estimate.duration_text == "8m"
    assert estimate.based_on == 2
    assert estimate.gpu_product == "NVIDIA-L4"
    assert estimate.cost == pytest.approx(450 / 3600 * 0.8) and estimate.currency == "EUR"


def test_no_estimate_without_a_basis() -> None:
    assert book_with((2.0, 350)).estimate(spec(), PRICES) is None  # one job is not enough
    book = book_with((2.0, 350), (2.0, 350))
    assert book.estimate(spec(batchSize=2), PRICES) is None  # another kind
    steps_per_image = spec()
    steps_per_image.training.max_steps = None  # stepsPerImage: the photos are not counted yet
    assert book.estimate(steps_per_image, PRICES) is None
    assert kind_of(spec()) != kind_of(spec(batchSize=2))
    assert not SpeedBook().record(spec(), steps=500, steps_per_second=0.0, run_seconds=10, product=None)


def test_the_book_goes_through_its_configmap_and_survives_a_bad_one() -> None:
    book = book_with((2.0, 350), (4.0, 175))
    again = SpeedBook.from_data(book.to_data())
    assert again.estimate(spec(), PRICES) == book.estimate(spec(), PRICES)
    assert SpeedBook.from_data({"speeds.json": "{not json"}).samples == {}
    assert SpeedBook.from_data(None).samples == {}


def test_the_estimate_is_written_before_the_job_runs_and_never_after() -> None:
    estimate = book_with((2.0, 350), (2.0, 350)).estimate(spec(), PRICES)
    waiting = status_of(Observed(job=job(), pods=[], estimate=estimate))
    assert waiting["estimate"]["durationText"] == "10m" and waiting["estimate"]["basedOn"] == 2
    # Once a pod has started, a job without one never gets it.
    started = status_of(Observed(job=job(active=1), pods=[pod()], progress=event(), estimate=estimate))
    assert "estimate" not in started
    # One written before the start stays as it was.
    kept = status_of(Observed(job=job(active=1), pods=[pod()], progress=event(), estimate=None), previous=waiting)
    assert kept["estimate"] == waiting["estimate"]
