"""Failure policy: retries, what fails the Job at once, what is not the job's fault, the deadline."""

from __future__ import annotations

from typing import Any

from finetune_api.report import ExitCode
from finetune_operator.render.failure_policy import add_failure_policy
from finetune_operator.render.trainer import pod_spec
from tests.unit.render.specs import parsed, with_fields


def test_bad_input_and_out_of_memory_fail_at_once_and_disruptions_cost_no_retry(job: dict[str, Any]) -> None:
    add_failure_policy(job, parsed().spec.run_policy)
    spec = job["spec"]
    assert spec["backoffLimit"] == 3
    fail, ignore = spec["podFailurePolicy"]["rules"]
    assert fail["action"] == "FailJob"
    assert fail["onExitCodes"] == {
        "containerName": "trainer",
        "operator": "In",
        "values": [int(ExitCode.BAD_INPUT), int(ExitCode.OUT_OF_MEMORY)],
    }
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert "activeDeadlineSeconds" not in spec
    pod = pod_spec(job)
    # The Job replaces a failed pod (and counts it); a Job's podFailurePolicy requires Never.
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 60


def test_run_policy_sets_retries_and_deadline_but_never_the_ttl_at_creation(job: dict[str, Any]) -> None:
    policy = parsed(
        with_fields("runPolicy", backoffLimit=0, activeDeadlineSeconds=3600, ttlSecondsAfterFinished=600)
    ).spec.run_policy
    add_failure_policy(job, policy)
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    # The operator sets the TTL once the final status is written: a Job deleted earlier would
    # take the pods' termination messages with it.
    assert "ttlSecondsAfterFinished" not in job["spec"]
