"""Rendering a FineTuneJob into its ConfigMap, Secret and Job: pure, no cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api import load_manifest, parse_manifest
from finetune_operator import names
from finetune_operator.render import (
    ANNOTATION_FULL_NAME,
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    cluster_problems,
    display_uri,
    render,
    resolve_uri,
    trainer_command,
)
from tests.bad_specs import good_manifest

ROOT = Path(__file__).resolve().parents[2]


def _body(manifest: dict[str, Any], name: str = "nick-portrait", namespace: str = "team-a") -> dict[str, Any]:
    body = dict(manifest)
    body["metadata"] = {"name": name, "namespace": namespace, "uid": "1234-uid"}
    return body


def _render(manifest: dict[str, Any], **kwargs: Any) -> Any:
    body = _body(manifest, **{k: kwargs.pop(k) for k in ("name", "namespace") if k in kwargs})
    job = parse_manifest(body)
    options = {"trainer_image": "trainer:1", "report_base_url": "http://op.svc:8081"}
    options.update(kwargs)
    return render(body, job, **options)


def portrait() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "portrait.yaml").read_text())


def test_portrait_job_asks_for_one_gpu_and_runs_the_trainer() -> None:
    rendered = _render(portrait())
    job = rendered.job
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # No launcher in front: exit codes 2 and 3 must reach the podFailurePolicy unchanged.
    assert (
        container["command"]
        == trainer_command()
        == ["python", "-m", "finetune_trainer", "run", "/etc/finetune/job.yaml"]
    )
    assert container["image"] == "trainer:1"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["tolerations"] == []
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    tolerated = _render(portrait(), default_tolerations=[gpu_toleration]).job["spec"]["template"]["spec"]
    assert tolerated["tolerations"] == [gpu_toleration]


def test_failure_policy_fails_fast_on_bad_input_and_ignores_disruptions() -> None:
    rules = _render(portrait()).job["spec"]["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert fail["onExitCodes"]["values"] == [2, 3]
    assert fail["onExitCodes"]["containerName"] == "trainer"
    ignore = next(r for r in rules if r["action"] == "Ignore")
    assert ignore["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


def test_pvc_inputs_mount_read_only_and_output_read_write() -> None:
    rendered = _render(portrait())
    pod = rendered.job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims["datasets"]["persistentVolumeClaim"]["readOnly"] is True
    assert claims["outputs"]["persistentVolumeClaim"]["readOnly"] is False
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/data/datasets"]["readOnly"] is True
    assert mounts["/data/outputs"]["readOnly"] is False
    assert "/dev/shm" in mounts
    resolved = yaml.safe_load(rendered.job["spec"]["template"]["metadata"]["annotations"]["finetune.dev/job-yaml"])
    assert resolved["spec"]["dataset"]["instanceImages"] == "/data/datasets/nick/"
    assert resolved["spec"]["output"]["uri"] == "/data/outputs/nick/"
    # The trainer validates the resolved file with the same models.
    assert parse_manifest(resolved).spec.training.steps_per_image == 150


def test_model_parts_on_claims_are_mounted_and_resolved() -> None:
    """A Flux transformer's single file with its components folder, and a replacement VAE, each on
    a claim of its own: every claim is mounted read-only and the trainer reads mount paths."""
    manifest = good_manifest()
    manifest["spec"]["method"] = "LoRA"
    manifest["spec"]["baseModel"] = {
        "uri": "pvc://models/flux1-dev.safetensors",
        "type": "flux1",
        "componentsUri": "pvc://flux-parts/FLUX.1-dev",
        "vaeUri": "pvc://vaes/ae",
    }
    rendered = _render(manifest)
    pod = rendered.job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
    for claim in ("models", "flux-parts", "vaes"):
        assert claims[claim]["persistentVolumeClaim"]["readOnly"] is True, claim
    resolved = yaml.safe_load(rendered.job["spec"]["template"]["metadata"]["annotations"]["finetune.dev/job-yaml"])
    assert resolved["spec"]["baseModel"]["componentsUri"] == "/data/flux-parts/FLUX.1-dev"
    assert resolved["spec"]["baseModel"]["vaeUri"] == "/data/vaes/ae"
    assert resolved["spec"]["baseModel"]["uri"] == "/data/models/flux1-dev.safetensors"


def test_same_claim_for_input_and_output_is_mounted_once_writable() -> None:
    manifest = good_manifest()
    manifest["spec"]["dataset"]["instanceImages"] = "pvc://shared/images"
    manifest["spec"]["output"]["uri"] = "pvc://shared/out"
    pod = _render(manifest).job["spec"]["template"]["spec"]
    shared = [v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "shared"]
    assert len(shared) == 1
    assert shared[0]["persistentVolumeClaim"]["readOnly"] is False


def test_the_job_is_owned_and_labelled() -> None:
    rendered = _render(portrait())
    for obj in (rendered.job,):
        owner = obj["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "FineTuneJob"
        assert owner["uid"] == "1234-uid"
        assert owner["controller"] is True
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "finetune-operator"
        assert labels["finetune.dev/job-name"] == "nick-portrait"
        assert obj["metadata"]["annotations"][ANNOTATION_FULL_NAME] == "nick-portrait"
    template = rendered.job["spec"]["template"]["metadata"]
    assert template["labels"]["finetune.dev/job-name"] == "nick-portrait"


def test_credentials_secret_arrives_as_files_not_environment_and_report_url_is_per_job() -> None:
    pod = _render(portrait()).job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # Environment variables reach every child process and many a crash report: none from the Secret.
    assert "envFrom" not in container
    assert not any("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in container["env"])
    volume = next(v for v in pod["volumes"] if v["name"] == "credentials")
    assert volume["secret"]["secretName"] == "hf-token"
    assert volume["secret"]["optional"] is True
    mount = next(m for m in container["volumeMounts"] if m["name"] == "credentials")
    assert mount == {"name": "credentials", "mountPath": "/var/run/finetune/credentials", "readOnly": True}
    env = {e["name"]: e for e in container["env"]}
    assert env["FINETUNE_CREDENTIALS_DIR"]["value"] == "/var/run/finetune/credentials"
    assert env["FINETUNE_CREDENTIALS_SECRET"]["value"] == "hf-token"
    assert env["FINETUNE_REPORT_URL"]["value"] == (
        "http://op.svc:8081/v1alpha1/namespaces/team-a/finetunejobs/nick-portrait/progress"
    )
    assert env["FINETUNE_ATTEMPT"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["FINETUNE_REPORT_TOKEN_FILE"]["value"] == "/var/run/finetune/report/token"


def test_job_file_and_report_token_come_without_a_configmap_or_secret() -> None:
    pod = _render(portrait(), report_ca="-----BEGIN CERTIFICATE-----\nx\n").job["spec"]["template"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    job_file = volumes["job"]["downwardAPI"]["items"][0]
    assert job_file["path"] == "job.yaml"
    assert job_file["fieldRef"]["fieldPath"] == "metadata.annotations['finetune.dev/job-yaml']"
    token = volumes["report-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "finetune-operator"
    assert token["path"] == "token"
    assert token["expirationSeconds"] >= 3600
    assert pod["metadata"]["annotations"]["finetune.dev/report-ca"].startswith("-----BEGIN")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["FINETUNE_REPORT_CA_FILE"] == "/var/run/finetune/report/ca.crt"
    # (The portrait names a credentials Secret: the user's own, mounted as it is.)
    assert not any("configMap" in v or "secret" in v for v in pod["spec"]["volumes"] if v["name"] != "credentials")
    # The pod gets no token for the Kubernetes API, only the audience-bound one.
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_run_policy_maps_onto_the_job() -> None:
    manifest = good_manifest()
    manifest["spec"]["runPolicy"] = {
        "backoffLimit": 5,
        "activeDeadlineSeconds": 3600,
        "ttlSecondsAfterFinished": 600,
        "suspend": True,
    }
    spec = _render(manifest).job["spec"]
    assert spec["backoffLimit"] == 5
    assert spec["activeDeadlineSeconds"] == 3600
    # The TTL is set only once the final status is written (a Job deleted earlier takes the
    # result with it): never at creation.
    assert "ttlSecondsAfterFinished" not in spec
    assert spec["suspend"] is True


def test_kueue_queue_label_and_job_created_suspended() -> None:
    manifest = good_manifest()
    manifest["spec"]["runPolicy"] = {"queueName": "gpu-queue"}
    job = _render(manifest).job
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    assert KUEUE_PRIORITY_LABEL not in job["metadata"]["labels"]


def test_priority_class_becomes_kueues_workload_priority_label() -> None:
    manifest = good_manifest()
    manifest["spec"]["runPolicy"] = {"queueName": "gpu-queue", "priorityClass": "high"}
    job = _render(manifest).job
    assert job["metadata"]["labels"][KUEUE_PRIORITY_LABEL] == "high"
    # On the Job only: Kueue reads it there; the pods' labels stay ours.
    assert KUEUE_PRIORITY_LABEL not in job["spec"]["template"]["metadata"]["labels"]


def test_placement_settings_reach_the_pod() -> None:
    manifest = good_manifest()
    manifest["spec"]["resources"] = {
        "gpus": 2,
        "gpuResource": "amd.com/gpu",
        "nodeSelector": {"pool": "a100"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "training",
    }
    pod = _render(manifest, default_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}]).job["spec"][
        "template"
    ]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["priorityClassName"] == "training"
    assert pod["affinity"] == {"nodeAffinity": {}}
    keys = [t["key"] for t in pod["tolerations"]]
    assert keys == ["nvidia.com/gpu", "dedicated"]


def test_a_placement_profile_places_the_pod_and_wins_over_the_jobs_own() -> None:
    from finetune_api.job_policy import parse_profiles
    from tests.policy_cases import PROFILES

    manifest = good_manifest()
    manifest["spec"]["resources"] = {
        "placementProfile": "a100",
        "nodeSelector": {"nvidia.com/gpu.product": "Tesla-T4", "zone": "b"},
        "tolerations": [{"key": "spot", "operator": "Exists"}],
        "priorityClassName": "batch-low",
    }
    profile = parse_profiles(json.dumps(PROFILES))["a100"]
    pod = _render(manifest, default_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}], profile=profile)
    pod = pod.job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "zone": "b"}
    assert pod["priorityClassName"] == "batch-high"
    assert [t["key"] for t in pod["tolerations"]] == ["nvidia.com/gpu", "dedicated", "spot"]
    assert "affinity" not in pod
    bare = _render(good_manifest(), profile=parse_profiles(json.dumps(PROFILES))["cpu"]).job["spec"]["template"]
    assert not {"nodeSelector", "affinity", "priorityClassName"} & set(bare["spec"])


@pytest.mark.parametrize("length", [63, 64, 100, 253])
def test_long_names_fit_every_limit_and_stay_distinct(length: int) -> None:
    name = ("a" * (length - 1)) + "b"
    other = ("a" * (length - 1)) + "c"
    assert len(names.job_name(name)) <= 63
    assert len(names.label_value(name)) <= 63
    if length > 63:
        assert names.job_name(name) != names.job_name(other)
    assert names.job_name(name) == names.job_name(name)
    rendered = _render(good_manifest(), name=name)
    assert rendered.job["metadata"]["annotations"][ANNOTATION_FULL_NAME] == name


def test_uris_round_trip_between_pvc_and_mount_paths() -> None:
    rendered = _render(portrait())
    path = resolve_uri("pvc://outputs/nick/checkpoints/checkpoint-000100")
    assert path == "/data/outputs/nick/checkpoints/checkpoint-000100"
    assert display_uri(path, rendered.mounts) == "pvc://outputs/nick/checkpoints/checkpoint-000100"
    assert display_uri("s3://bucket/x", rendered.mounts) == "s3://bucket/x"


def test_a_pvc_path_never_resolves_outside_its_claim() -> None:
    assert resolve_uri("pvc://outputs/a/../b") == "/data/outputs/a/../b"
    for uri in ("pvc://outputs/..", "pvc://outputs/../../etc", "pvc://outputs/nick/../../../root"):
        with pytest.raises(ValueError, match="leaves the claim outputs"):
            resolve_uri(uri)


def test_plain_paths_and_file_uris_are_refused_for_a_cluster_but_parse_for_a_workstation() -> None:
    manifest = good_manifest()
    manifest["spec"]["baseModel"]["uri"] = "/models/sd15"
    manifest["spec"]["output"]["uri"] = "file:///outputs/nick"
    job = parse_manifest(_body(manifest))
    problems = cluster_problems(job)
    assert [p.split(":")[0] for p in problems] == ["spec.baseModel.uri", "spec.output.uri"]
    assert all("pvc://CLAIM/path" in p for p in problems)
    assert cluster_problems(parse_manifest(_body(good_manifest()))) == []


def test_every_example_renders() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        job = load_manifest(path)
        body = _body(job.model_dump(mode="json", by_alias=True, exclude_none=True))
        rendered = render(body, job, trainer_image="t:1")
        assert rendered.job["kind"] == "Job"


def test_the_charts_pull_secrets_reach_trainer_pods_by_name() -> None:
    """values.yaml said imagePullSecrets reach trainer pods; nothing rendered them."""
    import argparse

    from finetune_operator.settings import add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = from_arguments(parser.parse_args(["--trainer-image-pull-secrets=regcred, mirror"]))
    assert settings.trainer_image_pull_secrets == ("regcred", "mirror")
    job = _render(portrait(), image_pull_secrets=settings.trainer_image_pull_secrets).job
    assert job["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert "imagePullSecrets" not in _render(portrait()).job["spec"]["template"]["spec"]


def test_cache_and_tmp_are_bounded_so_one_job_cannot_fill_a_shared_nodes_disk() -> None:
    import argparse

    from finetune_operator.settings import add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = from_arguments(parser.parse_args([]))
    assert (settings.cache_size_limit, settings.tmp_size_limit) == ("200Gi", "20Gi")
    job = _render(portrait(), cache_size_limit=settings.cache_size_limit, tmp_size_limit="1Gi").job
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert volumes[mounts["/cache"]]["emptyDir"] == {"sizeLimit": "200Gi"}
    assert volumes[mounts["/tmp"]]["emptyDir"] == {"sizeLimit": "1Gi"}
    unbounded = from_arguments(parser.parse_args(["--cache-size-limit=", "--tmp-size-limit="]))
    job = _render(portrait(), cache_size_limit=unbounded.cache_size_limit, tmp_size_limit=unbounded.tmp_size_limit).job
    assert {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}[mounts["/cache"]]["emptyDir"] == {}
