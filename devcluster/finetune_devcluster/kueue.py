"""Kueue in the local control plane, as a platform team runs it: its manager built from
``sigs.k8s.io/kueue`` (``binaries.py``), its CRDs and webhook manifests read from that module's
source at the same version, the batch/Job integration on, its admission webhooks and its
pending-workloads ("visibility") API served on loopback.

Certificates: one serving certificate signed by the control plane's CA (for 127.0.0.1 and the
service names the apiserver checks) serves all three of Kueue's endpoints.  The webhooks are
registered by URL (``https://127.0.0.1:PORT/...``).  The visibility API is an aggregated API:
its APIService names a Service of type ExternalName pointing at ``localhost``, which the
aggregation layer resolves without a cluster network, and the apiserver proxies to it with the
front-proxy client certificate (``cluster.py``).

Kueue reads two certificates from fixed paths when it does not manage its own
(``/etc/kueue/metrics/certs`` for its metrics endpoint and ``/visibility`` for the visibility
API).  The manager runs in a mount namespace of its own (as the node agent runs pods) where the
control plane's certificate is bind-mounted at both; the host keeps the two empty mount-point
directories, which are left in place because another local cluster's Kueue may be using them.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finetune_devcluster import binaries

if TYPE_CHECKING:
    from finetune_devcluster.cluster import LocalCluster

NAMESPACE = "kueue-system"
USER = "system:kueue"
PROCESS_NAME = "kueue"
WEBHOOK_SERVICE = "kueue-webhook-service"
VISIBILITY_SERVICE = "kueue-visibility-server"
VISIBILITY_GROUP = "visibility.kueue.x-k8s.io"
VISIBILITY_VERSION = "v1beta2"
FRAMEWORKS = ("batch/job",)
METRICS_CERT_DIR = "/etc/kueue/metrics/certs"
VISIBILITY_CERT_DIR = "/visibility"
CRD_DIR = "config/components/crd/bases"
WEBHOOK_MANIFESTS = "config/components/webhook/manifests.yaml"
# The webhooks of the kinds this cluster serves: the batch/Job integration and Kueue's own
# kinds.  The module's manifest also lists every other integration (pods, deployments, ...);
# the manager serves no handler for an integration that is off, so registering those would
# make the apiserver refuse every pod.
SERVED_WEBHOOK_PATHS = ("-batch-v1-job", "-kueue-x-k8s-io-")


class KueueError(RuntimeError):
    """Kueue did not come up; the message names the log to read."""


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def manager_config(*, ports: dict[str, int], cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for the local control plane."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['metrics']}"},
        "webhook": {"host": "127.0.0.1", "port": ports["webhook"], "certDir": str(cert_dir)},
        "visibilityServer": {"bindAddress": "127.0.0.1", "bindPort": ports["visibility"]},
        "leaderElection": {"leaderElect": False},
        # The control plane signs the certificates; Kueue's own rotator would make them for a
        # Service's DNS name, which nothing here resolves.
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(FRAMEWORKS)},
        "clientConnection": {"qps": 50, "burst": 100},
    }


def webhook_configurations(manifests: str, *, port: int, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's own webhook manifests, each webhook called by URL on loopback.

    Only the webhooks of the kinds the manager serves (``SERVED_WEBHOOK_PATHS``) are kept."""
    configurations = []
    for document in yaml.safe_load_all(manifests):
        if not document:
            continue
        hooks = []
        for hook in document.get("webhooks") or []:
            path = hook["clientConfig"]["service"]["path"]
            if not any(part in path for part in SERVED_WEBHOOK_PATHS):
                continue
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}
            hooks.append(hook)
        document["metadata"] = {"name": f"kueue-{document['metadata']['name']}"}
        document["webhooks"] = hooks
        configurations.append(document)
    return configurations


def visibility_objects(*, port: int, ca_bundle: str) -> list[dict[str, Any]]:
    """The APIService of the pending-workloads API and the Service it names."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": VISIBILITY_SERVICE, "namespace": NAMESPACE},
        # The aggregation layer resolves an ExternalName Service to its name and the
        # APIService's port: Kueue's server on loopback, no cluster network needed.
        "spec": {"type": "ExternalName", "externalName": "localhost"},
    }
    api_service = {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": f"{VISIBILITY_VERSION}.{VISIBILITY_GROUP}"},
        "spec": {
            "group": VISIBILITY_GROUP,
            "version": VISIBILITY_VERSION,
            "groupPriorityMinimum": 100,
            "versionPriority": 100,
            "service": {"name": VISIBILITY_SERVICE, "namespace": NAMESPACE, "port": port},
            "caBundle": ca_bundle,
        },
    }
    return [service, api_service]


def serving_hosts() -> tuple[str, ...]:
    """Where the apiserver reaches Kueue, by address and by the service names it checks."""
    return (
        "127.0.0.1",
        "localhost",
        f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc",
        f"{VISIBILITY_SERVICE}.{NAMESPACE}.svc",
    )


def crd_files(source: Path) -> list[Path]:
    return sorted((source / CRD_DIR).glob("*.yaml"))


def _apply(cluster: LocalCluster, objects: Iterable[dict[str, Any]]) -> None:
    items = list(objects)
    if items:
        cluster.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )


def _get(url: str, *, timeout: float = 2) -> int:
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context if url.startswith("https") else None) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def start(cluster: LocalCluster, *, timeout: float = 120) -> None:
    """Install Kueue's CRDs and start its manager against ``cluster``; return once its webhooks
    answer and its pending-workloads API is served."""
    started = time.monotonic()
    kueue_binary = binaries.ensure([PROCESS_NAME])[PROCESS_NAME]
    source = binaries.module_dir(PROCESS_NAME)
    state = cluster.state_dir / "kueue"
    certs = cluster.pki / "kueue"
    cluster.sign_serving_cert("kueue", hosts=serving_hosts(), directory=certs)
    ca_bundle = base64.b64encode(cluster.ca_file.read_bytes()).decode()
    state.mkdir(parents=True, exist_ok=True)

    files = crd_files(source)
    if not files:
        raise KueueError(f"no CRDs in {source / CRD_DIR}")
    args = ["apply", "--server-side", "--force-conflicts"]
    for path in files:
        args += ["-f", str(path)]
    cluster.kubectl(*args)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{_crd_name(p)}" for p in files])
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)

    names = ("webhook", "visibility", "health", "metrics")
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    cluster.kueue_ports = ports
    config = state / "config.yaml"
    config.write_text(yaml.safe_dump(manager_config(ports=ports, cert_dir=certs)))
    # The certificate folders are made in the manager's own view by podexec, not on the host.
    exec_spec = state / "exec.json"
    exec_spec.write_text(
        json.dumps(
            {
                "argv": [
                    str(kueue_binary),
                    f"--config={config}",
                    f"--kubeconfig={cluster.component_kubeconfig(USER)}",
                    f"--visibility-server-port={ports['visibility']}",
                ],
                "env": {"PATH": "/usr/bin:/bin", "HOME": str(state)},
                "cwd": str(state),
                "mounts": [
                    {"source": str(certs), "target": target, "readOnly": True}
                    for target in (METRICS_CERT_DIR, VISIBILITY_CERT_DIR)
                ],
            }
        )
    )
    cluster.spawn(
        PROCESS_NAME,
        [
            "unshare",
            *([] if os.geteuid() == 0 else ["--user", "--map-root-user"]),
            "--mount",
            "--propagation",
            "private",
            "--",
            sys.executable,
            "-m",
            "finetune_devcluster.podexec",
            str(exec_spec),
        ],
    )
    log = cluster.logs / f"{PROCESS_NAME}.log"
    _wait(cluster, lambda: _get(f"http://127.0.0.1:{ports['health']}/readyz") == 200, "Kueue's /readyz", timeout, log)

    manifests = (source / WEBHOOK_MANIFESTS).read_text()
    _apply(cluster, webhook_configurations(manifests, port=ports["webhook"], ca_bundle=ca_bundle))
    _apply(cluster, visibility_objects(port=ports["visibility"], ca_bundle=ca_bundle))
    # Through the apiserver: a server-side dry run passes Kueue's webhooks, and the aggregated
    # API answers.  Either fails while the apiserver has not yet picked up the registrations.
    flavor = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ResourceFlavor",
        "metadata": {"name": "finetune-probe"},
    }

    def webhooks_answer() -> bool:
        out = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(flavor), check=False)
        return "created (server dry run)" in out

    _wait(cluster, webhooks_answer, "Kueue's webhooks through the apiserver", timeout, log)
    _wait(
        cluster,
        lambda: (
            "error"
            not in cluster.kubectl(
                "get", "--raw", f"/apis/{VISIBILITY_GROUP}/{VISIBILITY_VERSION}", check=False
            ).lower()
        ),
        "Kueue's pending-workloads API through the apiserver",
        timeout,
        log,
    )
    cluster.save()
    _log(f"Kueue ready in {time.monotonic() - started:.1f}s (webhooks on 127.0.0.1:{ports['webhook']}; log {log})")


def _crd_name(path: Path) -> str:
    # kueue.x-k8s.io_clusterqueues.yaml -> clusterqueues.kueue.x-k8s.io
    group, plural = path.stem.split("_", 1)
    return f"{plural}.{group}"


def _wait(cluster: LocalCluster, check: Any, what: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not cluster.kueue_running:
            raise KueueError(
                f"Kueue exited while waiting for {what}; last lines of {log}:\n{cluster.log_tail(PROCESS_NAME, 30)}"
            )
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise KueueError(f"{what} not ready after {timeout:.0f}s; see {log}:\n{cluster.log_tail(PROCESS_NAME, 30)}")


def _log(message: str) -> None:
    print(f"[kueue] {message}", file=sys.stderr, flush=True)
