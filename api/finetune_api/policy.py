"""Generate the ValidatingAdmissionPolicy that keeps a FineTuneJob's spec fixed where it must be.

The model, dataset, method and priority class never change; what the Job is made from
(training, output, resources, ...) stops changing once the Job exists (``status.jobName``).
These rules compare the new object with the old one, so as CEL in the CRD (``self ==
oldSelf``) the apiserver evaluated them on every write of the object, the operator's status
writes included, though a status write cannot change the spec: at a burst of 1,000 jobs that
was about a third of what each status write cost the apiserver.  A ValidatingAdmissionPolicy
matching ``finetunejobs`` (not ``finetunejobs/status``) runs them only when someone changes the
FineTuneJob itself.  It ships beside the CRD in ``crds/`` (and the chart's ``crds/``), with the
same life: installed with it, upgraded with it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from finetune_api.crd import HEADER, LABELS, generate
from finetune_api.v1alpha1 import GROUP, IMMUTABLE, IMMUTABLE_TEXT, PLURAL, STARTED_IMMUTABLE, STARTED_IMMUTABLE_TEXT

NAME = f"immutable-spec.{GROUP}"
POLICY_FILE = Path("crds") / f"{NAME}.yaml"
# 422 Unprocessable Entity, as the CRD's own validation answers.
REASON = "Invalid"


def same(path: str) -> str:
    """CEL: the field at ``spec.<path>`` is the same in the new and the old object, absent in
    both included.  (Every parent on these paths is required or defaulted to ``{}``.)"""
    *parents, leaf = path.split(".")
    holder = "".join(f".{p}" for p in parents)
    new, old = f"object.spec{holder}", f"oldObject.spec{holder}"
    return f"has({new}.{leaf}) ? (has({old}.{leaf}) && {new}.{leaf} == {old}.{leaf}) : !has({old}.{leaf})"


def validations() -> list[dict[str, str]]:
    rules = [
        {"expression": same(path), "message": f"spec.{path} {IMMUTABLE_TEXT}", "reason": REASON} for path in IMMUTABLE
    ]
    rules += [
        {
            "expression": f"!variables.jobExists || ({same(path)})",
            "message": f"spec.{path} {STARTED_IMMUTABLE_TEXT}",
            "reason": REASON,
        }
        for path in STARTED_IMMUTABLE
    ]
    return rules


def build_policy() -> list[dict[str, Any]]:
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": ["*"],
                        "operations": ["UPDATE"],
                        # The object itself; its status subresource is "finetunejobs/status".
                        "resources": [PLURAL],
                    }
                ]
            },
            "variables": [
                {"name": "jobExists", "expression": "has(oldObject.status) && has(oldObject.status.jobName)"}
            ],
            "validations": validations(),
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        "spec": {"policyName": NAME, "validationActions": ["Deny"]},
    }
    return [policy, binding]


def render_policy() -> str:
    return HEADER + yaml.safe_dump_all(build_policy(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    return generate(render_policy(), argv if argv is not None else sys.argv[1:], POLICY_FILE)


if __name__ == "__main__":
    sys.exit(main())
