"""crds/: the CRD and the immutability policy are what the models generate, and the rules that
compare a FineTuneJob with its previous self live in the policy, not in the CRD (where they ran
on every status write)."""

from __future__ import annotations

import yaml

from finetune_api import job_policy
from finetune_api.crd import build_crd, render_crd
from finetune_api.policy import NAME, build_policy, render_policy
from finetune_api.v1alpha1 import IMMUTABLE, STARTED_IMMUTABLE
from tests.bad_specs import crd_validations
from tests.conftest import ROOT


def test_committed_files_are_what_the_models_generate() -> None:
    assert (ROOT / "crds" / "finetunejobs.finetune.dev.yaml").read_text() == render_crd(), "run `make crds`"
    assert (ROOT / "crds" / f"{NAME}.yaml").read_text() == render_policy(), "run `make crds`"
    assert (ROOT / "crds" / f"{job_policy.NAME}.yaml").read_text() == job_policy.render_policy(), "run `make crds`"


def test_the_job_policy_checks_new_finetunejobs_against_its_params() -> None:
    """CREATE only: a job admitted before a stricter policy is still updated (its annotations, by
    the operator); the operator refuses to run it (job_policy.problems)."""
    policy = job_policy.build_policy()
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["finetunejobs"] and rule["operations"] == ["CREATE"]
    assert policy["spec"]["paramKind"] == {"apiVersion": "v1", "kind": "ConfigMap"}
    assert policy["spec"]["failurePolicy"] == "Fail"


def test_no_crd_rule_compares_with_the_old_object() -> None:
    rules = [v["rule"] for v in crd_validations(build_crd())]
    assert len(rules) > 20  # the CRD's own rules are still there
    assert not [rule for rule in rules if "oldSelf" in rule]


def test_the_policy_matches_updates_of_the_finetunejob_itself_not_its_status() -> None:
    policy, binding = build_policy()
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["finetunejobs"] and rule["operations"] == ["UPDATE"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}


def test_every_fixed_field_has_its_validation_naming_it() -> None:
    policy, _ = build_policy()
    by_message = {v["message"].split(" ")[0]: v["expression"] for v in policy["spec"]["validations"]}
    assert set(by_message) == {f"spec.{path}" for path in IMMUTABLE + STARTED_IMMUTABLE}
    for path in IMMUTABLE:
        expression = by_message[f"spec.{path}"]
        assert "jobExists" not in expression and f"object.spec.{path} == oldObject.spec.{path}" in expression
    for path in STARTED_IMMUTABLE:
        expression = by_message[f"spec.{path}"]
        assert expression.startswith("!variables.jobExists || ")
        assert f"object.spec.{path} == oldObject.spec.{path}" in expression
    for validation in policy["spec"]["validations"]:
        assert "create a new FineTuneJob" in validation["message"]


def test_the_policy_file_is_two_documents_kubectl_applies() -> None:
    docs = list(yaml.safe_load_all((ROOT / "crds" / f"{NAME}.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
