"""A flood of bad report tokens costs the operator and the apiserver next to nothing: Job
creation and the leader's Lease go on as usual, and the apiserver sees almost no TokenReviews.

The operator under test runs as a user whose every request the apiserver's audit log records,
so the TokenReviews are counted where they happen, not by the operator's own account."""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.bad_specs import good_manifest
from tests.conftest import ARTIFACTS, AUDITED_USER, ROOT
from tests.kube import Kube, OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

RATE = 2000  # requests a second
SECONDS = 30
MAX_TOKEN_REVIEWS = 100


def audited(kube: Kube, *, resource: str) -> list[dict[str, Any]]:
    """The audited user's finished requests on ``resource``, as the apiserver logged them."""
    log = kube.cluster.logs / "audit.log"
    if not log.is_file():
        return []
    found = []
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if (
            entry.get("stage") == "ResponseComplete"
            and entry.get("user", {}).get("username") == AUDITED_USER
            and (entry.get("objectRef") or {}).get("resource") == resource
        ):
            found.append(entry)
    return found


def flush_audit_log(kube: Kube, namespace: str) -> None:
    """The audit log is written in batches: wait until a request made now is in it."""
    token = next(
        line.split(",")[0]
        for line in (kube.cluster.pki / "tokens.csv").read_text().splitlines()
        if line.split(",")[1] == AUDITED_USER
    )
    marker = f"/api/v1/namespaces/{namespace}/configmaps/audit-marker-{time.monotonic_ns()}"
    request = urllib.request.Request(kube.cluster.server + marker, headers={"Authorization": f"Bearer {token}"})
    context = ssl.create_default_context(cafile=str(kube.cluster.ca_file))
    # 404: what matters is that the request is logged.
    with contextlib.suppress(urllib.error.HTTPError):
        urllib.request.urlopen(request, context=context, timeout=10)
    wait_for(
        lambda: any(
            marker.endswith(e.get("objectRef", {}).get("name", "-")) for e in audited(kube, resource="configmaps")
        ),
        timeout=30,
        what="the audit log to catch up",
    )


def rejected(operator: OperatorProcess) -> float:
    from tests.cluster.test_progress import metric

    return metric(operator.metrics(), "finetune_progress_reports_total", 'result="rejected"')


def test_a_flood_of_bad_report_tokens_costs_nothing(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    from kubernetes import client

    coordination = client.CoordinationV1Api(kube.api_client)
    lease_name = f"flood-{namespace}"[:63]

    def holder() -> dict[str, Any]:
        return dict(kube.plain(coordination.read_namespaced_lease(lease_name, "default")).get("spec") or {})

    operator.stop()  # one operator acts on these jobs: the audited one
    flooded = OperatorProcess(
        kubeconfig=kube.cluster.user_kubeconfig(AUDITED_USER),
        log_dir=ARTIFACTS / "flood" / namespace,
        extra_args=["--leader-election", "--lease-namespace=default", f"--lease-name={lease_name}"],
        env={"POD_NAME": "flooded"},
    )
    generator: subprocess.Popen[str] | None = None
    try:
        flooded.start()
        wait_for(lambda: holder().get("holderIdentity") == "flooded", timeout=30, what="the operator to lead")
        target = good_manifest("target")
        target["spec"]["resources"] = {"gpus": 8}  # never scheduled: its pod waits, so no trainer reports
        kube.create_ftj(namespace, target)
        kube.wait_phase(namespace, "target", "Queued", timeout=60)
        pod = kube.pods(namespace, "finetune.dev/job-name=target")[0]
        claims = {
            "aud": ["finetune-operator"],
            "exp": int(time.time()) + 3600,
            "iat": int(time.time()),
            "iss": "https://kubernetes.default.svc.cluster.local",
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": pod.metadata.name, "uid": pod.metadata.uid},
                "serviceaccount": {"name": "default", "uid": "0"},
            },
            "sub": f"system:serviceaccount:{namespace}:default",
        }
        flush_audit_log(kube, namespace)
        reviews_before = len(audited(kube, resource="tokenreviews"))
        lease_before = holder()

        url = f"{flooded.report_url}/v1alpha1/namespaces/{namespace}/finetunejobs/target/progress"
        generator = subprocess.Popen(
            [sys.executable, "-m", "tests.flood", url, f"--rate={RATE}", f"--seconds={SECONDS}",
             f"--claims={json.dumps(claims)}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        # Well into the flood (thousands refused already), a new FineTuneJob: its Job appears
        # as fast as without one.
        wait_for(
            lambda: rejected(flooded) >= 5 * RATE or generator.poll() is not None,
            timeout=60,
            what="the flood to be under way",
        )
        assert generator.poll() is None, generator.communicate()
        during = good_manifest("during")
        during["spec"]["resources"] = {"gpus": 8}
        applied = time.monotonic()
        kube.create_ftj(namespace, during)
        wait_for(
            lambda: kube.batch.list_namespaced_job(namespace, field_selector="metadata.name=during").items,
            timeout=30,
            interval=0.1,
            what="the Job of a FineTuneJob applied during the flood",
        )
        job_seconds = time.monotonic() - applied
        still_flooding = generator.poll() is None
        out, err = generator.communicate(timeout=SECONDS + 60)
        assert generator.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        flush_audit_log(kube, namespace)
        reviews = len(audited(kube, resource="tokenreviews")) - reviews_before
        lease_after = holder()
        log = flooded.log.read_text()
        assert flooded.ready()  # raises if it exited
    finally:
        if generator is not None and generator.poll() is None:
            generator.kill()
            generator.wait()
        # Nothing of this test for the next operator to act on while the namespace goes away.
        kube.kubectl("-n", namespace, "delete", "ftj", "--all", "--wait=true", "--timeout=60s", check=False)
        flooded.stop()
        operator.start()

    summary = f"{result}; Job after {job_seconds:.1f}s; {reviews} TokenReviews"
    answered = sum(v for k, v in result["answers"].items() if k.isdigit())
    # A flood it was: thousands a second were sent (on a busy machine the server answers fewer).
    assert result["sent"] >= RATE * SECONDS * 0.5, summary
    assert answered >= result["sent"] * 0.5, summary
    assert "202" not in result["answers"], summary
    assert still_flooding, f"the flood was over before the Job appeared: {summary}"
    assert job_seconds < 5, summary
    assert reviews < MAX_TOKEN_REVIEWS, summary
    assert lease_after["holderIdentity"] == "flooded", lease_after
    assert lease_after.get("leaseTransitions") == lease_before.get("leaseTransitions"), (lease_before, lease_after)
    assert "leader-lost" not in log
    Path(ARTIFACTS / "flood" / namespace / "result.txt").write_text(summary + "\n")
