"""The progress endpoint: only the job's own token writes its progress, reports coalesce into
a bounded number of status patches, and metrics carry progress."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.bad_specs import good_manifest
from tests.kube import Kube, OperatorProcess, wait_for

pytestmark = pytest.mark.cluster


def pod_token(kube: Kube, namespace: str, pod: Any, *, audience: str = "finetune-operator") -> str:
    """The token the kubelet would project into ``pod``: bound to it, for the operator's audience."""
    request = {
        "spec": {
            "audiences": [audience],
            "expirationSeconds": 3600,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid},
        }
    }
    result = kube.core.create_namespaced_service_account_token("default", namespace, request)
    return str(result.status.token)


def queued_job(kube: Kube, namespace: str, name: str) -> str:
    """A FineTuneJob that never gets a GPU (so no trainer reports but ours); returns its pod's token."""
    manifest = good_manifest(name)
    manifest["spec"]["resources"] = {"gpus": 8}
    kube.create_ftj(namespace, manifest)
    kube.wait_phase(namespace, name, "Queued", timeout=60)
    # Settled: the operator has also copied the Job's start time (a write of its own, throttled).
    wait_for(lambda: kube.status(namespace, name).get("startTime"), timeout=30, what=f"{name}'s startTime")
    return pod_token(kube, namespace, pod_of(kube, namespace, name))


def pod_of(kube: Kube, namespace: str, name: str) -> Any:
    """The job's pod: its name is the attempt its reports carry."""
    return kube.pods(namespace, f"finetune.dev/job-name={name}")[0]


def report(step: int, *, total: int = 100, stage: str = "training", attempt: str = "pod-a") -> dict[str, Any]:
    return {
        "seq": step,
        "attempt": attempt,
        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "stage": stage,
        "step": step,
        "totalSteps": total,
        "loss": 0.5 - step / 1000,
        "learningRate": 1e-5,
        "stepsPerSecond": 4.0,
        "etaSeconds": (total - step) // 4,
    }


def post(
    operator: OperatorProcess, namespace: str, name: str, token: str | None, body: bytes | dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{operator.report_url}/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/progress",
        data=data,
        method="POST",
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def metric(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match and labels in (match.group(1) or ""):
            total += float(match.group(2))
    return total


def test_a_report_with_the_right_token_reaches_status_and_metrics(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    token = queued_job(kube, namespace, "reported")
    attempt = pod_of(kube, namespace, "reported").metadata.name
    code, body = post(operator, namespace, "reported", token, report(42, attempt=attempt))
    assert (code, body) == (202, {"accepted": True, "requests": {}})
    status = wait_for(
        lambda: (s := kube.status(namespace, "reported")).get("progress", {}).get("step") == 42 and s,
        timeout=15,
        what="step 42 on the resource",
    )
    assert status["progress"]["totalSteps"] == 100
    assert status["progressText"] == "42/100 (42%)"
    text = operator.metrics()
    assert metric(text, "finetune_job_step", f'name="reported",namespace="{namespace}"') == 42
    assert metric(text, "finetune_job_loss", f'name="reported",namespace="{namespace}"') == pytest.approx(0.458)

    # A person's request rides on the next reply (kubectl ftj save sets the annotation).
    kube.kubectl("-n", namespace, "annotate", "ftj", "reported", "finetune.dev/save-now=t1")
    step = iter(range(43, 100))
    asked = wait_for(
        lambda: (
            (b := post(operator, namespace, "reported", token, report(next(step), attempt=attempt))[1]).get("requests")
            and b
        ),
        timeout=30,
        interval=1,
        what="the request in the reply",
    )
    assert asked == {"accepted": True, "requests": {"save": "t1"}}


def test_wrong_tokens_unknown_jobs_and_huge_bodies_are_rejected(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    token = queued_job(kube, namespace, "guarded")
    other_token = queued_job(kube, namespace, "neighbour")
    before = kube.status(namespace, "guarded")
    assert post(operator, namespace, "guarded", None, report(1))[0] == 401
    assert post(operator, namespace, "guarded", "not-the-token", report(1))[0] == 403
    assert post(operator, namespace, "guarded", other_token, report(1))[0] == 403
    # Whether a job exists is not told to a token that is not its pod's: an unknown job answers
    # as a known job answers a neighbour's token (a pod could probe other jobs' names by 404).
    assert post(operator, namespace, "nobody", token, report(1)) == post(
        operator, namespace, "guarded", other_token, report(1)
    )
    assert post(operator, namespace, "nobody", token, report(1))[0] == 403
    assert post(operator, "other-namespace", "guarded", token, report(1))[0] == 403
    assert post(operator, namespace, "nobody", "not-a-token", report(1)) == post(
        operator, namespace, "guarded", "not-a-token", report(1)
    )
    pod = kube.pods(namespace, "finetune.dev/job-name=guarded")[0]
    wrong_audience = pod_token(kube, namespace, pod, audience="https://kubernetes.default.svc.cluster.local")
    assert post(operator, namespace, "guarded", wrong_audience, report(1))[0] == 403
    huge = report(1)
    huge["message"] = "x" * 300_000
    assert post(operator, namespace, "guarded", token, json.dumps(huge).encode())[0] == 413
    assert post(operator, namespace, "guarded", token, b"{not json")[0] == 422
    time.sleep(2.5)
    after = kube.status(namespace, "guarded")
    assert "progress" not in after
    assert after == before
    assert metric(operator.metrics(), "finetune_progress_reports_total", 'result="rejected"') >= 6


def test_a_flooding_job_is_throttled_and_its_writes_stay_bounded_while_another_job_reports(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    """One pod posting as fast as it can gets 429 with Retry-After after a burst (the rest of its
    reports are not read, kept or written), and another job of the same namespace reports as usual."""
    from kubernetes import watch

    from finetune_operator.report_rate import BURST, PER_SECOND

    token = queued_job(kube, namespace, "flooded")
    attempt = pod_of(kube, namespace, "flooded").metadata.name
    neighbour_token = queued_job(kube, namespace, "neighbour")
    neighbour = pod_of(kube, namespace, "neighbour").metadata.name
    time.sleep(1.5)
    changes: list[int] = []
    stop = threading.Event()

    def count_changes() -> None:
        # Every status write of this one job is a MODIFIED event of it.
        stream = watch.Watch().stream(
            kube.custom.list_namespaced_custom_object,
            "finetune.dev",
            "v1alpha1",
            namespace,
            "finetunejobs",
            field_selector="metadata.name=flooded",
            timeout_seconds=60,
        )
        for event in stream:
            if event["type"] == "MODIFIED":
                step = ((event["object"].get("status") or {}).get("progress") or {}).get("step")
                changes.append(step or 0)
            if stop.is_set():
                return

    counter = threading.Thread(target=count_changes, daemon=True)
    counter.start()
    time.sleep(1)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        flood = pool.map(
            lambda i: (i, *post(operator, namespace, "flooded", token, report(i, total=1000, attempt=attempt))),
            range(1, 1001),
        )
        # Meanwhile the neighbour's trainer reports as a trainer does.
        neighbour_code = post(operator, namespace, "neighbour", neighbour_token, report(7, attempt=neighbour))[0]
        results = list(flood)
    flood_seconds = time.monotonic() - started
    assert neighbour_code == 202
    accepted = [(i, body) for i, code, body in results if code == 202]
    throttled = [body for _, code, body in results if code == 429]
    assert len(accepted) + len(throttled) == 1000, {code for _, code, _ in results}
    assert throttled and {b["error"] for b in throttled} == {"Throttled"}
    assert len(accepted) <= BURST + PER_SECOND * flood_seconds + 1, (len(accepted), flood_seconds)
    newest = max(i for i, body in accepted if body.get("accepted"))
    status = wait_for(
        lambda: (s := kube.status(namespace, "flooded")).get("progress", {}).get("step") == newest and s,
        timeout=15,
        what=f"the newest accepted report (step {newest}) on the resource",
    )
    assert status["progress"]["step"] == newest
    assert wait_for(
        lambda: kube.status(namespace, "neighbour").get("progress", {}).get("step") == 7,
        timeout=15,
        what="the neighbour's report on its resource",
    )
    time.sleep(2)
    stop.set()
    # One write per status interval (1 s in these tests) while reports arrive, and the last one.
    assert 1 <= len(changes) <= flood_seconds + 3, f"{len(changes)} writes for 1000 reports in {flood_seconds:.1f}s"
    assert changes[-1] == newest
    # Once it slows down (Retry-After), the pod reports again.
    time.sleep(1.0)
    assert post(operator, namespace, "flooded", token, report(1001, total=1001, attempt=attempt))[0] == 202


def test_stale_reports_do_not_overwrite_newer_ones(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    token = queued_job(kube, namespace, "ordered")
    attempt = pod_of(kube, namespace, "ordered").metadata.name
    assert post(operator, namespace, "ordered", token, report(50, attempt=attempt))[1] == {
        "accepted": True,
        "requests": {},
    }
    assert post(operator, namespace, "ordered", token, report(49, attempt=attempt))[1] == {
        "accepted": False,
        "requests": {},
    }
    wait_for(
        lambda: kube.status(namespace, "ordered").get("progress", {}).get("step") == 50,
        timeout=15,
        what="step 50",
    )
    time.sleep(1.5)
    assert kube.status(namespace, "ordered")["progress"]["step"] == 50


def test_reports_that_would_poison_the_status_are_refused_with_400_and_a_reason(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    token = queued_job(kube, namespace, "poisoned")
    attempt = pod_of(kube, namespace, "poisoned").metadata.name
    before = operator.metrics()
    cases = [
        ({"loss": float("nan")}, "NotFinite"),  # json.dumps writes NaN, as a careless client would
        ({"learningRate": float("inf")}, "NotFinite"),
        ({"step": 150, "totalSteps": 100}, "OutOfRange"),
        ({"time": "9999"}, "BadTime"),
        ({"time": "9999-12-31T23:59:59Z"}, "BadTime"),
    ]
    for fields, reason in cases:
        body = json.dumps({**report(5, attempt=attempt), **fields}).encode()
        code, answer = post(operator, namespace, "poisoned", token, body)
        assert (code, answer.get("error")) == (400, reason), (fields, answer)
        assert next(iter(fields)) in answer["message"] or reason == "OutOfRange"
    # None of them froze the status: a sound report afterwards (dated now, after one "from 9999")
    # is accepted and reaches the resource.
    assert post(operator, namespace, "poisoned", token, report(7, attempt=attempt)) == (
        202,
        {"accepted": True, "requests": {}},
    )
    wait_for(
        lambda: kube.status(namespace, "poisoned").get("progress", {}).get("step") == 7,
        timeout=15,
        what="step 7 on the resource",
    )
    after = operator.metrics()
    for reason in ("NotFinite", "OutOfRange", "BadTime"):
        label = f'reason="{reason}",result="rejected"'
        assert metric(after, "finetune_progress_reports_total", label) > metric(
            before, "finetune_progress_reports_total", label
        ), reason
    assert metric(after, "finetune_status_patch_errors_total") == metric(before, "finetune_status_patch_errors_total")


def test_a_token_counts_only_for_the_pods_the_jobs_current_job_owns(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    """A pod that carries the job's name, labels and annotation is not the job's pod: anyone who
    may create pods in the namespace can make one, and its token must not write the status."""
    token = queued_job(kube, namespace, "owned")
    real = pod_of(kube, namespace, "owned")
    impostor = kube.core.create_namespaced_pod(
        namespace,
        {
            "metadata": {
                "name": "owned-zzzzz",
                "labels": dict(real.metadata.labels),
                "annotations": {"finetune.dev/finetunejob": "owned"},
            },
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "trainer",
                        "image": "busybox",
                        "command": ["sleep", "600"],
                        "resources": {"limits": {"nvidia.com/gpu": "8"}},
                    }
                ],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
    )
    impostor_token = pod_token(kube, namespace, impostor)
    forged = report(60, attempt="owned-zzzzz")
    # 503 only while the operator has not seen the new pod yet; then a plain no.
    code = wait_for(
        lambda: (c := post(operator, namespace, "owned", impostor_token, forged)[0]) != 503 and c,
        timeout=30,
        what="an answer other than 'not known yet'",
    )
    assert code == 403
    # The real pod's token speaks for the real pod's attempt only.
    answer = post(operator, namespace, "owned", token, report(61, attempt="owned-zzzzz"))
    assert answer[0] == 403 and answer[1]["error"] == "WrongAttempt", answer
    assert post(operator, namespace, "owned", token, report(62, attempt="someone-else"))[0] == 403
    assert post(operator, namespace, "owned", token, report(63, attempt=real.metadata.name)) == (
        202,
        {"accepted": True, "requests": {}},
    )
    wait_for(lambda: kube.status(namespace, "owned").get("progress", {}).get("step") == 63, timeout=15, what="63")
