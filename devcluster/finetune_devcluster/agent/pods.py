"""Pods: the watch of the pods bound to the agent's nodes, each pod's life (volumes, init
containers, containers, the deletion a kubelet honours) and the status it reports."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from finetune_devcluster.agent.containers import Containers
from finetune_devcluster.agent.fields import now
from finetune_devcluster.agent.runs import ContainerRun, PodRun, log_file
from finetune_devcluster.agent.volumes import Volumes

LOG = logging.getLogger("node-agent")


class Pods:
    """Runs the pods the scheduler binds to ``node_names``, one thread a pod."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        node_names: set[str],
        pods_dir: Path,
        volumes: Volumes,
        containers: Containers,
        stopping: threading.Event,
    ) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.node_names = node_names
        self.pods_dir = pods_dir
        self.volumes = volumes
        self.containers = containers
        self.stopping = stopping
        self.runs: dict[str, PodRun] = {}
        self.lock = threading.Lock()

    def watch_loop(self) -> None:
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
            with self.lock:
                self.runs.pop(run.uid, None)
            if run.terminating.is_set() and not self.stopping.is_set():
                self._finalise_deletion(pod)

    def _run_pod_inner(self, pod: Any, run: PodRun) -> None:
        run.directory.mkdir(parents=True, exist_ok=True)
        waiting = [waiting_status(c, reason="ContainerCreating") for c in pod.spec.containers]
        self._patch_status(pod, phase="Pending", container_statuses=waiting, ready=False)
        volumes = self.volumes.materialise(pod, run.directory)
        for init in pod.spec.init_containers or []:
            if run.terminating.is_set():
                break
            result = self.containers.run(pod, run, init, volumes)
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
            thread = threading.Thread(target=self.containers.run, args=(pod, run, container, volumes), daemon=True)
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
        unstarted = [r for r in run.containers.values() if r.start_error]
        if unstarted:
            # As a kubelet reports a container it cannot create: the pod stays Pending, the
            # container waiting with the reason and the message (never an exit code of its own).
            waiting_now = [
                waiting_status(
                    c,
                    reason="CreateContainerError",
                    message=run.containers[c.name].start_error or "another container could not start",
                )
                for c in pod.spec.containers
            ]
            self._patch_status(pod, phase="Pending", container_statuses=waiting_now, ready=False)
            LOG.warning(
                "event=container-create-error pod=%s/%s message=%s",
                run.namespace,
                run.name,
                unstarted[0].start_error,
            )
            return
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
        """End every pod's processes (a short grace period) and wait for their threads."""
        with self.lock:
            runs = list(self.runs.values())
        for run in runs:
            run.grace_seconds = 2
            run.terminating.set()
        for run in runs:
            if run.thread is not None:
                run.thread.join(timeout=10)


def waiting_status(container: Any, *, reason: str, message: str = "") -> dict[str, Any]:
    """A container's status while it is not running yet, as a kubelet writes it."""
    waiting = {"reason": reason, **({"message": message} if message else {})}
    return {
        "name": container.name,
        "ready": False,
        "restartCount": 0,
        "image": container.image,
        "imageID": "",
        "started": False,
        "state": {"waiting": waiting},
    }


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
