"""Placement: what the pod asks of a node (GPUs, CPU, memory) and which nodes it may use
(node selector, tolerations, affinity, priority class)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from finetune_api.v1alpha1 import Resources
from finetune_operator.render.trainer import Manifest, pod_spec, trainer_container

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"


def place_pod(
    job: Manifest,
    resources: Resources,
    *,
    gpu_resource: str = DEFAULT_GPU_RESOURCE,
    default_tolerations: Sequence[dict[str, Any]] = (),
) -> None:
    """``gpu_resource`` and ``default_tolerations`` are the operator's settings for the cluster;
    a spec that names its own GPU resource (not the default) wins, and its tolerations come
    after the cluster's, each once."""
    gpu_name = resources.gpu_resource if resources.gpu_resource != DEFAULT_GPU_RESOURCE else gpu_resource
    trainer_container(job)["resources"] = {
        "requests": {"cpu": resources.cpu, "memory": resources.memory},
        # GPUs cannot be overcommitted: a GPU request is its limit, so only the limit is written.
        "limits": {gpu_name: str(resources.gpus), "memory": resources.memory},
    }
    pod = pod_spec(job)
    tolerations = [copy.deepcopy(t) for t in default_tolerations]
    tolerations += [t for t in resources.tolerations if t not in tolerations]
    pod["tolerations"] = tolerations
    if resources.node_selector:
        pod["nodeSelector"] = dict(resources.node_selector)
    if resources.affinity:
        pod["affinity"] = copy.deepcopy(resources.affinity)
    if resources.priority_class_name:
        pod["priorityClassName"] = resources.priority_class_name
