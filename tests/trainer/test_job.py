"""What runs where: device fallbacks are reported, impossible jobs are refused up front."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune_api.v1alpha1 import parse_manifest
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


def _sd1(**training: Any) -> Any:
    """SD 1.x, where an unset compile was measured to pay (job.COMPILE_MEASURED)."""
    spec = _spec(**training)
    return spec.model_copy(update={"base_model": spec.base_model.model_copy(update={"type": "v1x"})})


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
    # (preferBf16: false, or fp16 would become bf16 on this GPU: see the fast path's tests below.)
    spec = _spec(mixedPrecision="fp16", attention="xformers", optimizer="AdamW8bit", preferBf16=False)
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
    # Each image is seen stepsPerImage times, whatever the batch: the web UI's meaning.
    assert total_steps(_spec(batchSize=2), 10) == 750
    assert total_steps(_spec(batchSize=2, gradientAccumulationSteps=3), 10) == 250
    assert total_steps(_spec(batchSize=4), 10, num_processes=2) == 188  # 1500 / 8, rounded up
    assert total_steps(_spec(stepsPerImage=1, batchSize=4), 3) == 1


@pytest.mark.parametrize(
    ("change", "field", "fix"),
    [
        (
            {"method": "LoRA", "training": {"maxSteps": 1, "trainTextEncoder": True}},
            "spec.training.trainTextEncoder",
            "set spec.training.lora.trainTextEncoder: true",
        ),
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


def test_a_prompt_of_only_whitespace_is_bad_input_naming_the_field(tmp_path: Path) -> None:
    from finetune_trainer import cli

    path = tmp_path / "job.yaml"
    path.write_text(
        "kind: FineTuneJob\nspec:\n  baseModel: {uri: /m}\n"
        '  dataset: {instanceImages: /d, instancePrompt: "  \\t "}\n'
        "  training: {maxSteps: 1}\n  output: {uri: /o}\n"
    )
    with pytest.raises(BadInput, match=r"spec\.dataset\.instancePrompt: is empty or only whitespace"):
        load_job(path)
    log = tmp_path / "termination-log"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_TERMINATION_LOG", str(log))
        patch.delenv("FINETUNE_REPORT_URL", raising=False)
        assert cli.main(["run", str(path)]) == 2  # bad input: not retried
    assert "spec.dataset.instancePrompt" in log.read_text()


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


# --- the fast path's choices ----------------------------------------------------------------------

H100 = Device(type="cuda", bf16=True, xformers=False, bitsandbytes=True, compiler=True)


def test_fp16_becomes_bf16_where_the_gpu_has_it_and_says_so() -> None:
    settings, warnings = resolve_settings(_spec(mixedPrecision="fp16"), H100)
    assert settings.mixed_precision == "bf16"
    (warning,) = [w for w in warnings if w.startswith("spec.training.mixedPrecision")]
    assert "training in bf16 instead of fp16" in warning
    assert "spec.training.preferBf16: false" in warning
    kept, warnings = resolve_settings(_spec(mixedPrecision="fp16", preferBf16=False), H100)
    assert kept.mixed_precision == "fp16"
    assert not [w for w in warnings if w.startswith("spec.training.mixedPrecision")]
    older = Device(type="cuda", bf16=False, compiler=True)
    assert resolve_settings(_spec(mixedPrecision="fp16"), older)[0].mixed_precision == "fp16"
    assert resolve_settings(_spec(mixedPrecision="no"), H100)[0].mixed_precision == "no"


def test_gpu_runs_fuse_adamw_and_use_channels_last_but_not_with_bitsandbytes() -> None:
    adamw = resolve_settings(_spec(optimizer="AdamW"), H100)[0]
    assert (adamw.fused_optimizer, adamw.channels_last, adamw.cudnn_benchmark) == (True, True, True)
    eight_bit = resolve_settings(_spec(optimizer="AdamW8bit"), H100)[0]
    assert (eight_bit.optimizer, eight_bit.fused_optimizer, eight_bit.channels_last) == ("AdamW8bit", False, False)
    cpu = resolve_settings(_spec(optimizer="AdamW"), Device(type="cpu", compiler=True))[0]
    assert (cpu.fused_optimizer, cpu.channels_last, cpu.cudnn_benchmark) == (False, False, False)
    # Prompt embeddings are cached unless the text encoder trains.
    assert adamw.cache_prompts
    assert not resolve_settings(_spec(trainTextEncoder=True), H100)[0].cache_prompts
    assert adamw.as_report()["fused_optimizer"] == "true"


def test_an_unset_compile_is_on_for_gpu_runs_long_enough_to_repay_it() -> None:
    """(For SD 1.x, where it was measured: see test_gpu_path for the families it is not.)"""
    from finetune_trainer.job import COMPILE_MIN_STEPS

    spec = _sd1()
    assert resolve_settings(spec, H100, total_steps=COMPILE_MIN_STEPS)[0].compile
    assert not resolve_settings(spec, H100, total_steps=COMPILE_MIN_STEPS - 1)[0].compile
    assert not resolve_settings(spec, H100)[0].compile  # length unknown
    assert not resolve_settings(spec, Device(type="cpu", compiler=True), total_steps=10**6)[0].compile
    no_compiler = Device(type="cuda", bf16=True, compiler=False)
    assert not resolve_settings(spec, no_compiler, total_steps=10**6)[0].compile
    # Asked for explicitly, it is on whatever the length, and off when asked off.
    assert resolve_settings(_spec(compile=True), H100, total_steps=10)[0].compile
    assert not resolve_settings(_spec(compile=False), H100, total_steps=10**6)[0].compile


def test_compile_needs_a_compiler_and_cuda_graphs_need_cuda_and_one_micro_batch() -> None:
    settings, warnings = resolve_settings(_spec(compile=True), Device(type="cpu", compiler=True))
    assert settings.compile  # honoured on a CPU that can build inductor's code
    settings, warnings = resolve_settings(_spec(compile=True), Device(type="cuda", bf16=True, compiler=False))
    assert not settings.compile
    assert any(w.startswith("spec.training.compile: torch.compile needs a C compiler") for w in warnings)

    graphs = _spec(compile=True, compileMode="reduce-overhead")
    assert resolve_settings(graphs, H100)[0].compile_mode == "reduce-overhead"
    for spec, device, why in (
        (_spec(compile=True, compileMode="reduce-overhead", gradientAccumulationSteps=2), H100, "gradients"),
        (graphs, Device(type="cpu", compiler=True), "CUDA graphs need a CUDA GPU"),
        (_spec(compileMode="reduce-overhead"), H100, "this run is not compiled"),
    ):
        settings, warnings = resolve_settings(spec, device, total_steps=10)
        assert settings.compile_mode == "default"
        assert any(w.startswith("spec.training.compileMode: reduce-overhead not used") and why in w for w in warnings)


def test_an_unset_compile_says_nothing_until_the_length_of_the_run_is_known() -> None:
    """The trainer resolves the settings once before counting the images (for the precision)
    and again after; a warning from the first would stay on the resource for good."""
    from finetune_trainer.job import COMPILE_MIN_STEPS

    spec = _sd1(compileMode="reduce-overhead", mixedPrecision="bf16")
    early, warnings = resolve_settings(spec, H100)
    assert (early.compile, warnings) == (False, [])
    late, warnings = resolve_settings(spec, H100, total_steps=COMPILE_MIN_STEPS)
    assert (late.compile, late.compile_mode, warnings) == (True, "reduce-overhead", [])


def test_the_barrier_timeout_of_several_processes_outlasts_what_the_main_process_does_alone() -> None:
    from finetune_trainer.job import MIN_PROCESS_GROUP_TIMEOUT_S, process_group_timeout

    plain = _spec()
    assert process_group_timeout(plain, remote_output=False) == MIN_PROCESS_GROUP_TIMEOUT_S  # NCCL's is 10 min
    prior = parse_manifest(
        {
            "spec": {
                "baseModel": {"uri": "/m", "type": "v2x"},
                "dataset": {
                    "instanceImages": "/d",
                    "instancePrompt": "a photo of nick",
                    "classPrompt": "a photo of a man",
                    "priorPreservation": True,
                    "numClassImages": 200,
                },
                "training": {"stepsPerImage": 150},
                "output": {"uri": "s3://bucket/out"},
            }
        }
    ).spec
    # 200 class images of 25 guided steps at 768 px on a slow GPU: hours, not minutes.
    assert process_group_timeout(prior, remote_output=False) > 200 * 25 * 2 * 2.25
    # A DreamBooth checkpoint of SD 2.x (about 10 GB with AdamW's state) over a slow link.
    uploads = process_group_timeout(_spec(optimizer="AdamW"), remote_output=True)
    assert uploads > 866e6 * 12 / (10 * 2**20)
