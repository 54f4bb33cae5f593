"""status.usage: GPU time over every attempt, from the pods' own timestamps and the reports,
never the operator's clock; the cost at the price of the node's GPU product; the metrics."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_api.report import ProgressEvent
from finetune_operator.metrics import Metrics, prometheus_text
from finetune_operator.usage import Prices, parse_prices, usage_of

PRICES = Prices({"NVIDIA-H100-80GB-HBM3": 3.6}, "EUR")
PRODUCTS = {"gpu-node-1": "NVIDIA-H100-80GB-HBM3"}


def pod(name: str, *, created: str, state: dict[str, Any] | None, node: str | None = "gpu-node-1") -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"nodeName": node} if node else {},
        "status": {},
    }
    if state is not None:
        body["status"]["containerStatuses"] = [{"name": "trainer", "state": state}]
    return body


def report(attempt: str, time: str) -> ProgressEvent:
    return ProgressEvent(seq=1, attempt=attempt, time=time, stage="training", step=5, total_steps=10)


FIRST = pod(
    "job-a",
    created="2026-01-01T00:00:00Z",
    state={"terminated": {"startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:10:00Z", "exitCode": 137}},
)
SECOND = pod("job-b", created="2026-01-01T00:10:30Z", state={"running": {"startedAt": "2026-01-01T00:11:00Z"}})


def test_a_retry_adds_both_attempts_running_time_and_the_cost_at_the_products_price() -> None:
    used = usage_of(
        None, [FIRST, SECOND], gpus=2, progress=report("job-b", "2026-01-01T00:16:00Z"), gpu_products=PRODUCTS,
        prices=PRICES,
    )  # fmt: skip
    assert used is not None
    assert [(p.name, p.seconds) for p in used.pods] == [("job-a", 600.0), ("job-b", 300.0)]
    assert used.gpu_seconds == 2 * 900
    assert used.gpu_product == "NVIDIA-H100-80GB-HBM3"
    assert used.cost == pytest.approx(1800 / 3600 * 3.6)
    assert used.currency == "EUR"


def test_a_pod_that_is_gone_keeps_its_time_and_a_running_one_moves_only_with_its_own_reports() -> None:
    first = usage_of(
        None, [FIRST, SECOND], gpus=1, progress=report("job-b", "2026-01-01T00:16:00Z"), gpu_products=PRODUCTS,
        prices=PRICES,
    )  # fmt: skip
    assert first is not None
    previous = first.model_dump(by_alias=True)
    # The first pod was cleaned up; the second reported again five minutes later.
    later = usage_of(
        previous, [SECOND], gpus=1, progress=report("job-b", "2026-01-01T00:21:00Z"), gpu_products=PRODUCTS,
        prices=PRICES,
    )  # fmt: skip
    assert later is not None and later.gpu_seconds == 600 + 600
    # A report of another attempt, or none, gives the running pod no time (and takes none back).
    stale = usage_of(
        later.model_dump(by_alias=True), [SECOND], gpus=1, progress=report("job-a", "2026-01-01T01:00:00Z"),
        gpu_products=PRODUCTS, prices=PRICES,
    )  # fmt: skip
    assert stale is not None and stale.gpu_seconds == 1200


def test_time_pending_or_queued_is_not_usage_and_no_price_means_no_cost() -> None:
    waiting = pod("job-a", created="2026-01-01T00:00:00Z", state={"waiting": {"reason": "ContainerCreating"}})
    unscheduled = pod("job-a", created="2026-01-01T00:00:00Z", state=None, node=None)
    for pods in ([waiting], [unscheduled], []):
        assert usage_of(None, pods, gpus=1, progress=None, gpu_products=PRODUCTS, prices=PRICES) is None
    used = usage_of(None, [FIRST], gpus=1, progress=None, gpu_products={"gpu-node-1": "A100"}, prices=PRICES)
    assert used is not None and used.gpu_product == "A100"
    assert used.cost is None and used.currency is None


def test_prices_are_product_equals_price() -> None:
    assert parse_prices("NVIDIA-H100-80GB-HBM3=2.49, NVIDIA-A100-SXM4-80GB=1.5") == {
        "NVIDIA-H100-80GB-HBM3": 2.49,
        "NVIDIA-A100-SXM4-80GB": 1.5,
    }
    assert parse_prices("") == {}
    for bad in ("H100", "H100=cheap", "=2", "H100=-1"):
        with pytest.raises(ValueError, match="PRODUCT=PRICE"):
            parse_prices(bad)


def test_the_metrics_sum_status_usage_by_namespace_and_queue_and_keep_deleted_jobs() -> None:
    metrics = Metrics()
    metrics.usage("team-a", "one", "gpus", {"gpuSeconds": 100.0, "cost": 0.1, "currency": "EUR"})
    metrics.usage("team-a", "two", "gpus", {"gpuSeconds": 50.0})
    metrics.usage("team-b", "three", "", {"gpuSeconds": 10.0, "cost": 0.01, "currency": "EUR"})
    metrics.forget("team-a", "one")  # deleted: what it used stays in the totals
    metrics.usage("team-a", "two", None, {"gpuSeconds": 60.0})  # queue None: the one it had
    text = prometheus_text(metrics)[0].decode()
    assert 'finetune_usage_gpu_seconds_total{namespace="team-a",queue="gpus"} 160.0' in text
    assert 'finetune_usage_gpu_seconds_total{namespace="team-b",queue=""} 10.0' in text
    assert 'finetune_cost_total{currency="EUR",namespace="team-a",queue="gpus"} 0.1' in text
    assert 'finetune_cost_total{currency="EUR",namespace="team-b",queue=""} 0.01' in text
