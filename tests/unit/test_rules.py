"""Each validation rule is written once (finetune_api/rules.py): the CRD carries its CEL with its
message, the models enforce its predicate with the same message, and a bad spec breaks each one
(tests/cluster/test_control_plane.py sends the same specs to the apiserver)."""

from __future__ import annotations

from typing import Any

import yaml

from finetune_api import rules
from tests.bad_specs import rule_cases

ROOT_CRD = "crds/finetunejobs.finetune.dev.yaml"


def _cel_in(schema: Any) -> list[dict[str, str]]:
    found: list[dict[str, str]] = []
    if isinstance(schema, dict):
        found += schema.get("x-kubernetes-validations", [])
        for value in schema.values():
            found += _cel_in(value)
    elif isinstance(schema, list):
        for value in schema:
            found += _cel_in(value)
    return found


def test_every_rule_is_in_the_crd_with_its_message_and_no_cel_is_outside_the_table() -> None:
    from pathlib import Path

    crd = yaml.safe_load((Path(__file__).resolve().parents[2] / ROOT_CRD).read_text())
    in_crd = {(r["rule"], r["message"]) for r in _cel_in(crd)}
    in_table = {(r.cel, r.message) for table in rules.TABLES.values() for r in table}
    assert in_crd == in_table


def test_every_rule_is_broken_by_a_bad_spec_and_refused_with_its_message() -> None:
    covered = {id(rule) for rule, _ in rule_cases()}
    missing = [r.message for table in rules.TABLES.values() for r in table if id(r) not in covered]
    assert missing == []


def test_a_fields_rule_gets_no_value_when_the_field_is_absent_and_shows_a_bad_one() -> None:
    assert rules.enforce(None, rules.URI) is None
    try:
        rules.enforce("ftp://x", rules.URI, show_value=True)
    except ValueError as refused:
        assert str(refused) == f"{rules.URI[0].message}; got 'ftp://x'"
    else:
        raise AssertionError("ftp:// was accepted")
