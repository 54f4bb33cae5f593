"""The API models: good specs pass, each bad spec is refused naming its field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_api import FineTuneJob, ManifestError, load_manifest, parse_manifest
from tests.bad_specs import BAD_SPECS, CLUSTER_ONLY_BAD_SPECS, BadSpec, bad_manifest, good_manifest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_good_spec_gets_the_documented_defaults() -> None:
    job = parse_manifest(good_manifest())
    spec = job.spec
    assert spec.method == "DreamBooth"
    assert spec.training.optimizer == "AdamW8bit"
    assert spec.training.mixed_precision == "fp16"
    assert spec.training.gradient_checkpointing is True
    assert spec.output.half_precision is True
    assert spec.output.formats == ["diffusers", "safetensors"]
    assert spec.resources.gpu_resource == "nvidia.com/gpu"
    assert spec.run_policy.backoff_limit == 3
    assert spec.checkpoints.every_steps == 0


@pytest.mark.parametrize(
    ("method", "model_type", "rate", "resolution"),
    [
        ("DreamBooth", "v1x", 2.0e-6, 512),
        ("LoRA", "v1x", 1.0e-4, 512),
        ("LoRA", "v2x-512", 1.0e-4, 512),
        ("DreamBooth", "v2x", 2.0e-6, 768),
        ("LoRA", "sdxl", 1.0e-4, 1024),
        ("LoRA", "flux1", 1.0e-4, 1024),
    ],
)
def test_learning_rate_and_resolution_default_by_method_and_family(
    method: str, model_type: str, rate: float, resolution: int
) -> None:
    manifest = good_manifest()
    manifest["spec"]["method"] = method
    manifest["spec"]["baseModel"]["type"] = model_type
    spec = parse_manifest(manifest).spec
    assert spec.training.learning_rate is None and spec.learning_rate == rate
    assert spec.dataset.resolution is None and spec.resolution == resolution
    manifest["spec"]["training"]["learningRate"] = 3e-5
    manifest["spec"]["dataset"]["resolution"] = 256
    spec = parse_manifest(manifest).spec
    assert (spec.learning_rate, spec.resolution) == (3e-5, 256)


def test_explain_names_each_methods_default_learning_rate() -> None:
    from finetune_api.v1alpha1 import Training

    description = Training.model_fields["learning_rate"].description or ""
    assert "2e-6 for method DreamBooth" in description and "1e-4 for method LoRA" in description


@pytest.mark.parametrize("case", BAD_SPECS, ids=lambda c: c.id)
def test_bad_spec_is_refused_naming_the_field(case: BadSpec) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(bad_manifest(case))
    assert case.field in str(info.value), f"{case.id}: {info.value}"


@pytest.mark.parametrize("case", CLUSTER_ONLY_BAD_SPECS, ids=lambda c: c.id)
def test_plain_paths_stay_valid_for_a_workstation_run(case: BadSpec) -> None:
    """The cluster refuses these (the CRD, the operator); `finetune-trainer run` reads them."""
    parse_manifest(bad_manifest(case))


def test_the_table_covers_every_rule() -> None:
    assert len(BAD_SPECS) >= 15
    assert len({c.id for c in BAD_SPECS}) == len(BAD_SPECS)


def test_unknown_field_is_refused_not_ignored() -> None:
    manifest = good_manifest()
    manifest["spec"]["training"]["learningrate"] = 1e-5
    with pytest.raises(ManifestError, match=r"spec\.training\.learningrate: unknown field"):
        parse_manifest(manifest)


def test_wrong_kind_is_refused() -> None:
    manifest = good_manifest()
    manifest["kind"] = "Job"
    with pytest.raises(ManifestError, match="kind: expected FineTuneJob"):
        parse_manifest(manifest)


@pytest.mark.parametrize(
    "uri",
    [
        "hf://stabilityai/stable-diffusion-2-base",
        "pvc://datasets/nick/",
        "s3://bucket/key",
        "gs://bucket/key",
        "https://example.com/model.safetensors",
        "http://127.0.0.1:9000/x",
        "file:///data/model",
        "/data/model",
        "relative/dir",
    ],
)
def test_every_documented_uri_scheme_is_accepted(uri: str) -> None:
    manifest = good_manifest()
    manifest["spec"]["baseModel"]["uri"] = uri
    assert parse_manifest(manifest).spec.base_model.uri == uri


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_accepted(path: Path) -> None:
    job = load_manifest(path)
    assert isinstance(job, FineTuneJob)


def test_portrait_example_matches_the_tutorial() -> None:
    spec = load_manifest(ROOT / "examples" / "portrait.yaml").spec
    assert spec.base_model.type == "v2x-512"
    assert spec.training.steps_per_image == 150
    assert spec.checkpoints.every_steps == 0
    assert spec.training.optimizer == "AdamW8bit"
    assert spec.training.mixed_precision == "fp16"
    assert spec.training.attention == "xformers"
    assert spec.output.half_precision is True
    assert "nickxxxawesome" in spec.dataset.instance_prompt


def test_yaml_that_is_not_a_job_says_so(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap"}))
    with pytest.raises(ManifestError, match="no FineTuneJob document"):
        load_manifest(path)


def test_models_import_neither_torch_nor_kopf() -> None:
    code = (
        "import sys; import finetune_api, finetune_api.crd; "
        "bad = [m for m in ('torch', 'kopf', 'diffusers', 'kubernetes') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stdlib_operator_module_is_not_shadowed() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.add(2, 3), operator.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    assert out.startswith("5 ")
    assert "finetune" not in out.split()[1]


def test_kubectl_get_shows_why_a_job_is_where_it_is_and_keeps_out_of_get_all() -> None:
    """Without -o wide: the reason (a failure's, Kueue's while it waits) and the LocalQueue;
    the category ``all`` stays kubectl's built-in workloads."""
    from finetune_api.crd import build_crd

    crd = build_crd()
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    default = [c["name"] for c in columns if not c.get("priority")]
    assert default == ["Phase", "Progress", "ETA", "Loss", "Reason", "Queue", "Age"]
    paths = {c["name"]: c["jsonPath"] for c in columns}
    assert (paths["Reason"], paths["Queue"]) == (".status.reason", ".status.queue.name")
    assert "all" not in crd["spec"]["names"]["categories"]


def test_several_problems_are_one_a_line_with_the_field_path_once() -> None:
    manifest = good_manifest("several")
    manifest["spec"]["training"].update(batchsize=2, maxSteps=-1)
    manifest["spec"]["smaples"] = {}
    with pytest.raises(ManifestError) as raised:
        parse_manifest(manifest, source="job.yaml")
    lines = str(raised.value).splitlines()
    assert lines[0] == "job.yaml: 3 problems:"
    assert sorted(lines[1:]) == [
        "- spec.smaples: unknown field (did you mean samples? fields are camelCase, see `kubectl explain ftj.spec`)",
        "- spec.training.batchsize: unknown field (did you mean batchSize? fields are camelCase, see "
        "`kubectl explain ftj.spec.training`)",
        "- spec.training.maxSteps: Input should be greater than 0",
    ]
    # A model's own check names its field: not "spec: spec.training.lora ...".
    manifest = good_manifest("lora-settings")
    manifest["spec"]["method"] = "DreamBooth"
    manifest["spec"]["training"]["lora"] = {"rank": 4}
    with pytest.raises(ManifestError) as raised:
        parse_manifest(manifest)
    assert str(raised.value).startswith("spec.training.lora is only for method LoRA")


def test_an_unknown_field_names_the_nearest_known_one_where_there_is_one() -> None:
    from finetune_api.v1alpha1 import nearest_field

    assert nearest_field(("spec", "training", "batchsize")) == "batchSize"
    assert nearest_field(("spec", "training", "learning_rate")) == "learningRate"
    assert nearest_field(("spec", "dataset", "instanceImage")) == "instanceImages"
    assert nearest_field(("spec", "training", "lora", "rnak")) == "rank"
    assert nearest_field(("spec", "dataset", "concepts", 0, "instancePromt")) == "instancePrompt"
    assert nearest_field(("spec", "training", "zzzzqqq")) is None


@pytest.mark.parametrize(
    ("resources", "shm"),
    [
        ({}, "8Gi"),
        ({"memory": "2Gi"}, "2Gi"),
        ({"memory": "8192Mi"}, "8Gi"),
        ({"memory": "4G", "shmSize": "1Gi"}, "1Gi"),
    ],
)
def test_shared_memory_is_at_most_the_pods_memory(resources: dict[str, str], shm: str) -> None:
    from finetune_api.v1alpha1 import Resources

    assert Resources.model_validate(resources).shm == shm
