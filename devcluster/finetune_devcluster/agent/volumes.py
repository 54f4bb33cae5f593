"""Volumes: PersistentVolumes for claims of the ``local`` StorageClass (a directory per claim),
and the content of each pod's volumes (ConfigMaps, Secrets, the downward API, projected
service-account tokens) written to the pod's folder before its containers start."""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from finetune_devcluster.agent.fields import field_value
from finetune_devcluster.agent.nodes import AGENT_LABEL

LOG = logging.getLogger("node-agent")

PROVISIONER = "finetune.dev/local-agent"
STORAGE_CLASS = "local"


class Volumes:
    """The provisioner of the ``local`` StorageClass and the writer of each pod's volumes."""

    def __init__(self, api_client: client.ApiClient, *, volumes_dir: Path) -> None:
        self.core = client.CoreV1Api(api_client)
        self.storage = client.StorageV1Api(api_client)
        self.volumes_dir = volumes_dir

    def ensure_storage_class(self) -> None:
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

    def claim_dir(self, namespace: str, claim: str) -> Path:
        return self.volumes_dir / namespace / claim

    # --- the provisioner -------------------------------------------------------------------------

    def provision_loop(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                claims = self.core.list_persistent_volume_claim_for_all_namespaces()
                stream = watch.Watch().stream(
                    self.core.list_persistent_volume_claim_for_all_namespaces,
                    resource_version=claims.metadata.resource_version,
                    timeout_seconds=60,
                )
                for claim in claims.items:
                    self.provision(claim)
                for event in stream:
                    if stopping.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.provision(event["object"])
            except Exception:
                if not stopping.is_set():
                    LOG.exception("event=provisioner-error")
                    time.sleep(1)

    def provision(self, claim: Any) -> None:
        if claim.spec.volume_name or claim.status.phase != "Pending":
            return
        if (claim.spec.storage_class_name or STORAGE_CLASS) != STORAGE_CLASS:
            return
        namespace, name = claim.metadata.namespace, claim.metadata.name
        directory = self.claim_dir(namespace, name)
        directory.mkdir(parents=True, exist_ok=True)
        # Writable by every uid, as local-path provisioners make theirs: a hostPath volume gets
        # no fsGroup from the kubelet, and the trainer runs as uid 1000 in its image.
        directory.chmod(0o777)
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

    # --- a pod's volumes -------------------------------------------------------------------------

    def materialise(self, pod: Any, pod_folder: Path) -> dict[str, Path]:
        """Return volume name -> host path, writing the content of API-backed volumes."""
        paths: dict[str, Path] = {}
        namespace = pod.metadata.namespace
        for volume in pod.spec.volumes or []:
            target = pod_folder / "volumes" / volume.name
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
