"""Each validation rule is written once (finetune_api/rules.py): the CRD carries its CEL with its
message, the models enforce its predicate with the same message, and a bad spec breaks each one
(tests/cluster/test_control_plane.py sends the same specs to the apiserver)."""

from __future__ import annotations

from finetune_api import rules
from finetune_api.crd import build_crd
from tests.bad_specs import crd_validations, rule_cases


def test_every_rule_is_in_the_crd_with_its_message_and_no_cel_is_outside_the_table() -> None:
    # The committed CRD is the generated one (test_generated_api_files.py).
    in_crd = {(r["rule"], r["message"]) for r in crd_validations(build_crd())}
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
