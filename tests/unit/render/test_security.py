"""Security: non-root without capabilities, no Kubernetes token, credentials as files."""

from __future__ import annotations

from typing import Any

from finetune_operator.render.security import mount_credentials, restrict_pod
from finetune_operator.render.trainer import pod_spec, trainer_container


def test_the_trainer_runs_as_its_user_without_privileges_or_an_api_token(job: dict[str, Any]) -> None:
    restrict_pod(job, trainer_uid=2000)
    pod = pod_spec(job)
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 2000,
        "runAsGroup": 2000,
        "fsGroup": 2000,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert trainer_container(job)["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    assert "serviceAccountName" not in pod


def test_credentials_arrive_as_files_in_an_optional_volume_never_as_values(job: dict[str, Any]) -> None:
    mount_credentials(job, "hf-token")
    container = trainer_container(job)
    volume = next(v for v in pod_spec(job)["volumes"] if "secret" in v)
    assert volume["secret"] == {"secretName": "hf-token", "defaultMode": 0o440, "optional": True}
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    env = {e["name"]: e for e in container["env"]}
    assert mount == {"name": volume["name"], "mountPath": env["FINETUNE_CREDENTIALS_DIR"]["value"], "readOnly": True}
    assert env["FINETUNE_CREDENTIALS_SECRET"]["value"] == "hf-token"
    assert "envFrom" not in container
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in container["env"])


def test_without_a_credentials_secret_nothing_is_added(job: dict[str, Any]) -> None:
    before = repr(job)
    mount_credentials(job, None)
    mount_credentials(job, "")
    assert repr(job) == before
