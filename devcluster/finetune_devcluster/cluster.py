"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, and the local node agent that acts as the kubelet of a few GPU nodes.

Everything lives in one state directory (``.cluster/`` by default): certificates,
etcd data, logs, the admin kubeconfig, the volumes of PersistentVolumeClaims and a
``processes.json`` that lets ``down`` stop what ``up`` started from another process.

With ``kueue=True`` (``make cluster-up KUEUE=1``) Kueue runs too: see ``kueue.py``.  The
apiserver's aggregation layer (front-proxy certificates) is always configured, so an
aggregated API such as Kueue's pending-workloads API can be served.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetune_devcluster import binaries, realnode

DEFAULT_STATE_DIR = Path(".cluster")
SERVICE_CIDR = "10.96.0.0/16"

# How long each component gets after SIGTERM before SIGKILL.  The apiserver
# and etcd take 15 s and more to exit on SIGTERM; nothing here needs their
# graceful shutdown (the state is thrown away or reused as is).
STOP_GRACE_SECONDS = 2.0


class ClusterError(RuntimeError):
    """The control plane did not come up; the message names the log to read."""


@dataclass
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int

    @classmethod
    def free(cls) -> Ports:
        return cls(*_free_ports(5))


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Process:
    name: str
    pid: int
    log: str


@dataclass
class LocalCluster:
    """A started (or startable) control plane rooted at ``state_dir``."""

    state_dir: Path = DEFAULT_STATE_DIR
    ports: Ports = field(default_factory=Ports.free)
    processes: list[Process] = field(default_factory=list)
    admin_token: str = ""
    # Record requests (verb, resource, user agent) of these users in logs/audit.log: the
    # benchmark counts the operator's API calls from it.
    audit_users: tuple[str, ...] = ()
    # More users with admin rights, each with a token and a kubeconfig of its own.
    extra_users: tuple[str, ...] = ()
    # Kueue's loopback ports (webhooks, visibility API, health, metrics) once it runs.
    kueue_ports: dict[str, int] = field(default_factory=dict)
    # The apiserver's /debug/pprof (for the benchmark's profile of where its CPU goes).
    profiling: bool = False

    # --- paths ---------------------------------------------------------------------------------

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def volumes(self) -> Path:
        return self.state_dir / "volumes"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    # --- life cycle ----------------------------------------------------------------------------

    def start(
        self, *, agent: bool = True, kueue: bool = False, timeout: float = 60, fresh: bool = False
    ) -> LocalCluster:
        """Start every process; ``fresh``: from an empty etcd, not what an earlier run left
        (its objects, and webhooks of a Kueue that is not running now)."""
        self.state_dir = self.state_dir.resolve()
        if (self.state_dir / "processes.json").is_file():
            existing = load(self.state_dir)
            if existing.alive():
                raise ClusterError(f"a cluster is already running from {self.state_dir}: `make cluster-down` stops it")
            existing.stop()
        if fresh:
            shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)
        found = binaries.ensure(list(binaries.CONTROL_PLANE))
        for directory in (self.pki, self.logs, self.volumes):
            directory.mkdir(parents=True, exist_ok=True)
        self._write_pki()
        started = time.monotonic()
        try:
            self._spawn("etcd", [str(found["etcd"]), *self._etcd_args()])
            self._wait_http(f"http://127.0.0.1:{self.ports.etcd_client}/health", "etcd", timeout)
            self._spawn("kube-apiserver", [str(found["kube-apiserver"]), *self._apiserver_args()])
            self._wait_https("/readyz", "kube-apiserver", timeout)
            self._write_kubeconfigs()
            self._spawn(
                "kube-controller-manager",
                [str(found["kube-controller-manager"]), *self._controller_manager_args()],
            )
            self._spawn("kube-scheduler", [str(found["kube-scheduler"]), *self._scheduler_args()])
            if agent:
                self._spawn(
                    "node-agent",
                    [
                        sys.executable,
                        "-m",
                        "finetune_devcluster.agent",
                        "--state-dir",
                        str(self.state_dir),
                    ],
                )
            self._save()
            self._wait_ready(timeout, agent=agent)
            if kueue:
                self.start_kueue(timeout=max(timeout, 120))
        except BaseException:
            self.stop()
            raise
        _log(f"control plane ready in {time.monotonic() - started:.1f}s; KUBECONFIG={self.kubeconfig}")
        return self

    def start_kueue(self, *, timeout: float = 120) -> None:
        """Start Kueue against this running control plane (once; a second call does nothing)."""
        from finetune_devcluster import kueue

        if not self.kueue_running:
            kueue.start(self, timeout=timeout)

    @property
    def kueue_running(self) -> bool:
        return any(p.name == "kueue" and _pid_alive(p.pid) for p in self.processes)

    def component_kubeconfig(self, user: str) -> Path:
        """The kubeconfig of a control-plane component's user (``system:kueue``, ...)."""
        return self._component_kubeconfig(user)

    def stop(self) -> None:
        """Stop every process, apiserver first (it hangs on exit when etcd is gone)."""
        order = [
            "kubelet",
            "node-agent",
            "kueue",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "etcd",
            "containerd",
        ]
        procs = sorted(self.processes, key=lambda p: order.index(p.name) if p.name in order else 0)
        for proc in procs:
            if proc.name == "containerd":
                realnode.stop_containers(self.state_dir)
            _terminate_group(proc.pid, STOP_GRACE_SECONDS)
        realnode.clean_up(self.state_dir)
        self.processes = []
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "processes.json").unlink()

    def alive(self) -> bool:
        return any(_pid_alive(p.pid) for p in self.processes)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- helpers for tests and the demo ----------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        result = subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.state_dir / 'kubectl-cache'}", *args],
            capture_output=True,
            text=True,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout if check else result.stdout + result.stderr

    def user_kubeconfig(self, user: str) -> Path:
        """The kubeconfig of one of ``extra_users``."""
        return self._component_kubeconfig(user)

    def install_crds(self, directory: Path, *, timeout: float = 30) -> None:
        """Apply CRDs and wait until kubectl can use them (discovery caches lag behind)."""

        # --force-conflicts: the objects may have been applied client-side before (kubectl
        # apply -f crds/, most people's habit), whose field manager would make this a conflict.
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(directory))
        deadline = time.monotonic() + timeout
        while True:
            shutil.rmtree(self.state_dir / "kubectl-cache", ignore_errors=True)
            # Discovery and the OpenAPI document (kubectl explain) both lag behind a new CRD.
            listed = self.kubectl("get", "finetunejobs", "-A", check=False).lower()
            explained = self.kubectl("explain", "finetunejobs.spec", check=False).lower()
            # The admission policies beside the CRD are in force once the apiserver has
            # compiled and type-checked them.
            policies = self.kubectl(
                "get", "validatingadmissionpolicies", "-l", "app.kubernetes.io/part-of=finetune", "-o",
                "jsonpath={range .items[*]}{.metadata.generation}={.status.observedGeneration} {end}", check=False,
            ).split()  # fmt: skip
            compiled = all(pair.partition("=")[0] == pair.partition("=")[2] for pair in policies)
            if "error" not in listed and "error" not in explained and compiled:
                return
            if time.monotonic() > deadline:
                raise ClusterError("the FineTuneJob CRD did not become usable")
            time.sleep(0.3)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # --- internals -----------------------------------------------------------------------------

    def spawn(self, name: str, argv: Sequence[str]) -> None:
        """Start one more process of this cluster (stopped with it, listed in processes.json)."""
        self._spawn(name, argv)

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.state_dir,
                start_new_session=True,
            )
        self.processes.append(Process(name, proc.pid, str(log_path)))
        self._save()

    def save(self) -> None:
        """Write processes.json (ports, processes) for ``load`` in another process."""
        self._save()

    def _save(self) -> None:
        data = {
            "ports": self.ports.__dict__,
            "processes": [p.__dict__ for p in self.processes],
            "admin_token": self.admin_token,
            "kueue_ports": self.kueue_ports,
        }
        path = self.state_dir / "processes.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)

    def _write_pki(self) -> None:
        pki = self.pki
        if not (pki / "ca.crt").is_file():
            _openssl("genrsa", "-out", str(pki / "ca.key"), "2048")
            _openssl(
                "req",
                "-x509",
                "-new",
                "-key",
                str(pki / "ca.key"),
                "-subj",
                "/CN=finetune-local-ca",
                "-days",
                "3650",
                "-out",
                str(pki / "ca.crt"),
            )
            _openssl("genrsa", "-out", str(pki / "apiserver.key"), "2048")
            ext = pki / "apiserver.ext"
            ext.write_text(
                "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
                "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
                "extendedKeyUsage=serverAuth\n"
            )
            _openssl(
                "req",
                "-new",
                "-key",
                str(pki / "apiserver.key"),
                "-subj",
                "/CN=kube-apiserver",
                "-out",
                str(pki / "apiserver.csr"),
            )
            _openssl(
                "x509",
                "-req",
                "-in",
                str(pki / "apiserver.csr"),
                "-CA",
                str(pki / "ca.crt"),
                "-CAkey",
                str(pki / "ca.key"),
                "-CAcreateserial",
                "-days",
                "3650",
                "-extfile",
                str(ext),
                "-out",
                str(pki / "apiserver.crt"),
            )
            _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
            _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
        self._write_front_proxy_pki()
        tokens = pki / "tokens.csv"
        rows = [
            ("admin", "admin", "system:masters"),
            ("system:kube-controller-manager", "kcm", "system:masters"),
            ("system:kube-scheduler", "scheduler", ""),
            ("system:node-agent", "node-agent", "system:masters"),
            ("system:kueue", "kueue", "system:masters"),
            (realnode.NODE_USER, "real-node", "system:nodes"),
            *[(user, user, "system:masters") for user in self.extra_users],
        ]
        # A state directory from an earlier start keeps its tokens; users added since get theirs.
        known = {line.split(",")[1] for line in tokens.read_text().splitlines()} if tokens.is_file() else set()
        missing = [row for row in rows if row[0] not in known]
        if missing:
            with open(tokens, "a") as handle:
                handle.writelines(f'{secrets.token_hex(16)},{user},{uid},"{groups}"\n' for user, uid, groups in missing)
            tokens.chmod(0o600)
        self.admin_token = self._token("admin")

    def _write_front_proxy_pki(self) -> None:
        """The aggregation layer's CA and the client certificate the apiserver proxies with."""
        pki = self.pki
        if (pki / "front-proxy-client.crt").is_file():
            return
        _openssl("genrsa", "-out", str(pki / "front-proxy-ca.key"), "2048")
        _openssl(
            "req",
            "-x509",
            "-new",
            "-key",
            str(pki / "front-proxy-ca.key"),
            "-subj",
            "/CN=finetune-local-front-proxy-ca",
            "-days",
            "3650",
            "-out",
            str(pki / "front-proxy-ca.crt"),
        )
        _openssl("genrsa", "-out", str(pki / "front-proxy-client.key"), "2048")
        _openssl(
            "req",
            "-new",
            "-key",
            str(pki / "front-proxy-client.key"),
            "-subj",
            "/CN=front-proxy-client",
            "-out",
            str(pki / "front-proxy-client.csr"),
        )
        ext = pki / "front-proxy-client.ext"
        ext.write_text("extendedKeyUsage=clientAuth\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(pki / "front-proxy-client.csr"),
            "-CA",
            str(pki / "front-proxy-ca.crt"),
            "-CAkey",
            str(pki / "front-proxy-ca.key"),
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            str(ext),
            "-out",
            str(pki / "front-proxy-client.crt"),
        )

    def sign_serving_cert(self, name: str, *, hosts: Sequence[str], directory: Path) -> None:
        """``directory``/tls.crt and tls.key: a serving certificate of this cluster's CA for
        ``hosts`` (IP addresses and DNS names), made once."""
        if (directory / "tls.crt").is_file():
            return
        directory.mkdir(parents=True, exist_ok=True)
        names = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
        ext = directory / "tls.ext"
        ext.write_text(f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n")
        _openssl("genrsa", "-out", str(directory / "tls.key"), "2048")
        _openssl(
            "req",
            "-new",
            "-key",
            str(directory / "tls.key"),
            "-subj",
            f"/CN={name}",
            "-out",
            str(directory / "tls.csr"),
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(directory / "tls.csr"),
            "-CA",
            str(self.pki / "ca.crt"),
            "-CAkey",
            str(self.pki / "ca.key"),
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            str(ext),
            "-out",
            str(directory / "tls.crt"),
        )

    def token(self, user: str) -> str:
        """The bearer token of one of the cluster's users (tokens.csv)."""
        return self._token(user)

    def _token(self, user: str) -> str:
        for line in (self.pki / "tokens.csv").read_text().splitlines():
            parts = line.split(",")
            if parts[1] == user:
                return parts[0]
        raise ClusterError(f"no token for {user}")

    def _etcd_args(self) -> list[str]:
        p = self.ports
        return [
            "--name=local",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{p.etcd_client}",
            f"--advertise-client-urls=http://127.0.0.1:{p.etcd_client}",
            f"--listen-peer-urls=http://127.0.0.1:{p.etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{p.etcd_peer}",
            f"--initial-cluster=local=http://127.0.0.1:{p.etcd_peer}",
            # Tests throw the data away: fsync buys nothing and costs seconds.
            "--unsafe-no-fsync",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self.pki
        return [
            f"--etcd-servers=http://127.0.0.1:{self.ports.etcd_client}",
            f"--etcd-prefix=/registry-{self.state_dir.name}",
            f"--secure-port={self.ports.apiserver}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            # The aggregation layer: the apiserver proxies aggregated APIs (Kueue's pending
            # workloads) with this client certificate and the user in these headers.
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            f"--profiling={str(self.profiling).lower()}",
            "--enable-garbage-collector=true",
            # The node agent's kubelet API (container logs) is on 127.0.0.1, its nodes' InternalIP;
            # their Hostname addresses resolve nowhere.
            "--kubelet-preferred-address-types=InternalIP",
            *self._audit_args(),
            "--v=1",
        ]

    def _audit_args(self) -> list[str]:
        if not self.audit_users:
            return ["--audit-log-path="]
        policy = self.pki / "audit-policy.yaml"
        users = ", ".join(f'"{u}"' for u in self.audit_users)
        policy.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n"
            f"rules:\n  - level: Metadata\n    users: [{users}]\n  - level: None\n"
        )
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.logs / 'audit.log'}",
            "--audit-log-maxsize=0",
            "--audit-log-mode=batch",
            "--audit-log-batch-max-wait=1s",
        ]

    def _component_kubeconfig(self, user: str) -> Path:
        return self.state_dir / f"{user.replace(':', '-')}.kubeconfig"

    def _controller_manager_args(self) -> list[str]:
        kubeconfig = self._component_kubeconfig("system:kube-controller-manager")
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--secure-port={self.ports.controller_manager}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            "--controllers=*",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            "--use-service-account-credentials=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Quicker reactions than production defaults: tests wait on them.
            "--concurrent-job-syncs=10",
            "--concurrent-gc-syncs=20",
            # The default client rate limit (20 requests/s) would make the Job controller the
            # bottleneck of every burst; production controllers run with more.
            "--kube-api-qps=100",
            "--kube-api-burst=200",
            "--node-monitor-grace-period=60s",
            "--v=1",
        ]

    def _scheduler_args(self) -> list[str]:
        kubeconfig = self._component_kubeconfig("system:kube-scheduler")
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--secure-port={self.ports.scheduler}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            "--kube-api-qps=100",
            "--kube-api-burst=200",
            "--v=1",
        ]

    def _write_kubeconfigs(self) -> None:
        for user, path in [
            ("admin", self.kubeconfig),
            ("system:kube-controller-manager", self._component_kubeconfig("system:kube-controller-manager")),
            ("system:kube-scheduler", self._component_kubeconfig("system:kube-scheduler")),
            ("system:node-agent", self._component_kubeconfig("system:node-agent")),
            ("system:kueue", self._component_kubeconfig("system:kueue")),
            *[(user, self._component_kubeconfig(user)) for user in self.extra_users],
        ]:
            write_kubeconfig(path, server=self.server, ca_file=self.ca_file, token=self._token(user), user=user)

    def _wait_http(self, url: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running()
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise ClusterError(f"{what} not healthy after {timeout:.0f}s; see {self.logs / (what + '.log')}")

    def _https_get(self, path: str) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        request = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.admin_token}"})
        try:
            with urllib.request.urlopen(request, timeout=3, context=context) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _wait_https(self, path: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running()
            with contextlib.suppress(OSError):
                status, _ = self._https_get(path)
                if status == 200:
                    return
            time.sleep(0.2)
        raise ClusterError(f"{what} not ready after {timeout:.0f}s; see {self.logs / (what + '.log')}")

    def _wait_ready(self, timeout: float, *, agent: bool) -> None:
        """Ready means: namespaces list, the default ServiceAccount exists, nodes are Ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running()
            status, _ = self._https_get("/api/v1/namespaces/default/serviceaccounts/default")
            if status == 200 and (not agent or self._nodes_ready()):
                return
            time.sleep(0.25)
        raise ClusterError(
            f"cluster not ready after {timeout:.0f}s (default ServiceAccount or GPU nodes missing); "
            f"see {self.logs}/kube-controller-manager.log and node-agent.log"
        )

    def _nodes_ready(self) -> bool:
        status, body = self._https_get("/api/v1/nodes?labelSelector=finetune.dev%2Flocal-agent%3Dtrue")
        if status != 200:
            return False
        items = json.loads(body).get("items", [])
        if not items:
            return False
        for node in items:
            conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            if conditions.get("Ready") != "True":
                return False
        return True

    def _check_running(self) -> None:
        for proc in self.processes:
            if not _pid_alive(proc.pid):
                tail = self.log_tail(proc.name, 25)
                raise ClusterError(f"{proc.name} exited during start-up; last lines of {proc.log}:\n{tail}")


def write_kubeconfig(path: Path, *, server: str, ca_file: Path, token: str, user: str) -> None:
    import base64

    ca = base64.b64encode(ca_file.read_bytes()).decode()
    text = f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: local
  context:
    cluster: local
    user: {user}
current-context: local
"""
    path.write_text(text)
    path.chmod(0o600)


def load(state_dir: Path = DEFAULT_STATE_DIR) -> LocalCluster:
    """The cluster that ``up`` started from ``state_dir`` (for ``down`` and for tests)."""
    data = json.loads((state_dir / "processes.json").read_text())
    cluster = LocalCluster(state_dir=state_dir.resolve(), ports=Ports(**data["ports"]))
    cluster.processes = [Process(**p) for p in data["processes"]]
    cluster.admin_token = data.get("admin_token", "")
    cluster.kueue_ports = dict(data.get("kueue_ports") or {})
    return cluster


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    return True


def _terminate_group(pid: int, grace: float) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pgid, os.WNOHANG)
    return False


def _log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def running(state_dir: Path = DEFAULT_STATE_DIR, *, agent: bool = True) -> Iterator[LocalCluster]:
    cluster = LocalCluster(state_dir=state_dir)
    cluster.start(agent=agent)
    try:
        yield cluster
    finally:
        cluster.stop()
