"""Containers: one container's process (its command, as the image is ignored), its environment
and its termination message.

The process starts through ``podexec`` in a mount namespace of its own, where each volume is
bind-mounted at its ``mountPath``; deletion sends SIGTERM to its process group, then SIGKILL
after the grace period.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_devcluster.agent.fields import field_value, now
from finetune_devcluster.agent.mounts import MountPoint
from finetune_devcluster.agent.runs import ContainerRun, PodRun, log_file

LOG = logging.getLogger("node-agent")

TERMINATION_MESSAGE_LIMIT = 4096
LOG_FALLBACK_LINES = 80
LOG_FALLBACK_BYTES = 2048
# The source tree this agent runs from (devcluster/finetune_devcluster/agent/ is three levels down).
PROJECT = Path(__file__).resolve().parents[3]


class Containers:
    """Runs containers as local processes."""

    def __init__(self, api_client: client.ApiClient, *, state_dir: Path) -> None:
        self.core = client.CoreV1Api(api_client)
        self.state_dir = state_dir

    def run(self, pod: Any, run: PodRun, container: Any, volumes: dict[str, Path]) -> ContainerRun:
        """Run ``container`` of ``pod`` to its end (or its deletion's grace period) and say how it ended."""
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
        protected = [Path(sys.executable).parent.parent, PROJECT, self.state_dir]
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
        security = container.security_context
        read_only_root = bool(security is not None and security.read_only_root_filesystem)
        # Mount targets that do not exist are made in the process's own view (podexec's
        # shadows), never on the host; its scratch folder is the run's.
        scratch = run.directory / f"{container.name}.mounts"
        scratch.mkdir(exist_ok=True)
        # Made before the start, empty: the process writes them (the start, or why it could not
        # start) when its root may already be read-only.
        started_file = run.directory / f"{container.name}.started"
        start_error = run.directory / f"{container.name}.start-error"
        for marker in (started_file, start_error):
            marker.write_text("")
        spec = {
            "argv": argv,
            "env": env,
            "cwd": container.working_dir or "/",
            "mounts": [{"source": str(m.source), "target": m.target, "readOnly": m.read_only} for m in mounts],
            "scratch": str(scratch),
            "startError": str(start_error),
            "startedFile": str(started_file),
            # readOnlyRootFilesystem: everything but the volumes is read-only, as a runtime
            # makes the image's root; the files handed over by path stay writable.
            "readOnlyRoot": read_only_root,
            "writable": [
                str(result.termination_file),
                str(started_file),
                str(start_error),
                *([env["TMPDIR"]] if "TMPDIR" in env else []),
            ],
        }
        spec_file = run.directory / f"{container.name}.exec.json"
        spec_file.write_text(json.dumps(spec))
        launcher = [sys.executable, "-m", "finetune_devcluster.podexec", str(spec_file)]
        if mounts or read_only_root:
            # A user who is not root mounts in a user namespace of its own, as root there (the
            # files it writes are the user's outside).
            user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
            launcher = ["unshare", *user, "--mount", "--propagation", "private", "--", *launcher]
        with open(result.log, "ab") as log:
            result.process = subprocess.Popen(
                launcher, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
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
            if result.started_at is None and started_file.stat().st_size > 0:
                # Its mounts are made and its command runs: Running, as a kubelet says it.
                result.started_at = now()
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
        if result.started_at is None and started_file.stat().st_size > 0:
            result.started_at = now()
        result.exit_code = code if code >= 0 else 128 - code
        result.finished_at = now()
        if start_error.is_file() and start_error.read_text().strip():
            # Not the container's exit: it never started (a kubelet's CreateContainerError).
            result.start_error = start_error.read_text().strip()
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
