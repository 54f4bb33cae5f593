"""Model families through the whole system: a FineTuneJob for SDXL or Flux.1, applied to the
cluster, is rendered, scheduled, trained by the real trainer in its pod and ends Succeeded with
its files on the resource."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.jobs import job_manifest
from tests.kube import Kube, OperatorProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def tiny_xl_assets(tiny_assets: Path) -> Path:
    from finetune_trainer.tiny import build_tiny_sdxl_pipeline

    build_tiny_sdxl_pipeline(tiny_assets / "tiny-sdxl", seed=0)
    return tiny_assets


@pytest.mark.parametrize("method", ["LoRA", "DreamBooth"])
def test_an_sdxl_job_trains_through_the_operator(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_xl_assets: Path, method: str
) -> None:
    paths = {claim: kube.create_pvc(namespace, claim) for claim in ("models", "datasets", "outputs")}
    shutil.copytree(tiny_xl_assets / "tiny-sdxl", paths["models"] / "tiny-sdxl")
    shutil.copytree(tiny_xl_assets / "subject", paths["datasets"] / "subject")
    name = f"xl-{method.lower()}"
    manifest = job_manifest(
        name,
        method=method,
        baseModel={"uri": "pvc://models/tiny-sdxl", "type": "sdxl"},
        training={"maxSteps": 4, "learningRate": 1e-3},
        checkpoints={"everySteps": 0, "keepLast": 1},
        samples={"prompts": ["a photo of sks toy"], "everySteps": 0, "numInferenceSteps": 2},
    )
    if method == "LoRA":
        manifest["spec"]["training"]["lora"] = {"rank": 4, "alpha": 4}
    kube.create_ftj(namespace, manifest)
    status = kube.wait_phase(namespace, name, "Succeeded", "Failed", timeout=600)
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == 4
    files = {f["path"] for f in status["output"]["files"]}
    if method == "LoRA":
        assert {"lora/pytorch_lora_weights.safetensors", f"{name}-lora.safetensors"} <= files
    else:
        assert {f"{name}.safetensors", "diffusers/model_index.json", "diffusers/text_encoder_2/config.json"} <= files
    assert status["output"]["samples"], status["output"]
    described = kube.kubectl("-n", namespace, "describe", "ftj", name)
    assert "Succeeded" in described and "README.md" in described


@pytest.fixture(scope="session")
def tiny_flux_assets(tiny_assets: Path) -> Path:
    from finetune_trainer.tiny import build_tiny_flux_pipeline, write_flux_single_file

    build_tiny_flux_pipeline(tiny_assets / "tiny-flux", seed=0)
    write_flux_single_file(tiny_assets / "tiny-flux", tiny_assets / "flux1-tiny.safetensors")
    return tiny_assets


@pytest.mark.parametrize("layout", ["folder", "single-file"])
def test_a_flux_lora_job_trains_through_the_operator(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_flux_assets: Path, layout: str
) -> None:
    """A Flux.1 LoRA from a diffusers folder, or from the transformer's single file with its
    text encoders, VAE and scheduler from another claim (spec.baseModel.componentsUri, mounted
    and resolved by the operator)."""
    paths = {claim: kube.create_pvc(namespace, claim) for claim in ("models", "parts", "datasets", "outputs")}
    shutil.copytree(tiny_flux_assets / "subject", paths["datasets"] / "subject")
    if layout == "folder":
        shutil.copytree(tiny_flux_assets / "tiny-flux", paths["models"] / "tiny-flux")
        base = {"uri": "pvc://models/tiny-flux", "type": "flux1"}
    else:
        shutil.copy(tiny_flux_assets / "flux1-tiny.safetensors", paths["models"] / "flux1-tiny.safetensors")
        shutil.copytree(tiny_flux_assets / "tiny-flux", paths["parts"] / "tiny-flux")
        base = {"uri": "pvc://models/flux1-tiny.safetensors", "type": "flux1", "componentsUri": "pvc://parts/tiny-flux"}
    name = f"flux-{layout}"
    manifest = job_manifest(
        name,
        method="LoRA",
        baseModel=base,
        training={"maxSteps": 3, "learningRate": 1e-3, "lora": {"rank": 4, "alpha": 4}, "baseQuantization": "nf4"},
        checkpoints={"everySteps": 0, "keepLast": 1},
        samples={"prompts": ["a photo of sks toy"], "everySteps": 0, "numInferenceSteps": 2},
    )
    kube.create_ftj(namespace, manifest)
    status = kube.wait_phase(namespace, name, "Succeeded", "Failed", timeout=600)
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == 3
    files = {f["path"] for f in status["output"]["files"]}
    assert {"lora/pytorch_lora_weights.safetensors", f"{name}-lora.safetensors", "README.md"} <= files
    assert status["output"]["samples"], status["output"]
    # No GPU here: the 4-bit base falls back, and the resource says so.
    assert any(w.startswith("spec.training.baseQuantization: nf4") for w in status.get("warnings", [])), status
