"""Shared fixtures.  One real control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, the node agent) serves every cluster and end-to-end test of a session;
each test works in namespaces of its own."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

# Nothing in a test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def cluster() -> Iterator[object]:
    from finetune_operator.devcluster.cluster import LocalCluster

    state = ARTIFACTS / "cluster"
    if (state / "processes.json").is_file():
        from finetune_operator.devcluster import cluster as devcluster

        devcluster.load(state).stop()
    shutil.rmtree(state, ignore_errors=True)
    local = LocalCluster(state_dir=state)
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
