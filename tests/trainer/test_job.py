"""What runs where: device fallbacks are reported, impossible jobs are refused up front."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune_operator.api.v1alpha1 import parse_manifest
from finetune_trainer.errors import BadInput
from finetune_trainer.job import Device, check_supported, load_job, resolve_settings, total_steps

pytestmark = pytest.mark.trainer


def _spec(**training: Any) -> Any:
    return parse_manifest(
        {
            "spec": {
                "baseModel": {"uri": "/models/sd", "type": "v2x-512"},
                "dataset": {"instanceImages": "/data/nick", "instancePrompt": "a photo of nick"},
                "training": {"stepsPerImage": 150, **training},
                "output": {"uri": "/out"},
            }
        }
    ).spec


def test_the_tutorial_settings_on_a_cpu_fall_back_with_a_warning_each() -> None:
    spec = _spec(mixedPrecision="fp16", attention="xformers", optimizer="AdamW8bit", compile=True)
    settings, warnings = resolve_settings(spec, Device(type="cpu", bf16=True, xformers=False, bitsandbytes=True))
    assert (settings.mixed_precision, settings.attention, settings.optimizer, settings.compile) == (
        "no",
        "sdpa",
        "AdamW8bit",  # bitsandbytes' 8-bit AdamW runs on CPUs: kept
        False,
    )
    assert [w.split(":")[0] for w in warnings] == [
        "spec.training.mixedPrecision",
        "spec.training.attention",
        "spec.training.compile",
    ]
    assert "training in fp32" in warnings[0]
    assert "using sdpa" in warnings[1]


def test_on_a_gpu_the_same_settings_run_as_asked() -> None:
    spec = _spec(mixedPrecision="fp16", attention="xformers", optimizer="AdamW8bit")
    settings, warnings = resolve_settings(spec, Device(type="cuda", bf16=True, xformers=True, bitsandbytes=True))
    assert (settings.mixed_precision, settings.attention, settings.optimizer) == ("fp16", "xformers", "AdamW8bit")
    assert warnings == []


def test_gpu_fallbacks_name_what_is_missing() -> None:
    spec = _spec(mixedPrecision="bf16", attention="xformers", optimizer="AdamW8bit")
    settings, warnings = resolve_settings(spec, Device(type="cuda", bf16=False, xformers=False, bitsandbytes=False))
    assert (settings.mixed_precision, settings.attention, settings.optimizer) == ("fp16", "sdpa", "AdamW")
    assert any("xformers is not installed" in w for w in warnings)
    assert any("AdamW8bit needs bitsandbytes" in w for w in warnings)
    assert any("no bf16 support" in w for w in warnings)


def test_prediction_type_follows_the_model_type() -> None:
    cpu = Device(type="cpu")
    assert resolve_settings(_spec(), cpu)[0].prediction_type == "epsilon"
    v = _spec()
    v.base_model.type = "v2x"
    assert resolve_settings(v, cpu)[0].prediction_type == "v_prediction"


def test_total_steps_is_steps_per_image_times_images_unless_max_steps() -> None:
    assert total_steps(_spec(), 10) == 1500
    assert total_steps(_spec(maxSteps=42), 10) == 42


@pytest.mark.parametrize(
    ("change", "field", "fix"),
    [
        (
            {"method": "LoRA", "training": {"maxSteps": 1, "trainTextEncoder": True}},
            "spec.training.trainTextEncoder",
            "set spec.training.lora.trainTextEncoder: true",
        ),
        ({"baseModel": {"uri": "/m", "type": "sdxl"}}, "spec.baseModel.type", "use v1x, v2x-512 or v2x"),
        ({"baseModel": {"uri": "pvc://models/sd15", "type": "v1x"}}, "spec.baseModel.uri", "use a local path"),
        ({"output": {"uri": "https://example.com/out"}}, "spec.output.uri", "s3://BUCKET/path or gs://BUCKET/path"),
        ({"output": {"uri": "hf://me/my-model"}}, "spec.output.uri", "s3://BUCKET/path or gs://BUCKET/path"),
    ],
)
def test_jobs_this_trainer_cannot_run_are_bad_input(change: dict[str, Any], field: str, fix: str) -> None:
    raw = {
        "baseModel": {"uri": "/models/sd", "type": "v1x"},
        "dataset": {"instanceImages": "/data/nick", "instancePrompt": "a photo of nick"},
        "training": {"maxSteps": 1},
        "output": {"uri": "/out"},
        **change,
    }
    spec = parse_manifest({"spec": raw}).spec
    with pytest.raises(BadInput) as caught:
        check_supported(spec)
    assert str(caught.value).startswith(field)
    assert fix in str(caught.value)


def test_an_invalid_manifest_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "kind: FineTuneJob\nspec:\n  baseModel: {uri: /m}\n  dataset: {instanceImages: /d, instancePrompt: p}\n"
        "  training: {maxSteps: 1, batchSize: 0}\n  output: {uri: /o}\n"
    )
    with pytest.raises(BadInput, match=r"spec\.training\.batchSize"):
        load_job(path)
    with pytest.raises(BadInput, match="does not exist"):
        load_job(tmp_path / "missing.yaml")


def test_lora_and_object_store_outputs_are_accepted() -> None:
    spec = parse_manifest(
        {
            "spec": {
                "method": "LoRA",
                "baseModel": {"uri": "s3://models/sd15", "type": "v1x"},
                "dataset": {"instanceImages": "gs://photos/nick", "instancePrompt": "a photo of nick"},
                "training": {"maxSteps": 1, "lora": {"rank": 8, "alpha": 8, "trainTextEncoder": True}},
                "output": {"uri": "s3://bucket/out", "mergeLoRA": True},
                "storage": {"s3EndpointUrl": "http://minio.storage.svc:9000"},
            }
        }
    ).spec
    check_supported(spec)  # does not raise
    assert spec.storage.s3_endpoint_url == "http://minio.storage.svc:9000"


def test_a_bad_s3_endpoint_is_refused_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "kind: FineTuneJob\nspec:\n  baseModel: {uri: s3://m/sd}\n  dataset: {instanceImages: /d, instancePrompt: p}\n"
        "  training: {maxSteps: 1}\n  output: {uri: s3://b/o}\n  storage: {s3EndpointUrl: 'minio:9000'}\n"
    )
    with pytest.raises(BadInput, match=r"spec\.storage\.s3EndpointUrl: must be an http:// or https:// URL"):
        load_job(path)
