"""A node run by a real kubelet: ``make cluster-up REAL_NODE=1``.

The node agent imitates a kubelet; this is the kubelet itself (v1.36.3, built from the same
Kubernetes module as the control plane) with Debian's containerd and runc, so a pod runs as a
cluster runs it: the image's own file system, read-only where the spec says so, as the uid the
spec names, with the kubelet's projected service-account token, downward-API files, fsGroup on
volumes that support it, and a network namespace of its own on a bridge.

What it needs of the machine, and why each setting is what it is:

* root (the kubelet and containerd mount, make network namespaces and cgroups);
* ``containerd`` and ``runc`` (Debian's packages) and the CNI plugins (``containernetworking-plugins``);
* cgroups of any kind: the kubelet refuses cgroup v1 unless ``failCgroupV1: false``, and on a
  machine without systemd it uses the ``cgroupfs`` driver with no QoS cgroups;
* a machine that may not lower a process's ``oom_score_adj`` (a container, say) makes runc fail
  with "can't get final child's PID from pipe": containerd's ``restrict_oom_score_adj`` keeps
  every container's score at or above containerd's own.

The node's address is the gateway of its own bridge (the kubelet refuses a loopback address):
pods reach the host there, so an operator on this machine that binds that address is reachable
for the trainer's progress reports (``report_url``).  The kubelet's API listens there too, for
``kubectl logs``; it trusts every caller, which is why it listens on no other address.

Images come from podman's store (``make images``): ``podman save`` into ``ctr images import``,
once per image ID (containerd's store is cached outside the repository, so a second cluster does
not import 7 GB again).  The pod sandbox's image is a 1.4 MB static ``pause`` built here from the
Go source below: no registry is reachable to pull one.

The node carries the taint and labels of the node agent's GPU nodes and one GPU of capacity,
patched into its status as Kubernetes documents for extended resources (there is no GPU and no
device plugin: the trainer runs on CPU).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_devcluster import binaries

if TYPE_CHECKING:
    from finetune_devcluster.cluster import LocalCluster

NODE_NAME = "finetune-real-0"
NODE_USER = f"system:node:{NODE_NAME}"
NODE_LABEL = "finetune.dev/real-node"
PAUSE_IMAGE = "localhost/finetune-pause:1"
NAMESPACE = "k8s.io"  # containerd's namespace for the kubelet's images and containers
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
CNI_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))

_PAUSE_MAIN = """// The pod sandbox's process: it holds the pod's namespaces until it is told to stop.
package main

import (
\t"os"
\t"os/signal"
\t"syscall"
)

func main() {
\tstop := make(chan os.Signal, 1)
\tsignal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
\tchildren := make(chan os.Signal, 8)
\tsignal.Notify(children, syscall.SIGCHLD)
\tfor {
\t\tselect {
\t\tcase <-stop:
\t\t\treturn
\t\tcase <-children:
\t\t\tfor {
\t\t\t\tpid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
\t\t\t\tif pid <= 0 || err != nil {
\t\t\t\t\tbreak
\t\t\t\t}
\t\t\t}
\t\t}
\t}
}
"""


class RealNodeError(RuntimeError):
    """The real node cannot run here; the message says what is missing and what to do."""


def _log(message: str) -> None:
    print(f"[real-node] {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], *, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(argv, input=input, capture_output=True, check=False)
    if check and done.returncode != 0:
        said = (done.stderr or done.stdout).decode()[-800:]
        raise RealNodeError(f"{' '.join(argv)} exited {done.returncode}: {said}")
    return done


@dataclass(frozen=True)
class Network:
    """The node's bridge, subnet and address, chosen from the cluster's state folder so that two
    clusters on one machine do not share a bridge."""

    bridge: str
    subnet: str
    gateway: str

    @classmethod
    def for_state(cls, state_dir: Path) -> Network:
        digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()
        third = 100 + int(digest[:4], 16) % 150
        return cls(bridge=f"ftn{digest[:8]}", subnet=f"10.244.{third}.0/24", gateway=f"10.244.{third}.1")


def requirements() -> list[str]:
    """What this machine lacks for a real node, each with its fix (empty: nothing)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root: the kubelet and containerd mount file systems and make network namespaces")
    for command, package in (("containerd", "containerd"), ("runc", "runc"), ("ctr", "containerd")):
        if shutil.which(command) is None:
            missing.append(f"{command}: apt-get install {package}")
    if not any((d / "bridge").is_file() for d in CNI_DIRS):
        missing.append("the CNI plugins: apt-get install containernetworking-plugins")
    return missing


def trainer_image() -> str:
    """The trainer image as `make images` tags it: the chart's default, the operator's too."""
    from finetune_devcluster import images

    trainer = images.images()[1]
    return trainer.reference(None, images.default_tag())


def run_dir(state_dir: Path) -> Path:
    """containerd's socket and state of the cluster at ``state_dir``: under /run, since a unix
    socket's path has at most 107 bytes and a state folder's may be longer."""
    return Path("/run/finetune-real-node") / Network.for_state(state_dir).bridge


def ctr_argv(socket: Path) -> list[str]:
    """``ctr`` talking to the node's containerd, in the kubelet's namespace."""
    return ["ctr", "--address", str(socket), "--namespace", NAMESPACE]


def containerd_root() -> Path:
    """containerd's store of images and snapshots, kept between clusters (one real node at a time)."""
    return binaries.cache_dir() / "real-node" / "containerd"


class RealNode:
    """The kubelet and containerd of one node, started as processes of ``cluster``."""

    def __init__(self, cluster: LocalCluster, *, name: str = NODE_NAME) -> None:
        self.cluster = cluster
        self.name = name
        self.dir = cluster.state_dir / "real-node"
        self.network = Network.for_state(cluster.state_dir)
        self.run_dir = run_dir(cluster.state_dir)

    @property
    def socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def address(self) -> str:
        """The node's InternalIP: the host as its pods see it."""
        return self.network.gateway

    def ctr(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return _run([*ctr_argv(self.socket), *args], input=input, check=check)

    # --- start -----------------------------------------------------------------------------------

    def start(self, *, images: list[str], timeout: float = 120) -> RealNode:
        missing = requirements()
        if missing:
            raise RealNodeError("a real node needs " + "; ".join(missing))
        kubelet = binaries.ensure(["kubelet"])["kubelet"]
        for directory in (self.dir, self.run_dir, containerd_root()):
            directory.mkdir(parents=True, exist_ok=True)
        self._bridge()
        self._write_cni()
        self.cluster.spawn("containerd", ["containerd", "--config", str(self._write_containerd_config())])
        self._wait(lambda: self.ctr("version", check=False).returncode == 0, "containerd", timeout)
        self._load_pause()
        for image in images:
            self.load_image(image)
        self._grant_node_role()
        self.cluster.spawn(
            "kubelet",
            [
                str(kubelet),
                f"--config={self._write_kubelet_config()}",
                f"--kubeconfig={self._kubeconfig()}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.address}",
                f"--root-dir={self.dir / 'kubelet'}",
                f"--cert-dir={self.dir / 'kubelet-pki'}",
                f"--node-labels={NODE_LABEL}=true,nvidia.com/gpu.present=true,nvidia.com/gpu.count=1",
                f"--register-with-taints={GPU_TAINT['key']}={GPU_TAINT['value']}:{GPU_TAINT['effect']}",
                "--v=1",
            ],
        )
        self._wait(self._registered, f"node {self.name} registered by its kubelet", timeout)
        # One GPU of capacity, as Kubernetes documents for an extended resource: the kubelet keeps
        # what it does not manage itself.
        self.cluster.kubectl(
            "patch", "node", self.name, "--subresource=status", "--type=json",
            "-p", json.dumps([{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "1"}]),
        )  # fmt: skip
        self._wait(self._ready, f"node {self.name} Ready with a GPU", timeout)
        _log(f"node {self.name} is Ready at {self.address} (kubelet {binaries.KUBERNETES_VERSION}, containerd)")
        return self

    def _bridge(self) -> None:
        net = self.network
        if _run(["ip", "link", "show", net.bridge], check=False).returncode != 0:
            _run(["ip", "link", "add", net.bridge, "type", "bridge"])
        prefix = net.subnet.split("/")[1]
        _run(["ip", "addr", "replace", f"{net.gateway}/{prefix}", "dev", net.bridge])
        _run(["ip", "link", "set", net.bridge, "up"])

    def _write_cni(self) -> None:
        conf = self.dir / "cni"
        conf.mkdir(exist_ok=True)
        net = self.network
        config = {
            "cniVersion": "1.0.0",
            "name": "finetune-real-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": net.bridge,
                    "isGateway": True,
                    # Pods reach this machine and nothing beyond it: no masquerade, no route out.
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": net.subnet, "gateway": net.gateway}]],
                        "dataDir": str(self.dir / "cni-ipam"),
                    },
                }
            ],
        }
        (conf / "10-finetune.conflist").write_text(json.dumps(config, indent=2))

    def _write_containerd_config(self) -> Path:
        # The first folder with the plugins (missing() names the package where none has them).
        cni_bin = next((d for d in CNI_DIRS if (d / "bridge").is_file()), CNI_DIRS[0])
        root = containerd_root()
        text = f"""version = 2
root = "{root}"
state = "{self.run_dir / "state"}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{self.dir / "cni"}"
"""
        path = self.dir / "containerd.toml"
        path.write_text(text)
        return path

    def _write_kubelet_config(self) -> Path:
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.address,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": self.address,
            "healthzPort": 10248,
            # The apiserver calls the kubelet with no client certificate (kubectl logs).
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "failCgroupV1": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "makeIPTablesUtilChains": False,
            "protectKernelDefaults": False,
            "serializeImagePulls": False,
            # The images are imported, not pulled: never collect them, never evict for a full disk
            # of a development machine.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "resolvConf": "",
        }
        path = self.dir / "kubelet.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def _kubeconfig(self) -> Path:
        from finetune_devcluster.cluster import write_kubeconfig

        path = self.dir / "kubelet.kubeconfig"
        write_kubeconfig(
            path,
            server=self.cluster.server,
            ca_file=self.cluster.ca_file,
            token=self.cluster.token(NODE_USER),
            user=NODE_USER,
        )
        return path

    def _grant_node_role(self) -> None:
        """The kubelet's user gets Kubernetes' own ``system:node`` role (what the Node authorizer
        would narrow on a production cluster)."""
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"finetune-{self.name}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": NODE_USER}],
        }
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(binding))

    # --- images ----------------------------------------------------------------------------------

    def _loaded(self) -> dict[str, str]:
        path = containerd_root() / "loaded.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _remember(self, ref: str, image_id: str) -> None:
        loaded = self._loaded()
        loaded[ref] = image_id
        path = containerd_root() / "loaded.json"
        path.with_suffix(".tmp").write_text(json.dumps(loaded, indent=2))
        path.with_suffix(".tmp").replace(path)

    def _has(self, ref: str) -> bool:
        return ref in self.ctr("images", "ls", "--quiet").stdout.decode().split()

    def _load_pause(self) -> None:
        if self._has(PAUSE_IMAGE):
            return
        self.ctr("images", "import", "-", input=pause_archive(build_pause()))
        # Pinned: the kubelet's image collection never removes the sandbox's image.
        self.ctr("images", "label", PAUSE_IMAGE, "io.cri-containerd.pinned=pinned")

    def load_image(self, ref: str) -> None:
        """``ref`` from podman's store into the node's, unless the same image ID is there."""
        found = _run(["podman", "image", "inspect", "--format", "{{.Id}}", ref], check=False)
        if found.returncode != 0:
            raise RealNodeError(f"podman has no image {ref}: `make images` builds it")
        image_id = found.stdout.decode().strip()
        if self._loaded().get(ref) == image_id and self._has(ref):
            _log(f"{ref}: already on the node")
            return
        _log(f"{ref}: podman save | ctr images import (a few minutes for the trainer's 7 GB)")
        started = time.monotonic()
        save = subprocess.Popen(["podman", "save", "--format", "docker-archive", ref], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                [*ctr_argv(self.socket), "images", "import", "-"],
                stdin=save.stdout,
                capture_output=True,
                check=False,
            )
        finally:
            assert save.stdout is not None
            save.stdout.close()
            saved = save.wait()
        if saved != 0 or imported.returncode != 0:
            raise RealNodeError(f"importing {ref} failed: {imported.stderr.decode()[-800:]}")
        self._remember(ref, image_id)
        _log(f"{ref}: imported in {time.monotonic() - started:.0f}s")

    # --- waiting ---------------------------------------------------------------------------------

    def _node(self) -> dict[str, Any] | None:
        out = self.cluster.kubectl("get", "node", self.name, "-o", "json", "--ignore-not-found")
        return json.loads(out) if out.strip() else None

    def _registered(self) -> bool:
        return self._node() is not None

    def _ready(self) -> bool:
        node = self._node()
        if node is None:
            return False
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
        return ready and node["status"].get("allocatable", {}).get("nvidia.com/gpu") == "1"

    def _wait(self, check: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.5)
        logs = "\n".join(f"--- {n} ---\n{self.cluster.log_tail(n, 15)}" for n in ("containerd", "kubelet"))
        raise RealNodeError(f"{what}: not within {timeout:.0f}s\n{logs}")


# --- stop: what the kubelet and containerd leave behind -----------------------------------------


def stop_containers(state_dir: Path) -> None:
    """Kill the node's containers while containerd still runs (after the kubelet, which would start
    them again): containerd's shims and the containers outlive containerd itself."""
    if not (state_dir / "real-node").is_dir():
        return
    socket = run_dir(state_dir) / "containerd.sock"
    if not socket.exists():
        return
    ctr = ctr_argv(socket)
    listed = subprocess.run([*ctr, "containers", "ls", "--quiet"], capture_output=True, text=True, check=False)
    for container in listed.stdout.split():
        subprocess.run([*ctr, "tasks", "kill", "--signal", "SIGKILL", container], capture_output=True, check=False)
        subprocess.run([*ctr, "tasks", "delete", "--force", container], capture_output=True, check=False)
        subprocess.run([*ctr, "containers", "delete", container], capture_output=True, check=False)


def clean_up(state_dir: Path) -> None:
    """After every process is stopped: the mounts under the node's folders, its addresses and its
    bridge."""
    node_dir = state_dir / "real-node"
    if not node_dir.is_dir():
        return
    network = Network.for_state(state_dir)
    state = run_dir(state_dir)
    for mount in reversed(_mounts_under((node_dir, state))):
        subprocess.run(["umount", "--lazy", mount], capture_output=True, check=False)
    subprocess.run(["ip", "link", "delete", network.bridge], capture_output=True, check=False)
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(node_dir / "cni-ipam", ignore_errors=True)


def _mounts_under(folders: tuple[Path, ...]) -> list[str]:
    prefixes = [str(f.resolve()) + "/" for f in folders]
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if any(point.startswith(p) for p in prefixes):
            mounts.append(point)
    return mounts


# --- the sandbox's image ------------------------------------------------------------------------


def build_pause() -> Path:
    """The ``pause`` binary (static, Go), built once into the cache."""
    target = binaries.cache_dir() / "bin" / "pause-1" / "pause"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="finetune-pause-") as tmp:
        work = Path(tmp)
        (work / "go.mod").write_text("module finetune.dev/pause\n\ngo 1.22\n")
        (work / "main.go").write_text(_PAUSE_MAIN)
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false"}
        partial = target.with_name("pause.partial")
        done = subprocess.run(
            ["go", "build", "-ldflags", "-s -w", "-o", str(partial), "."],
            cwd=work, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RealNodeError(f"building the pause binary failed: {done.stderr[-800:]}")
        partial.replace(target)
    return target


def pause_archive(binary: Path) -> bytes:
    """A docker-archive tarball (what ``ctr images import`` reads) of one layer: ``/pause``."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tar.gettarinfo(str(binary), arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        with open(binary, "rb") as handle:
            tar.addfile(info, handle)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]).encode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in (("layer.tar", layer_bytes), ("config.json", config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive.getvalue()
