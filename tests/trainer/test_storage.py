"""Object storage against an S3-compatible server on loopback (moto's server mode: the real S3
wire protocol, multipart uploads included, started in-process in a second), and writes that
are atomic.  gs:// shares every step but the client: the generic upload steps run here on an
in-memory fsspec store, and a gs:// output is checked to reach gcsfs."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from finetune_api.report import ExitCode
from finetune_trainer import outputs, storage
from finetune_trainer.errors import BadInput
from tests.trainer.conftest import base_spec, manifest, run_cli, run_script

pytestmark = pytest.mark.trainer

PART_BYTES = 1 << 20  # small parts, so that the tiny model's files go up in several


@dataclass
class S3:
    fs: Any
    endpoint: str

    def sha256(self, key: str) -> str:
        return hashlib.sha256(self.fs.cat_file(key)).hexdigest()

    def final_keys(self, prefix: str) -> list[str]:
        self.fs.invalidate_cache()
        return [k for k in self.fs.find(prefix) if not any(p.startswith(".tmp-") for p in k.split("/"))]

    def temporary_keys(self, prefix: str) -> list[str]:
        self.fs.invalidate_cache()
        return [k for k in self.fs.find(prefix) if any(p.startswith(".tmp-") for p in k.split("/"))]

    def unfinished_uploads(self) -> list[str]:
        return [u["Key"] for u in self.fs.call_s3("list_multipart_uploads", Bucket="bucket").get("Uploads", [])]


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    import fsspec
    import moto.s3.models
    from moto.server import ThreadedMotoServer

    # S3 wants parts of 5 MiB but the last; the tiny model's files are smaller than that.
    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 256 * 1024)
    monkeypatch.setattr(outputs, "UPLOAD_CHUNK_BYTES", PART_BYTES)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    # The endpoint comes from spec.storage.s3EndpointUrl, not from the environment.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets per process, not per server: start from an empty store.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).read()
    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=endpoint)
    fs.mkdir("bucket")
    try:
        yield S3(fs=fs, endpoint=endpoint)
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
        server.stop()


def _s3_spec(s3: S3, tiny_model: Path, photos: Path, **training: Any) -> dict[str, Any]:
    s3.fs.put(f"{tiny_model}/", "bucket/models/tiny/", recursive=True)
    s3.fs.put(f"{photos}/", "bucket/photos/", recursive=True)
    spec = base_spec(tiny_model, photos, Path("/unused"), **training)
    spec["baseModel"]["uri"] = "s3://bucket/models/tiny/"
    spec["dataset"]["instanceImages"] = "s3://bucket/photos/"
    spec["output"]["uri"] = "s3://bucket/out/"
    spec["storage"] = {"s3EndpointUrl": s3.endpoint}
    return spec


def _bucket_matches_its_manifest(s3: S3) -> dict[str, Any]:
    s3.fs.invalidate_cache()
    listed = json.loads(s3.fs.cat_file("bucket/out/manifest.json"))
    for entry in listed["files"]:
        key = f"bucket/out/{entry['path']}"
        assert s3.fs.info(key)["size"] == entry["sizeBytes"], key
        assert s3.sha256(key) == entry["sha256"], key
    assert s3.temporary_keys("bucket/out") == []
    assert s3.unfinished_uploads() == []
    return listed


def test_a_job_reads_its_model_and_photos_from_s3(
    s3: S3, tiny_model: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    spec = _s3_spec(s3, tiny_model, photos)
    spec["output"]["uri"] = str(tmp_path / "out")
    run = run_cli(manifest(tmp_path / "job.yaml", **spec), tmp_path / "out", tmp_path / "termination-log")
    assert run.code == ExitCode.SUCCESS, run.summary
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3  # unet, vae, text encoder

    spec["dataset"]["instanceImages"] = "s3://bucket/nobody/"
    run = run_cli(manifest(tmp_path / "job.yaml", **spec), tmp_path / "out2", tmp_path / "termination-log")
    assert run.code == ExitCode.BAD_INPUT
    assert run.summary["message"] == "spec.dataset.instanceImages: s3://bucket/nobody/ does not exist"


def test_a_run_with_everything_in_s3_ends_with_every_file_in_the_bucket(
    s3: S3, tiny_model: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs.core

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    parts: list[tuple[str, int]] = []
    real_call = s3fs.core.S3FileSystem._call_s3

    async def spy(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part":
            parts.append((kwargs["Key"], kwargs["PartNumber"]))
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", spy)
    spec = _s3_spec(s3, tiny_model, photos, maxSteps=4)
    # Prior preservation with one class image in the bucket; the second is generated.
    s3.fs.put_file(str(photos / "subject-00.png"), "bucket/class/ball.png")
    spec["dataset"].update(
        classPrompt="a photo of a ball", priorPreservation=True, numClassImages=2, classImages="s3://bucket/class/"
    )
    spec["checkpoints"] = {"everySteps": 2, "keepLast": 1}
    spec["samples"] = {"prompts": ["a photo of sks ball"], "everySteps": 2, "numInferenceSteps": 2}
    run = run_cli(manifest(tmp_path / "job.yaml", name="s3job", **spec), tmp_path, tmp_path / "termination-log")
    assert run.code == ExitCode.SUCCESS, run.summary

    listed = _bucket_matches_its_manifest(s3)
    names = {f["path"] for f in listed["files"]}
    assert {"s3job.safetensors", "diffusers/unet/diffusion_pytorch_model.safetensors", "loss.png"} <= names
    # The UNet (3 MiB) went up in 1 MiB parts, under a temporary key.
    unet_parts = sorted(n for key, n in parts if key.startswith("out/diffusers/unet/.tmp-diffusion_pytorch_model"))
    assert unet_parts == [1, 2, 3, 4]
    # Reports name the bucket, not the staging folder.
    summary = run.summary
    assert summary["outputUri"] == "s3://bucket/out"
    assert {f["path"] for f in summary["files"]} == names | {"manifest.json"}
    assert [c["uri"] for c in summary["checkpoints"]] == ["s3://bucket/out/checkpoints/checkpoint-000004"]
    assert summary["samples"] == [f"s3://bucket/out/samples/step-00000{s}-0.png" for s in (2, 4)]
    for uri in summary["samples"]:
        assert s3.fs.isfile(uri)
    # keepLast 1 in the bucket too; the kept checkpoint is complete.
    assert s3.fs.ls("bucket/out/checkpoints", detail=False) == ["bucket/out/checkpoints/checkpoint-000004"]
    assert s3.fs.isfile("bucket/out/checkpoints/checkpoint-000004/trainer_state.json")
    # The generated class image went to the output (for a retry elsewhere), not to the input folder.
    assert s3.final_keys("bucket/class") == ["bucket/class/ball.png"]
    assert s3.final_keys("bucket/out/class_images") == ["bucket/out/class_images/class-00000.png"]


# Runs the trainer's command line, but dies by SIGKILL while the second part of the exported
# UNet is on its way to the server: a multipart upload is open, nothing is complete.
KILL_DURING_UPLOAD = """
import os, signal, sys
import s3fs.core
from finetune_trainer import cli, outputs

outputs.UPLOAD_CHUNK_BYTES = int(sys.argv.pop(1))
real = s3fs.core.S3FileSystem._call_s3

async def call(self, method, *args, **kwargs):
    if method == "upload_part" and "diffusers/unet/" in kwargs.get("Key", "") and kwargs.get("PartNumber") == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return await real(self, method, *args, **kwargs)

s3fs.core.S3FileSystem._call_s3 = call
sys.exit(cli.main(sys.argv[1:]))
"""


def test_an_upload_killed_midway_leaves_no_object_under_a_final_name_and_a_rerun_completes_it(
    s3: S3, tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    spec = _s3_spec(s3, tiny_model, photos, maxSteps=2)
    job = manifest(tmp_path / "job.yaml", name="s3job", **spec)
    first_cache = tmp_path / "cache-1"
    killed = run_script(
        KILL_DURING_UPLOAD, [str(PART_BYTES), "run", str(job)], tmp_path, FINETUNE_CACHE_DIR=str(first_cache)
    )
    assert killed.returncode == -9, killed.stderr[-2000:]

    unet = "bucket/out/diffusers/unet/diffusion_pytorch_model.safetensors"
    assert any(".tmp-diffusion_pytorch_model.safetensors" in key for key in s3.unfinished_uploads())
    final = s3.final_keys("bucket/out")
    assert unet not in final
    assert "bucket/out/manifest.json" not in final
    assert "bucket/out/checkpoints/checkpoint-000002/trainer_state.json" in final  # uploaded before the exports
    # Whatever is under a final name is whole: the very bytes the trainer wrote.  (The owner
    # record and the lock of the killed writer live in the bucket only.)
    (staging,) = (first_cache / "outputs").iterdir()
    markers = {"bucket/out/.finetune-owner.json", "bucket/out/.finetune-lock.json"}
    assert markers <= set(final)
    for key in set(final) - markers:
        assert s3.sha256(key) == storage.sha256_file(staging / key.removeprefix("bucket/out/")), key

    # A retry in a new pod (an empty cache): resumes from the uploaded checkpoint, finishes.
    rerun = run_cli(job, tmp_path, tmp_path / "termination-log", FINETUNE_CACHE_DIR=str(tmp_path / "cache-2"))
    assert rerun.code == ExitCode.SUCCESS, rerun.summary
    assert "training" not in {e["stage"] for e in rerun.events()}
    listed = _bucket_matches_its_manifest(s3)  # every file whole; temporaries and open uploads gone
    assert "diffusers/unet/diffusion_pytorch_model.safetensors" in {f["path"] for f in listed["files"]}


def test_downloads_are_cached_by_content(s3: S3, photos: Path, tmp_path: Path) -> None:
    s3.fs.put(f"{photos}/", "bucket/photos/", recursive=True)
    store = storage.ObjectStore(s3_endpoint_url=s3.endpoint)
    field = "spec.dataset.instanceImages"
    first = storage.fetch("s3://bucket/photos/", field=field, cache_dir=tmp_path, store=store)
    assert first is not None
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in photos.iterdir())
    marker = first / "subject-00.png"
    stamp = marker.stat().st_mtime_ns
    again = storage.fetch("s3://bucket/photos/", field=field, cache_dir=tmp_path, store=store)
    assert again == first
    assert marker.stat().st_mtime_ns == stamp  # not downloaded again

    s3.fs.pipe("bucket/photos/subject-00.png", (photos / "subject-01.jpg").read_bytes())
    changed = storage.fetch("s3://bucket/photos/", field=field, cache_dir=tmp_path, store=store)
    assert changed is not None
    assert changed != first
    assert (changed / "subject-00.png").read_bytes() == (photos / "subject-01.jpg").read_bytes()

    # One file (a single-file checkpoint, say) is cached the same way.
    single = storage.fetch("s3://bucket/photos/subject-02.png", field=field, cache_dir=tmp_path, store=store)
    assert single is not None
    assert single.name == "subject-02.png"
    assert single.read_bytes() == (photos / "subject-02.png").read_bytes()


# --- the upload steps on any fsspec store -----------------------------------------------------------


class MemoryStore(storage.ObjectStore):
    """An in-memory fsspec store whose put_file can be made to fail or corrupt."""

    def __init__(self, put: Any = None) -> None:
        super().__init__()
        object.__setattr__(self, "put", put)

    def filesystem(self, uri: str) -> tuple[Any, str]:
        import fsspec

        fs = fsspec.filesystem("memory", skip_instance_cache=True)
        if self.put is not None:
            real = fs.put_file
            fs.put_file = lambda local, key, **kwargs: self.put(real, local, key)
        return fs, uri.removeprefix("memory://")


@pytest.fixture
def memory_root() -> Iterator[str]:
    import uuid

    import fsspec

    root = f"/uploads-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _keys(fs: Any, root: str) -> list[str]:
    return sorted(k.rsplit("/", 1)[-1] for k in fs.find(root))


def test_a_failed_upload_is_retried_with_backoff(tmp_path: Path, memory_root: str) -> None:
    local = tmp_path / "model.safetensors"
    local.write_bytes(b"weights" * 1000)
    failures = []

    def flaky(real: Any, local_path: str, key: str) -> None:
        if len(failures) < 2:
            failures.append(key)
            raise ConnectionError("connection reset by peer")
        real(local_path, key)

    sleeps: list[float] = []
    folder = outputs.RemoteFolder(f"memory://{memory_root}", MemoryStore(flaky), sleep=sleeps.append)
    folder.upload(local, "model.safetensors", sha256=storage.sha256_file(local))
    assert sleeps == [1.0, 2.0]
    assert all(".tmp-model.safetensors." in key for key in failures)
    assert folder.fs.cat_file(f"{memory_root}/model.safetensors") == local.read_bytes()
    assert _keys(folder.fs, memory_root) == ["model.safetensors"]


def test_an_upload_that_does_not_read_back_whole_never_gets_its_final_name(tmp_path: Path, memory_root: str) -> None:
    local = tmp_path / "model.safetensors"
    local.write_bytes(b"weights" * 1000)

    def truncating(real: Any, local_path: str, key: str) -> None:
        half = tmp_path / "half"
        half.write_bytes(Path(local_path).read_bytes()[:3000])
        real(str(half), key)

    sleeps: list[float] = []
    folder = outputs.RemoteFolder(f"memory://{memory_root}", MemoryStore(truncating), sleep=sleeps.append)
    with pytest.raises(outputs.UploadFailed, match=r"after 5 attempts: OSError: read back with SHA-256"):
        folder.upload(local, "model.safetensors", sha256=storage.sha256_file(local))
    assert sleeps == [1.0, 2.0, 4.0, 8.0]
    assert not folder.fs.exists(memory_root) or _keys(folder.fs, memory_root) == []


def test_a_refused_upload_is_bad_input_naming_the_output(tmp_path: Path, memory_root: str) -> None:
    local = tmp_path / "manifest.json"
    local.write_text("{}")

    def refused(real: Any, local_path: str, key: str) -> None:
        raise PermissionError("Access Denied")

    folder = outputs.RemoteFolder(f"memory://{memory_root}", MemoryStore(refused), sleep=lambda s: None)
    with pytest.raises(BadInput, match=r"^spec\.output\.uri: cannot write memory://.*/manifest\.json"):
        folder.upload(local, "manifest.json", sha256=storage.sha256_file(local))


def test_a_gs_output_is_staged_locally_and_uploaded_with_gcsfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No GCS server here: what runs is everything up to the first request.  A service-account
    key made here keeps google-auth from probing for a metadata server."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    credentials = tmp_path / "key.json"
    credentials.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test",
                "private_key_id": "1",
                "private_key": pem,
                "client_email": "trainer@test.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
    output = outputs.Output("gs://bucket/runs/nick/", cache_dir=tmp_path, store=storage.ObjectStore())
    assert output.remote is not None
    assert type(output.remote.fs).__module__.startswith("gcsfs")
    assert output.remote.root == "bucket/runs/nick"
    assert output.local.parent == tmp_path / "outputs"
    assert output.location() == "gs://bucket/runs/nick"
    assert (
        output.uri_of(output.local / "samples" / "step-000100-0.png")
        == "gs://bucket/runs/nick/samples/step-000100-0.png"
    )


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


class _Listing:
    """An object store of a few keys (fsspec's calls that fetch makes), whatever the keys hold."""

    def __init__(self, root: str, keys: dict[str, bytes]) -> None:
        self.root, self.keys = root, keys

    def isdir(self, path: str) -> bool:
        return path == self.root

    def isfile(self, path: str) -> bool:
        return False

    def find(self, path: str, detail: bool = False) -> dict[str, dict[str, Any]]:
        return {f"{self.root}/{key}": {"type": "file", "size": len(data)} for key, data in self.keys.items()}

    def get_file(self, remote: str, local: str) -> None:
        Path(local).write_bytes(self.keys[remote.removeprefix(self.root + "/")])


class _ListingStore(storage.ObjectStore):
    def __init__(self, fs: _Listing) -> None:
        super().__init__()
        object.__setattr__(self, "fs", fs)

    def filesystem(self, uri: str) -> tuple[Any, str]:
        return self.fs, self.fs.root


def test_an_objects_key_with_dot_dot_is_refused_not_written_outside_the_download(tmp_path: Path) -> None:
    fs = _Listing("bucket/photos", {"a.png": b"a", "x/../../../../escaped.txt": b"pwned"})
    with pytest.raises(BadInput, match=r"'x/\.\./\.\./\.\./\.\./escaped\.txt' would be written outside"):
        storage.fetch("s3://bucket/photos/", field="spec.dataset.instanceImages", cache_dir=tmp_path / "cache",
                      store=_ListingStore(fs))  # fmt: skip
    assert not [p for p in tmp_path.rglob("escaped.txt")]
    assert not (tmp_path / "escaped.txt").exists()
    # Keys that only look odd are fine.
    fs.keys = {"a.png": b"a", "b..c.png": b"b"}
    fetched = storage.fetch("s3://bucket/photos/", field="f", cache_dir=tmp_path / "cache", store=_ListingStore(fs))
    assert fetched is not None and sorted(p.name for p in fetched.iterdir()) == ["a.png", "b..c.png"]
