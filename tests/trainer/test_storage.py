"""Inputs from object storage (an S3-compatible server on loopback), and writes that are atomic."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_operator.api.report import ExitCode
from finetune_trainer import storage
from tests.trainer.conftest import base_spec, manifest, run_cli

pytestmark = pytest.mark.trainer


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }.items():
        monkeypatch.setenv(key, value)
    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("bucket")
    yield fs
    fsspec.filesystem("s3").clear_instance_cache()
    server.stop()


def test_a_job_reads_its_model_and_photos_from_s3(
    s3: object, tiny_model: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put(f"{tiny_model}/", "bucket/models/tiny/", recursive=True)  # type: ignore[attr-defined]
    s3.put(f"{photos}/", "bucket/photos/", recursive=True)  # type: ignore[attr-defined]
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    spec = base_spec(tiny_model, photos, tmp_path / "out")
    spec["baseModel"]["uri"] = "s3://bucket/models/tiny/"
    spec["dataset"]["instanceImages"] = "s3://bucket/photos/"
    run = run_cli(manifest(tmp_path / "job.yaml", **spec), tmp_path / "out", tmp_path / "termination-log")
    assert run.code == ExitCode.SUCCESS, run.summary
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3  # unet, vae, text encoder

    spec["dataset"]["instanceImages"] = "s3://bucket/nobody/"
    run = run_cli(manifest(tmp_path / "job.yaml", **spec), tmp_path / "out2", tmp_path / "termination-log")
    assert run.code == ExitCode.BAD_INPUT
    assert run.summary["message"] == "spec.dataset.instanceImages: s3://bucket/nobody/ does not exist"


def test_atomic_path_replaces_a_folder_only_when_the_new_one_is_complete(tmp_path: Path) -> None:
    final = tmp_path / "diffusers"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), storage.atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("crashed while writing")
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["diffusers"]
    with storage.atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("whole")
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["diffusers"]
