"""``make demo``: the whole system on this machine, end to end.

A local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
the node agent with two GPU nodes), the CRD, the operator, three PersistentVolumeClaims,
a tiny Stable Diffusion pipeline with random weights and four synthetic pictures, and
``examples/demo.yaml`` applied with kubectl.  It prints ``kubectl get ftj -w`` lines until
the job ends, then where the results are.

With ``--real-node`` (``make demo REAL_NODE=1``) the job runs on a node of a real kubelet with
containerd instead (``realnode.py``), in the trainer image ``make images`` built, as a cluster runs
it; the operator listens on that node's address for the trainer's reports.

With ``--kueue`` (``make demo KUEUE=1``) Kueue runs too, with one GPU of quota for the demo
namespace (``examples/kueue/demo-queue.yaml``), and two such jobs go through its LocalQueue: one
runs while the other is Queued in Kueue's words, then runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from finetune_devcluster import cluster as devcluster
from finetune_devcluster import realnode

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "demo"
CLAIMS = ("models", "datasets", "outputs")
DEMO_NOTE = (
    "DEMO DATA: a tiny Stable Diffusion pipeline with random weights and synthetic pictures, built by\n"
    "`make demo` so that nothing is downloaded. Pictures made with it are noise by design.\n"
)


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def trainer_command() -> str:
    """The trainer's CLI: beside this Python (the project's venv), else on the PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("finetune-trainer", path=search)
    if found is None:
        raise SystemExit("the demo needs the trainer's CLI, finetune-trainer: `make setup` installs it")
    return found


def build_demo_data(model: Path, images: Path) -> None:
    """The tiny pipeline at ``model`` and four pictures in ``images``, through ``finetune-trainer tiny``.

    The demo starts the trainer as a user would, through its CLI: the trainer (torch, diffusers)
    is no part of the dev cluster. ``tiny`` writes model/ and images/ side by side; the demo keeps
    them on separate claims.
    """
    staging = model.parent / ".tiny-build"
    shutil.rmtree(staging, ignore_errors=True)
    command = [trainer_command(), "tiny", str(staging), "--images", "4", "--size", "64"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    shutil.rmtree(model, ignore_errors=True)
    (staging / "model").replace(model)
    images.mkdir(parents=True, exist_ok=True)
    for picture in sorted((staging / "images").iterdir()):
        picture.replace(images / picture.name)
    shutil.rmtree(staging, ignore_errors=True)


class Demo:
    def __init__(
        self, *, state_dir: Path, keep: bool, timeout: float, kueue: bool = False, real_node: bool = False
    ) -> None:
        self.state_dir = state_dir
        self.keep = keep
        self.timeout = timeout
        self.kueue = kueue
        self.real_node = real_node
        # Where the operator listens: with a real node, the node's address, which its pods reach.
        self.host = realnode.Network.for_state(state_dir).gateway if real_node else "127.0.0.1"
        # With Kueue, a second job waits in the queue behind the first.
        self.jobs = ["demo", "demo-2"] if kueue else ["demo"]
        self.cluster: devcluster.LocalCluster | None = None
        self.started_cluster = False
        self.operator: subprocess.Popen[bytes] | None = None
        self.ports = {"progress": _free_port(), "metrics": _free_port(), "health": _free_port(), "web": _free_port()}

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        assert self.cluster is not None
        return self.cluster.kubectl(*args, check=check, input=input)

    # --- steps -----------------------------------------------------------------------------------

    def start_cluster(self) -> None:
        if (self.state_dir / "processes.json").is_file():
            existing = devcluster.load(self.state_dir)
            if existing.alive():
                say(f"using the control plane already running from {self.state_dir} (make cluster-up)")
                self.cluster = existing
                if self.kueue and not existing.kueue_running:
                    say("starting Kueue (built from sigs.k8s.io/kueue; webhooks and pending-workloads API on loopback)")
                    existing.start_kueue()
                self._check_reused(existing)
                if self.real_node:
                    self._start_real_node()
                return
        # The demo owns the cluster it starts: from an empty etcd, whatever an earlier run left
        # (Kueue's webhooks with no Kueue running would refuse every Job).
        say("starting a local control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, node agent")
        if self.kueue:
            say("and Kueue (built from sigs.k8s.io/kueue; webhooks and pending-workloads API on loopback)")
        self.cluster = devcluster.LocalCluster(state_dir=self.state_dir).start(
            agent=True, kueue=self.kueue, timeout=90, fresh=True
        )
        self.started_cluster = True
        if self.real_node:
            self._start_real_node()
        print(self.kubectl("get", "nodes", "-L", "nvidia.com/gpu.count"), flush=True)

    def _start_real_node(self) -> None:
        assert self.cluster is not None
        if self.kubectl("get", "node", realnode.NODE_NAME, "--ignore-not-found", "-o", "name").strip():
            return
        say(f"adding {realnode.NODE_NAME}: a real kubelet with containerd and runc (realnode.py)")
        realnode.RealNode(self.cluster).start(images=[realnode.trainer_image()])

    def _check_reused(self, cluster: devcluster.LocalCluster) -> None:
        """A running cluster the demo did not start must be able to run it: fail at once with a
        sentence, not after minutes of waiting on a job nothing can create."""
        if cluster.kueue_running:
            return
        hooks = self.kubectl(
            "get", "mutatingwebhookconfigurations,validatingwebhookconfigurations", "-o", "name", check=False
        )
        left = [h for h in hooks.split() if "kueue" in h]
        if left:
            raise SystemExit(
                f"the cluster running from {self.state_dir} has Kueue's webhooks ({', '.join(left)}) but no Kueue "
                "running, so every Job create would fail: `make cluster-down`, then `make demo` (or keep Kueue: "
                "`make demo KUEUE=1`)"
            )

    def install_crd(self) -> None:
        assert self.cluster is not None
        say("installing the FineTuneJob CRD (crds/finetunejobs.finetune.dev.yaml)")
        self.cluster.install_crds(ROOT / "crds")

    def start_operator(self) -> None:
        assert self.cluster is not None
        log = self.cluster.logs / "operator.log"
        say(f"starting the operator (log: {log}; web page: http://{self.host}:{self.ports['web']}/)")
        with open(log, "ab") as handle:
            self.operator = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "finetune_operator",
                    "run",
                    f"--kubeconfig={self.cluster.kubeconfig}",
                    f"--bind-address={self.host}",
                    f"--progress-port={self.ports['progress']}",
                    f"--metrics-port={self.ports['metrics']}",
                    f"--health-port={self.ports['health']}",
                    f"--web-port={self.ports['web']}",
                    "--web",
                    # A cluster of one's own: the per-job series are for its dashboard.
                    "--metrics-per-job",
                    f"--report-url=http://{self.host}:{self.ports['progress']}",
                    "--status-interval=1",
                ],
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.operator.poll() is not None:
                raise SystemExit(f"the operator exited; see {log}")
            with contextlib.suppress(OSError):
                url = f"http://{self.host}:{self.ports['health']}/readyz"
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            time.sleep(0.2)
        raise SystemExit(f"the operator did not become ready; see {log}")

    def prepare_data(self) -> dict[str, Path]:
        assert self.cluster is not None
        say(f"namespace {NAMESPACE}: claims {', '.join(CLAIMS)} (the node agent backs each with a directory)")
        self.kubectl("create", "namespace", NAMESPACE, check=False)
        for claim in CLAIMS:
            manifest = {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": NAMESPACE},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            }
            self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        self.kubectl("-n", NAMESPACE, "wait", "--for=jsonpath={.status.phase}=Bound", "pvc", "--all", "--timeout=60s")
        paths = {claim: self.cluster.volumes / NAMESPACE / claim for claim in CLAIMS}
        model = paths["models"] / "tiny-sd"
        images = paths["datasets"] / "subject"
        if not (model / "model_index.json").is_file():
            say("building the tiny demo pipeline (random weights) and four synthetic pictures")
            build_demo_data(model, images)
            for folder in (model, images):
                (folder / "DEMO-README.txt").write_text(DEMO_NOTE)
        return paths

    def set_up_queue(self) -> None:
        say("Kueue: one GPU of quota for namespace demo (kubectl apply -f examples/kueue/demo-queue.yaml)")
        print(self.kubectl("apply", "-f", str(ROOT / "examples" / "kueue" / "demo-queue.yaml")).strip(), flush=True)
        self.kubectl(
            "-n", NAMESPACE, "wait", "--for=condition=Active", "localqueue/gpu", "--timeout=60s"
        )  # fmt: skip

    def manifests(self) -> list[dict[str, Any]]:
        """examples/demo.yaml, and with Kueue a second copy of it: both in the LocalQueue gpu."""
        import yaml

        base = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
        if self.real_node:
            base["spec"]["resources"]["nodeSelector"] = {realnode.NODE_LABEL: "true"}
        if not self.kueue:
            return [base]
        out = []
        for name in self.jobs:
            manifest = json.loads(json.dumps(base))
            manifest["metadata"]["name"] = name
            manifest["spec"]["output"]["uri"] = f"pvc://outputs/{name}/"
            manifest["spec"].setdefault("runPolicy", {})["queueName"] = "gpu"
            out.append(manifest)
        return out

    def run_job(self) -> dict[str, Any]:
        self.kubectl("-n", NAMESPACE, "delete", "ftj", *self.jobs, "--ignore-not-found", "--wait=true")
        if self.kueue:
            say("two copies of examples/demo.yaml (demo, demo-2) with spec.runPolicy.queueName: gpu")
            print(
                self.kubectl(
                    "apply",
                    "-f",
                    "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": self.manifests()}),
                ).strip(),
                flush=True,
            )
            say("kubectl -n demo get ftj -w   (REASON: Kueue's while a job waits; kubectl describe ftj: its message)")
        elif self.real_node:
            say(f"examples/demo.yaml with spec.resources.nodeSelector {realnode.NODE_LABEL}: 'true'")
            print(self.kubectl("apply", "-f", "-", input=json.dumps(self.manifests()[0])).strip(), flush=True)
        else:
            say("kubectl apply -f examples/demo.yaml")
            print(self.kubectl("apply", "-f", str(ROOT / "examples" / "demo.yaml")).strip(), flush=True)
            say("kubectl -n demo get ftj -w")
        assert self.cluster is not None
        watch = subprocess.Popen(
            [
                "kubectl",
                f"--kubeconfig={self.cluster.kubeconfig}",
                f"--cache-dir={self.state_dir / 'kubectl-cache'}",
                "-n",
                NAMESPACE,
                "get",
                "ftj",
                "-w",
            ],
            stdout=sys.stdout,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.timeout
        statuses: dict[str, dict[str, Any]] = {}
        waited: dict[str, str] = {}
        try:
            while time.monotonic() < deadline:
                for name in self.jobs:
                    raw = self.kubectl("-n", NAMESPACE, "get", "ftj", name, "-o", "json", check=False)
                    with contextlib.suppress(ValueError):
                        statuses[name] = json.loads(raw).get("status") or {}
                    status = statuses.get(name) or {}
                    if status.get("phase") == "Queued" and status.get("reason") != "WaitingForAdmission":
                        waited[name] = status.get("message") or ""
                if all((statuses.get(n) or {}).get("phase") in ("Succeeded", "Failed") for n in self.jobs):
                    time.sleep(1.0)  # let the watch print the last line
                    break
                time.sleep(0.5)
        finally:
            watch.terminate()
            watch.wait(timeout=5)
        for name, message in waited.items():
            say(f"{name} waited in Kueue's queue: {message}")
        for name in self.jobs[1:]:
            status = statuses.get(name) or {}
            output = (status.get("output") or {}).get("uri")
            say(f"{name}: {status.get('phase')} ({status.get('progressText', '')}), output {output}")
        return statuses.get("demo") or {}

    def report(self, status: dict[str, Any], paths: dict[str, Path]) -> int:
        phase = status.get("phase")
        if phase != "Succeeded":
            say(f"the job ended {phase or 'without finishing'}: {status.get('reason')}: {status.get('message')}")
            print(self.kubectl("-n", NAMESPACE, "describe", "ftj", "demo"), flush=True)
            return 1
        output = status.get("output") or {}
        files = [f["path"] for f in output.get("files") or []]
        single = next((f for f in files if f.endswith(".safetensors") and "/" not in f), None)
        local_output = paths["outputs"] / "demo"
        say("done. Where things are (pvc://CLAIM/path on the resource; the local directory beside it):")
        checkpoints = status.get("checkpoints") or []
        if checkpoints:
            newest = checkpoints[-1]
            print(f"  checkpoint (step {newest['step']}): {newest['uri']}")
        print(f"  output folder:        {output.get('uri')}  ->  {local_output}")
        if single:
            print(f"  single-file model:    {output.get('uri')}/{single}  ->  {local_output / single}")
        samples = output.get("samples") or []
        if samples:
            print(f"  newest sample image:  {samples[-1]}")
        sample_files = sorted((local_output / "samples").glob("*.png")) if (local_output / "samples").is_dir() else []
        if sample_files:
            print(f"                        ->  {sample_files[-1]}")
        if self.keep and self.cluster is not None:
            # The page shows what the token's holder may list: here the local cluster's admin.
            page = f"http://{self.host}:{self.ports['web']}/?namespace={NAMESPACE}#token={self.cluster.admin_token}"
            print(f"  the web page:         {page}")
        print("  look at it with kubectl:")
        print(f"    export KUBECONFIG={self.state_dir / 'kubeconfig'}")
        print("    kubectl -n demo get ftj demo")
        print("    kubectl -n demo describe ftj demo")
        print("    kubectl -n demo get ftj demo -o jsonpath='{.status.output.files[*].path}'")
        print("    kubectl ftj list -n demo          # the kubectl plugin (on the PATH in .venv/bin)")
        return 0

    def stop(self) -> None:
        if self.keep:
            say(
                f"left running (KEEP=1): export KUBECONFIG={self.state_dir / 'kubeconfig'}; "
                f"stop it with `make cluster-down` (operator pid {self.operator.pid if self.operator else '-'})"
            )
            if self.operator is not None and self.cluster is not None:
                extra = json.loads((self.state_dir / "processes.json").read_text())
                extra["processes"].append(
                    {"name": "operator", "pid": self.operator.pid, "log": str(self.cluster.logs / "operator.log")}
                )
                (self.state_dir / "processes.json").write_text(json.dumps(extra, indent=2))
            return
        if self.operator is not None and self.operator.poll() is None:
            self.operator.send_signal(signal.SIGTERM)
            try:
                self.operator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.operator.kill()
        if self.cluster is not None and self.started_cluster:
            say("stopping the control plane (KEEP=1 leaves it running)")
            self.cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", default=os.environ.get("KEEP") == "1")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".cluster")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--kueue",
        action="store_true",
        default=os.environ.get("KUEUE") == "1",
        help="run Kueue too: two jobs, one GPU of quota, the second waits in the queue",
    )
    parser.add_argument(
        "--real-node",
        action="store_true",
        default=os.environ.get("REAL_NODE") == "1",
        help="run the job on a real kubelet's node, in the trainer image `make images` built",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    demo = Demo(
        state_dir=args.state_dir.resolve(),
        keep=args.keep,
        timeout=args.timeout,
        kueue=args.kueue,
        real_node=args.real_node,
    )
    try:
        demo.start_cluster()
        demo.install_crd()
        demo.start_operator()
        paths = demo.prepare_data()
        if demo.kueue:
            demo.set_up_queue()
        status = demo.run_job()
        code = demo.report(status, paths)
    finally:
        demo.stop()
    say(f"demo finished in {time.monotonic() - started:.0f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
