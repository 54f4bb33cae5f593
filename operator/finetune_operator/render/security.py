"""Security: what the trainer may do.  It runs as a fixed non-root user with no capabilities,
talks to no Kubernetes API (progress goes to the operator), and gets the user's credentials as
files, never as environment variables, which reach every child process and many a crash report."""

from __future__ import annotations

from finetune_api.contract import CREDENTIALS_DIR, ENV_CREDENTIALS_DIR, ENV_CREDENTIALS_SECRET
from finetune_operator.render.trainer import Manifest, pod_spec, trainer_container

CREDENTIALS_VOLUME = "credentials"


def restrict_pod(job: Manifest, *, trainer_uid: int) -> None:
    """``trainer_uid``: the user the trainer image is built for, which owns its caches."""
    pod = pod_spec(job)
    # Trainer pods talk to no Kubernetes API: progress goes to the operator.
    pod["automountServiceAccountToken"] = False
    pod["enableServiceLinks"] = False
    pod["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": trainer_uid,
        "runAsGroup": trainer_uid,
        "fsGroup": trainer_uid,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # A read-only root: everything the trainer writes goes to its volumes (/cache, /tmp, /dev/shm,
    # the output), which the image's environment points every library's cache at.
    trainer_container(job)["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }


def mount_credentials(job: Manifest, secret: str | None) -> None:
    """spec.baseModel.credentialsSecret, one file per key, and where the trainer finds them."""
    if not secret:
        return
    container = trainer_container(job)
    container["env"] += [
        {"name": ENV_CREDENTIALS_DIR, "value": CREDENTIALS_DIR},
        {"name": ENV_CREDENTIALS_SECRET, "value": secret},
    ]
    # Optional: a missing Secret leaves the folder empty, and the trainer says so (bad input,
    # naming spec.baseModel.credentialsSecret) instead of the pod waiting without a word.
    pod_spec(job)["volumes"].append(
        {"name": CREDENTIALS_VOLUME, "secret": {"secretName": secret, "defaultMode": 0o440, "optional": True}}
    )
    container["volumeMounts"].append({"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_DIR, "readOnly": True})
