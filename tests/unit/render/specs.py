"""FineTuneJob specs for the builders' tests: the good spec with a change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune_api import parse_manifest
from finetune_api.v1alpha1 import FineTuneJob
from tests.bad_specs import good_manifest


def parsed(change: Callable[[dict[str, Any]], None] | None = None) -> FineTuneJob:
    manifest = good_manifest()
    if change is not None:
        change(manifest["spec"])
    return parse_manifest(manifest)


def with_fields(section: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        spec.setdefault(section, {}).update(fields)

    return change
