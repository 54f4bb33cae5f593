"""Deterministic, valid names for the objects of one FineTuneJob.

A FineTuneJob name may be 253 characters; a Job name and every label value may
be 63.  Long names keep a readable prefix and end in a hash of the full name, so
two long names that share a prefix never collide and the same FineTuneJob always
maps to the same objects (creation stays idempotent across operator restarts).
"""

from __future__ import annotations

import hashlib

LABEL_LIMIT = 63
NAME_LIMIT = 253


def _hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def fit(name: str, limit: int, *, suffix: str = "") -> str:
    """``name + suffix`` if it fits in ``limit``, else a prefix, a hash of the name, and the suffix."""
    if len(name) + len(suffix) <= limit:
        return name + suffix
    keep = limit - len(suffix) - 9
    prefix = name[:keep].rstrip("-.")
    return f"{prefix}-{_hash(name)}{suffix}"


def label_value(name: str) -> str:
    """A label value (63 characters, alphanumeric at both ends) naming the FineTuneJob."""
    return fit(name, LABEL_LIMIT)


def job_name(name: str) -> str:
    # The Job controller copies the Job name into the pods' job-name label.
    return fit(name, LABEL_LIMIT)


def volume_name(claim: str) -> str:
    """A volume name (a DNS label) for a PersistentVolumeClaim.  A claim name may hold dots, a
    volume name may not: such a claim's volume ends in a hash of the claim's name, so that
    ``a.b`` and ``a-b`` get two volumes, not one."""
    if "." not in claim:
        return fit(f"pvc-{claim}", LABEL_LIMIT)
    return fit(f"pvc-{claim.replace('.', '-')}", LABEL_LIMIT, suffix=f"-{_hash(claim)}")
