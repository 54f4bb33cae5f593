"""Operator at scale: apply N FineTuneJobs and, in the same run on the same control plane, N
equivalent plain batch/v1 Jobs; then measure how fresh the status stays with 1, 100 and 1,000
jobs reporting progress every 5 s.

Everything runs on this machine: etcd, kube-apiserver (with an audit log, to count the
operator's requests), kube-controller-manager, kube-scheduler, KWOK with 150 fake nodes of 8
GPUs (pods go Running, then Succeeded after a delay), and the operator as its own process.
Results: bench/results/operator-scale.json and .md.

    python bench/operator_scale.py [--sizes 100,1000] [--nodes 150] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import kwok  # noqa: E402
from finetune_api.v1alpha1 import GROUP, PLURAL, VERSION, parse_manifest  # noqa: E402
from finetune_devcluster import binaries  # noqa: E402
from finetune_devcluster.cluster import LocalCluster  # noqa: E402
from finetune_operator import names  # noqa: E402
from finetune_operator.render import render  # noqa: E402

RESULTS = ROOT / "bench" / "results"
STATE = ROOT / "bench" / ".state"
THREADS = 16
OPERATOR_USER = "finetune-operator"
REPORT_INTERVAL = 5.0
# Steady arrival: the latency goals apply at the rates where plain Jobs keep apply -> Running
# p95 under this many seconds.
STEADY_PLAIN_BOUND = 2.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float | int | None]:
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def spec(name: str) -> dict[str, Any]:
    """A one-GPU FineTuneJob in object storage (no claims: the pods are simulated; a cluster
    refuses plain paths)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/sd15", "type": "v1x"},
            "dataset": {"instanceImages": "s3://datasets/nick", "instancePrompt": "a photo of sks"},
            "training": {"stepsPerImage": 150},
            "output": {"uri": "s3://outputs/nick"},
            "resources": {"gpus": 1, "cpu": "1", "memory": "2Gi"},
        },
    }


def plain_job(namespace: str, name: str) -> dict[str, Any]:
    """The Job the operator would render for ``spec(name)``, applied directly."""
    body = spec(name)
    body["metadata"] = {"name": name, "namespace": namespace, "uid": "00000000-0000-0000-0000-000000000000"}
    job = render(body, parse_manifest(body), trainer_image="trainer:bench").job
    del job["metadata"]["ownerReferences"]
    job["metadata"]["labels"] = {"bench": "plain"}
    job["spec"]["template"]["metadata"]["labels"] = {"bench": "plain", "plain-job": name}
    return job


@dataclass
class Timeline:
    """Local arrival times of what the watches saw, keyed by job name."""

    applied: dict[str, float] = field(default_factory=dict)
    applied_wall: dict[str, float] = field(default_factory=dict)
    job_seen: dict[str, float] = field(default_factory=dict)
    running: dict[str, float] = field(default_factory=dict)
    running_wall: dict[str, float] = field(default_factory=dict)
    pod_seen_wall: dict[str, float] = field(default_factory=dict)
    pod_seen: dict[str, float] = field(default_factory=dict)
    scheduled: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    ftj_succeeded: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Raw:
    """Plain HTTPS to the apiserver: the official client's model (de)serialisation costs more CPU
    than the apiserver itself at these rates, and this machine has two cores for everything."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.server = cluster.server
        self.headers = {"Authorization": f"Bearer {cluster.admin_token}", "Content-Type": "application/json"}
        self.ca = str(cluster.ca_file)
        self.local = threading.local()

    def session(self) -> Any:
        import requests

        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
            self.local.session.trust_env = False  # REQUESTS_CA_BUNDLE would replace our CA
            self.local.session.verify = self.ca
            self.local.session.headers.update(self.headers)
        return self.local.session

    def post(self, path: str, body: dict[str, Any]) -> None:
        response = self.session().post(self.server + path, data=json.dumps(body), timeout=60)
        if response.status_code >= 300:
            raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")

    def watch(self, path: str, stop: threading.Event) -> Any:
        """Yield (type, object) of a watch, reconnecting until ``stop`` is set."""
        import requests

        version = ""
        while not stop.is_set():
            params = {"watch": "true", "timeoutSeconds": "30"}
            if version:
                params["resourceVersion"] = version
            try:
                with requests.get(
                    self.server + path, params=params, headers=self.headers, verify=self.ca, stream=True, timeout=40
                ) as response:
                    for line in response.iter_lines():
                        if stop.is_set():
                            return
                        if not line:
                            continue
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            version = ""
                            break
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        yield event.get("type"), obj
            except requests.RequestException:
                time.sleep(0.2)


class Watcher:
    """Watches Jobs, Pods and FineTuneJobs of one namespace from this process."""

    def __init__(self, raw: Raw, namespace: str, timeline: Timeline, *, job_key: str) -> None:
        self.raw = raw
        self.namespace = namespace
        self.timeline = timeline
        self.job_key = job_key
        self.stop_event = threading.Event()
        paths = {
            "jobs": f"/apis/batch/v1/namespaces/{namespace}/jobs",
            "pods": f"/api/v1/namespaces/{namespace}/pods",
            "ftjs": f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}",
        }
        self.threads = [
            threading.Thread(target=self._loop, args=(kind, path), daemon=True) for kind, path in paths.items()
        ]
        for thread in self.threads:
            thread.start()

    def _loop(self, kind: str, path: str) -> None:
        for _, obj in self.raw.watch(path, self.stop_event):
            now = time.monotonic()
            with self.timeline.lock:
                self._record(kind, obj, now)

    def _record(self, kind: str, obj: dict[str, Any], now: float) -> None:
        t = self.timeline
        meta = obj.get("metadata", {})
        if kind == "jobs":
            t.job_seen.setdefault(meta.get("name", ""), now)
        elif kind == "pods":
            labels = meta.get("labels") or {}
            name = labels.get(self.job_key) or labels.get("job-name")
            if not name:
                return
            t.pod_seen_wall.setdefault(name, time.time())
            t.pod_seen.setdefault(name, now)
            if (obj.get("spec") or {}).get("nodeName"):
                t.scheduled.setdefault(name, now)
            phase = (obj.get("status") or {}).get("phase")
            if phase == "Running":
                t.running.setdefault(name, now)
                t.running_wall.setdefault(name, time.time())
            elif phase == "Succeeded":
                t.running.setdefault(name, now)
                t.finished.setdefault(name, now)
        elif (obj.get("status") or {}).get("phase") == "Succeeded":
            t.ftj_succeeded.setdefault(meta.get("name", ""), now)

    def stop(self) -> None:
        self.stop_event.set()


class OperatorRun:
    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.ports = {"progress": free_port(), "metrics": free_port(), "health": free_port()}
        self.log = log
        args = [
            sys.executable,
            "-m",
            "finetune_operator",
            "run",
            f"--kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--progress-port={self.ports['progress']}",
            f"--metrics-port={self.ports['metrics']}",
            f"--health-port={self.ports['health']}",
            f"--report-url=http://127.0.0.1:{self.ports['progress']}",
        ]
        if os.environ.get("BENCH_TRACEMALLOC"):
            args[1:1] = ["-X", "tracemalloc=1"]
        self.handle = open(log, "ab")  # noqa: SIM115 (held for the process's life)
        # As the chart's Deployment runs it: two malloc arenas (see helm/.../deployment.yaml).
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
        self.process = subprocess.Popen(
            args, stdout=self.handle, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.ps = psutil.Process(self.process.pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['health']}/readyz", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        self.cpu_start = self.cpu()

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)
            except psutil.Error:
                return

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def stop(self) -> None:
        self._stop.set()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.handle.close()


def apply_all(objects: list[dict[str, Any]], create: Any, timeline: Timeline, key: str) -> float:
    """Create every object from 16 threads as fast as they go; return the burst's length."""
    started = time.monotonic()

    def one(obj: dict[str, Any]) -> None:
        create(obj)
        with timeline.lock:
            name = obj["metadata"][key] if key != "name" else obj["metadata"]["name"]
            timeline.applied[name] = time.monotonic()
            timeline.applied_wall[name] = time.time()

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, objects))
    return time.monotonic() - started


def apply_finetunejobs(raw: Raw, namespace: str, objects: list[dict[str, Any]], timeline: Timeline) -> float:
    return apply_all(
        objects,
        lambda obj: raw.post(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", obj),
        timeline,
        "name",
    )


def ftj_names(n: int) -> list[str]:
    return [f"ftj-{i:05d}" for i in range(n)]


def new_namespace(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespace({"metadata": {"name": namespace}})
    wait_until(lambda: core.list_namespaced_service_account(namespace).items, 30, "default ServiceAccount")


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def latencies(start: dict[str, float], end: dict[str, float], names_map: dict[str, str] | None = None) -> list[float]:
    out = []
    for name, t0 in start.items():
        target = names_map.get(name, name) if names_map else name
        if target in end:
            out.append(end[target] - t0)
    return out


def stages(t: Timeline, job_names: dict[str, str] | None = None) -> dict[str, Any]:
    """Where apply -> Running goes, per job: the Job showing up, its pod showing up, the pod bound
    to a node, the pod Running (all as this process's watches saw them)."""
    job_seen = {name: t.job_seen[(job_names or {}).get(name, name)] for name in t.applied
                if (job_names or {}).get(name, name) in t.job_seen}  # fmt: skip
    return {
        "apply_to_job": summary(latencies(t.applied, job_seen)),
        "job_to_pod": summary(latencies(job_seen, t.pod_seen)),
        "pod_to_scheduled": summary(latencies(t.pod_seen, t.scheduled)),
        "scheduled_to_running": summary(latencies(t.scheduled, t.running)),
    }


def delete_namespace(core: client.CoreV1Api, namespace: str, timeout: float = 300) -> None:
    try:
        core.delete_namespace(namespace)
    except client.exceptions.ApiException:
        return

    def gone() -> bool:
        try:
            core.read_namespace(namespace)
        except client.exceptions.ApiException as exc:
            return exc.status == 404
        return False

    wait_until(gone, timeout, f"namespace {namespace} to be deleted")


@dataclass(frozen=True)
class Request:
    """One request of the operator's, as the apiserver's audit log has it."""

    moment: float  # wall clock, when the apiserver received it
    agent: str
    verb: str
    stage: str
    resource: str
    subresource: str
    namespace: str
    name: str


def read_audit(audit_log: Path) -> list[Request]:
    """The operator's requests (by its user agents) in the audit log, parsed once for all figures."""
    requests: list[Request] = []
    if not audit_log.is_file():
        return requests
    with open(audit_log) as handle:
        for line in handle:
            try:
                event = json.loads(line)
                agent = str(event.get("userAgent", ""))
                if not (agent.startswith("finetune-operator") or agent.startswith("kopf")):
                    continue
                moment = dt.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00"))
            except (ValueError, KeyError):
                continue
            ref = event.get("objectRef") or {}
            requests.append(
                Request(
                    moment=moment.timestamp(),
                    agent=agent,
                    verb=str(event.get("verb")),
                    stage=str(event.get("stage")),
                    resource=ref.get("resource", "?"),
                    subresource=ref.get("subresource", ""),
                    namespace=ref.get("namespace", ""),
                    name=ref.get("name") or "",
                )
            )
    return requests


def audit_counts(requests: list[Request], start_wall: float, end_wall: float) -> dict[str, int]:
    """The operator's API requests between two wall-clock times, by verb/resource."""
    counts: Counter[str] = Counter(
        f"{r.verb} {r.resource}" + (f"/{r.subresource}" if r.subresource else "")
        for r in requests
        if start_wall <= r.moment <= end_wall
    )
    return dict(sorted(counts.items()))


WRITE_VERBS = ("create", "update", "patch", "delete")


def writes_before(
    requests: list[Request], namespace: str, cutoff_wall: dict[str, float], *, since: float = 0.0
) -> list[int]:
    """Per FineTuneJob of ``namespace``: the finetune-operator's writes naming it or its Job received
    by the apiserver after ``since`` and before its cut-off (a wall-clock time per job name)."""
    per_job: Counter[str] = Counter(
        r.name
        for r in requests
        if r.agent.startswith("finetune-operator")
        and r.verb in WRITE_VERBS
        and r.stage == "ResponseComplete"
        and r.namespace == namespace
        and r.resource in ("jobs", "finetunejobs")
        and r.name in cutoff_wall
        and since <= r.moment <= cutoff_wall[r.name]
    )
    return [per_job[name] for name in cutoff_wall]


def job_posts(requests: list[Request], namespace: str) -> dict[str, float]:
    """When the apiserver received the operator's create of each Job in ``namespace`` (wall clock)."""
    posts: dict[str, float] = {}
    for r in requests:
        if r.verb == "create" and r.resource == "jobs" and r.namespace == namespace:
            posts.setdefault(r.name, r.moment)
    return posts


class CpuMeter:
    """CPU seconds each process of the cluster has used (the apiserver, etcd, the controller
    manager, the scheduler, KWOK, this script, and the operator while one runs): where the two
    cores went during a burst, read side by side for the plain Jobs and the FineTuneJobs."""

    ORDER = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok", "bench", "operator")

    def __init__(self, pids: dict[str, int]) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}

    def snapshot(self, **extra: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, process in [*self.processes.items(), *((n, psutil.Process(p)) for n, p in extra.items())]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            out[name] = float(times.user + times.system)
        return out

    def idle(self, seconds: float = 5.0) -> dict[str, float]:
        """Each process's CPU seconds per second while nothing is applied (leases, resyncs,
        heartbeats): what a phase's CPU per job leaves out to count only the jobs' own."""
        before = self.snapshot()
        time.sleep(seconds)
        used = self.since(before, self.snapshot())
        return {name: value / seconds for name, value in used.items()}

    @staticmethod
    def per_job(used: dict[str, float], idle: dict[str, float], wall: float, n: int) -> dict[str, float]:
        """Milliseconds of CPU per job, above each process's idle use over the same wall time."""
        return {name: 1000 * max(0.0, value - idle.get(name, 0.0) * wall) / n for name, value in used.items()}

    @staticmethod
    def since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        used = {name: after[name] - before.get(name, 0.0) for name in after}
        used["total"] = sum(used.values())
        return used


def plain_burst(
    n: int, namespace: str, raw: Raw, core: client.CoreV1Api, finish_timeout: float, *, meter: CpuMeter
) -> dict[str, Any]:
    """N plain Jobs applied at once in ``namespace``: when their pods ran and finished, and the
    CPU each process used until they all ran."""
    new_namespace(core, namespace)
    plain = Timeline()
    watcher = Watcher(raw, namespace, plain, job_key="plain-job")
    time.sleep(1)
    say(f"N={n}: applying {n} plain Jobs in {namespace}")
    cpu_before = meter.snapshot()
    apiserver = ApiserverProfile(raw, f"apiserver-{namespace}")
    burst = apply_all(
        [plain_job(namespace, f"job-{i:05d}") for i in range(n)],
        lambda obj: raw.post(f"/apis/batch/v1/namespaces/{namespace}/jobs", obj),
        plain,
        "name",
    )
    wait_until(lambda: len(plain.running) >= n, finish_timeout, "plain pods Running")
    cpu_used = meter.since(cpu_before, meter.snapshot())
    apiserver.finish()
    wait_until(lambda: len(plain.finished) >= n, finish_timeout, "plain pods Succeeded")
    watcher.stop()
    first = min(plain.applied.values())
    result = {
        "apply_burst_seconds": burst,
        "apply_to_running": summary(latencies(plain.applied, plain.running)),
        "stages": stages(plain),
        "all_running_after": max(plain.running.values()) - first,
        "all_finished_after": max(plain.finished.values()) - first,
        "cpu_until_all_running": cpu_used,
    }
    say(f"N={n}: plain Jobs done: {json.dumps(result['apply_to_running'])}")
    delete_namespace(core, namespace)
    return result


def run_size(n: int, cluster: LocalCluster, api: client.ApiClient, results: dict[str, Any], meter: CpuMeter) -> None:
    core = client.CoreV1Api(api)
    raw = Raw(cluster)
    finish_timeout = 120 + n * 0.6

    # --- plain Jobs -----------------------------------------------------------------------------
    plain_result = plain_burst(n, f"bench-plain-{n}", raw, core, finish_timeout, meter=meter)

    # --- the same burst of plain Jobs (not the operator's) while the operator runs --------------
    # What other people's Jobs pay for the operator's presence, and what their pods cost it: a
    # fresh operator with no FineTuneJobs, the cluster's pods coming and going around it.
    beside_operator = OperatorRun(cluster.user_kubeconfig(OPERATOR_USER), STATE / f"operator-beside-{n}.log")
    time.sleep(3)
    beside = plain_burst(n, f"bench-beside-{n}", raw, core, finish_timeout, meter=meter)
    beside["operator_peak_rss_mb"] = beside_operator.peak_rss / 2**20
    beside["operator_cpu_seconds"] = beside_operator.cpu() - beside_operator.cpu_start
    beside_operator.stop()
    say(f"N={n}: plain Jobs beside the operator: RSS {beside['operator_peak_rss_mb']:.0f} MB")

    # --- the operator ---------------------------------------------------------------------------
    namespace = f"bench-ftj-{n}"
    new_namespace(core, namespace)
    operator = OperatorRun(cluster.user_kubeconfig(OPERATOR_USER), STATE / f"operator-{n}.log")
    ftj = Timeline()
    profiler = start_profiler(operator, f"profile-{n}.txt")
    watcher = Watcher(raw, namespace, ftj, job_key="finetune.dev/job-name")
    time.sleep(1)
    say(f"N={n}: applying {n} FineTuneJobs")
    wall_start = time.time()
    cpu_before = meter.snapshot(operator=operator.process.pid)
    apiserver = ApiserverProfile(raw, f"apiserver-{namespace}")
    burst = apply_finetunejobs(raw, namespace, [spec(name) for name in ftj_names(n)], ftj)
    job_names = {name: names.job_name(name) for name in ftj_names(n)}
    wait_until(lambda: len(ftj.job_seen) >= n, finish_timeout, "the operator's Jobs")
    created_wall = time.time()
    wait_until(lambda: len(ftj.running) >= n, finish_timeout, "operator pods Running")
    cpu_used = meter.since(cpu_before, meter.snapshot(operator=operator.process.pid))
    apiserver.finish()
    wait_until(lambda: len(ftj.ftj_succeeded) >= n, finish_timeout, "FineTuneJobs Succeeded")
    time.sleep(2)
    wall_end = time.time()
    watcher.stop()
    cpu = operator.cpu() - operator.cpu_start
    if os.environ.get("BENCH_TRACEMALLOC"):
        operator.process.send_signal(signal.SIGUSR2)
        time.sleep(5)
    stop_profiler(profiler)
    own_writes_skipped = operator.metric("finetune_own_status_writes_skipped_total")
    events_dropped = operator.metric("finetune_events_dropped_total")
    operator.stop()
    first = min(ftj.applied.values())
    audit = read_audit(cluster.logs / "audit.log")
    requests = audit_counts(audit, wall_start, wall_end)
    creation = audit_counts(audit, wall_start, created_wall + 1)
    writes = sum(v for k, v in requests.items() if k.split(" ")[0] in WRITE_VERBS)
    status_writes = sum(v for k, v in requests.items() if k.endswith("finetunejobs/status"))
    operator_result = {
        "apply_burst_seconds": burst,
        "apply_to_job": summary(latencies(ftj.applied, ftj.job_seen, job_names)),
        # The same, split: until the apiserver received the operator's create of the Job (no
        # watch of ours in the way), the rest being the Job's way back to a watcher.
        "apply_to_job_post": summary(latencies(ftj.applied_wall, job_posts(audit, namespace), job_names)),
        "apply_to_running": summary(latencies(ftj.applied, ftj.running)),
        "stages": stages(ftj, job_names),
        "all_running_after": max(ftj.running.values()) - first,
        "all_finished_after": max(ftj.finished.values()) - first if ftj.finished else None,
        "all_succeeded_on_resource_after": max(ftj.ftj_succeeded.values()) - first,
        "peak_rss_mb": operator.peak_rss / 2**20,
        "cpu_seconds": cpu,
        "cpu_until_all_running": cpu_used,
        "requests": requests,
        "requests_during_creation": creation,
        "writes_per_job": writes / n,
        # At creation: before the Job's pod exists (so nothing the operator wrote can be its
        # answer to the pod); the pod's own steps (scheduled, started, running) follow.
        "writes_at_creation": summary([float(c) for c in writes_before(audit, namespace, ftj.pod_seen_wall)]),
        "writes_before_running": summary([float(c) for c in writes_before(audit, namespace, ftj.running_wall)]),
        "status_writes_per_job": status_writes / n,
        # FineTuneJob changes that were only our own status write, and Events dropped.
        "own_status_writes_skipped": own_writes_skipped,
        "events_dropped": events_dropped,
    }
    say(f"N={n}: operator done: {json.dumps(operator_result['apply_to_running'])}")
    results[str(n)] = {
        "plain": plain_result,
        "beside": beside,
        "ratio_beside_running_p95": (beside["apply_to_running"]["p95"] or 0)
        / (plain_result["apply_to_running"]["p95"] or 1),
        "ratio_beside_all_running": beside["all_running_after"] / plain_result["all_running_after"],
        "operator": operator_result,
        "ratio_running_p95": (operator_result["apply_to_running"]["p95"] or 0)
        / (plain_result["apply_to_running"]["p95"] or 1),
        "ratio_all_running": operator_result["all_running_after"] / plain_result["all_running_after"],
    }
    delete_namespace(core, namespace)


def start_profiler(operator: OperatorRun, name: str) -> subprocess.Popen[bytes] | None:
    """With BENCH_PYSPY=path/to/py-spy: a sampling profile of the operator over a phase (for
    finding where its time goes), written under the bench state folder."""
    if not os.environ.get("BENCH_PYSPY"):
        return None
    return subprocess.Popen(
        [os.environ["BENCH_PYSPY"], "record", "--pid", str(operator.process.pid), "--format", "raw",
         "--rate", "40", "--nonblocking", "--output", str(STATE / name)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


class ApiserverProfile:
    """With BENCH_PPROF=1: the apiserver's CPU profile over the first ``seconds`` of a burst
    (its /debug/pprof/profile), written under the bench state folder with ``go tool pprof -top``
    beside it when Go is on the PATH: what the apiserver spends the shared cores on."""

    def __init__(self, raw: Raw, name: str, seconds: int = 30) -> None:
        self.path = STATE / f"{name}.pprof"
        self.thread: threading.Thread | None = None
        if not os.environ.get("BENCH_PPROF"):
            return

        def fetch() -> None:
            response = raw.session().get(f"{raw.server}/debug/pprof/profile?seconds={seconds}", timeout=seconds + 60)
            self.path.write_bytes(response.content)

        self.thread = threading.Thread(target=fetch, daemon=True)
        self.thread.start()

    def finish(self) -> None:
        if self.thread is None:
            return
        self.thread.join()
        go = shutil.which("go")
        if go and self.path.is_file():
            top = subprocess.run(
                [go, "tool", "pprof", "-top", "-nodecount=60", str(self.path)],
                capture_output=True,
                text=True,
                check=False,
            )
            self.path.with_suffix(".top.txt").write_text(top.stdout + top.stderr)
            cumulative = subprocess.run(
                [go, "tool", "pprof", "-top", "-cum", "-nodecount=80", str(self.path)],
                capture_output=True,
                text=True,
                check=False,
            )
            self.path.with_suffix(".cum.txt").write_text(cumulative.stdout + cumulative.stderr)


def stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(timeout=30)


def creation_only(n: int, cluster: LocalCluster, api: client.ApiClient, meter: CpuMeter) -> dict[str, Any]:
    """N suspended FineTuneJobs: the operator creates N suspended Jobs and patches N statuses, and
    no pod is made. The operator's creation path alone, without the Job controller, scheduler and
    simulated nodes competing for the two cores (as the naive operator's Job figures were taken)."""
    core = client.CoreV1Api(api)
    raw = Raw(cluster)
    namespace = f"bench-create-{n}"
    new_namespace(core, namespace)
    operator = OperatorRun(cluster.user_kubeconfig(OPERATOR_USER), STATE / f"operator-create-{n}.log")
    timeline = Timeline()
    profiler = start_profiler(operator, f"profile-create-{n}.txt")
    watcher = Watcher(raw, namespace, timeline, job_key="finetune.dev/job-name")
    time.sleep(1)
    say(f"creation only: applying {n} suspended FineTuneJobs")
    objects = [spec(name) for name in ftj_names(n)]
    for obj in objects:
        obj["spec"]["runPolicy"] = {"suspend": True}
    cpu_before, started = meter.snapshot(operator=operator.process.pid), time.monotonic()
    apiserver = ApiserverProfile(raw, f"apiserver-{namespace}", seconds=10)
    burst = apply_finetunejobs(raw, namespace, objects, timeline)
    job_names = {name: names.job_name(name) for name in ftj_names(n)}
    wait_until(lambda: len(timeline.job_seen) >= n, 120 + n * 0.2, "the operator's suspended Jobs")
    cpu_used = meter.since(cpu_before, meter.snapshot(operator=operator.process.pid))
    wall = time.monotonic() - started
    apiserver.finish()
    time.sleep(2)
    watcher.stop()
    stop_profiler(profiler)
    operator.stop()
    posts = job_posts(read_audit(cluster.logs / "audit.log"), namespace)
    result = {
        "apply_burst_seconds": burst,
        "apply_to_job": summary(latencies(timeline.applied, timeline.job_seen, job_names)),
        "apply_to_job_post": summary(latencies(timeline.applied_wall, posts, job_names)),
        "peak_rss_mb": operator.peak_rss / 2**20,
        # Until the last Job was seen: each process's CPU seconds, and the wall time they shared.
        "cpu_until_all_created": cpu_used,
        "seconds_until_all_created": wall,
    }
    say(f"creation only: {json.dumps(result['apply_to_job'])}")
    delete_namespace(core, namespace)
    return result


def apply_steadily(objects: list[dict[str, Any]], create: Any, timeline: Timeline, rate: float) -> tuple[float, float]:
    """Create the objects at ``rate`` per second (object i is sent at i / rate s, by a pool of
    16 threads, so one slow create does not hold the next back); return the arrival phase's
    length and the largest lag of a send behind its schedule."""
    started = time.monotonic()
    lag = 0.0

    def one(obj: dict[str, Any]) -> None:
        create(obj)
        with timeline.lock:
            timeline.applied[obj["metadata"]["name"]] = time.monotonic()
            timeline.applied_wall[obj["metadata"]["name"]] = time.time()

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        futures = []
        for index, obj in enumerate(objects):
            due = started + index / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            lag = max(lag, time.monotonic() - due)
            futures.append(pool.submit(one, obj))
        for future in futures:
            future.result()
    return time.monotonic() - started, lag


def steady_rate(
    rate: float,
    seconds: float,
    cluster: LocalCluster,
    api: client.ApiClient,
    meter: CpuMeter,
    *,
    idle: dict[str, float],
) -> dict[str, Any]:
    """Plain Jobs, then FineTuneJobs (a fresh operator), arriving at ``rate`` per second for
    ``seconds``: their latencies, and each process's CPU per job from the first arrival until
    every one has finished (the FineTuneJobs: Succeeded on the resource)."""
    core = client.CoreV1Api(api)
    raw = Raw(cluster)
    n = round(rate * seconds)
    tag = f"{rate:g}".replace(".", "p")
    finish_timeout = 120 + seconds + n * 0.2
    out: dict[str, Any] = {"rate": rate, "seconds": seconds, "jobs": n}

    namespace = f"bench-steady-plain-{tag}"
    new_namespace(core, namespace)
    plain = Timeline()
    watcher = Watcher(raw, namespace, plain, job_key="plain-job")
    time.sleep(1)
    say(f"steady {rate:g}/s: {n} plain Jobs over {seconds:.0f} s")
    cpu_before, started = meter.snapshot(), time.monotonic()
    length, lag = apply_steadily(
        [plain_job(namespace, f"job-{i:05d}") for i in range(n)],
        lambda obj: raw.post(f"/apis/batch/v1/namespaces/{namespace}/jobs", obj),
        plain,
        rate,
    )
    wait_until(lambda: len(plain.finished) >= n, finish_timeout, "plain pods Succeeded")
    used, wall = meter.since(cpu_before, meter.snapshot()), time.monotonic() - started
    watcher.stop()
    out["plain"] = {
        "arrival_seconds": length,
        "send_lag_max": lag,
        "apply_to_running": summary(latencies(plain.applied, plain.running)),
        "cpu_ms_per_job": CpuMeter.per_job(used, idle, wall, n),
        "cpu_ms_per_job_with_idle": CpuMeter.per_job(used, {}, wall, n),
    }
    say(f"steady {rate:g}/s: plain Jobs: {json.dumps(out['plain']['apply_to_running'])}")
    delete_namespace(core, namespace)

    namespace = f"bench-steady-ftj-{tag}"
    new_namespace(core, namespace)
    operator = OperatorRun(cluster.user_kubeconfig(OPERATOR_USER), STATE / f"operator-steady-{tag}.log")
    ftj = Timeline()
    watcher = Watcher(raw, namespace, ftj, job_key="finetune.dev/job-name")
    time.sleep(1)
    before, quiet = operator.cpu(), 5.0
    time.sleep(quiet)
    idle = {**idle, "operator": (operator.cpu() - before) / quiet}
    profiler = start_profiler(operator, f"profile-steady-{tag}.txt")
    say(f"steady {rate:g}/s: {n} FineTuneJobs over {seconds:.0f} s")
    wall_start, started = time.time(), time.monotonic()
    cpu_before = meter.snapshot(operator=operator.process.pid)
    length, lag = apply_steadily(
        [spec(name) for name in ftj_names(n)],
        lambda obj: raw.post(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", obj),
        ftj,
        rate,
    )
    wait_until(lambda: len(ftj.ftj_succeeded) >= n, finish_timeout, "FineTuneJobs Succeeded")
    time.sleep(2)  # the last Events
    used = meter.since(cpu_before, meter.snapshot(operator=operator.process.pid))
    wall, wall_end = time.monotonic() - started, time.time()
    watcher.stop()
    stop_profiler(profiler)
    operator.stop()
    job_names = {name: names.job_name(name) for name in ftj_names(n)}
    requests = audit_counts(read_audit(cluster.logs / "audit.log"), wall_start, wall_end)
    out["ftj"] = {
        "arrival_seconds": length,
        "send_lag_max": lag,
        "apply_to_job": summary(latencies(ftj.applied, ftj.job_seen, job_names)),
        "apply_to_running": summary(latencies(ftj.applied, ftj.running)),
        "cpu_ms_per_job": CpuMeter.per_job(used, idle, wall, n),
        "cpu_ms_per_job_with_idle": CpuMeter.per_job(used, {}, wall, n),
        "writes_per_job": {k: v / n for k, v in requests.items() if k.split(" ")[0] in WRITE_VERBS},
    }
    out["ftj"]["writes_per_job_total"] = sum(out["ftj"]["writes_per_job"].values())
    out["ftj"]["operator_cpu_ms_per_job"] = out["ftj"]["cpu_ms_per_job"].get("operator", 0.0)
    say(
        f"steady {rate:g}/s: FineTuneJobs: {json.dumps(out['ftj']['apply_to_running'])}, "
        f"operator {out['ftj']['operator_cpu_ms_per_job']:.1f} ms/job"
    )
    delete_namespace(core, namespace)
    return out


async def _report_loop(
    session: Any,
    *,
    url: str,
    token: str,
    attempt: str,
    posted: dict[tuple[str, int], float],
    name: str,
    stop_at: float,
    offset: float,
    interval: float,
) -> int:
    await asyncio.sleep(offset)
    step = 0
    sent = 0
    while time.monotonic() < stop_at:
        step += 10
        body = {
            "seq": step,
            "attempt": attempt,
            "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "stage": "training",
            "step": step,
            "totalSteps": 100000,
            "loss": 0.1,
            "stepsPerSecond": 2.0,
        }
        try:
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as response:
                await response.read()
                if response.status == 202:
                    posted[(name, step)] = time.monotonic()
                    sent += 1
        except Exception:
            pass
        await asyncio.sleep(interval)
    return sent


def freshness(cluster: LocalCluster, api: client.ApiClient, total: int, counts: list[int]) -> dict[str, Any]:
    import aiohttp

    core = client.CoreV1Api(api)
    raw = Raw(cluster)
    namespace = "bench-fresh"
    new_namespace(core, namespace)
    operator = OperatorRun(cluster.user_kubeconfig(OPERATOR_USER), STATE / "operator-fresh.log")
    say(f"freshness: {total} FineTuneJobs whose pods keep running")
    timeline = Timeline()
    apply_finetunejobs(raw, namespace, [spec(name) for name in ftj_names(total)], timeline)
    pods: dict[str, str] = {}

    def all_running() -> bool:
        for pod in core.list_namespaced_pod(namespace).items:
            if pod.status.phase == "Running":
                pods[pod.metadata.labels["finetune.dev/job-name"]] = pod.metadata.name
        return len(pods) >= total

    wait_until(all_running, 300 + total * 0.5, "freshness pods Running")
    pod_objects = {p.metadata.labels["finetune.dev/job-name"]: p for p in core.list_namespaced_pod(namespace).items}

    def token_for(name: str) -> str:
        pod = pod_objects[name]
        request = {
            "spec": {
                "audiences": ["finetune-operator"],
                "expirationSeconds": 7200,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod.metadata.name,
                    "uid": pod.metadata.uid,
                },
            }
        }
        return str(core.create_namespaced_service_account_token("default", namespace, request).status.token)

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        tokens = dict(zip(pod_objects, pool.map(token_for, pod_objects), strict=True))
    seen: dict[tuple[str, int], float] = {}
    stop_watch = threading.Event()

    def watch_status() -> None:
        for _, obj in raw.watch(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", stop_watch):
            now = time.monotonic()
            step = ((obj.get("status") or {}).get("progress") or {}).get("step")
            if step:
                seen.setdefault((obj["metadata"]["name"], step), now)

    watcher = threading.Thread(target=watch_status, daemon=True)
    watcher.start()
    out: dict[str, Any] = {}
    base = f"http://127.0.0.1:{operator.ports['progress']}/v1alpha1/namespaces/{namespace}/finetunejobs"
    duration = 40.0
    for count in counts:
        say(f"freshness: {count} jobs reporting every {REPORT_INTERVAL:.0f}s for {duration:.0f}s")
        posted: dict[tuple[str, int], float] = {}
        job_list = ftj_names(count)
        patches_before = operator.metric("finetune_status_patches_total")
        cpu_before = operator.cpu()

        async def drive(jobs: list[str] = job_list, sink: dict[tuple[str, int], float] = posted) -> int:
            connector = aiohttp.TCPConnector(limit=200)
            timeout = aiohttp.ClientTimeout(total=5)
            stop_at = time.monotonic() + duration
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                sent = await asyncio.gather(
                    *[
                        _report_loop(
                            session,
                            url=f"{base}/{name}/progress",
                            token=tokens[name],
                            attempt=pods[name],
                            posted=sink,
                            name=name,
                            stop_at=stop_at,
                            offset=REPORT_INTERVAL * i / len(jobs),
                            interval=REPORT_INTERVAL,
                        )
                        for i, name in enumerate(jobs)
                    ]
                )
            return sum(sent)

        started, started_wall = time.monotonic(), time.time()
        sent = asyncio.run(drive())
        time.sleep(8)
        elapsed = time.monotonic() - started
        patches = operator.metric("finetune_status_patches_total") - patches_before
        # Per reporting job: only their own status writes (a job that is not reporting may still
        # get a write of its own in the window, e.g. a throttled field catching up).
        window = {name: time.time() for name in job_list}
        own = writes_before(read_audit(cluster.logs / "audit.log"), namespace, window, since=started_wall)
        cpu = operator.cpu() - cpu_before
        delays = [seen[key] - t for key, t in posted.items() if key in seen]
        out[str(count)] = {
            "reports_sent": sent,
            "reports_seen_on_resource": len(delays),
            "post_to_watch": summary(delays),
            "status_patches_per_second": patches / elapsed,
            "status_patches_per_job_per_interval": sum(own) / max(1, count) / (elapsed / REPORT_INTERVAL),
            "operator_cpu_percent": 100 * cpu / elapsed,
        }
        say(f"freshness {count}: {json.dumps(out[str(count)]['post_to_watch'])}")

    # Reports that carry nothing new must not cost a status write.
    say("freshness: repeated identical reports")
    patches_before = operator.metric("finetune_status_patches_total")

    async def repeat() -> None:
        async with aiohttp.ClientSession() as session:
            for round_ in range(5):
                for name in ftj_names(min(100, total)):
                    body = {
                        "seq": 100000 + round_,
                        "attempt": pods[name],
                        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                        "stage": "training",
                        "step": 999990,
                        "totalSteps": 100000,
                        "loss": 0.1,
                        "stepsPerSecond": 2.0,
                    }
                    async with session.post(
                        f"{base}/{name}/progress", json=body, headers={"Authorization": f"Bearer {tokens[name]}"}
                    ) as response:
                        await response.read()
                await asyncio.sleep(REPORT_INTERVAL)

    asyncio.run(repeat())
    time.sleep(5)
    repeated = operator.metric("finetune_status_patches_total") - patches_before
    out["identical_reports"] = {"jobs": min(100, total), "rounds": 5, "status_patches": repeated}
    out["operator_peak_rss_mb"] = operator.peak_rss / 2**20
    stop_watch.set()
    operator.stop()
    delete_namespace(core, namespace)
    return out


def stage_p50s(result: dict[str, Any]) -> str:
    steps = result.get("stages", {})
    keys = ("apply_to_job", "job_to_pod", "pod_to_scheduled", "scheduled_to_running")
    return " / ".join(fmt(steps.get(k, {}).get("p50")) for k in keys)


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(goal: str, figure: Any, met: bool) -> None:
        rows.append({"goal": goal, "figure": figure, "met": bool(met)})

    n1000 = results["scale"].get("1000")
    if n1000:
        op = n1000["operator"]
        to_job = op["apply_to_job"]["p99"] or 99.0
        row("apply -> Job created p99 <= 1 s at N=1000", to_job, to_job <= 1.0)
    alone = results.get("creation_only", {}).get("1000")
    if alone:
        to_job = alone["apply_to_job"]["p99"] or 99.0
        row("the same with no pods being made (suspended FineTuneJobs)", to_job, to_job <= 1.0)
    if n1000:
        row(
            "apply -> pod Running p95 within 1.10x plain Jobs",
            n1000["ratio_running_p95"],
            n1000["ratio_running_p95"] <= 1.1,
        )
        row("all Running within 1.10x plain Jobs", n1000["ratio_all_running"], n1000["ratio_all_running"] <= 1.1)
        writes = op["writes_at_creation"]["max"] or 0
        row("<= 2 API writes per job at creation (max over jobs)", writes, writes <= 2)
        row("operator peak RSS <= 120 MB at 1,000 jobs", op["peak_rss_mb"], op["peak_rss_mb"] <= 120)
        if "beside" in n1000:
            ratio = n1000["ratio_beside_running_p95"]
            row("1,000 plain Jobs beside the operator: pods Running p95 within 1.05x", ratio, ratio <= 1.05)
            rss = n1000["beside"]["operator_peak_rss_mb"]
            row("the operator's peak RSS through them <= 120 MB", rss, rss <= 120)
    fresh = results.get("freshness", {})
    if "1000" in fresh:
        p99 = fresh["1000"]["post_to_watch"]["p99"] or 99.0
        row("status freshness p99 <= 5 s at 1,000 reporting jobs", p99, p99 <= 5)
        interval = fresh["1000"]["status_patches_per_job_per_interval"]
        row("<= 1 status write per job per report interval", interval, interval <= 1.0)
    if "identical_reports" in fresh:
        repeated = fresh["identical_reports"]["status_patches"]
        row("no status write for reports with nothing new", repeated, repeated == 0)
    for rate, data in results.get("steady", {}).items():
        plain, op = data["plain"]["apply_to_running"]["p95"] or 99.0, data["ftj"]
        if plain < STEADY_PLAIN_BOUND:  # the latency goals hold where plain Jobs keep up
            to_job = op["apply_to_job"]["p99"] or 99.0
            row(f"steady {rate}/s: apply -> Job p99 <= 1 s", to_job, to_job <= 1.0)
            running = op["apply_to_running"]["p95"] or 99.0
            row(
                f"steady {rate}/s: apply -> Running p95 <= plain Jobs' ({plain:.2f} s) + 1 s",
                running,
                running <= plain + 1,
            )
        cpu = op["operator_cpu_ms_per_job"]
        row(f"steady {rate}/s: the operator's CPU per job over its life <= 5 ms", cpu, cpu <= 5.0)
    return rows


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def cpu_row(used: dict[str, float], processes: list[str]) -> str:
    return f"{fmt(used['total'])} ({' / '.join(fmt(used.get(p)) for p in processes)})"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Operator at scale",
        "",
        f"Run {results['time']} on {results['machine']['cpus']} CPUs, Python {results['machine']['python']}, "
        f"Kubernetes {results['machine']['kubernetes']}, {results['nodes']} KWOK nodes x 8 GPUs."
        + (
            f" Profilers on ({', '.join(results['profilers'])}): the operator's (py-spy) and the apiserver's "
            "(pprof) CPU profiles of the bursts, under bench/.state/."
            if results.get("profilers")
            else ""
        ),
        "",
        "| N | what | plain Jobs | operator | ratio |",
        "|---|---|---|---|---|",
    ]
    for n, data in results["scale"].items():
        plain, op = data["plain"], data["operator"]
        lines += [
            f"| {n} | apply -> Job created p50 / p99 (s) | (direct) | {fmt(op['apply_to_job']['p50'])} / "
            f"{fmt(op['apply_to_job']['p99'])} | |",
            f"| {n} | of which apply -> the apiserver has the operator's create p50 / p99 (s) | | "
            f"{fmt(op['apply_to_job_post']['p50'])} / {fmt(op['apply_to_job_post']['p99'])} | |",
            f"| {n} | apply -> pod Running p50 / p95 / p99 (s) | {fmt(plain['apply_to_running']['p50'])} / "
            f"{fmt(plain['apply_to_running']['p95'])} / {fmt(plain['apply_to_running']['p99'])} | "
            f"{fmt(op['apply_to_running']['p50'])} / {fmt(op['apply_to_running']['p95'])} / "
            f"{fmt(op['apply_to_running']['p99'])} | {fmt(data['ratio_running_p95'])} (p95) |",
            f"| {n} | p50 of each step: apply -> Job / -> pod / -> scheduled / -> Running (s) | "
            f"{stage_p50s(plain)} | {stage_p50s(op)} | |",
            f"| {n} | all Running after (s) | {fmt(plain['all_running_after'])} | {fmt(op['all_running_after'])} | "
            f"{fmt(data['ratio_all_running'])} |",
            f"| {n} | all finished after (s) | {fmt(plain['all_finished_after'])} | "
            f"{fmt(op['all_finished_after'])} (Succeeded on the resource: "
            f"{fmt(op['all_succeeded_on_resource_after'])}) | |",
            f"| {n} | operator peak RSS (MB) / CPU (s) | | {fmt(op['peak_rss_mb'])} / {fmt(op['cpu_seconds'])} | |",
        ]
        if "cpu_until_all_running" in op:
            names_ = [p for p in CpuMeter.ORDER if p in op["cpu_until_all_running"]]
            lines.append(
                f"| {n} | CPU (s) until all Running: total ({' / '.join(names_)}) | "
                f"{cpu_row(plain['cpu_until_all_running'], names_)} | {cpu_row(op['cpu_until_all_running'], names_)} | "
                f"{fmt(op['cpu_until_all_running']['total'] / plain['cpu_until_all_running']['total'])} |"
            )
        beside = data.get("beside")
        if beside:
            lines += [
                f"| {n} | plain Jobs alone / beside the operator: apply -> pod Running p95, all Running (s) | "
                f"{fmt(plain['apply_to_running']['p95'])}, {fmt(plain['all_running_after'])} | "
                f"{fmt(beside['apply_to_running']['p95'])}, {fmt(beside['all_running_after'])} | "
                f"{fmt(data['ratio_beside_running_p95'])} (p95), {fmt(data['ratio_beside_all_running'])} (all) |",
                f"| {n} | the operator through those plain Jobs: peak RSS (MB) / CPU (s) | | "
                f"{fmt(beside['operator_peak_rss_mb'])} / {fmt(beside['operator_cpu_seconds'])} | |",
            ]
        lines += [
            f"| {n} | API writes per job: at creation / before the pod runs / whole life / status | | "
            f"{fmt(op['writes_at_creation']['p50'])} (max {fmt(op['writes_at_creation']['max'])}) / "
            f"{fmt(op['writes_before_running']['p50'])} (max {fmt(op['writes_before_running']['max'])}) / "
            f"{fmt(op['writes_per_job'])} / "
            f"{fmt(op['status_writes_per_job'])} | |",
        ]
    for n, alone in results.get("creation_only", {}).items():
        lines += [
            f"| {n} | suspended (no pods made): apply -> Job created p50 / p99 (s) | | "
            f"{fmt(alone['apply_to_job']['p50'])} / {fmt(alone['apply_to_job']['p99'])} | |",
            f"| {n} | suspended: apply -> the apiserver has the operator's create p50 / p99 (s) | | "
            f"{fmt(alone['apply_to_job_post']['p50'])} / {fmt(alone['apply_to_job_post']['p99'])} | |",
        ]
        if "cpu_until_all_created" in alone:
            used = alone["cpu_until_all_created"]
            processes = [p for p in CpuMeter.ORDER if p in used]
            lines.append(
                f"| {n} | suspended: CPU (s) until all created: total ({' / '.join(processes)}) over the wall time "
                f"(s) | | {cpu_row(used, processes)} over {fmt(alone['seconds_until_all_created'])} | |"
            )
    if results.get("freshness"):
        lines += ["", "## Status freshness", "", "| reporting jobs | POST -> seen by a watch p50 / p99 (s) | "
                  "status patches/s | per job per interval | operator CPU % |", "|---|---|---|---|---|"]  # fmt: skip
        for count, data in results["freshness"].items():
            if not count.isdigit():
                continue
            lines.append(
                f"| {count} | {fmt(data['post_to_watch']['p50'])} / {fmt(data['post_to_watch']['p99'])} | "
                f"{fmt(data['status_patches_per_second'])} | {fmt(data['status_patches_per_job_per_interval'])} | "
                f"{fmt(data['operator_cpu_percent'])} |"
            )
    if results.get("steady"):
        lines += [
            "",
            "## Steady arrival",
            "",
            "| per second | jobs | plain: apply -> Running p50 / p95 (s) | FineTuneJobs: apply -> Job p50 / p99 (s) "
            "| FineTuneJobs: apply -> Running p50 / p95 (s) | CPU per job above idle, plain / FineTuneJob (ms): "
            "apiserver; all processes | operator CPU per job above idle (with idle) (ms) | operator writes per job "
            "| goals apply |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for rate, data in results["steady"].items():
            plain, op = data["plain"], data["ftj"]
            lines.append(
                f"| {rate} | {data['jobs']} | {fmt(plain['apply_to_running']['p50'])} / "
                f"{fmt(plain['apply_to_running']['p95'])} | {fmt(op['apply_to_job']['p50'])} / "
                f"{fmt(op['apply_to_job']['p99'])} | {fmt(op['apply_to_running']['p50'])} / "
                f"{fmt(op['apply_to_running']['p95'])} | {fmt(plain['cpu_ms_per_job'].get('kube-apiserver'))} / "
                f"{fmt(op['cpu_ms_per_job'].get('kube-apiserver'))}; {fmt(plain['cpu_ms_per_job']['total'])} / "
                f"{fmt(op['cpu_ms_per_job']['total'])} | {fmt(op['operator_cpu_ms_per_job'])} "
                f"({fmt(op['cpu_ms_per_job_with_idle'].get('operator'))}) | "
                f"{fmt(op['writes_per_job_total'])} | "
                f"{'yes' if (plain['apply_to_running']['p95'] or 99) < STEADY_PLAIN_BOUND else 'no (plain Jobs lag)'} |"
            )
        idle = results.get("steady_idle_cpu_percent", {})
        lines += [
            "",
            "Idle use left out of the CPU per job (percent of a core, measured with nothing applied): "
            + ", ".join(f"{name} {fmt(idle[name])}" for name in CpuMeter.ORDER if name in idle)
            + "; the operator's own, per rate, just before its jobs arrive.",
        ]
        lines += ["", "The operator's writes per job by verb and resource, at each rate:", ""]
        for rate, data in results["steady"].items():
            writes = data["ftj"]["writes_per_job"]
            lines.append(f"- {rate}/s: " + ", ".join(f"{k}: {fmt(v)}" for k, v in writes.items()))
    lines += ["", "## Goals", "", "| goal | figure | met |", "|---|---|---|"]
    for row in results["goals"]:
        lines.append(f"| {row['goal']} | {fmt(row['figure'])} | {'yes' if row['met'] else 'NO'} |")
    lines += ["", "API requests by the operator per verb and resource (whole run of each N):", ""]
    for n, data in results["scale"].items():
        lines.append(f"- N={n}: " + ", ".join(f"{k}: {v}" for k, v in data["operator"]["requests"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--nodes", type=int, default=150)
    parser.add_argument("--fresh", default="1,100,1000", help="numbers of reporting jobs")
    parser.add_argument("--quick", action="store_true", help="N=50 only, 20 nodes, freshness 1,10")
    parser.add_argument(
        "--creation-only", action="store_true", help="only the suspended-FineTuneJobs phase, at the largest size"
    )
    parser.add_argument("--rates", default="2,5,10,20", help="steady arrival: jobs per second")
    parser.add_argument("--steady-seconds", type=float, default=60, help="steady arrival: seconds at each rate")
    parser.add_argument("--steady-only", action="store_true", help="only the steady-arrival phase")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    fresh_counts = [int(s) for s in args.fresh.split(",") if s]
    rates = [float(s) for s in args.rates.split(",") if s]
    if args.quick:
        sizes, args.nodes, fresh_counts, rates, args.steady_seconds = [50], 20, [1, 10], [2], 10
    partial = args.creation_only or args.steady_only
    started = time.monotonic()
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True)
    found = binaries.ensure(["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"])
    cluster = LocalCluster(
        state_dir=STATE / "cluster",
        audit_users=(OPERATOR_USER,),
        extra_users=(OPERATOR_USER,),
        profiling=bool(os.environ.get("BENCH_PPROF")),
    )
    cluster.start(agent=False, timeout=90)
    simulator = kwok.start(
        found["kwok"],
        kubeconfig=cluster.kubeconfig,
        workdir=STATE,
        complete_after=20,
        keep_running=["bench-fresh"],
    )
    results: dict[str, Any] = {
        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kubernetes": binaries.KUBERNETES_VERSION,
            "platform": platform.platform(),
        },
        "nodes": args.nodes,
        # Sampling profilers slow what they watch a little: a run with them says so.
        "profilers": [name for name in ("BENCH_PYSPY", "BENCH_PPROF") if os.environ.get(name)],
        "scale": {},
    }
    try:
        cluster.install_crds(ROOT / "crds")
        kwok.create_nodes(cluster.kubectl, args.nodes, gpus=8)
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        api.configuration.connection_pool_maxsize = 64
        core = client.CoreV1Api(api)
        wait_until(
            lambda: (
                sum(
                    1
                    for node in core.list_node(label_selector=kwok.LABEL).items
                    if any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
                )
                >= args.nodes
            ),
            120,
            "KWOK nodes Ready",
        )
        meter = CpuMeter(
            {p.name: p.pid for p in cluster.processes} | {"kwok": simulator.process.pid, "bench": os.getpid()}
        )
        for n in [] if partial else sizes:
            run_size(n, cluster, api, results["scale"], meter)
        if not args.steady_only:
            results["creation_only"] = {str(max(sizes)): creation_only(max(sizes), cluster, api, meter)}
        if not partial:
            results["freshness"] = freshness(cluster, api, max(fresh_counts), fresh_counts)
        if not args.creation_only:
            # Each process's use with nothing applied, measured once the cluster has settled (not
            # beside a namespace being deleted or an operator starting, which would inflate it).
            time.sleep(10)
            idle = meter.idle(seconds=15)
            results["steady_idle_cpu_percent"] = {name: 100 * value for name, value in idle.items()}
            results["steady"] = {
                f"{rate:g}": steady_rate(rate, args.steady_seconds, cluster, api, meter, idle=idle) for rate in rates
            }
    finally:
        simulator.stop()
        cluster.stop()
    results["goals"] = goals(results)
    results["seconds"] = time.monotonic() - started
    # A partial run (one phase, for finding where time goes) leaves the published results alone.
    out = STATE if partial else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "operator-scale.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "operator-scale.md").write_text(markdown(results))
    print(markdown(results))
    say(f"done in {results['seconds']:.0f}s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
