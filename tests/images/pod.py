"""A pod spec run by podman as a kubelet would run it: one container, its volumes made on the host.

This owns the translation of what a rendered pod asks for into ``podman run`` flags, and nothing
more: the user and groups (runAsUser/runAsGroup, fsGroup added to the process's groups and given
to every writable volume as the kubelet does: group-owned, group-writable, set-group-id folders),
the container's securityContext (a read-only root, dropped capabilities, no new privileges), the
command in place of the image's entrypoint, environment values and the downward API's fields,
each volume (downwardAPI files, a projected token, emptyDir on disk or in memory with its size,
claims as host folders), the termination-message file, the memory limit, and no network.

Anything in the spec it does not know is an error, not left out: a test must not pass because a
field was ignored.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_devcluster.images import PODMAN, ULIMITS

QUANTITY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "K": 1000, "M": 1000**2, "G": 1000**3}


def quantity_bytes(value: str) -> int:
    for suffix, factor in QUANTITY.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def give_to_fs_group(path: Path, gid: int) -> None:
    """What the kubelet does to a writable volume with fsGroup: group gid, group rw, folders set-gid."""
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, d) for d in dirs)]:
            os.chown(name, -1, gid)
            os.chmod(name, os.stat(name).st_mode | 0o2070)
        for name in files:
            full = os.path.join(root, name)
            os.chown(full, -1, gid)
            os.chmod(full, os.stat(full).st_mode | 0o060)


@dataclass
class PodRun:
    """The ``podman run`` command of one pod, and where its host-side files are."""

    command: list[str]
    termination_log: Path
    volumes: dict[str, Path] = field(default_factory=dict)


def podman_run(
    pod: dict[str, Any],
    *,
    pod_name: str,
    annotations: dict[str, str],
    claims: dict[str, Path],
    scratch: Path,
    image: str | None = None,
    token: str = "not-a-real-token",
    namespace: str = "default",
    network: str = "none",
    extra: tuple[str, ...] = (),
) -> PodRun:
    """The command that runs ``pod`` (a pod spec) as a kubelet would; host state goes under ``scratch``.

    ``claims`` maps each PersistentVolumeClaim's name to the host folder that is its volume;
    ``network`` is podman's (``host`` reaches a control plane on loopback); ``extra`` are more
    flags (a kubeconfig mounted where no service-account token is).
    """
    (container,) = pod["containers"]
    known_pod_fields = {
        "restartPolicy", "automountServiceAccountToken", "enableServiceLinks", "securityContext",
        "containers", "volumes", "tolerations", "terminationGracePeriodSeconds", "nodeSelector",
        "serviceAccountName",
    }  # fmt: skip
    unknown = set(pod) - known_pod_fields
    assert not unknown, f"the pod asks for {sorted(unknown)}, which this runner does not do"
    pod_security = pod.get("securityContext", {})
    uid, gid = pod_security["runAsUser"], pod_security["runAsGroup"]
    fs_group = pod_security.get("fsGroup")
    if pod_security.get("runAsNonRoot"):
        assert uid != 0, "runAsNonRoot with runAsUser 0: the kubelet would refuse to start it"

    args = [*PODMAN, "run", "--rm", "--pull", "never", *ULIMITS, "--network", network, "--name", pod_name]
    if network != "host":
        args += ["--hostname", pod_name]
    args += ["--user", f"{uid}:{gid}"]
    if fs_group is not None:
        args += ["--group-add", str(fs_group)]

    security = container.get("securityContext", {})
    if security.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for capability in security.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", capability]
    assert not security.get("capabilities", {}).get("add"), "added capabilities are not expected of a trainer"

    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args += ["--memory", str(quantity_bytes(limits["memory"]))]

    fields = {
        "metadata.name": pod_name,
        "metadata.namespace": namespace,
        **{f"metadata.annotations['{k}']": v for k, v in annotations.items()},
    }
    for variable in container.get("env", []):
        value = variable["value"] if "value" in variable else fields[variable["valueFrom"]["fieldRef"]["fieldPath"]]
        args += ["--env", f"{variable['name']}={value}"]

    run = PodRun(command=[], termination_log=scratch / "termination-log")
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        read_only = mount.get("readOnly", False)
        target = mount["mountPath"]
        host = scratch / "volumes" / mount["name"]
        if "downwardAPI" in volume:
            host.mkdir(parents=True)
            for item in volume["downwardAPI"]["items"]:
                (host / item["path"]).write_text(fields[item["fieldRef"]["fieldPath"]])
                (host / item["path"]).chmod(0o644)
            read_only = True  # the kubelet mounts these read-only whatever the mount says
        elif "projected" in volume:
            host.mkdir(parents=True)
            for source in volume["projected"]["sources"]:
                (source_kind,) = source
                assert source_kind == "serviceAccountToken", f"projected {source_kind} is not done here"
                file = host / source["serviceAccountToken"]["path"]
                file.write_text(token)
                file.chmod(volume["projected"].get("defaultMode", 0o644))
                if fs_group is not None:
                    os.chown(file, -1, fs_group)
            read_only = True
        elif "emptyDir" in volume and volume["emptyDir"].get("medium") == "Memory":
            size = quantity_bytes(volume["emptyDir"]["sizeLimit"]) if "sizeLimit" in volume["emptyDir"] else None
            if target == "/dev/shm":
                args += ["--shm-size", str(size or 64 * 1024**2)]
            else:
                options = f",tmpfs-size={size}" if size else ""
                args += ["--mount", f"type=tmpfs,destination={target},tmpfs-mode=1777{options}"]
            continue
        elif "emptyDir" in volume:
            host.mkdir(parents=True)
            host.chmod(0o777)  # as the kubelet makes an emptyDir
            if fs_group is not None:
                give_to_fs_group(host, fs_group)
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            host = claims[claim] / mount["subPath"] if mount.get("subPath") else claims[claim]
            if fs_group is not None and not read_only:
                give_to_fs_group(host, fs_group)
            read_only = read_only or volume["persistentVolumeClaim"].get("readOnly", False)
        else:
            raise AssertionError(f"volume {mount['name']}: {sorted(volume)} is not done here")
        run.volumes[mount["name"]] = host
        args += ["--volume", f"{host}:{target}:{'ro' if read_only else 'rw'}"]

    # The termination-message file: a file of the node's, writable by the container's user.
    message_path = container.get("terminationMessagePath", "/dev/termination-log")
    run.termination_log.parent.mkdir(parents=True, exist_ok=True)
    run.termination_log.write_text("")
    run.termination_log.chmod(0o666)
    args += ["--volume", f"{run.termination_log}:{message_path}:rw"]

    args += extra
    command = container.get("command")
    if command:
        args += ["--entrypoint", command[0]]
    args.append(image or container["image"])
    if command:
        args += command[1:]
    args += container.get("args", [])
    run.command = args
    return run


def in_image(image: str, *command: str) -> subprocess.CompletedProcess[str]:
    """``command`` in a throw-away container of ``image``, with no network."""
    run = [*PODMAN, "run", "--rm", "--pull", "never", *ULIMITS, "--network", "none", "--entrypoint", command[0], image]
    return subprocess.run([*run, *command[1:]], capture_output=True, text=True, check=False)


def image_env(image: str) -> dict[str, str]:
    """The environment ``image`` gives its containers."""
    found = subprocess.run(
        [*PODMAN, "image", "inspect", "--format", "{{json .Config.Env}}", image],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(item.split("=", 1) for item in json.loads(found.stdout))


def clear(path: Path) -> None:
    """Remove what a run left (files the container's user owns included)."""
    shutil.rmtree(path, ignore_errors=True)
