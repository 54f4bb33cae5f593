"""Credentials for the model hub and object stores.

In a pod they are files: the operator mounts the Secret named by
``spec.baseModel.credentialsSecret`` at ``$FINETUNE_CREDENTIALS_DIR``, one file per key
(``HF_TOKEN``, ``AWS_ACCESS_KEY_ID``, ...), and sets no environment variable from it, since the
environment reaches every child process and many a crash report.  They are read here, where a
library needs them, and handed to it directly.  On a workstation (no such folder) the usual
environment variables are read instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune_api import contract
from finetune_trainer.errors import BadInput

FIELD = "spec.baseModel.credentialsSecret"


def folder() -> Path | None:
    value = os.environ.get(contract.ENV_CREDENTIALS_DIR)
    return Path(value) if value else None


def value(name: str) -> str | None:
    """The credential ``name``: its file in the mounted Secret, else the environment variable."""
    where = folder()
    if where is not None:
        path = where / name
        if path.is_file():
            text = path.read_text().strip()
            if text:
                return text
    return os.environ.get(name) or None


def check_mounted() -> None:
    """A Secret that was named but is missing (or empty) is bad input, said at the start: the
    volume is optional, so the pod starts and this says which Secret to create."""
    where = folder()
    secret = os.environ.get(contract.ENV_CREDENTIALS_SECRET)
    if where is None or not secret:
        return
    # A mounted Secret also holds the kubelet's own entries (..data, ..2026_...): not keys.
    keys = [p for p in where.iterdir() if not p.name.startswith("..")] if where.is_dir() else []
    if not keys:
        raise BadInput(
            f"the Secret {secret} does not exist in the job's namespace or holds no keys: create it "
            f"(kubectl create secret generic {secret} --from-literal=HF_TOKEN=...) and create the FineTuneJob "
            "again, or remove spec.baseModel.credentialsSecret",
            field=FIELD,
        )


def hf_token() -> str | None:
    return value("HF_TOKEN") or value("HUGGING_FACE_HUB_TOKEN")


def filesystem_options(scheme: str) -> dict[str, Any]:
    """fsspec options with the credentials of ``scheme`` (s3, gs), from the files; {} where
    there are none (the library then looks where it always does)."""
    if scheme == "s3":
        options: dict[str, Any] = {}
        for option, name in (
            ("key", "AWS_ACCESS_KEY_ID"),
            ("secret", "AWS_SECRET_ACCESS_KEY"),
            ("token", "AWS_SESSION_TOKEN"),
        ):
            found = value(name)
            if found:
                options[option] = found
        client: dict[str, Any] = {}
        region = value("AWS_DEFAULT_REGION") or value("AWS_REGION")
        if region:
            client["region_name"] = region
        endpoint = value("AWS_ENDPOINT_URL")
        if endpoint:
            client["endpoint_url"] = endpoint
        if client:
            options["client_kwargs"] = client
        return options
    if scheme == "gs":
        where = folder()
        # A service-account key (JSON) stored under this key of the Secret is a file already.
        key = where / "GOOGLE_APPLICATION_CREDENTIALS" if where is not None else None
        if key is not None and key.is_file():
            return {"token": str(key)}
    return {}
