"""The order in which a Job's fields are written, in one place.

The builders each add their part wherever they run, and the order of a Job's keys and of its
env, volumes and mounts stays what it was when one function wrote them all: the Jobs we send
(and ``kubectl get job -o yaml`` of what we sent, and a diff of two rendered Jobs) read the
same.  A field or a name not listed here keeps the order it was added in, after the listed ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finetune_api.contract import (
    ANNOTATION_FULL_NAME,
    ANNOTATION_JOB_FILE,
    ANNOTATION_REPORT_CA,
    ENV_ATTEMPT,
    ENV_CACHE_DIR,
    ENV_CREDENTIALS_DIR,
    ENV_CREDENTIALS_SECRET,
    ENV_JOB,
    ENV_REPORT_CA_FILE,
    ENV_REPORT_TOKEN_FILE,
    ENV_REPORT_URL,
    ENV_TERMINATION_LOG,
)
from finetune_operator.render.job_file import JOB_FILE_VOLUME
from finetune_operator.render.report_channel import REPORT_VOLUME
from finetune_operator.render.security import CREDENTIALS_VOLUME
from finetune_operator.render.trainer import CACHE_VOLUME, SHM_VOLUME, TMP_VOLUME, Manifest, pod_spec

JOB_SPEC = (
    "completions",
    "parallelism",
    "backoffLimit",
    "suspend",
    "podFailurePolicy",
    "template",
    "activeDeadlineSeconds",
)
TEMPLATE_ANNOTATIONS = (ANNOTATION_FULL_NAME, ANNOTATION_JOB_FILE, ANNOTATION_REPORT_CA)
POD_SPEC = (
    "restartPolicy",
    "automountServiceAccountToken",
    "enableServiceLinks",
    "securityContext",
    "containers",
    "volumes",
    "tolerations",
    "terminationGracePeriodSeconds",
    "nodeSelector",
    "affinity",
    "priorityClassName",
)
CONTAINER = (
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "env",
    "resources",
    "volumeMounts",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "securityContext",
)
ENV = (
    ENV_REPORT_URL,
    ENV_JOB,
    ENV_ATTEMPT,
    ENV_REPORT_TOKEN_FILE,
    ENV_TERMINATION_LOG,
    "HF_HOME",
    ENV_CACHE_DIR,
    "PYTHONUNBUFFERED",
    ENV_REPORT_CA_FILE,
    ENV_CREDENTIALS_DIR,
    ENV_CREDENTIALS_SECRET,
)
# The claims come after these, in the order they were mounted (by claim name).
VOLUMES = (JOB_FILE_VOLUME, REPORT_VOLUME, SHM_VOLUME, CACHE_VOLUME, TMP_VOLUME, CREDENTIALS_VOLUME)


def _keys_in_order(mapping: dict[str, Any], order: Sequence[str]) -> dict[str, Any]:
    rank = {key: i for i, key in enumerate(order)}
    return dict(sorted(mapping.items(), key=lambda item: rank.get(item[0], len(order))))


def _names_in_order(items: list[dict[str, Any]], order: Sequence[str]) -> list[dict[str, Any]]:
    rank = {name: i for i, name in enumerate(order)}
    return sorted(items, key=lambda item: rank.get(item["name"], len(order)))


def arrange(job: Manifest) -> None:
    """Put the fields of ``job`` in the order above, in place (sorting is stable: what is not
    listed keeps its order)."""
    job["spec"] = _keys_in_order(job["spec"], JOB_SPEC)
    template = job["spec"]["template"]
    template["metadata"]["annotations"] = _keys_in_order(template["metadata"]["annotations"], TEMPLATE_ANNOTATIONS)
    pod = template["spec"] = _keys_in_order(pod_spec(job), POD_SPEC)
    pod["volumes"] = _names_in_order(pod["volumes"], VOLUMES)
    containers = pod["containers"] = [_keys_in_order(c, CONTAINER) for c in pod["containers"]]
    for container in containers:
        container["env"] = _names_in_order(container["env"], ENV)
        container["volumeMounts"] = _names_in_order(container["volumeMounts"], VOLUMES)
