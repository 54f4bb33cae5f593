"""The job policy at admission (finetune_api.job_policy's ValidatingAdmissionPolicy, bound to a
ConfigMap as the chart binds it): the API server refuses each case the operator refuses, in the
same words, and admits the allowed spec.  (The operator's own check: tests/unit/test_job_policy.py.)"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from finetune_api.job_policy import NAME
from tests.kube import Kube
from tests.policy_cases import POLICY, REFUSED, Refused, allowed_manifest


def _dry_run(kube: Kube, namespace: str, manifest: dict[str, object]) -> str:
    return kube.kubectl(
        "-n", namespace, "create", "--dry-run=server", "-f", "-", check=False, input=json.dumps(manifest)
    )


@pytest.fixture(scope="module")
def bound(kube: Kube) -> Iterator[str]:
    """A namespace, and the policy bound for it only to a ConfigMap of POLICY in it.  One for the
    module: after a binding is deleted, the API server took more than a minute to find the params
    of the next one (a binding deleted while its namespace is being deleted)."""
    namespace = f"t-job-policy-{uuid.uuid4().hex[:5]}"
    kube.create_namespace(namespace)
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "job-policy"}, "data": POLICY}
    kube.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(configmap))
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": f"job-policy-{namespace}"},
        "spec": {
            "policyName": NAME,
            "validationActions": ["Deny"],
            "paramRef": {"name": "job-policy", "namespace": namespace, "parameterNotFoundAction": "Deny"},
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
        },
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(binding))
    # A new binding is in force once the API server's informers have it and its ConfigMap (until
    # then it admits, then refuses for want of params): until a case is refused for its name.
    deadline = time.monotonic() + 60
    while REFUSED[0].words not in (out := _dry_run(kube, namespace, REFUSED[0].manifest("probe"))):
        assert time.monotonic() < deadline, f"the job policy's binding never took effect: {out}"
        time.sleep(0.5)
    yield namespace
    kube.kubectl("delete", "validatingadmissionpolicybinding", f"job-policy-{namespace}", check=False)
    kube.core.delete_namespace(namespace)


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.id)
def test_admission_refuses_what_the_policy_does_not_allow_naming_the_list(
    kube: Kube, bound: str, case: Refused
) -> None:
    out = _dry_run(kube, bound, case.manifest(f"refused-{case.id}"))
    assert "created (server dry run)" not in out, out
    assert f"ValidatingAdmissionPolicy '{NAME}'" in out and case.words in out, out


def test_admission_admits_the_allowed_spec_and_other_namespaces_are_not_bound(
    kube: Kube, bound: str, namespace: str
) -> None:
    """(``namespace`` is another test namespace, without a binding.)"""
    assert "created (server dry run)" in _dry_run(kube, bound, allowed_manifest())
    assert "created (server dry run)" in _dry_run(kube, namespace, REFUSED[0].manifest("free"))
