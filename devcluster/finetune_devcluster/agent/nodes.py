"""The agent's Nodes: what they offer (GPUs, the kubelet API's port), and the heartbeats
(status conditions and Leases) that keep them Ready."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_devcluster.agent.fields import now

LOG = logging.getLogger("node-agent")

AGENT_LABEL = "finetune.dev/local-agent"
HEARTBEAT_SECONDS = 10


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpus: int
    cpu: str = "16"
    memory: str = "64Gi"


DEFAULT_NODES = (NodeSpec("gpu-node-1", 1), NodeSpec("gpu-node-2", 2))


def parse_nodes(text: str) -> tuple[NodeSpec, ...]:
    """``gpu-node-1=1,gpu-node-2=2`` -> NodeSpecs."""
    nodes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, gpus = item.partition("=")
        nodes.append(NodeSpec(name, int(gpus or 1)))
    return tuple(nodes)


def node_manifest(node: NodeSpec, *, kubelet_port: int | None = None) -> dict[str, Any]:
    capacity = {
        "cpu": node.cpu,
        "memory": node.memory,
        "pods": "110",
        "ephemeral-storage": "100Gi",
        "nvidia.com/gpu": str(node.gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {
                AGENT_LABEL: "true",
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": f"local-gpu-{node.gpus}",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": str(node.gpus),
                "nvidia.com/gpu.product": "Local-Simulated-GPU",
            },
        },
        "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": node_conditions(),
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": node.name},
            ],
            # Where the apiserver finds this node's kubelet API (container logs, see logserver.py).
            **({"daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}}} if kubelet_port else {}),
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "v1.36.3",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "local://finetune-node-agent",
                "osImage": "finetune local node agent",
                "kernelVersion": os.uname().release,
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
            },
        },
    }


def node_conditions() -> list[dict[str, str]]:
    stamp = now()
    healthy = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID"),
        ("Ready", "True", "KubeletReady"),
    ]
    return [
        {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": "local node agent",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }
        for kind, status, reason in healthy
    ]


class Nodes:
    """Registers the agent's nodes and keeps them Ready."""

    def __init__(self, api_client: client.ApiClient, nodes: tuple[NodeSpec, ...]) -> None:
        self.core = client.CoreV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self.nodes = nodes

    def register(self, *, kubelet_port: int | None) -> None:
        for node in self.nodes:
            body = node_manifest(node, kubelet_port=kubelet_port)
            try:
                self.core.create_node(body)
                LOG.info("event=node-registered node=%s gpus=%d", node.name, node.gpus)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                self.core.patch_node(node.name, {"metadata": {"labels": body["metadata"]["labels"]}})
            self.core.patch_node_status(node.name, {"status": body["status"]})

    def heartbeat(self) -> None:
        for node in self.nodes:
            capacity = node_manifest(node)["status"]["capacity"]
            status = {"conditions": node_conditions(), "capacity": capacity, "allocatable": capacity}
            try:
                self.core.patch_node_status(node.name, {"status": status})
                self._renew_lease(node.name)
            except ApiException as exc:
                if exc.status == 404:
                    self.core.create_node(node_manifest(node))
                else:
                    LOG.warning("event=heartbeat-failed node=%s status=%s", node.name, exc.status)

    def _renew_lease(self, name: str) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": stamp},
        }
        try:
            self.coordination.patch_namespaced_lease(name, "kube-node-lease", {"spec": body["spec"]})
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    def heartbeat_loop(self, stopping: threading.Event) -> None:
        while not stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.heartbeat()
            except Exception:
                LOG.exception("event=heartbeat-error")
