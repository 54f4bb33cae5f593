"""Simulated GPU capacity for the benchmarks: KWOK keeps fake nodes Ready and moves their
pods through Running to Succeeded after a delay, without running anything.

The stages are written here (KWOK runs no stage unless given some): a node becomes Ready;
a scheduled pod becomes Running; a Running pod of a Job becomes Succeeded after
``complete_after`` seconds, except in namespaces listed in ``keep_running``; a pod being
deleted is removed.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

LABEL = "type=kwok"


def stages(*, complete_after: float, keep_running: list[str]) -> list[dict[str, Any]]:
    node_ready = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": "bench-node-ready"},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Node"},
            "selector": {
                "matchExpressions": [
                    {
                        "key": '.status.conditions.[] | select( .type == "Ready" ) | .status',
                        "operator": "NotIn",
                        "values": ["True"],
                    }
                ]
            },
            "next": {
                "statusTemplate": (
                    "{{ $now := Now }}\n"
                    "conditions:\n"
                    '- type: Ready\n  status: "True"\n  reason: KubeletReady\n  message: simulated\n'
                    "  lastHeartbeatTime: {{ $now | Quote }}\n  lastTransitionTime: {{ $now | Quote }}\n"
                    "allocatable:\n{{ YAML .status.allocatable 1 }}\n"
                    "capacity:\n{{ YAML .status.capacity 1 }}\n"
                    "phase: Running\n"
                )
            },
        },
    }
    pod_running = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": "bench-pod-running"},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {
                "matchExpressions": [
                    {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
                    {"key": ".status.phase", "operator": "In", "values": ["Pending"]},
                ]
            },
            "next": {
                "statusTemplate": (
                    "{{ $now := Now }}\n"
                    "conditions:\n"
                    '- {type: Initialized, status: "True", lastTransitionTime: {{ $now | Quote }}}\n'
                    '- {type: ContainersReady, status: "True", lastTransitionTime: {{ $now | Quote }}}\n'
                    '- {type: Ready, status: "True", lastTransitionTime: {{ $now | Quote }}}\n'
                    "containerStatuses:\n"
                    "{{ range .spec.containers }}\n"
                    "- name: {{ .name | Quote }}\n  image: {{ .image | Quote }}\n  ready: true\n"
                    "  restartCount: 0\n  started: true\n"
                    "  state: {running: {startedAt: {{ $now | Quote }}}}\n"
                    "{{ end }}\n"
                    "phase: Running\n"
                    "startTime: {{ $now | Quote }}\n"
                )
            },
        },
    }
    complete_selector = [
        {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
        {"key": ".status.phase", "operator": "In", "values": ["Running"]},
        {"key": ".metadata.ownerReferences.[].kind", "operator": "In", "values": ["Job"]},
    ]
    if keep_running:
        complete_selector.append({"key": ".metadata.namespace", "operator": "NotIn", "values": keep_running})
    pod_complete = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": "bench-pod-complete"},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {"matchExpressions": complete_selector},
            "delay": {"durationMilliseconds": int(complete_after * 1000)},
            "next": {
                "statusTemplate": (
                    "{{ $now := Now }}\n"
                    "containerStatuses:\n"
                    "{{ range .spec.containers }}\n"
                    "- name: {{ .name | Quote }}\n  image: {{ .image | Quote }}\n  ready: false\n"
                    "  restartCount: 0\n  started: false\n"
                    "  state: {terminated: {exitCode: 0, reason: Completed, "
                    "startedAt: {{ $now | Quote }}, finishedAt: {{ $now | Quote }}}}\n"
                    "{{ end }}\n"
                    "phase: Succeeded\n"
                )
            },
        },
    }
    pod_delete = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": "bench-pod-delete"},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {"matchExpressions": [{"key": ".metadata.deletionTimestamp", "operator": "Exists"}]},
            "next": {"finalizers": {"empty": True}, "delete": True},
        },
    }
    return [node_ready, pod_running, pod_complete, pod_delete]


def node(name: str, *, gpus: int) -> dict[str, Any]:
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"type": "kwok", "kubernetes.io/hostname": name, "nvidia.com/gpu.present": "true"},
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "status": {"capacity": capacity, "allocatable": capacity},
    }


@dataclass
class Kwok:
    process: subprocess.Popen[bytes]
    config: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start(binary: Path, *, kubeconfig: Path, workdir: Path, complete_after: float, keep_running: list[str]) -> Kwok:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "kwok-stages.yaml"
    config.write_text(yaml.safe_dump_all(stages(complete_after=complete_after, keep_running=keep_running)))
    log = open(workdir / "kwok.log", "wb")  # noqa: SIM115 (the process writes to it until stop)
    process = subprocess.Popen(
        [
            str(binary),
            f"--kubeconfig={kubeconfig}",
            f"--config={config}",
            f"--manage-nodes-with-label-selector={LABEL}",
            "--cidr=10.64.0.0/12",
            "--node-ip=10.0.0.1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Kwok(process, config)


def create_nodes(kubectl: Any, count: int, *, gpus: int) -> None:
    items = [node(f"kwok-gpu-{i:04d}", gpus=gpus) for i in range(count)]
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
