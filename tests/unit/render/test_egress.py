"""The NetworkPolicy beside each Job: what its pods may not reach, and which pods it holds."""

from __future__ import annotations

import pytest

from finetune_api.contract import LABEL_JOB_NAME
from finetune_operator import names
from finetune_operator.render.egress import DEFAULT_DENIED, egress_policy, parse_denied
from finetune_operator.render.trainer import labels_for


def test_the_metadata_services_are_denied_and_every_other_address_and_pod_allowed() -> None:
    policy = egress_policy(name="nick", job_name="nick", namespace="team", uid="u1", denied=DEFAULT_DENIED)
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Egress"]
    assert spec["egress"] == [
        {"to": [{"namespaceSelector": {}}]},
        {
            "to": [
                {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}},
                {"ipBlock": {"cidr": "::/0", "except": ["fd00:ec2::254/128"]}},
            ]
        },
    ]
    # It holds the job's pods (labels the operator sets on them), and goes with the FineTuneJob.
    assert spec["podSelector"]["matchLabels"].items() <= labels_for("nick").items()
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "u1"
    # NodeLocal DNSCache's link-local address stays reachable.
    assert "169.254.0.0/16" not in str(spec)


def test_a_long_name_selects_its_pods_by_the_label_they_carry() -> None:
    name = "a" * 200
    policy = egress_policy(name=name, job_name="short", namespace="team", uid="u1", denied=["10.0.0.0/8"])
    assert policy["spec"]["podSelector"]["matchLabels"][LABEL_JOB_NAME] == names.label_value(name)
    assert policy["metadata"]["name"] == "short"
    assert policy["spec"]["egress"][1]["to"][1] == {"ipBlock": {"cidr": "::/0"}}


def test_the_flag_takes_cidrs_and_addresses_and_names_a_bad_one() -> None:
    assert parse_denied(" 169.254.169.254, fd00:ec2::254/128,,10.1.2.3/8") == (
        "169.254.169.254/32",
        "fd00:ec2::254/128",
        "10.0.0.0/8",
    )
    assert parse_denied("") == ()
    with pytest.raises(ValueError, match=r"--trainer-egress-deny: 'metadata' is not an address or CIDR"):
        parse_denied("metadata")
