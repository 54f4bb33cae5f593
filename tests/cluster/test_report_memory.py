"""Fifty jobs' pods sending the largest reports the operator accepts keep it under the chart's
memory limit, while another job's report still reaches its status at once.

A report is at most 256 KiB of JSON, but parsed, and copied into a status, a report of thousands
of tiny entries cost the operator many times that, and kept until its job ended: some fifty
jobs could push the operator past its limit and every tenant lost status.  The operator here is
a fresh one (the session's is stopped meanwhile: two operators must not act on the same jobs),
so its peak resident memory is what a new pod of the chart would reach.  (Reports this large also
arrive in several reads of the connection: the operator once parsed the first read alone and
refused them as not JSON.)
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import time
import typing
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from finetune_api.report import MAX_REPORT_BYTES, ProgressEvent
from tests.bad_specs import good_manifest
from tests.conftest import ARTIFACTS, ROOT
from tests.kube import Kube, OperatorProcess, instead_of, wait_for

pytestmark = pytest.mark.cluster

JOBS = 50
REPORTS_EACH = 3


def chart_memory_limit() -> int:
    values = yaml.safe_load((ROOT / "helm" / "finetune-operator" / "values.yaml").read_text())
    limit = values["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) * 2**20


def _most(field: str) -> int:
    """The most items ProgressEvent admits in ``field`` (its max_length)."""
    for meta in ProgressEvent.model_fields[field].metadata:
        if hasattr(meta, "max_length"):
            return typing.cast(int, meta.max_length)
    raise AssertionError(f"ProgressEvent.{field} admits any number of items")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def largest_report(seq: int, attempt: str) -> bytes:
    """A report as large as the operator accepts, made of the entries that cost it most: as many
    files as the schema admits, then checkpoints, samples, settings and warnings, each as long
    as the schema admits, until the body limit."""
    body: dict[str, Any] = {
        "seq": seq,
        "attempt": attempt,
        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "stage": "training",
        "step": seq,
        "totalSteps": 100,
        "loss": 0.1,
        "message": "m" * 2000,
    }
    makers = {
        "files": lambda i: {"path": f"f{i}", "sizeBytes": i, "sha256": f"{i:064x}"},
        "checkpoints": lambda i: {"step": i, "uri": f"pvc://c/{i}"},
        "samples": lambda i: f"s/{i}.png",
        "warnings": lambda i: f"w{i} " + "w" * 400,
    }
    room = MAX_REPORT_BYTES - len(_json(body)) - 64
    for field, make in makers.items():
        items: list[Any] = []
        size = 0
        while len(items) < _most(field) and size < room:
            item = make(len(items))
            size += len(_json(item)) + 1
            items.append(item)
        if items and size > room:
            items.pop()
            size -= len(_json(item)) + 1
        body[field] = items
        room -= size + len(field) + 4
    settings = {}
    while room > 300 and len(settings) < 64:
        settings[f"setting-{len(settings)}"] = "v" * 200
        room -= 220
    body["settings"] = settings
    raw = _json(body).encode()
    assert len(raw) <= MAX_REPORT_BYTES, len(raw)
    ProgressEvent.model_validate_json(raw)  # one the operator accepts
    return raw


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), bytes."""
    for line in open(f"/proc/{pid}/status").read().splitlines():  # noqa: SIM115
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def fresh_operator(kube: Kube, operator: OperatorProcess) -> Iterator[OperatorProcess]:
    fresh = OperatorProcess(kubeconfig=kube.cluster.kubeconfig, log_dir=ARTIFACTS / "report-memory")
    with instead_of(operator, fresh):
        yield fresh


def test_fifty_jobs_sending_the_largest_reports_keep_the_operator_under_its_limit(
    kube: Kube, namespace: str, fresh_operator: OperatorProcess
) -> None:
    from tests.cluster.test_progress import pod_of, pod_token, post, report

    names = [f"flood-{i:02d}" for i in range(JOBS)] + ["neighbour"]
    for name in names:
        manifest = good_manifest(name)
        manifest["spec"]["resources"] = {"gpus": 8}  # never scheduled: no trainer reports but ours
        kube.create_ftj(namespace, manifest)
    for name in names:
        kube.wait_phase(namespace, name, "Queued", timeout=120)
    pods = {name: pod_of(kube, namespace, name) for name in names}
    tokens = {name: pod_token(kube, namespace, pod) for name, pod in pods.items()}
    time.sleep(2)
    before = peak_rss(fresh_operator.process.pid)  # type: ignore[union-attr]

    def flood(name: str) -> list[tuple[int, str]]:
        attempt = pods[name].metadata.name
        answers = []
        for seq in range(1, REPORTS_EACH + 1):
            # As a trainer's pusher does: on 429 (new tokens are reviewed a few at a time), wait and send again.
            for _ in range(30):
                code, body = post(fresh_operator, namespace, name, tokens[name], largest_report(seq, attempt))
                if code != 429:
                    break
                time.sleep(2)
            answers.append((code, body.get("error", "")))
        return answers

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        flooding = pool.map(flood, names[:-1])
        # Meanwhile the neighbour's trainer reports as a trainer does, and its status shows it.
        attempt = pods["neighbour"].metadata.name
        assert post(fresh_operator, namespace, "neighbour", tokens["neighbour"], report(7, attempt=attempt))[0] == 202
        wait_for(
            lambda: kube.status(namespace, "neighbour").get("progress", {}).get("step") == 7,
            timeout=20,
            what="the neighbour's report on its resource during the flood",
        )
        codes = [code for codes in flooding for code in codes]
    assert codes == [(202, "")] * (JOBS * REPORTS_EACH), sorted(set(codes))
    for name in names[:-1]:
        wait_for(
            lambda n=name: kube.status(namespace, n).get("progress", {}).get("step") == REPORTS_EACH,
            timeout=60,
            what=f"{name}'s last report on its resource",
        )
    time.sleep(2)
    peak = peak_rss(fresh_operator.process.pid)  # type: ignore[union-attr]
    limit = chart_memory_limit()
    print(f"operator peak RSS: {before / 2**20:.0f} MiB before the flood, {peak / 2**20:.0f} MiB after")
    assert peak < limit, f"the operator peaked at {peak / 2**20:.0f} MiB, over the chart's {limit / 2**20:.0f} MiB"
