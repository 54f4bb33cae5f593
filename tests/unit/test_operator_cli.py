"""What ``finetune-operator`` tells a person: every option of ``run`` explained, with the
environment variable that sets it and its default, and ``crd`` printing all there is to install."""

from __future__ import annotations

import argparse
import contextlib
import io
import re

import pytest
import yaml

from finetune_operator import settings
from finetune_operator.cli import build_parser, main


def _run_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["run"]


def test_every_run_option_has_help_with_its_variable_and_default() -> None:
    options = [a for a in _run_parser()._actions if a.option_strings and "--help" not in a.option_strings]
    assert len(options) >= 25
    for action in options:
        text = action.help or ""
        assert len(text) > 20, f"{action.option_strings[0]} has no help"
        assert "default" in text, f"{action.option_strings[0]}: no default in {text!r}"
    for option in settings.OPTIONS:
        # One naming scheme: --report-url is FINETUNE_REPORT_URL.
        if option.env != "KUBECONFIG":
            assert option.env == "FINETUNE_" + option.flag.removeprefix("--").upper().replace("-", "_")
    help_text = _run_parser().format_help()
    for option in settings.OPTIONS:
        assert f"env {option.env}" in " ".join(help_text.split()), option.flag
    assert "`" not in help_text and "**" not in help_text  # no markup


def test_a_variable_sets_an_option_and_a_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_REPORT_URL", "https://operator.example:8081")
    monkeypatch.setenv("FINETUNE_WORKERS", "4")
    args = _run_parser().parse_args([])
    assert (args.report_url, args.workers) == ("https://operator.example:8081", 4)
    assert _run_parser().parse_args(["--workers", "8"]).workers == 8
    # The variable's older name still works where the new one is not set.
    monkeypatch.delenv("FINETUNE_REPORT_URL")
    monkeypatch.setenv("FINETUNE_REPORT_BASE_URL", "https://old.example")
    assert _run_parser().parse_args([]).report_url == "https://old.example"


def test_crd_prints_the_crd_and_the_admission_policy() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["crd"]) == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(out.getvalue()) if d]
    assert kinds == [
        "CustomResourceDefinition",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ValidatingAdmissionPolicy",  # the job policy's, bound by the chart
    ]


def test_namespaces_are_names_for_both_watches_never_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = settings.from_arguments(_run_parser().parse_args(["--namespace", "team-a", "-n", "team-b"]))
    assert chosen.namespaces == ("team-a", "team-b")
    monkeypatch.setenv("FINETUNE_WATCH_NAMESPACES", "team-a, team-c")
    assert settings.from_arguments(_run_parser().parse_args([])).namespaces == ("team-a", "team-c")
    # kopf would list every namespace to match a pattern; the Job and Pod watches would widen
    # to the whole cluster: refused, naming the pattern and what to write instead.
    for pattern in ("team-*", "!kube-system", "Team-A"):
        with pytest.raises(SystemExit, match=re.escape(f"--namespace takes namespace names, not '{pattern}'")):
            settings.from_arguments(_run_parser().parse_args(["--namespace", pattern]))


def test_job_limits_are_numbers_and_quantities() -> None:
    chosen = settings.from_arguments(
        _run_parser().parse_args(["--max-gpus-per-job", "4", "--max-memory-per-job", "128Gi"])
    )
    assert (chosen.max_gpus_per_job, chosen.max_memory_per_job) == (4, "128Gi")
    with pytest.raises(SystemExit, match="--max-memory-per-job must be a quantity such as 64Gi, not 'lots'"):
        settings.from_arguments(_run_parser().parse_args(["--max-memory-per-job", "lots"]))


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--web-tls"], "--web-tls serves the page with the progress endpoint's certificate"),
        (["--placement-profiles", "a100=gpu"], "--placement-profiles is not JSON"),
        (["--trainer-egress-deny", "metadata"], "--trainer-egress-deny: 'metadata' is not an address or CIDR"),
    ],
)
def test_a_setting_that_cannot_work_stops_the_operator_naming_the_flag(args: list[str], complaint: str) -> None:
    with pytest.raises(SystemExit, match=re.escape(complaint)):
        settings.from_arguments(_run_parser().parse_args(args))
