"""The pod the operator renders and what the trainer reads by default agree (the pod contract)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from finetune_api import contract, parse_manifest
from finetune_operator.render import render
from finetune_trainer import report
from tests.bad_specs import good_manifest

ROOT = Path(__file__).resolve().parents[2]


def _pod() -> dict[str, Any]:
    body = good_manifest()
    body["metadata"] = {"name": "nick", "namespace": "team-a", "uid": "u-1"}
    rendered = render(body, parse_manifest(body), trainer_image="t:1", report_base_url="https://op:8081", report_ca="X")
    return rendered.job["spec"]["template"]


def _mount_of(container: dict[str, Any], pod: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume a file path lies in, and the path inside that volume."""
    for mount in container["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
            return volume, path[len(prefix) :]
    raise AssertionError(f"nothing is mounted where {path} lies")


def test_the_trainer_finds_its_token_ca_job_file_and_termination_log_where_the_pod_puts_them() -> None:
    pod = _pod()
    container = pod["spec"]["containers"][0]
    assert container["name"] == contract.CONTAINER_NAME
    env = {e["name"]: e for e in container["env"]}

    # The token: the trainer's default path (used when the variable is unset) is the mounted one.
    assert env[contract.ENV_REPORT_TOKEN_FILE]["value"] == report.DEFAULT_TOKEN_FILE
    volume, inner = _mount_of(container, pod, report.DEFAULT_TOKEN_FILE)
    token_sources = [s["serviceAccountToken"] for s in volume["projected"]["sources"] if "serviceAccountToken" in s]
    assert [s["path"] for s in token_sources] == [inner]
    assert token_sources[0]["audience"] == contract.REPORT_AUDIENCE

    # The CA bundle the trainer verifies the operator with.
    volume, inner = _mount_of(container, pod, env[contract.ENV_REPORT_CA_FILE]["value"])
    ca_items = [i for s in volume["projected"]["sources"] if "downwardAPI" in s for i in s["downwardAPI"]["items"]]
    assert [i["path"] for i in ca_items] == [inner]

    # The job file: the container command reads the file the downward API writes.
    assert container["command"] == contract.trainer_command()
    job_file = container["command"][-1]
    volume, inner = _mount_of(container, pod, job_file)
    assert [i["path"] for i in volume["downwardAPI"]["items"]] == [inner]
    annotation = volume["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"]
    assert contract.ANNOTATION_JOB_FILE in annotation
    assert contract.ANNOTATION_JOB_FILE in pod["metadata"]["annotations"]

    # The termination message the operator falls back to is where the trainer writes it.
    assert container["terminationMessagePath"] == report.DEFAULT_TERMINATION_LOG
    assert env[contract.ENV_TERMINATION_LOG]["value"] == report.DEFAULT_TERMINATION_LOG
    assert env[contract.ENV_REPORT_URL]["value"].endswith(contract.report_path("team-a", "nick"))


def test_every_variable_the_operator_sets_for_the_trainer_is_one_the_trainer_reads() -> None:
    read: set[str] = set()
    for path in (ROOT / "trainer-image" / "finetune_trainer").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "contract"
                and node.attr.startswith("ENV_")
            ):
                read.add(getattr(contract, node.attr))
    container = _pod()["spec"]["containers"][0]
    ours = {e["name"] for e in container["env"] if e["name"].startswith("FINETUNE_")}
    # FINETUNE_JOB names the job in the pod's environment for people reading it (kubectl exec, logs).
    assert ours - read == {contract.ENV_JOB}
