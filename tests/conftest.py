"""Shared fixtures.  One real control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, the node agent) serves every cluster and end-to-end test of a session;
each test works in namespaces of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
# A user whose every API request the apiserver's audit log records: a test that must count an
# operator's calls (TokenReviews under a flood) runs that operator as this user.
AUDITED_USER = "audited-operator"

# Nothing in a test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def cluster() -> Iterator[object]:
    from finetune_devcluster.cluster import LocalCluster

    state = ARTIFACTS / "cluster"
    if (state / "processes.json").is_file():
        from finetune_devcluster import cluster as devcluster

        devcluster.load(state).stop()
    shutil.rmtree(state, ignore_errors=True)
    local = LocalCluster(state_dir=state, audit_users=(AUDITED_USER,), extra_users=(AUDITED_USER,))
    local.start(agent=True, timeout=90)
    try:
        local.install_crds(ROOT / "crds")
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def kube(cluster: object) -> object:
    from tests.kube import Kube

    return Kube(cluster)  # type: ignore[arg-type]


@pytest.fixture
def namespace(kube: object, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t-{request.node.name[:30].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    kube.create_namespace(name)  # type: ignore[attr-defined]
    yield name
    # Namespaces go in the background: a test does not wait for the garbage collector.
    kube.core.delete_namespace(name)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def tiny_assets() -> Path:
    """A diffusers folder with random weights and four pictures (no download)."""
    from finetune_trainer.tiny import build_tiny_pipeline, write_demo_images

    root = ARTIFACTS / "tiny-assets"
    shutil.rmtree(root, ignore_errors=True)
    build_tiny_pipeline(root / "tiny-sd", seed=0)
    write_demo_images(root / "subject", 4, 64)
    return root


@pytest.fixture(scope="session")
def operator(cluster: object) -> Iterator[object]:
    from tests.kube import OperatorProcess

    proc = OperatorProcess(kubeconfig=cluster.kubeconfig, log_dir=ARTIFACTS / "operator")  # type: ignore[attr-defined]
    if proc.log.exists():
        proc.log.unlink()
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def kueue(cluster: object, operator: object) -> object:
    """Kueue (built from its Go module) against the session's control plane, started by the
    first test that needs it.  The operator looks for Kueue's API when it starts, so the
    session's operator is restarted once Kueue is in."""
    cluster.start_kueue(timeout=180)  # type: ignore[attr-defined]
    operator.stop()  # type: ignore[attr-defined]
    operator.start()  # type: ignore[attr-defined]
    return cluster


@pytest.fixture
def queues(kube: object, kueue: object) -> Iterator[object]:
    """Makes a test's ClusterQueues and LocalQueues; deletes its ClusterQueues afterwards."""
    from tests.queues import Queues

    made = Queues(kube)  # type: ignore[arg-type]
    yield made
    made.delete_all()


@pytest.fixture(scope="session")
def prometheus(operator: object) -> Iterator[object]:
    """A real Prometheus server (Debian's package) scraping the test operator every second."""
    from tests.kube import Prometheus, free_port, wait_for

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus server is not installed: `make test` installs Debian's prometheus package")
    root = ARTIFACTS / "prometheus"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config = root / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: finetune-operator\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{operator.metrics_port}']\n"  # type: ignore[attr-defined]
    )
    port = free_port()
    log = root / "prometheus.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(port, process, log)
    try:
        wait_for(
            lambda: server.value('up{job="finetune-operator"}') == 1.0,
            timeout=60,
            what="Prometheus to scrape the operator",
        )
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
