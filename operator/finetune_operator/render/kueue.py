"""Kueue: which queue admits the Job and in which order.

Kueue admits a Job by resuming it, so a queued Job is created suspended; ``runPolicy.suspend``
is the same switch in the user's hands.  The labels go on the Job only, where Kueue reads them:
the pods' labels stay ours.
"""

from __future__ import annotations

from finetune_api.contract import KUEUE_PRIORITY_LABEL, KUEUE_QUEUE_LABEL
from finetune_api.v1alpha1 import RunPolicy
from finetune_operator.render.trainer import Manifest


def queue_in_kueue(job: Manifest, policy: RunPolicy) -> None:
    labels = job["metadata"]["labels"]
    if policy.queue_name:
        labels[KUEUE_QUEUE_LABEL] = policy.queue_name
    if policy.priority_class:
        # Kueue's WorkloadPriorityClass: the order of admission and who may preempt whom.
        labels[KUEUE_PRIORITY_LABEL] = policy.priority_class
    # With Kueue the Job starts suspended and Kueue admits it.
    job["spec"]["suspend"] = bool(policy.suspend or policy.queue_name)
