"""Kueue: the queue and priority labels on the Job, and a queued Job created suspended."""

from __future__ import annotations

from typing import Any

from finetune_api.contract import KUEUE_PRIORITY_LABEL, KUEUE_QUEUE_LABEL
from finetune_operator.render.kueue import queue_in_kueue
from tests.unit.render.specs import parsed, with_fields


def test_without_a_queue_the_job_runs_at_once_and_carries_no_kueue_label(job: dict[str, Any]) -> None:
    queue_in_kueue(job, parsed().spec.run_policy)
    assert job["spec"]["suspend"] is False
    assert not {KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL} & job["metadata"]["labels"].keys()


def test_a_queued_job_is_created_suspended_for_kueue_to_admit(job: dict[str, Any]) -> None:
    queue_in_kueue(job, parsed(with_fields("runPolicy", queueName="gpu", priorityClass="high")).spec.run_policy)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu"
    assert job["metadata"]["labels"][KUEUE_PRIORITY_LABEL] == "high"
    # Kueue reads the Job's labels; the pods' stay ours.
    template_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not {KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL} & template_labels.keys()


def test_a_suspended_job_without_a_queue_is_created_suspended(job: dict[str, Any]) -> None:
    queue_in_kueue(job, parsed(with_fields("runPolicy", suspend=True)).spec.run_policy)
    assert job["spec"]["suspend"] is True
    assert KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]
