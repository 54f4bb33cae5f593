"""Failure policy: what a failed pod means for the Job.

Kubernetes does the retries (backoffLimit), the disruption handling (podFailurePolicy) and the
deadline; the trainer's exit code says which kind of failure it was.  A retried pod resumes from
the newest complete checkpoint.
"""

from __future__ import annotations

from finetune_api.contract import CONTAINER_NAME
from finetune_api.report import ExitCode
from finetune_api.v1alpha1 import RunPolicy
from finetune_operator.render.trainer import Manifest, pod_spec

# SIGTERM (preemption, a drained node, a deleted pod) to SIGKILL: the trainer stops its workers,
# writes its summary and exits as a transient failure that a retry resumes.
TERMINATION_GRACE_SECONDS = 60


def add_failure_policy(job: Manifest, policy: RunPolicy) -> None:
    spec = job["spec"]
    spec["backoffLimit"] = policy.backoff_limit
    spec["podFailurePolicy"] = {
        "rules": [
            {
                # Bad input and out-of-memory cannot succeed on a retry.
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": [int(ExitCode.BAD_INPUT), int(ExitCode.OUT_OF_MEMORY)],
                },
            },
            {
                # Preemption, eviction, node drain: not the job's fault.
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
        ]
    }
    if policy.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    # No ttlSecondsAfterFinished here: the operator sets it once the final status is written,
    # so that a Job (and its pods' termination messages) outlives an operator that was down.
    pod = pod_spec(job)
    # A pod that failed is replaced by the Job, never restarted in place: the podFailurePolicy
    # and the retry budget see every attempt (and a Job's podFailurePolicy requires Never).
    pod["restartPolicy"] = "Never"
    pod["terminationGracePeriodSeconds"] = TERMINATION_GRACE_SECONDS
