"""Test helpers for the real local control plane: clients, waits, and the operator as a process."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from finetune_api.v1alpha1 import GROUP, PLURAL, VERSION
from finetune_devcluster.cluster import LocalCluster

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], *, timeout: float = 60, interval: float = 0.25, what: str = "") -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except ApiException as exc:
            last = f"ApiException {exc.status}: {exc.reason}"
        except OSError as exc:  # a server still starting: connection refused
            last = repr(exc)
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or check}: last saw {last!r}")


def wait_moving(
    check: Callable[[], T | None],
    *,
    moved: Callable[[], Any],
    stall: float,
    interval: float = 0.25,
    what: str = "",
) -> T:
    """Poll ``check`` until it returns something truthy, for as long as ``moved()`` keeps
    changing: fail only once it has stood still for ``stall`` seconds."""
    mark: Any = object()
    still_since = time.monotonic()
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
            now_mark = moved()
        except ApiException as exc:
            last = now_mark = f"ApiException {exc.status}: {exc.reason}"
        except OSError as exc:  # a server still starting: connection refused
            last = now_mark = repr(exc)
        now = time.monotonic()
        if now_mark != mark:
            mark, still_since = now_mark, now
        elif now - still_since > stall:
            raise AssertionError(f"nothing moved for {stall:.0f}s waiting for {what or check}: last saw {last!r}")
        time.sleep(interval)


class BackgroundWatch:
    """``on_event(obj)`` for every object a watch (``list_fn(*args, **kwargs)``) sees, in a
    thread until ``stop``: each 5 s stream resumes from the last resourceVersion seen, so no
    change between two streams is missed; after an error it lists afresh."""

    def __init__(self, list_fn: Callable[..., Any], *args: Any, on_event: Callable[[Any], None], **kwargs: Any):
        from kubernetes import watch

        self._stop = threading.Event()
        self._watch = watch.Watch()

        def version_of(obj: Any) -> str | None:
            if isinstance(obj, dict):
                return str(obj.get("metadata", {}).get("resourceVersion") or "") or None
            return str(obj.metadata.resource_version or "") or None

        def run() -> None:
            version: str | None = None
            while not self._stop.is_set():
                try:
                    resume = {"resource_version": version} if version else {}
                    for event in self._watch.stream(list_fn, *args, timeout_seconds=5, **kwargs, **resume):
                        version = version_of(event["object"]) or version
                        on_event(event["object"])
                        if self._stop.is_set():
                            return
                except Exception:
                    version = None
                    time.sleep(0.2)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._watch.stop()
        self._thread.join(timeout=10)


# Below the kernel's ephemeral range (32768-60999 by default): the test operator keeps its ports
# across a stop and a start, and while it is down an outgoing connection's local port (drawn
# from the ephemeral range) could take one, and its restart would fail.
PORTS = range(20000, 32000)


# Every port handed out in this test session: a stopped operator keeps its ports for its restart
# (the session's operator is stopped while the chart's own operators run), so a port free now may
# still be promised to a process that will bind it again.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    for _ in range(500):
        port = random.choice(PORTS)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free loopback port in {PORTS.start}-{PORTS.stop - 1}")


@dataclass
class Kube:
    cluster: LocalCluster
    api_client: client.ApiClient = field(init=False)

    def __post_init__(self) -> None:
        self.api_client = config.new_client_from_config(config_file=str(self.cluster.kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.rbac = client.RbacAuthorizationV1Api(self.api_client)
        self.apps = client.AppsV1Api(self.api_client)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return self.cluster.kubectl(*args, check=check, input=input)

    def plain(self, obj: Any) -> dict[str, Any]:
        return dict(self.api_client.sanitize_for_serialization(obj))

    def ftj(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.ftj(namespace, name).get("status") or {})

    def create_ftj(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        return dict(self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest))

    def patch_ftj(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return dict(self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch))

    def wait_phase(self, namespace: str, name: str, *phases: str, timeout: float = 120) -> dict[str, Any]:
        """The status once its phase is one of ``phases``; ``timeout`` as in ``wait_status``."""
        return self.wait_status(
            namespace, name, lambda s: s.get("phase") in phases, timeout=timeout, what=f"phase in {phases}"
        )

    def wait_status(
        self, namespace: str, name: str, done: Callable[[dict[str, Any]], Any], *, timeout: float = 120, what: str = ""
    ) -> dict[str, Any]:
        """The status once ``done(status)`` holds.  ``timeout`` is how long the job may stand
        still (phase, reason, attempts, stage, step and checkpoints all unchanged), not a limit on
        the whole wait: on a busy machine a job that trains slowly but steadily is waited for,
        one that stops moving fails the test."""
        seen: dict[str, Any] = {}

        def check() -> dict[str, Any] | None:
            seen["status"] = status = self.status(namespace, name)
            return status if done(status) else None

        def moved() -> tuple[Any, ...]:
            status = seen.get("status") or {}
            progress = status.get("progress") or {}
            return (
                status.get("phase"),
                status.get("reason"),
                status.get("attempts"),
                progress.get("stage"),
                progress.get("step"),
                len(status.get("checkpoints") or []),
            )

        try:
            return wait_moving(check, moved=moved, stall=timeout, what=f"{namespace}/{name}: {what or done}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstatus now: {json.dumps(self.status(namespace, name), indent=1)}") from None

    def pods(self, namespace: str, selector: str = "") -> list[Any]:
        return list(self.core.list_namespaced_pod(namespace, label_selector=selector).items)

    def create_namespace(self, name: str) -> None:
        self.core.create_namespace({"metadata": {"name": name, "labels": {"finetune.dev/test": "true"}}})
        # Pods need the namespace's default ServiceAccount, made by a controller.
        wait_for(
            lambda: self.core.read_namespaced_service_account("default", name),
            timeout=30,
            what=f"default ServiceAccount in {name}",
        )

    def create_pvc(self, namespace: str, name: str, size: str = "1Gi") -> Path:
        """A claim of the local StorageClass; returns the directory the node agent backs it with."""
        self.core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": name},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
            },
        )
        wait_for(
            lambda: self.core.read_namespaced_persistent_volume_claim(name, namespace).status.phase == "Bound",
            timeout=30,
            what=f"claim {namespace}/{name} bound",
        )
        path = self.cluster.volumes / namespace / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class OperatorProcess:
    """The operator as the separate process it is in production, on free loopback ports."""

    kubeconfig: Path
    log_dir: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    progress_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    web_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def report_url(self) -> str:
        return f"http://127.0.0.1:{self.progress_port}"

    @property
    def log(self) -> Path:
        return self.log_dir / "operator.log"

    def start(self) -> OperatorProcess:
        """Start and wait for /readyz.  A first start whose port another process bound between
        the draw and the bind (drawing a free port and binding it are two steps) draws again:
        nothing has been told its ports yet."""
        for _ in range(3):
            try:
                return self._start()
            except AssertionError:
                if self.starts > 1 or "address already in use" not in self.log_tail(5):
                    raise
                self.starts = 0
                self.progress_port, self.metrics_port = free_port(), free_port()
                self.health_port, self.web_port = free_port(), free_port()
        return self._start()

    def _start(self) -> OperatorProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        args = [
            sys.executable,
            "-m",
            "finetune_operator",
            "run",
            f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--progress-port={self.progress_port}",
            f"--metrics-port={self.metrics_port}",
            f"--health-port={self.health_port}",
            f"--web-port={self.web_port}",
            "--web",
            "--metrics-per-job",
            f"--report-url={self.report_url}",
            "--status-interval=1",
            # status.usage.cost: the dev cluster's nodes' GPU product at 36 an hour, a cent a second.
            "--gpu-hour-prices=Local-Simulated-GPU=36",
            *self.extra_args,
        ]
        with open(self.log, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True
            )
        wait_for(self.ready, timeout=60, what="operator /readyz")
        return self

    def ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"the operator exited; see {self.log}:\n{self.log_tail()}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=1) as response,
        ):
            return bool(response.status == 200)
        return False

    def stop(self, *, timeout: float = 20) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.is_file():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())


class Prometheus:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.process = process
        self.log = log

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None


@contextlib.contextmanager
def instead_of(shared: OperatorProcess, other: OperatorProcess) -> Iterator[OperatorProcess]:
    """``other`` runs while the session's operator ``shared`` is stopped (two operators must not
    act on the same jobs); ``shared`` starts again after."""
    shared.stop()
    if other.log.exists():
        other.log.unlink()
    try:
        yield other.start()
    finally:
        other.stop()
        shared.start()
