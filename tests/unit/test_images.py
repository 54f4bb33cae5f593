"""make images: the names it gives the images are the chart's, and the base it stands in for is the Dockerfiles'."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from finetune_devcluster import images

ROOT = Path(__file__).resolve().parents[2]


def test_the_images_are_named_as_the_charts_values_expect() -> None:
    values = yaml.safe_load((ROOT / "helm" / "finetune-operator" / "values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "helm" / "finetune-operator" / "Chart.yaml").read_text())
    operator, trainer = images.images()
    tag = images.default_tag()
    assert tag == chart["appVersion"]
    assert operator.reference(None, tag) == f"{values['image']['repository']}:{chart['appVersion']}"
    assert trainer.reference(None, tag) == f"{values['trainer']['image']['repository']}:{chart['appVersion']}"
    assert operator.reference("registry.example.com/ml/", "1.2") == "registry.example.com/ml/operator:1.2"
    assert trainer.reference("registry.example.com/ml", "1.2") == "registry.example.com/ml/trainer:1.2"


@pytest.mark.parametrize("dockerfile", ["operator/Dockerfile", "trainer-image/Dockerfile"])
def test_each_dockerfile_builds_on_the_base_the_stand_in_replaces(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    assert re.search(rf"^ARG BASE_IMAGE={re.escape(images.UPSTREAM_BASE)}$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert (ROOT / f"{dockerfile}.dockerignore").is_file()
    # The optional CA secret reaches only the steps that reach PyPI.
    for line in text.splitlines():
        if "pip install" in line and "--no-build-isolation" not in line:
            assert "PIP_CERT=/run/secrets/pip-ca" in text


def test_the_build_ca_comes_from_pips_own_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.delenv("PIP_CERT", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    assert images.build_ca_secret() == ()
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert images.build_ca_secret() == ("--secret", f"id=pip-ca,src={bundle}")
    monkeypatch.setenv("PIP_CERT", str(tmp_path / "missing.pem"))
    assert images.build_ca_secret() == ("--secret", f"id=pip-ca,src={bundle}")
