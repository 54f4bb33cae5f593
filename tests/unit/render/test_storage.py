"""Storage mounts: one volume per claim named by a pvc:// URI, writable only where the trainer writes."""

from __future__ import annotations

from typing import Any

from finetune_operator.render.storage import ClaimMount, claim_mounts, mount_claims
from finetune_operator.render.trainer import pod_spec, trainer_container
from tests.unit.render.specs import parsed, with_fields


def _claims(job: dict[str, Any]) -> dict[str, tuple[bool, str, bool]]:
    """claim -> (volume read-only, mount path, mount read-only)."""
    mounts = {m["name"]: m for m in trainer_container(job)["volumeMounts"]}
    return {
        v["persistentVolumeClaim"]["claimName"]: (
            v["persistentVolumeClaim"]["readOnly"],
            mounts[v["name"]]["mountPath"],
            mounts[v["name"]]["readOnly"],
        )
        for v in pod_spec(job)["volumes"]
        if "persistentVolumeClaim" in v
    }


def test_inputs_are_mounted_read_only_and_outputs_read_write(job: dict[str, Any]) -> None:
    spec = parsed(with_fields("dataset", classPrompt="a man", classImages="pvc://class/men/", priorPreservation=True))
    mount_claims(job, claim_mounts(spec))
    assert _claims(job) == {
        "models": (True, "/data/models", True),
        "datasets": (True, "/data/datasets", True),
        # Class images generated when missing are saved for the next job.
        "class": (False, "/data/class", False),
        "outputs": (False, "/data/outputs", False),
    }


def test_object_stores_and_the_hub_need_no_mount(job: dict[str, Any]) -> None:
    def elsewhere(spec: dict[str, Any]) -> None:
        spec["baseModel"]["uri"] = "hf://stabilityai/stable-diffusion-2-base"
        spec["dataset"]["instanceImages"] = "s3://datasets/nick/"
        spec["output"]["uri"] = "gs://outputs/nick/"

    before = [list(pod_spec(job)["volumes"]), list(trainer_container(job)["volumeMounts"])]
    mounts = claim_mounts(parsed(elsewhere))
    assert mounts == ()
    mount_claims(job, mounts)
    assert [pod_spec(job)["volumes"], trainer_container(job)["volumeMounts"]] == before


def test_each_claim_is_mounted_once_in_the_order_given(job: dict[str, Any]) -> None:
    mounts = (
        ClaimMount(claim="b", path="/data/b", read_only=True),
        ClaimMount(claim="a", path="/data/a", read_only=False),
    )
    mount_claims(job, mounts)
    volumes = [v for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v]
    assert [v["persistentVolumeClaim"]["claimName"] for v in volumes] == ["b", "a"]
    assert [v["name"] for v in volumes] == [m.volume for m in mounts]
    assert len({m["name"] for m in trainer_container(job)["volumeMounts"]}) == len(
        trainer_container(job)["volumeMounts"]
    )


def _concepts(spec: dict[str, Any]) -> None:
    del spec["dataset"]["instanceImages"], spec["dataset"]["instancePrompt"]
    spec["dataset"]["concepts"] = [
        {"images": "pvc://people/nick/", "instancePrompt": "a photo of nqz man"},
        {"images": "pvc://pets/rex/", "instancePrompt": "a photo of rqx dog", "classImages": "pvc://class/dogs/"},
    ]


def test_the_claims_of_concepts_are_mounted_and_their_uris_resolved(job: dict[str, Any]) -> None:
    """A multi-concept dataset on claims failed as BadInput in a cluster: its claims were neither
    mounted nor resolved in the job file."""
    from finetune_operator.render.job_file import resolved_manifest

    spec = parsed(_concepts)
    mount_claims(job, claim_mounts(spec))
    assert _claims(job) == {
        "models": (True, "/data/models", True),
        "people": (True, "/data/people", True),
        "pets": (True, "/data/pets", True),
        "class": (False, "/data/class", False),
        "outputs": (False, "/data/outputs", False),
    }
    concepts = resolved_manifest(spec, namespace="a", name="b", uid="c")["spec"]["dataset"]["concepts"]
    assert [(c["images"], c.get("classImages")) for c in concepts] == [
        ("/data/people/nick/", None),
        ("/data/pets/rex/", "/data/class/dogs/"),
    ]


def test_a_concepts_plain_path_is_a_cluster_problem() -> None:
    from finetune_operator.render.storage import cluster_problems

    def plain(spec: dict[str, Any]) -> None:
        _concepts(spec)
        spec["dataset"]["concepts"][1]["images"] = "/photos/rex"

    assert [p.split(":")[0] for p in cluster_problems(parsed(plain))] == ["spec.dataset.concepts[1].images"]


def test_claims_whose_names_differ_by_a_dot_get_volumes_of_their_own(job: dict[str, Any]) -> None:
    import re

    from finetune_operator.names import volume_name

    def dotted(spec: dict[str, Any]) -> None:
        spec["baseModel"]["uri"] = "pvc://a.b/sd15"
        spec["dataset"]["instanceImages"] = "pvc://a-b/nick/"

    mount_claims(job, claim_mounts(parsed(dotted)))
    claims = [v for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v]
    volumes = {v["persistentVolumeClaim"]["claimName"]: v["name"] for v in claims}
    assert volumes["a.b"] != volumes["a-b"]
    assert volumes["a-b"] == "pvc-a-b"  # a name without a dot keeps the volume it always had
    long = "x." * 100 + "y"
    for name in [*volumes.values(), volume_name(long)]:
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
