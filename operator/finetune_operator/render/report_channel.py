"""The report channel: how the trainer tells the operator what happens.

Progress is pushed to the operator's report URL with a service-account token projected for the
operator's audience and bound to the pod (short-lived, rotated by the kubelet, nothing stored);
the operator checks it with a TokenReview.  The final summary also goes to the termination
message, the fallback when the last push was lost.  With a private CA the bundle comes in the
same projected volume, from a pod-template annotation.
"""

from __future__ import annotations

from finetune_api.contract import (
    ANNOTATION_REPORT_CA,
    CA_FILE,
    ENV_REPORT_CA_FILE,
    ENV_REPORT_TOKEN_FILE,
    ENV_REPORT_URL,
    ENV_TERMINATION_LOG,
    TERMINATION_LOG,
    TOKEN_DIR,
    TOKEN_FILE,
    TOKEN_SECONDS,
    report_path,
)
from finetune_operator.render.trainer import Manifest, pod_spec, trainer_container

REPORT_VOLUME = "report-token"


def report_url(base: str, namespace: str, name: str) -> str:
    return f"{base.rstrip('/')}{report_path(namespace, name)}" if base else ""


def add_report_channel(job: Manifest, *, namespace: str, name: str, base_url: str, audience: str, ca: str) -> None:
    """``base_url`` empty: no URL for the trainer, which then reports through its termination
    message only.  ``ca`` empty: the operator's certificate is one the image already trusts."""
    container = trainer_container(job)
    env = container["env"]
    url = report_url(base_url, namespace, name)
    if url:
        env.append({"name": ENV_REPORT_URL, "value": url})
    env += [
        {"name": ENV_REPORT_TOKEN_FILE, "value": TOKEN_FILE},
        {"name": ENV_TERMINATION_LOG, "value": TERMINATION_LOG},
    ]
    sources: list[Manifest] = [
        {"serviceAccountToken": {"audience": audience, "expirationSeconds": TOKEN_SECONDS, "path": "token"}}
    ]
    if ca:
        job["spec"]["template"]["metadata"]["annotations"][ANNOTATION_REPORT_CA] = ca
        sources.append(
            {
                "downwardAPI": {
                    "items": [
                        {"path": "ca.crt", "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_REPORT_CA}']"}}
                    ]
                }
            }
        )
        env.append({"name": ENV_REPORT_CA_FILE, "value": CA_FILE})
    pod_spec(job)["volumes"].append({"name": REPORT_VOLUME, "projected": {"sources": sources, "defaultMode": 0o444}})
    container["volumeMounts"].append({"name": REPORT_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
    container["terminationMessagePath"] = TERMINATION_LOG
    # The logs' tail when the trainer died before writing its summary (killed, out of memory).
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
