"""Placement: what the pod asks of a node (GPUs, CPU, memory) and which nodes it may use
(node selector, tolerations, affinity, priority class): the cluster's default tolerations, the
job's placement profile, then the job's own."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from finetune_api.job_policy import PlacementProfile
from finetune_api.v1alpha1 import Resources
from finetune_operator.render.trainer import Manifest, pod_spec, trainer_container

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"


def place_pod(
    job: Manifest,
    resources: Resources,
    *,
    gpu_resource: str = DEFAULT_GPU_RESOURCE,
    default_tolerations: Sequence[dict[str, Any]] = (),
    profile: PlacementProfile | None = None,
) -> None:
    """``gpu_resource`` and ``default_tolerations`` are the operator's settings for the cluster;
    a spec that names its own GPU resource (not the default) wins, and its tolerations come
    after the cluster's and its profile's, each once.  The profile (the platform team's) wins
    over the job where both set a node label, an affinity or a priority class."""
    profile = profile or PlacementProfile()
    gpu_name = resources.gpu_resource if resources.gpu_resource != DEFAULT_GPU_RESOURCE else gpu_resource
    trainer_container(job)["resources"] = {
        "requests": {"cpu": resources.cpu, "memory": resources.memory},
        # GPUs cannot be overcommitted: a GPU request is its limit, so only the limit is written.
        "limits": {gpu_name: str(resources.gpus), "memory": resources.memory},
    }
    pod = pod_spec(job)
    tolerations = [copy.deepcopy(t) for t in default_tolerations]
    for toleration in (*profile.tolerations, *resources.tolerations):
        if toleration not in tolerations:
            tolerations.append(copy.deepcopy(toleration))
    pod["tolerations"] = tolerations
    node_selector = {**resources.node_selector, **profile.node_selector}
    if node_selector:
        pod["nodeSelector"] = node_selector
    affinity = profile.affinity or resources.affinity
    if affinity:
        pod["affinity"] = copy.deepcopy(affinity)
    priority_class = profile.priority_class_name or resources.priority_class_name
    if priority_class:
        pod["priorityClassName"] = priority_class
