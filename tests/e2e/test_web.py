"""Looking at a running job: the read-only web page in a real browser (Debian's Chromium,
driven by Playwright), `kubectl ftj`, and every expression of the Grafana dashboard against
the real Prometheus.  One long tiny job with preview samples serves all three."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ARTIFACTS, ROOT
from tests.jobs import job_manifest, prepare_claims
from tests.kube import Kube, OperatorProcess, Prometheus, wait_for

pytestmark = pytest.mark.e2e

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE_PROMPT = 'a photo of sks toy <img src=x onerror="document.title=1"><b>bold</b>'


def api(operator: OperatorProcess, path: str, token: str) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{operator.web_port}{path}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def watched(kube: Kube, operator: OperatorProcess, tiny_assets: Path) -> Iterator[str]:
    """A namespace whose job "watched" is Training and has sample thumbnails."""
    namespace = f"t-watched-{uuid.uuid4().hex[:5]}"
    kube.create_namespace(namespace)
    prepare_claims(kube, namespace, tiny_assets)
    manifest = job_manifest(
        "watched",
        training={"maxSteps": 20000},
        samples={
            "prompts": [HOSTILE_PROMPT, "a photo of sks toy in the snow"],
            "everySteps": 150,
            "numInferenceSteps": 2,
        },
    )
    kube.create_ftj(namespace, manifest)

    def with_thumbnails() -> Any:
        items = api(operator, f"/api/jobs?namespace={namespace}", kube.cluster.admin_token)["items"]
        return items[0] if items and items[0]["thumbnails"] and items[0]["phase"] == "Training" else None

    wait_for(with_thumbnails, timeout=300, what="a Training job with sample thumbnails on the web API")
    yield namespace
    kube.core.delete_namespace(namespace)


def test_page_shows_a_running_job_with_samples_and_updates_itself(
    kube: Kube, operator: OperatorProcess, watched: str
) -> None:
    from playwright.sync_api import sync_playwright

    namespace = watched
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium package")
    # Another namespace's jobs are filtered out.
    assert api(operator, "/api/jobs?namespace=nobody-here", kube.cluster.admin_token)["items"] == []

    shots = ARTIFACTS / "web"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 700})
            # The page asks for a token and Kubernetes decides what it shows: the admin's here.
            page.goto(f"http://127.0.0.1:{operator.web_port}/?namespace={namespace}")
            page.locator("#login input").fill(kube.cluster.admin_token)
            page.locator("#login button").click()
            row = page.locator(f'tr[data-job="{namespace}/watched"]')
            row.wait_for(timeout=15000)
            assert "Training" in row.inner_text()
            steps = row.locator(".steps")
            first = steps.inner_text()
            assert "/20000" in first
            image = row.locator(".thumbs img").first
            image.wait_for(timeout=15000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
            # The prompt is text, never markup.
            assert row.locator(".thumbs b").count() == 0
            assert HOSTILE_PROMPT in (
                row.locator(".thumbs img").first.get_attribute("title") or ""
            ) or HOSTILE_PROMPT in (row.locator(".thumbs img").nth(1).get_attribute("title") or "")
            assert page.title() == "FineTuneJobs"
            page.screenshot(path=str(shots / "jobs-running.png"), full_page=True)
            # No reload: the page refreshes itself.
            css = f'tr[data-job="{namespace}/watched"] .steps'
            page.wait_for_function(
                "([css, before]) => (document.querySelector(css) || {}).textContent !== before",
                arg=[css, first],
                timeout=30000,
            )
            assert steps.inner_text() != first

            page.locator(f'tr[data-job="{namespace}/watched"] a').click()
            page.wait_for_url(f"**/jobs/{namespace}/watched")
            page.locator("#curve polyline").wait_for(timeout=15000)
            page.locator("#events tr").first.wait_for(timeout=15000)
            assert (
                "Training" in page.locator("#events").inner_text()
                or "Initializing" in page.locator("#events").inner_text()
            )
            time.sleep(0.5)
            page.screenshot(path=str(shots / "job-running.png"), full_page=True)
        finally:
            browser.close()


def _plugin(kube: Kube, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl ftj ...` the way a person runs it: kubectl finds kubectl-ftj on the PATH."""
    env = {
        **os.environ,
        "KUBECONFIG": str(kube.cluster.kubeconfig),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    return subprocess.run(["kubectl", "ftj", *args], capture_output=True, text=True, env=env, check=False, timeout=60)


def test_kubectl_ftj_lists_jobs_and_fetches_samples(
    kube: Kube, operator: OperatorProcess, watched: str, tmp_path: Path
) -> None:
    listed = _plugin(kube, "list", "-n", watched)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split() == ["NAMESPACE", "NAME", "PHASE", "STEP", "LOSS", "ETA", "SAMPLES", "OUTPUT"]
    cells = row.split()
    assert cells[:3] == [watched, "watched", "Training"]
    assert re.fullmatch(r"\d+/20000", cells[3])
    assert int(cells[6]) >= 1
    assert cells[7] == "pvc://outputs/watched"
    fetched = _plugin(
        kube,
        "samples",
        "watched",
        "-n",
        watched,
        "-o",
        str(tmp_path),
        "--operator-url",
        f"http://127.0.0.1:{operator.web_port}",
    )
    assert fetched.returncode == 0, fetched.stderr
    pictures = sorted(tmp_path.glob("step-*.jpg"))
    assert len(pictures) >= 2
    from PIL import Image

    with Image.open(pictures[0]) as image:
        assert image.format == "JPEG" and image.width > 8
    missing = _plugin(kube, "samples", "nope", "-n", watched, "-o", str(tmp_path))
    assert missing.returncode != 0 and "nope" in missing.stderr


def test_kubectl_ftj_logs_shows_the_running_trainers_log(kube: Kube, watched: str) -> None:
    """Through the apiserver to the node's kubelet API, as on a real cluster."""
    shown = _plugin(kube, "logs", "watched", "-n", watched)
    assert shown.returncode == 0, shown.stderr
    reports = [json.loads(line) for line in shown.stdout.splitlines() if line.startswith("{")]
    assert any(r.get("job") == "watched" and r.get("stage") == "training" for r in reports), shown.stdout[-2000:]
    pod = kube.pods(watched, "finetune.dev/job-name=watched")[0].metadata.name
    tail = kube.kubectl("logs", "-n", watched, pod, "-c", "trainer", "--tail=3")
    assert len(tail.splitlines()) == 3
    missing = _plugin(kube, "logs", "nope", "-n", watched)
    assert missing.returncode != 0 and "nope" in missing.stderr


def test_every_dashboard_expression_returns_data_for_a_running_job(prometheus: Prometheus, watched: str) -> None:
    dashboard = json.loads((ROOT / "helm" / "finetune-operator" / "dashboards" / "finetune-operator.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(expressions) >= 8

    def concrete(expr: str) -> str:
        return expr.replace("$__rate_interval", "1m").replace("$namespace", watched)

    for expr in expressions:
        result = wait_for(
            lambda e=expr: prometheus.query(concrete(e)),
            timeout=90,
            what=f"data for the dashboard expression {expr}",
        )
        assert result, expr
