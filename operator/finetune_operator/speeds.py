"""An estimate before a job runs: the measured speed of finished jobs of the same kind.

A kind is what sets the speed of a step: the model family, the method, the resolution, the batch
(size x accumulation) and the GPUs per job.  For each succeeded job the operator keeps, in a
ConfigMap of its own (so a restart or a new leader keeps it), the trainer's measured seconds per
step, the rest of the pods' running time (loading, caching, sampling, exporting) and the GPU
product it ran on; the newest ``KEEP`` per kind.

A new FineTuneJob with ``training.maxSteps`` (with stepsPerImage its steps depend on photos
nobody has counted yet) whose kind has at least ``MIN_JOBS`` such jobs gets ``status.estimate``
before its Job is admitted: the mean rest plus its steps at the mean seconds per step, and at the
price of the newest sample's GPU product, the cost.  It is an estimate, never a promise: the
data, the node and the other jobs on it change the figure.  A job that has started is never given
one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from finetune_api.v1alpha1 import EstimateStatus, FineTuneJobSpec
from finetune_operator import usage

KEEP = 10
MIN_JOBS = 2
CONFIGMAP_KEY = "speeds.json"


@dataclass(frozen=True)
class Sample:
    seconds_per_step: float
    overhead_seconds: float
    gpu_product: str | None = None


def kind_of(spec: FineTuneJobSpec) -> str:
    training = spec.training
    return (
        f"{spec.base_model.type}.{spec.method}.{spec.resolution}px.batch{training.batch_size}"
        f"x{training.gradient_accumulation_steps}.{spec.resources.gpus}gpu"
    )


def duration_text(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{max(minutes, 1)}m"
    return f"{minutes // 60}h{minutes % 60:02d}m"


class SpeedBook:
    """Samples by kind, newest last."""

    def __init__(self, samples: Mapping[str, list[Sample]] | None = None) -> None:
        self.samples: dict[str, list[Sample]] = {k: list(v) for k, v in (samples or {}).items()}

    def record(
        self, spec: FineTuneJobSpec, *, steps: int, steps_per_second: float, run_seconds: float, product: str | None
    ) -> bool:
        """A succeeded job's speed; False where it says nothing (no steps, no speed)."""
        if steps <= 0 or steps_per_second <= 0 or run_seconds <= 0:
            return False
        per_step = 1.0 / steps_per_second
        sample = Sample(round(per_step, 6), round(max(0.0, run_seconds - steps * per_step), 1), product)
        kept = self.samples.setdefault(kind_of(spec), [])
        kept.append(sample)
        del kept[:-KEEP]
        return True

    def estimate(self, spec: FineTuneJobSpec, prices: usage.Prices) -> EstimateStatus | None:
        steps = spec.training.max_steps
        kept = self.samples.get(kind_of(spec), [])
        if steps is None or len(kept) < MIN_JOBS:
            return None
        per_step = sum(s.seconds_per_step for s in kept) / len(kept)
        overhead = sum(s.overhead_seconds for s in kept) / len(kept)
        seconds = overhead + steps * per_step
        product = kept[-1].gpu_product
        price = prices.per_gpu_hour.get(product) if product else None
        return EstimateStatus(
            duration_seconds=round(seconds),
            duration_text=duration_text(seconds),
            gpu_product=product,
            cost=round(seconds / 3600 * spec.resources.gpus * price, 4) if price is not None else None,
            currency=prices.currency if price is not None else None,
            based_on=len(kept),
        )

    def to_data(self) -> dict[str, str]:
        return {CONFIGMAP_KEY: json.dumps({k: [asdict(s) for s in v] for k, v in sorted(self.samples.items())})}

    @classmethod
    def from_data(cls, data: Mapping[str, Any] | None) -> SpeedBook:
        try:
            raw = json.loads((data or {}).get(CONFIGMAP_KEY) or "{}")
            return cls({k: [Sample(**s) for s in v] for k, v in raw.items()})
        except (ValueError, TypeError):
            return cls()  # a hand-edited ConfigMap that does not parse: start afresh
