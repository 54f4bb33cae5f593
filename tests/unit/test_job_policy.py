"""The operator's side of a platform team's job policy: each refused case names its field and
the list it breaks; the allowed spec and an empty policy pass.  (The admission policy is held to
the same cases on the dev cluster, through the installed chart: tests/cluster/test_helm.py.)"""

from __future__ import annotations

import re
import typing

import pytest
from pydantic import BaseModel

from finetune_api import parse_manifest, rules
from finetune_api.job_policy import JobPolicy, claim_of, claim_uses, parse_profiles, problems, split
from finetune_api.v1alpha1 import FineTuneJobSpec
from tests.policy_cases import PROFILES_ONLY, REFUSED, Refused, allowed_manifest, job_policy, placed_freely


def test_the_lists_read_as_the_configmap_and_flags_write_them() -> None:
    assert split(" a/, b ,,") == ("a/", "b")
    assert split("") == ()
    assert claim_of("pvc://team-data/nick/") == "team-data" and claim_of("s3://bucket/x") is None


def test_the_allowed_spec_passes_and_an_empty_policy_allows_anything_but_an_unknown_profile() -> None:
    assert problems(parse_manifest(allowed_manifest()).spec, job_policy()) == []
    assert problems(parse_manifest(allowed_manifest()).spec, job_policy(PROFILES_ONLY)) == []
    assert problems(parse_manifest(placed_freely()).spec, job_policy()) == []
    for case in REFUSED:
        spec = parse_manifest(case.manifest("x")).spec
        spec.resources.placement_profile = ""
        assert problems(spec, JobPolicy()) == []
    unknown = parse_manifest(allowed_manifest()).spec
    assert problems(unknown, JobPolicy()) == [
        "spec.resources.placementProfile: placement profile a100 is not defined on this cluster: it must be one of "
        "(none defined) (the chart's jobPolicy.placementProfiles; ask the platform team)"
    ]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.id)
def test_each_refused_name_is_named_with_its_field_and_list(case: Refused) -> None:
    found = problems(parse_manifest(case.manifest("x")).spec, job_policy(case.policy))
    assert len(found) == 1, found
    assert found[0].startswith(f"{case.field}: ") and case.words in found[0], found


def test_a_profile_with_a_typo_or_not_json_is_refused_naming_the_flag_and_profile() -> None:
    assert parse_profiles("") == {}
    profile = parse_profiles('{"a100": {"nodeSelector": {"gpu": "a100"}, "priorityClassName": "batch"}}')["a100"]
    assert profile.node_selector == {"gpu": "a100"} and profile.priority_class_name == "batch"
    with pytest.raises(ValueError, match=r"--placement-profiles: profile 'a100': nodeSelectors: Extra inputs"):
        parse_profiles('{"a100": {"nodeSelectors": {"gpu": "a100"}}}')
    with pytest.raises(ValueError, match="--placement-profiles is not JSON"):
        parse_profiles("a100=gpu")
    with pytest.raises(ValueError, match="must be a JSON object of profiles by name"):
        parse_profiles('[{"nodeSelector": {}}]')


def _uri_fields(model: type[BaseModel], prefix: str = "spec") -> set[str]:
    """Every field of the spec's models that holds a URI (the CRD's URI rule), by its path."""
    found: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}.{field.alias or name}"
        if field.json_schema_extra == rules.cel(rules.URI):
            found.add(path)
        for inner in (field.annotation, *typing.get_args(field.annotation)):
            for kind in (inner, *typing.get_args(inner)):
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    found |= _uri_fields(kind, path + ("[]" if typing.get_origin(inner) is list else ""))
    return found


def test_every_uri_field_of_the_spec_is_one_the_policy_reads() -> None:
    """A URI field the policy did not read would name a claim that no list guards."""
    manifest = allowed_manifest()
    spec = manifest["spec"]
    spec["baseModel"].update(vaeUri="pvc://v/x", componentsUri="pvc://c/x", type="flux1")
    spec["method"] = "LoRA"
    spec["dataset"]["classImages"] = "pvc://k/x"
    spec["evaluation"] = {"clipModel": "pvc://clip/x", "dinoModel": "pvc://dino/x", "prompts": ["a photo of sks"]}
    job = parse_manifest(manifest).spec
    listed = {field for field, _, _ in claim_uses(job)}
    concept = FineTuneJobSpec.model_validate(
        {**job.model_dump(by_alias=True), "dataset": {"concepts": [{"images": "pvc://a/x", "classImages": "pvc://b/x",
                                                                     "instancePrompt": "a photo of sks"}]}}
    )  # fmt: skip
    listed |= {re.sub(r"\[\d+\]", "[]", field) for field, _, _ in claim_uses(concept)}
    assert listed == _uri_fields(FineTuneJobSpec)
