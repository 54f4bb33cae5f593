"""Where a trainer pod may not connect: a NetworkPolicy beside each Job.

A trainer downloads models and datasets (a hub, an object store, a claim's server) and reports to
the operator, so its egress stays open; but the cloud's metadata service hands whoever asks the
node's credentials, and a tenant's image (or a model's pickled code) could ask.  The policy lets
the job's pods reach every pod of the cluster (DNS, the operator, in-cluster stores) and every
address outside it except the ones denied (``--trainer-egress-deny``: the metadata services by
default).  NodeLocal DNSCache listens on link-local 169.254.20.10, so only the metadata address
itself is denied, not 169.254.0.0/16.

It is created before the Job, owned by the FineTuneJob (deleted with it), and selects the job's
pods by the labels the operator puts on them.  A cluster whose network plugin does not enforce
NetworkPolicies ignores it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from finetune_api.contract import LABEL_JOB_NAME, LABEL_MANAGED_BY, MANAGED_BY
from finetune_operator import names
from finetune_operator.render.trainer import labels_for, owner_reference

# The clouds' instance metadata services (AWS, GCP, Azure, and AWS over IPv6).
DEFAULT_DENIED = ("169.254.169.254/32", "fd00:ec2::254/128")


def parse_denied(text: str, source: str = "--trainer-egress-deny") -> tuple[str, ...]:
    """Comma-separated CIDRs (an address alone is one host) -> normalized CIDRs; ValueError
    naming ``source`` and the bad entry."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            found.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(f"{source}: {part!r} is not an address or CIDR (e.g. 169.254.169.254/32)") from None
    return tuple(found)


def egress_policy(*, name: str, job_name: str, namespace: str, uid: str, denied: Sequence[str]) -> dict[str, Any]:
    """The NetworkPolicy of FineTuneJob ``name``'s pods (named as its Job, ``job_name``)."""
    blocks = []
    for everything in ("0.0.0.0/0", "::/0"):
        whole = ipaddress.ip_network(everything)
        inside = [cidr for cidr in denied if ipaddress.ip_network(cidr).version == whole.version]
        blocks.append({"ipBlock": {"cidr": everything, **({"except": inside} if inside else {})}})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": job_name,
            "namespace": namespace,
            "labels": labels_for(name),
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "podSelector": {"matchLabels": {LABEL_JOB_NAME: names.label_value(name), LABEL_MANAGED_BY: MANAGED_BY}},
            "policyTypes": ["Egress"],
            "egress": [
                # Pods of the cluster: DNS, the operator's progress endpoint, in-cluster stores.
                {"to": [{"namespaceSelector": {}}]},
                {"to": blocks},
            ],
        },
    }
