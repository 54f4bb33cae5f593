"""Credentials reach the trainer as files of the mounted Secret, and it hands them to the
libraries itself: nothing of them is in its environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer import credentials, storage
from tests.trainer.conftest import base_spec, manifest, run_cli

pytestmark = pytest.mark.trainer

SECRETS = {
    "HF_TOKEN": "hf_file_token",
    "AWS_ACCESS_KEY_ID": "AKIAFROMFILE",
    "AWS_SECRET_ACCESS_KEY": "secret-from-file",
    "AWS_DEFAULT_REGION": "eu-west-3",
}


@pytest.fixture
def mounted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Secret as the kubelet mounts it: a file per key (links into a ..data folder)."""
    folder = tmp_path / "credentials"
    data = folder / "..2026_11_25_00_00_00.000000001"
    data.mkdir(parents=True)
    for key, value in SECRETS.items():
        (data / key).write_text(value + "\n")
        (folder / key).symlink_to(Path(data.name) / key)
    (folder / "..data").symlink_to(data.name)
    for key in (*SECRETS, "HUGGING_FACE_HUB_TOKEN", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FINETUNE_CREDENTIALS_DIR", str(folder))
    monkeypatch.setenv("FINETUNE_CREDENTIALS_SECRET", "hf-token")
    return folder


def test_the_hub_token_and_s3_keys_come_from_the_mounted_files(mounted: Path) -> None:
    assert credentials.hf_token() == "hf_file_token"
    fs, _ = storage.ObjectStore(s3_endpoint_url="http://127.0.0.1:9").filesystem("s3://bucket/model")
    assert (fs.key, fs.secret) == ("AKIAFROMFILE", "secret-from-file")
    assert fs.client_kwargs["region_name"] == "eu-west-3"
    credentials.check_mounted()  # keys are there: nothing to say


def test_a_named_secret_that_is_missing_is_bad_input_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path, photos: Path, termination_log: Path
) -> None:
    empty = tmp_path / "credentials"
    empty.mkdir()  # an optional Secret volume of a Secret that does not exist
    monkeypatch.setenv("FINETUNE_CREDENTIALS_DIR", str(empty))
    monkeypatch.setenv("FINETUNE_CREDENTIALS_SECRET", "hf-token")
    job = manifest(tmp_path / "job.yaml", **base_spec(tiny_model, photos, tmp_path / "out"))
    run = run_cli(job, tmp_path / "out", termination_log)
    assert run.code == 2
    assert run.summary["reason"] == "BadInput"
    assert run.summary["message"].startswith("spec.baseModel.credentialsSecret: the Secret hf-token does not exist")
