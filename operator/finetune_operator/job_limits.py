"""What one FineTuneJob may ask for on this cluster, as the platform team set it (the chart's
``jobLimits``, the operator's ``--max-gpus-per-job`` and ``--max-memory-per-job``).

The CRD holds every spec to the API's own ranges; these are the cluster's, which a CRD cannot
know.  A job beyond them fails with InvalidSpec before any Job is made, naming the field, the
limit and where it is set.
"""

from __future__ import annotations

from finetune_api.rules import quantity_value
from finetune_api.v1alpha1 import FineTuneJobSpec


def problems(spec: FineTuneJobSpec, *, max_gpus: int, max_memory: str) -> list[str]:
    """Sentences naming what is beyond the limits (none where a limit is unset: 0 or "")."""
    found = []
    resources = spec.resources
    if max_gpus and resources.gpus > max_gpus:
        found.append(
            f"spec.resources.gpus: {resources.gpus} is more than a job may ask for on this cluster (at most "
            f"{max_gpus}: the operator's --max-gpus-per-job, the chart's jobLimits.maxGPUs); ask for fewer"
        )
    if max_memory and quantity_value(resources.memory) > quantity_value(max_memory):
        found.append(
            f"spec.resources.memory: {resources.memory} is more than a job may ask for on this cluster (at most "
            f"{max_memory}: the operator's --max-memory-per-job, the chart's jobLimits.maxMemory); ask for less"
        )
    return found
