"""status.usage: the GPU time a FineTuneJob has used over all its attempts, and what it cost.

Each attempt is a pod; its running time is its trainer container's, from ``startedAt`` to
``finishedAt``, or, while it runs, to the time of the newest progress report that pod sent.  So
the figure is made only of what the pods and the reports say (no clock of the operator's), moves
when they do (a status write is due then anyway, and an unchanged figure never causes one), and
time spent pending, queued in Kueue or suspended is never in it.  A pod that is gone (a retry's
predecessor after the Job's pod cleanup, a pod Kueue evicted) keeps the figure last seen for it,
carried in ``usage.pods``.

The cost is ``gpuSeconds / 3600`` times the price per GPU-hour the operator is given for the GPU
product of the node the newest attempt ran on (its label, ``nvidia.com/gpu.product`` by
default); without a price there is no cost, never a guessed one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_api.contract import CONTAINER_NAME
from finetune_api.report import ProgressEvent
from finetune_api.v1alpha1 import PodUsage, UsageStatus
from finetune_operator.timestamps import parse_rfc3339

MAX_PODS = 64


@dataclass(frozen=True)
class Prices:
    """Prices per GPU-hour by GPU product (the node label's value), and their currency."""

    per_gpu_hour: Mapping[str, float] = field(default_factory=dict)
    currency: str = "USD"


NO_PRICES = Prices()


def _trainer_state(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    for container in statuses:
        if container.get("name") == CONTAINER_NAME:
            return dict(container.get("state") or {})
    return {}


def pod_seconds(pod: dict[str, Any], progress: ProgressEvent | None) -> float:
    """How long the pod's trainer has run, as far as the pod and its reports say."""
    state = _trainer_state(pod)
    if "terminated" in state:
        started = parse_rfc3339(state["terminated"].get("startedAt"))
        finished = parse_rfc3339(state["terminated"].get("finishedAt"))
    elif "running" in state:
        started = parse_rfc3339(state["running"].get("startedAt"))
        name = pod.get("metadata", {}).get("name")
        finished = parse_rfc3339(progress.time) if progress is not None and progress.attempt == name else None
    else:
        return 0.0
    if started is None or finished is None:
        return 0.0
    return max(0.0, (finished - started).total_seconds())


def usage_of(
    previous: Mapping[str, Any] | None,
    pods: Sequence[dict[str, Any]],
    *,
    gpus: int,
    progress: ProgressEvent | None,
    gpu_products: Mapping[str, str],
    prices: Prices,
) -> UsageStatus | None:
    """The new status.usage from the last one written (``previous``, wire form) and the pods
    now seen; None before any pod has run."""
    seconds: dict[str, float] = {}
    for entry in (previous or {}).get("pods") or []:
        if entry.get("name"):
            seconds[entry["name"]] = float(entry.get("seconds") or 0)
    newest: dict[str, Any] | None = None
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or ""):
        name = pod.get("metadata", {}).get("name")
        if not name:
            continue
        ran = pod_seconds(pod, progress)
        if name in seconds or ran > 0:
            # Never less than before: a report older than the last one read gives no step back.
            seconds[name] = max(seconds.get(name, 0.0), ran)
        if pod.get("spec", {}).get("nodeName"):
            newest = pod
    if not seconds:
        return None
    entries = [PodUsage(name=n, seconds=round(s, 1)) for n, s in list(seconds.items())[-MAX_PODS:]]
    gpu_seconds = round(gpus * sum(seconds.values()), 1)
    product = (previous or {}).get("gpuProduct")
    if newest is not None:
        product = gpu_products.get(newest["spec"]["nodeName"], product)
    price = prices.per_gpu_hour.get(product) if product else None
    return UsageStatus(
        gpus=gpus,
        gpu_seconds=gpu_seconds,
        gpu_product=product,
        cost=round(gpu_seconds / 3600 * price, 4) if price is not None else None,
        currency=prices.currency if price is not None else None,
        pods=entries,
    )


def parse_prices(text: str) -> dict[str, float]:
    """``PRODUCT=PRICE,PRODUCT=PRICE`` (the operator's --gpu-hour-prices) as a mapping."""
    prices: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        product, sep, price = item.rpartition("=")
        try:
            value = float(price)
        except ValueError:
            value = -1.0
        if not sep or not product or value < 0:
            raise ValueError(f"--gpu-hour-prices: {item!r} is not PRODUCT=PRICE (e.g. NVIDIA-H100-80GB-HBM3=2.49)")
        prices[product] = value
    return prices
