"""The report channel: URL, audience-bound token, CA and termination message of the trainer."""

from __future__ import annotations

from typing import Any

from finetune_api.contract import ANNOTATION_REPORT_CA, TOKEN_SECONDS
from finetune_operator.render.report_channel import add_report_channel, report_url
from finetune_operator.render.trainer import pod_spec, trainer_container

CA = "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"


def _add(job: dict[str, Any], *, base_url: str = "https://op.svc:8443", ca: str = "") -> dict[str, Any]:
    add_report_channel(job, namespace="team-a", name="nick", base_url=base_url, audience="finetune-operator", ca=ca)
    return {e["name"]: e.get("value") for e in trainer_container(job)["env"]}


def _volume_at(job: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    for mount in trainer_container(job)["volumeMounts"]:
        if path.startswith(mount["mountPath"] + "/"):
            volume = next(v for v in pod_spec(job)["volumes"] if v["name"] == mount["name"])
            return volume, path[len(mount["mountPath"]) + 1 :]
    raise AssertionError(f"nothing mounted at {path}")


def test_each_job_reports_to_its_own_url_with_a_token_for_the_operators_audience(job: dict[str, Any]) -> None:
    env = _add(job)
    assert env["FINETUNE_REPORT_URL"] == "https://op.svc:8443/v1alpha1/namespaces/team-a/finetunejobs/nick/progress"
    volume, inner = _volume_at(job, env["FINETUNE_REPORT_TOKEN_FILE"])
    [source] = volume["projected"]["sources"]
    assert source["serviceAccountToken"] == {
        "audience": "finetune-operator",
        "expirationSeconds": TOKEN_SECONDS,
        "path": inner,
    }
    assert "FINETUNE_REPORT_CA_FILE" not in env
    assert ANNOTATION_REPORT_CA not in job["spec"]["template"]["metadata"]["annotations"]


def test_without_a_report_url_the_trainer_has_its_termination_message_only(job: dict[str, Any]) -> None:
    env = _add(job, base_url="")
    assert "FINETUNE_REPORT_URL" not in env
    container = trainer_container(job)
    assert env["FINETUNE_TERMINATION_LOG"] == container["terminationMessagePath"]
    # A trainer killed before its summary still leaves the tail of its logs on the pod.
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_a_private_ca_travels_as_an_annotation_into_the_token_volume(job: dict[str, Any]) -> None:
    env = _add(job, ca=CA)
    assert job["spec"]["template"]["metadata"]["annotations"][ANNOTATION_REPORT_CA] == CA
    volume, inner = _volume_at(job, env["FINETUNE_REPORT_CA_FILE"])
    [item] = [i for s in volume["projected"]["sources"] if "downwardAPI" in s for i in s["downwardAPI"]["items"]]
    assert item == {"path": inner, "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_REPORT_CA}']"}}


def test_report_url_joins_without_a_double_slash_and_is_empty_without_a_base() -> None:
    assert report_url("http://op:8081/", "a", "b") == "http://op:8081/v1alpha1/namespaces/a/finetunejobs/b/progress"
    assert report_url("", "a", "b") == ""
