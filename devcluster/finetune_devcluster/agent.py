"""The local node agent: the kubelet of a few GPU nodes, running each pod's command as a local process.

It registers Nodes with ``nvidia.com/gpu`` capacity and keeps them Ready (status
heartbeats and Leases), provisions PersistentVolumes for claims of the ``local``
StorageClass (a directory per claim under ``<state>/volumes/NS/CLAIM``), and for
every pod bound to its nodes:

* materialises ConfigMap, Secret, downwardAPI, projected and emptyDir volumes in a
  per-pod directory and maps PVCs and hostPaths to their directories;
* runs each container's command (the image is ignored; this Python environment is
  on the PATH) in a mount namespace of its own where every volume is bind-mounted
  at its ``mountPath``, so the process sees the paths a real pod would;
* reports phase, container states, exit codes and the termination message (the
  file named by ``FINETUNE_TERMINATION_LOG``, or the log tail on error);
* honours deletion as a kubelet does: SIGTERM, the grace period, SIGKILL, the final
  status, then the delete with grace 0;
* serves the kubelet API's container logs on loopback (``kubectl logs [-f]``), see
  ``logserver.py``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from finetune_devcluster.logserver import LogServer

LOG = logging.getLogger("node-agent")

AGENT_LABEL = "finetune.dev/local-agent"
PROVISIONER = "finetune.dev/local-agent"
STORAGE_CLASS = "local"
HEARTBEAT_SECONDS = 10
TERMINATION_MESSAGE_LIMIT = 4096
LOG_FALLBACK_LINES = 80
LOG_FALLBACK_BYTES = 2048


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


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


@dataclass
class MountPoint:
    source: Path
    target: str
    read_only: bool


@dataclass
class ContainerRun:
    name: str
    process: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    log: Path | None = None
    termination_file: Path | None = None
    message: str = ""


@dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    directory: Path
    containers: dict[str, ContainerRun] = field(default_factory=dict)
    thread: threading.Thread | None = None
    terminating: threading.Event = field(default_factory=threading.Event)
    grace_seconds: float = 30.0
    created_mount_points: list[Path] = field(default_factory=list)


class MountPoints:
    """Mount points made on the host for pods, removed when the last pod using them ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[Path, int] = {}

    def acquire(self, target: str, *, is_dir: bool) -> list[Path]:
        """Create ``target`` (and missing parents) on the host; return the paths to release later."""
        path = Path(target)
        with self._lock:
            if path in self._users:
                # Made for another pod that still runs: share it.
                self._users[path] += 1
                return [path]
            missing = []
            probe = path
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            created = []
            for item in reversed(missing):
                if item == path and not is_dir:
                    item.touch()
                else:
                    item.mkdir()
                self._users[item] = 1
                created.append(item)
            return created

    def release(self, paths: list[Path]) -> None:
        with self._lock:
            for item in sorted(paths, key=lambda p: len(p.parts), reverse=True):
                count = self._users.get(item, 0) - 1
                if count > 0:
                    self._users[item] = count
                    continue
                self._users.pop(item, None)
                with contextlib.suppress(OSError):
                    if item.is_dir():
                        item.rmdir()
                    elif item.is_file() and item.stat().st_size == 0:
                        item.unlink()


class NodeAgent:
    def __init__(self, *, state_dir: Path, nodes: tuple[NodeSpec, ...] = DEFAULT_NODES) -> None:
        self.state_dir = state_dir.resolve()
        self.nodes = nodes
        self.node_names = {n.name for n in nodes}
        kubeconfig = self.state_dir / "system-node-agent.kubeconfig"
        if not kubeconfig.is_file():
            kubeconfig = self.state_dir / "kubeconfig"
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.api_client.configuration.connection_pool_maxsize = 32
        self.core = client.CoreV1Api(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)
        self.storage = client.StorageV1Api(self.api_client)
        self.runs: dict[str, PodRun] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.mount_points = MountPoints()
        self.pods_dir = self.state_dir / "pods"
        self.volumes_dir = self.state_dir / "volumes"
        self.log_server: LogServer | None = None

    # --- nodes -----------------------------------------------------------------------------------

    def register_nodes(self) -> None:
        port = self.log_server.port if self.log_server else None
        for node in self.nodes:
            body = node_manifest(node, kubelet_port=port)
            try:
                self.core.create_node(body)
                LOG.info("event=node-registered node=%s gpus=%d", node.name, node.gpus)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                self.core.patch_node(node.name, {"metadata": {"labels": body["metadata"]["labels"]}})
            self.core.patch_node_status(node.name, {"status": body["status"]})
        self._ensure_storage_class()
        self.heartbeat()

    def _ensure_storage_class(self) -> None:
        body = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Retain",
            "volumeBindingMode": "Immediate",
        }
        with contextlib.suppress(ApiException):
            self.storage.create_storage_class(body)

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

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            try:
                self.heartbeat()
            except Exception:
                LOG.exception("event=heartbeat-error")

    # --- volumes ---------------------------------------------------------------------------------

    def claim_dir(self, namespace: str, claim: str) -> Path:
        return self.volumes_dir / namespace / claim

    def _provision_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                claims = self.core.list_persistent_volume_claim_for_all_namespaces()
                stream = watch.Watch().stream(
                    self.core.list_persistent_volume_claim_for_all_namespaces,
                    resource_version=claims.metadata.resource_version,
                    timeout_seconds=60,
                )
                for claim in claims.items:
                    self._provision(claim)
                for event in stream:
                    if self.stopping.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._provision(event["object"])
            except Exception:
                if not self.stopping.is_set():
                    LOG.exception("event=provisioner-error")
                    time.sleep(1)

    def _provision(self, claim: Any) -> None:
        if claim.spec.volume_name or claim.status.phase != "Pending":
            return
        if (claim.spec.storage_class_name or STORAGE_CLASS) != STORAGE_CLASS:
            return
        namespace, name = claim.metadata.namespace, claim.metadata.name
        directory = self.claim_dir(namespace, name)
        directory.mkdir(parents=True, exist_ok=True)
        pv_name = f"local-{namespace}-{name}"[:200] + "-" + claim.metadata.uid[:8]
        body = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": pv_name,
                "labels": {AGENT_LABEL: "true"},
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
            },
            "spec": {
                "capacity": {"storage": claim.spec.resources.requests.get("storage", "1Gi")},
                "accessModes": claim.spec.access_modes or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": STORAGE_CLASS,
                "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": namespace,
                    "name": name,
                    "uid": claim.metadata.uid,
                },
            },
        }
        try:
            self.core.create_persistent_volume(body)
            LOG.info("event=volume-provisioned claim=%s/%s path=%s", namespace, name, directory)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _materialise_volumes(self, pod: Any, run: PodRun) -> dict[str, Path]:
        """Return volume name -> host path, writing the content of API-backed volumes."""
        paths: dict[str, Path] = {}
        namespace = pod.metadata.namespace
        for volume in pod.spec.volumes or []:
            target = run.directory / "volumes" / volume.name
            if volume.persistent_volume_claim is not None:
                paths[volume.name] = self._claim_path(namespace, volume.persistent_volume_claim.claim_name)
                continue
            if volume.host_path is not None:
                paths[volume.name] = Path(volume.host_path.path)
                continue
            target.mkdir(parents=True, exist_ok=True)
            paths[volume.name] = target
            if volume.config_map is not None:
                self._write_config_map(namespace, volume.config_map, target)
            elif volume.secret is not None:
                self._write_secret(namespace, volume.secret, target)
            elif volume.downward_api is not None:
                self._write_downward(pod, volume.downward_api.items or [], target)
            elif volume.projected is not None:
                for source in volume.projected.sources or []:
                    if source.config_map is not None:
                        self._write_config_map(namespace, source.config_map, target)
                    elif source.secret is not None:
                        self._write_secret(namespace, source.secret, target, name_attr="name")
                    elif source.downward_api is not None:
                        self._write_downward(pod, source.downward_api.items or [], target)
                    elif source.service_account_token is not None:
                        self._write_token(pod, source.service_account_token, target)
        return paths

    def _claim_path(self, namespace: str, claim_name: str) -> Path:
        with contextlib.suppress(ApiException):
            claim = self.core.read_namespaced_persistent_volume_claim(claim_name, namespace)
            if claim.spec.volume_name:
                volume = self.core.read_persistent_volume(claim.spec.volume_name)
                if volume.spec.host_path is not None:
                    path = Path(volume.spec.host_path.path)
                    path.mkdir(parents=True, exist_ok=True)
                    return path
        path = self.claim_dir(namespace, claim_name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _write_items(target: Path, data: dict[str, bytes], items: list[Any] | None) -> None:
        chosen = {item.key: item.path for item in items} if items else {key: key for key in data}
        for key, relative in chosen.items():
            if key not in data:
                continue
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data[key])
            tmp.replace(path)

    def _write_config_map(self, namespace: str, source: Any, target: Path) -> None:
        try:
            cm = self.core.read_namespaced_config_map(source.name, namespace)
        except ApiException as exc:
            if exc.status == 404 and source.optional:
                return
            raise
        data = {k: v.encode() for k, v in (cm.data or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.binary_data or {}).items()})
        self._write_items(target, data, source.items)

    def _write_secret(self, namespace: str, source: Any, target: Path, *, name_attr: str = "secret_name") -> None:
        try:
            secret = self.core.read_namespaced_secret(getattr(source, name_attr), namespace)
        except ApiException as exc:
            if exc.status == 404 and source.optional:
                return
            raise
        data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        self._write_items(target, data, source.items)

    def _write_downward(self, pod: Any, items: list[Any], target: Path) -> None:
        for item in items:
            if item.field_ref is None:
                continue
            value = field_value(pod, item.field_ref.field_path)
            path = target / item.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(value)

    def _write_token(self, pod: Any, source: Any, target: Path) -> None:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [source.audience] if source.audience else None,
                "expirationSeconds": source.expiration_seconds or 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod.metadata.name,
                    "uid": pod.metadata.uid,
                },
            },
        }
        try:
            token = self.core.create_namespaced_service_account_token(
                pod.spec.service_account_name or "default", pod.metadata.namespace, body
            )
            (target / source.path).write_text(token.status.token)
        except ApiException as exc:
            LOG.warning(
                "event=token-request-failed pod=%s/%s status=%s", pod.metadata.namespace, pod.metadata.name, exc.status
            )

    # --- pods ------------------------------------------------------------------------------------

    def _pod_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                pods = self.core.list_pod_for_all_namespaces()
                for pod in pods.items:
                    self._on_pod(pod, initial=True)
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=pods.metadata.resource_version,
                    timeout_seconds=120,
                    allow_watch_bookmarks=False,
                )
                for event in stream:
                    if self.stopping.is_set():
                        return
                    if event["type"] == "ERROR":
                        break
                    pod = event["object"]
                    if event["type"] == "DELETED":
                        self._on_pod_gone(pod)
                    else:
                        self._on_pod(pod)
            except Exception:
                if not self.stopping.is_set():
                    LOG.exception("event=pod-watch-error")
                    time.sleep(1)

    def _on_pod(self, pod: Any, *, initial: bool = False) -> None:
        if pod.spec.node_name not in self.node_names:
            return
        uid = pod.metadata.uid
        with self.lock:
            run = self.runs.get(uid)
        if pod.metadata.deletion_timestamp is not None:
            if run is None:
                if pod.status.phase in ("Pending", None) or initial or pod.status.phase in ("Succeeded", "Failed"):
                    self._finalise_deletion(pod)
                return
            run.grace_seconds = float(pod.metadata.deletion_grace_period_seconds or 30)
            run.terminating.set()
            return
        if run is not None or pod.status.phase in ("Succeeded", "Failed"):
            return
        if initial and pod.status.phase == "Running":
            # We cannot re-attach to a process from an earlier agent: report it lost.
            self._report_lost(pod)
            return
        run = PodRun(
            namespace=pod.metadata.namespace,
            name=pod.metadata.name,
            uid=uid,
            directory=self._pod_folder(pod.metadata.namespace, pod.metadata.name, uid[:8]),
        )
        with self.lock:
            self.runs[uid] = run
        run.thread = threading.Thread(
            target=self._run_pod, args=(pod, run), name=f"pod-{pod.metadata.name}", daemon=True
        )
        run.thread.start()

    def _on_pod_gone(self, pod: Any) -> None:
        with self.lock:
            run = self.runs.get(pod.metadata.uid)
        if run is not None:
            run.grace_seconds = 0
            run.terminating.set()

    def _finalise_deletion(self, pod: Any) -> None:
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                body=client.V1DeleteOptions(grace_period_seconds=0, preconditions={"uid": pod.metadata.uid}),
            )

    def _report_lost(self, pod: Any) -> None:
        statuses = [
            terminated_status(c.name, exit_code=137, reason="Error", message="the node agent restarted", started=None)
            for c in pod.spec.containers
        ]
        self._patch_status(pod, phase="Failed", container_statuses=statuses, ready=False)

    def _run_pod(self, pod: Any, run: PodRun) -> None:
        try:
            self._run_pod_inner(pod, run)
        except Exception as exc:
            LOG.exception("event=pod-error pod=%s/%s", run.namespace, run.name)
            statuses = [
                terminated_status(c.name, exit_code=128, reason="StartError", message=str(exc)[:1000], started=None)
                for c in pod.spec.containers
            ]
            with contextlib.suppress(Exception):
                self._patch_status(pod, phase="Failed", container_statuses=statuses, ready=False)
        finally:
            self.mount_points.release(run.created_mount_points)
            with self.lock:
                self.runs.pop(run.uid, None)
            if run.terminating.is_set() and not self.stopping.is_set():
                self._finalise_deletion(pod)

    def _run_pod_inner(self, pod: Any, run: PodRun) -> None:
        run.directory.mkdir(parents=True, exist_ok=True)
        waiting = [
            {
                "name": c.name,
                "ready": False,
                "restartCount": 0,
                "image": c.image,
                "imageID": "",
                "started": False,
                "state": {"waiting": {"reason": "ContainerCreating"}},
            }
            for c in pod.spec.containers
        ]
        self._patch_status(pod, phase="Pending", container_statuses=waiting, ready=False)
        volumes = self._materialise_volumes(pod, run)
        for init in pod.spec.init_containers or []:
            if run.terminating.is_set():
                break
            result = self._run_container(pod, run, init, volumes)
            if result.exit_code != 0:
                statuses = [
                    terminated_status(
                        c.name, exit_code=1, reason="Error", message="init container failed", started=None
                    )
                    for c in pod.spec.containers
                ]
                self._patch_status(pod, phase="Failed", container_statuses=statuses, ready=False)
                return
        if run.terminating.is_set():
            self._patch_status(
                pod,
                phase="Failed",
                container_statuses=[
                    terminated_status(c.name, exit_code=137, reason="Error", message="", started=None)
                    for c in pod.spec.containers
                ],
                ready=False,
            )
            return
        threads = []
        for container in pod.spec.containers:
            run.containers[container.name] = ContainerRun(container.name)
        for container in pod.spec.containers:
            thread = threading.Thread(target=self._run_container, args=(pod, run, container, volumes), daemon=True)
            threads.append(thread)
            thread.start()
        # Report Running once every process has started.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
            r.started_at is None and r.exit_code is None for r in run.containers.values()
        ):
            time.sleep(0.02)
        pids = {name: (r.process.pid if r.process else 0) for name, r in run.containers.items()}
        running = [
            {
                "name": c.name,
                "ready": True,
                "restartCount": 0,
                "image": c.image,
                "imageID": "local://" + c.image,
                "containerID": f"local://{pids.get(c.name, 0)}",
                "started": True,
                "state": {"running": {"startedAt": run.containers[c.name].started_at or now()}},
            }
            for c in pod.spec.containers
        ]
        if all(r.exit_code is None for r in run.containers.values()):
            self._patch_status(pod, phase="Running", container_statuses=running, ready=True)
        for thread in threads:
            thread.join()
        statuses = [
            terminated_status(
                r.name,
                exit_code=r.exit_code if r.exit_code is not None else 137,
                reason="Completed"
                if r.exit_code == 0
                else ("OOMKilled" if r.exit_code == 137 and r.message == "OOMKilled" else "Error"),
                message=r.message,
                started=r.started_at,
                finished=r.finished_at,
            )
            for r in run.containers.values()
        ]
        phase = "Succeeded" if all(r.exit_code == 0 for r in run.containers.values()) else "Failed"
        self._patch_status(pod, phase=phase, container_statuses=statuses, ready=False)
        LOG.info(
            "event=pod-finished pod=%s/%s phase=%s exit_codes=%s",
            run.namespace,
            run.name,
            phase,
            {r.name: r.exit_code for r in run.containers.values()},
        )

    def _run_container(self, pod: Any, run: PodRun, container: Any, volumes: dict[str, Path]) -> ContainerRun:
        result = run.containers.get(container.name) or ContainerRun(container.name)
        run.containers.setdefault(container.name, result)
        result.log = log_file(run.directory, container.name)
        result.termination_file = run.directory / f"{container.name}.termination-log"
        result.termination_file.write_text("")
        argv = list(container.command or []) + list(container.args or [])
        if not argv:
            result.exit_code = 128
            result.message = "the local node agent needs an explicit command (it ignores images)"
            return result
        env = self._container_env(pod, container, result.termination_file)
        mounts = []
        for mount in container.volume_mounts or []:
            source = volumes.get(mount.name)
            if source is None:
                continue
            if mount.sub_path:
                source = source / mount.sub_path
                if not source.exists():
                    source.mkdir(parents=True)
            mounts.append(MountPoint(source=source, target=mount.mount_path, read_only=bool(mount.read_only)))
        # A mount over a directory that holds this agent's own runtime (the venv, the project,
        # the state directory) would hide it from the process: a real kubelet's images do not
        # live on the host's /tmp, ours may.  Such a mount is skipped; /tmp becomes TMPDIR.
        protected = [Path(sys.executable).parent.parent, Path(__file__).resolve().parents[3], self.state_dir]
        kept = []
        for mount in mounts:
            target = Path(mount.target)
            if any(path == target or target in path.parents for path in protected):
                LOG.warning(
                    "event=mount-skipped pod=%s/%s target=%s reason=would-hide-the-node-agent",
                    run.namespace,
                    run.name,
                    mount.target,
                )
                if mount.target == "/tmp":
                    env["TMPDIR"] = str(mount.source)
                continue
            kept.append(mount)
        mounts = kept
        # As a kubelet does, the termination-message file is mounted where the
        # container expects it; FINETUNE_TERMINATION_LOG names it too.
        message_path = container.termination_message_path or "/dev/termination-log"
        if Path(message_path).parent.is_dir():
            mounts.append(MountPoint(source=result.termination_file, target=message_path, read_only=False))
        mounts.sort(key=lambda m: len(Path(m.target).parts))
        for mount in mounts:
            run.created_mount_points.extend(self.mount_points.acquire(mount.target, is_dir=mount.source.is_dir()))
        spec = {
            "argv": argv,
            "env": env,
            "cwd": container.working_dir or "/",
            "mounts": [{"source": str(m.source), "target": m.target, "readOnly": m.read_only} for m in mounts],
        }
        spec_file = run.directory / f"{container.name}.exec.json"
        spec_file.write_text(json.dumps(spec))
        launcher = [sys.executable, "-m", "finetune_devcluster.podexec", str(spec_file)]
        if mounts:
            launcher = ["unshare", "--mount", "--propagation", "private", "--", *launcher]
        with open(result.log, "ab") as log:
            result.process = subprocess.Popen(
                launcher, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        result.started_at = now()
        LOG.info(
            "event=container-started pod=%s/%s container=%s pid=%d",
            run.namespace,
            run.name,
            container.name,
            result.process.pid,
        )
        killed_at: float | None = None
        while True:
            try:
                code = result.process.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if run.terminating.is_set():
                if killed_at is None:
                    killed_at = time.monotonic()
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(result.process.pid, signal.SIGTERM)
                elif time.monotonic() - killed_at > run.grace_seconds:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(result.process.pid, signal.SIGKILL)
        # Children left in the group (a launcher's workers) go with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(result.process.pid, signal.SIGKILL)
        result.exit_code = code if code >= 0 else 128 - code
        result.finished_at = now()
        result.message = self._termination_message(container, result)
        return result

    @staticmethod
    def _termination_message(container: Any, result: ContainerRun) -> str:
        message = ""
        if result.termination_file and result.termination_file.is_file():
            message = result.termination_file.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode(errors="replace")
        fallback = container.termination_message_policy == "FallbackToLogsOnError"
        if not message.strip() and result.exit_code != 0 and fallback and result.log and result.log.is_file():
            lines = result.log.read_bytes().decode(errors="replace").splitlines()[-LOG_FALLBACK_LINES:]
            message = "\n".join(lines)[-LOG_FALLBACK_BYTES:]
        return message

    def _container_env(self, pod: Any, container: Any, termination_file: Path) -> dict[str, str]:
        env = {
            # The image is ignored: the pod runs this Python environment's tools.
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONUNBUFFERED": "1",
            "HOSTNAME": pod.metadata.name[:63],
            "CUDA_VISIBLE_DEVICES": "",
            "FINETUNE_TERMINATION_LOG": str(termination_file),
        }
        for var in ("FINETUNE_CACHE", "HF_HOME", "TMPDIR", "OMP_NUM_THREADS", "PYTHONPATH", "VIRTUAL_ENV"):
            if var in os.environ:
                env[var] = os.environ[var]
        namespace = pod.metadata.namespace
        for source in container.env_from or []:
            prefix = source.prefix or ""
            if source.config_map_ref is not None:
                with contextlib.suppress(ApiException):
                    cm = self.core.read_namespaced_config_map(source.config_map_ref.name, namespace)
                    env.update({prefix + k: v for k, v in (cm.data or {}).items()})
            if source.secret_ref is not None:
                with contextlib.suppress(ApiException):
                    secret = self.core.read_namespaced_secret(source.secret_ref.name, namespace)
                    env.update({prefix + k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()})
        for var in container.env or []:
            if var.value is not None:
                env[var.name] = expand(var.value, env)
            elif var.value_from is not None:
                value = self._env_value_from(pod, var.value_from)
                if value is not None:
                    env[var.name] = value
            else:
                env[var.name] = ""
        return env

    def _env_value_from(self, pod: Any, source: Any) -> str | None:
        namespace = pod.metadata.namespace
        try:
            if source.secret_key_ref is not None:
                secret = self.core.read_namespaced_secret(source.secret_key_ref.name, namespace)
                raw = (secret.data or {}).get(source.secret_key_ref.key)
                return None if raw is None else base64.b64decode(raw).decode()
            if source.config_map_key_ref is not None:
                cm = self.core.read_namespaced_config_map(source.config_map_key_ref.name, namespace)
                return (cm.data or {}).get(source.config_map_key_ref.key)
        except ApiException:
            return None
        if source.field_ref is not None:
            return field_value(pod, source.field_ref.field_path)
        if source.resource_field_ref is not None:
            return "0"
        return None

    def _patch_status(
        self,
        pod: Any,
        *,
        phase: str,
        container_statuses: list[dict[str, Any]],
        ready: bool,
    ) -> None:
        """Write the pod's status, merging our conditions into the ones others set (scheduler, eviction)."""
        try:
            current = self.core.read_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        if current.metadata.uid != pod.metadata.uid:
            return
        stamp = now()
        conditions = {c.type: self.api_client.sanitize_for_serialization(c) for c in (current.status.conditions or [])}
        for kind, value in (
            ("PodReadyToStartContainers", "True"),
            ("Initialized", "True"),
            ("ContainersReady", "True" if ready else "False"),
            ("Ready", "True" if ready else "False"),
        ):
            previous = conditions.get(kind, {})
            if previous.get("status") != value:
                conditions[kind] = {"type": kind, "status": value, "lastTransitionTime": stamp}
                if kind in ("Ready", "ContainersReady") and phase in ("Succeeded", "Failed"):
                    conditions[kind]["reason"] = "PodCompleted"
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": list(conditions.values()),
            "containerStatuses": container_statuses,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
        }
        if current.status.start_time is None:
            status["startTime"] = stamp
        body = {"status": status}
        try:
            self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, body)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # --- running ---------------------------------------------------------------------------------

    def run(self) -> None:
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self._start_log_server()
        self.register_nodes()
        threads = [
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
            threading.Thread(target=self._provision_loop, name="provisioner", daemon=True),
            threading.Thread(target=self._pod_loop, name="pods", daemon=True),
        ]
        for thread in threads:
            thread.start()
        LOG.info("event=agent-started nodes=%s", ",".join(sorted(self.node_names)))
        self.stopping.wait()

    def _start_log_server(self) -> None:
        # Any serving certificate will do: the apiserver does not check the kubelet's unless told
        # to (--kubelet-certificate-authority); the cluster's own one names 127.0.0.1.
        cert, key = self.state_dir / "pki" / "apiserver.crt", self.state_dir / "pki" / "apiserver.key"
        if not (cert.is_file() and key.is_file()):
            LOG.warning("event=no-kubelet-api reason=no-certificate path=%s (kubectl logs will not work)", cert)
            return
        self.log_server = LogServer(cert=cert, key=key, find=self.container_log, running=self.container_running)
        self.log_server.start()
        LOG.info("event=kubelet-api-started port=%d", self.log_server.port)

    def _live_run(self, namespace: str, pod: str) -> PodRun | None:
        with self.lock:
            return next((r for r in self.runs.values() if r.namespace == namespace and r.name == pod), None)

    def _pod_folder(self, namespace: str, pod: str, uid: str) -> Path:
        # Pod and namespace names have no "_": a folder names one pod (uid "*" globs its runs).
        return self.pods_dir / f"{namespace}_{pod}_{uid}"

    def container_log(self, namespace: str, pod: str, container: str) -> Path | None:
        """The log file of ``container`` in the pod of that name: the running one, else the newest."""
        run = self._live_run(namespace, pod)
        if run is not None:
            return log_file(run.directory, container)
        runs = self.pods_dir.glob(self._pod_folder(namespace, pod, "*").name)
        folders = sorted(runs, key=lambda p: p.stat().st_mtime)
        return log_file(folders[-1], container) if folders else None

    def container_running(self, namespace: str, pod: str, container: str) -> bool:
        run = self._live_run(namespace, pod)
        if run is None or (run.terminating.is_set() and container not in run.containers):
            return False
        result = run.containers.get(container)
        return result is None or result.exit_code is None

    def stop(self) -> None:
        self.stopping.set()
        if self.log_server is not None:
            self.log_server.stop()
        with self.lock:
            runs = list(self.runs.values())
        for run in runs:
            run.grace_seconds = 2
            run.terminating.set()
        for run in runs:
            if run.thread is not None:
                run.thread.join(timeout=10)


def log_file(pod_folder: Path, container: str) -> Path:
    """Where a container's output goes (stdout and stderr, as a kubelet keeps them)."""
    return pod_folder / f"{container}.log"


def terminated_status(
    name: str,
    *,
    exit_code: int,
    reason: str,
    message: str,
    started: str | None,
    finished: str | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": started or now(),
        "finishedAt": finished or now(),
    }
    if message:
        state["message"] = message
    return {
        "name": name,
        "ready": False,
        "restartCount": 0,
        "image": "",
        "imageID": "",
        "started": False,
        "state": {"terminated": state},
    }


def field_value(pod: Any, path: str) -> str:
    meta = pod.metadata
    simple = {
        "metadata.name": meta.name,
        "metadata.namespace": meta.namespace,
        "metadata.uid": meta.uid,
        "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name,
        "status.hostIP": "127.0.0.1",
        "status.podIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path] or "")
    for prefix, source in (("metadata.labels", meta.labels), ("metadata.annotations", meta.annotations)):
        if path == prefix:
            return "\n".join(f'{k}="{v}"' for k, v in sorted((source or {}).items()))
        if path.startswith(prefix + "["):
            key = path[len(prefix) + 1 : -1].strip("'\"")
            return str((source or {}).get(key, ""))
    return ""


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values."""
    out = []
    i = 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i) and ")" in value[i:]:
            end = value.index(")", i)
            name = value[i + 2 : end]
            out.append(env.get(name, f"$({name})"))
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=Path(".cluster"))
    parser.add_argument(
        "--nodes", default=os.environ.get("FINETUNE_AGENT_NODES", ""), help="e.g. gpu-node-1=1,gpu-node-2=2"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    agent = NodeAgent(state_dir=args.state_dir, nodes=parse_nodes(args.nodes) or DEFAULT_NODES)

    def _stop(*_: object) -> None:
        threading.Thread(target=agent.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        agent.run()
    finally:
        agent.stop()
        shutil.rmtree(agent.pods_dir / ".tmp", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
