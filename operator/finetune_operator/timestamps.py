"""Kubernetes timestamps: RFC 3339 in UTC, written to the second and read with fractions."""

from __future__ import annotations

import datetime as dt


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(stamp: object) -> dt.datetime | None:
    """A Kubernetes timestamp (``...Z``, fractions allowed), or None when absent or malformed."""
    if not stamp:
        return None
    try:
        return dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
