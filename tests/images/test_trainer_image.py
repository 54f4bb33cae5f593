"""The trainer image runs the demo's FineTuneJob as the pod the operator renders for it.

The pod spec comes from the operator's own render() of examples/demo.yaml, and tests/images/pod.py
runs it with podman as a kubelet would: uid/gid 1000 with fsGroup 1000, a read-only root, no
capabilities, no new privileges, the job file from the downward API, a projected token, /cache and
/tmp as empty folders, /dev/shm at the size the spec asks, no network, and claims that another
user made (the outputs claim belongs to uid 2000 until fsGroup gives it to the pod's group).
What it writes is read by diffusers' own loader, not by ours.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api import parse_manifest
from finetune_api.report import ExitCode, TrainerSummary
from finetune_api.v1alpha1 import FailureReason
from finetune_operator.render import render
from tests.images.pod import PodRun, clear, image_env, in_image, podman_run

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "images"
JOB_ANNOTATION = "finetune.dev/job-yaml"
# Whoever made the claims' folders: not the pod's user, as on a cluster's storage.
VOLUME_OWNER = 2000


def rendered_pod(image: str, change: Any = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The pod template the operator renders for examples/demo.yaml: its spec and annotations."""
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    body["metadata"]["uid"] = "00000000-0000-4000-8000-000000000001"
    if change is not None:
        change(body["spec"])
    job = parse_manifest(copy.deepcopy(body))
    rendered = render(
        body, job, trainer_image=image, report_base_url="http://finetune-operator.finetune-system.svc:8081"
    )
    template = rendered.job["spec"]["template"]
    return template["spec"], template["metadata"]["annotations"]


def make_claims(root: Path, tiny_assets: Path) -> dict[str, Path]:
    """The demo's three claims as host folders, owned by VOLUME_OWNER with the usual 0755 folders."""
    claims = {name: root / "claims" / name for name in ("models", "datasets", "outputs")}
    for path in claims.values():
        path.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(tiny_assets / "tiny-sd"), str(claims["models"] / "tiny-sd")], check=True)
    subprocess.run(["cp", "-r", str(tiny_assets / "subject"), str(claims["datasets"] / "subject")], check=True)
    for path in claims.values():
        subprocess.run(["chown", "-R", f"{VOLUME_OWNER}:{VOLUME_OWNER}", str(path)], check=True)
        subprocess.run(["chmod", "-R", "u=rwX,go=rX", str(path)], check=True)
    return claims


def run_pod(run: PodRun, log: Path) -> int:
    """Run it; its stdout goes to ``log``, its stderr beside it (``.err``)."""
    with log.open("w") as out, log.with_suffix(".err").open("w") as err:
        return subprocess.run(run.command, stdout=out, stderr=err, check=False).returncode


def summary_of(run: PodRun) -> TrainerSummary:
    text = run.termination_log.read_text()
    assert text, "the trainer left no termination message"
    assert len(text.encode()) <= 4096
    return TrainerSummary.model_validate(json.loads(text))


@pytest.fixture
def scratch(request: pytest.FixtureRequest) -> Path:
    path = ARTIFACTS / request.node.name
    clear(path)
    path.mkdir(parents=True)
    return path


def test_the_demo_job_succeeds_in_the_trainer_image_as_its_pod(
    trainer_image: str, tiny_assets: Path, scratch: Path
) -> None:
    pod, annotations = rendered_pod(trainer_image)
    security = pod["containers"][0]["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    claims = make_claims(scratch, tiny_assets)
    run = podman_run(pod, pod_name="demo-abcde", annotations=annotations, claims=claims, scratch=scratch)
    assert "--read-only" in run.command and "none" in run.command
    code = run_pod(run, scratch / "pod.log")
    log, err = (scratch / "pod.log").read_text(), (scratch / "pod.err").read_text()
    assert code == ExitCode.SUCCESS, f"the trainer pod exited {code}:\n{log[-3000:]}\n{err[-3000:]}"

    summary = summary_of(run)
    assert summary.phase == "Succeeded" and summary.reason == "Completed", summary
    assert summary.step == summary.total_steps == 60
    assert summary.output_uri == "/data/outputs/demo"
    # Every line on stdout is the JSON the contract defines; nothing on stderr (libraries' own
    # warnings and progress bars) complains of a folder it could not write on the read-only root
    # or of a library that does not load.
    lines = [line for line in log.splitlines() if line.strip()]
    not_json = [line for line in lines if not line.startswith("{")]
    assert not not_json, "lines that are not the trainer's JSON log:\n" + "\n".join(not_json[:20])
    assert any(json.loads(line).get("event") == "progress" for line in lines)
    for complaint in ("Read-only file system", "Permission denied", "not writable", "Traceback", "can't load"):
        assert complaint not in err, f"stderr says {complaint!r}:\n{err[-3000:]}"
    # Nor is the log cluttered: no library progress bars, no warning about an empty list.
    for clutter in ("it/s]", "kept in float32: []"):
        assert clutter not in err, f"stderr has {clutter!r}:\n{err[-3000:]}"

    output = claims["outputs"] / "demo"
    # Written by the pod's user, into a folder of the claim's owner that fsGroup opened to it.
    assert output.stat().st_uid == 1000
    manifest = json.loads((output / "manifest.json").read_text())
    assert {entry["path"] for entry in manifest["files"]} >= {"loss.png", "samples.png"}
    samples = sorted((output / "samples").glob("*.png"))
    assert samples, "no preview samples"
    from PIL import Image

    with Image.open(samples[-1]) as picture:
        assert picture.size == (64, 64)
    # diffusers' own loader reads the exported folder.
    from diffusers import StableDiffusionPipeline

    folder = next(p.parent for p in output.rglob("model_index.json"))
    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert pipeline.unet.config.sample_size is not None


def test_a_bad_job_file_ends_with_the_bad_input_exit_code_and_reason(
    trainer_image: str, tiny_assets: Path, scratch: Path
) -> None:
    pod, annotations = rendered_pod(trainer_image)
    # A job file the trainer must refuse as written: its base model is not on the claim.
    job = json.loads(annotations[JOB_ANNOTATION])
    job["spec"]["baseModel"]["uri"] = "/data/models/no-such-model"
    annotations = {**annotations, JOB_ANNOTATION: json.dumps(job)}
    claims = make_claims(scratch, tiny_assets)
    run = podman_run(pod, pod_name="demo-fghij", annotations=annotations, claims=claims, scratch=scratch)
    code = run_pod(run, scratch / "pod.log")
    log = (scratch / "pod.log").read_text() + (scratch / "pod.err").read_text()
    assert code == ExitCode.BAD_INPUT, f"exit {code}:\n{log[-3000:]}"
    summary = summary_of(run)
    assert summary.phase == "Failed" and summary.reason == str(FailureReason.BAD_INPUT)
    assert "spec.baseModel.uri" in summary.message, summary.message
    assert not (claims["outputs"] / "demo").exists() or not any((claims["outputs"] / "demo").iterdir())


# Libraries that are loaded only when a run asks for what they serve, none of which a trainer pod
# on one node does: nvshmem's bootstrap and transport plugins (MPI, UCX, libfabric: multi-node
# shared memory) and cuFile's RDMA plugin (GPUDirect Storage over InfiniBand). NCCL itself opens
# libibverbs only if it is there, and uses sockets between nodes otherwise.
OPTIONAL_PLUGINS = ("nvidia/nvshmem/lib/nvshmem_bootstrap_", "nvidia/nvshmem/lib/nvshmem_transport_", "libcufile_rdma")


def test_the_image_needs_only_the_drivers_libraries_from_the_node(trainer_image: str) -> None:
    """Every shared library torch, triton, nvidia/ and the bitsandbytes build for torch's CUDA
    load resolves in the image, but the driver's own (libcuda, libnvidia-ml), which the NVIDIA
    container runtime mounts. bitsandbytes' builds for other CUDA versions, ROCm and XPU are
    never loaded with this torch, and the plugins above only on request."""
    script = r"""
import glob, os, subprocess, sysconfig
import torch
site = sysconfig.get_paths()["purelib"]
cuda = torch.version.cuda.replace(".", "")
ours = f"{site}/bitsandbytes/libbitsandbytes_cuda{cuda}.so"
assert os.path.isfile(ours), f"no bitsandbytes build for CUDA {cuda}: {sorted(glob.glob(site + '/bitsandbytes/*.so'))}"
found = [glob.glob(f"{site}/{d}/**/*.so*", recursive=True) for d in ("torch", "triton", "nvidia")]
libraries = [ours] + [p for paths in found for p in paths]
directories = sorted({os.path.dirname(p) for p in libraries})
env = {**os.environ, "LD_LIBRARY_PATH": ":".join(directories)}
print(len(libraries))
for path in libraries:
    out = subprocess.run(["ldd", path], capture_output=True, text=True, env=env).stdout
    for line in out.splitlines():
        if "not found" in line:
            print(line.split()[0], os.path.relpath(path, site))
"""
    result = in_image(trainer_image, "python", "-c", script)
    assert result.returncode == 0, result.stderr
    count, *missing = result.stdout.strip().splitlines()
    assert int(count) > 50, f"only {count} libraries found: the scan looked in the wrong place"
    driver = ("libcuda.so", "libnvidia-ml.so")
    needed = [line for line in missing if not line.startswith(driver) and not any(p in line for p in OPTIONAL_PLUGINS)]
    assert not needed, "libraries the image lacks (not the driver's):\n" + "\n".join(needed)


def test_the_trainer_image_holds_no_operator_packages(trainer_image: str) -> None:
    result = in_image(trainer_image, "python", "-m", "pip", "list", "--format", "json")
    assert result.returncode == 0, result.stderr
    installed = {p["name"].lower() for p in json.loads(result.stdout)}
    assert {"torch", "diffusers", "finetune-operator"} <= installed
    assert not installed & {"kopf", "kubernetes"}, installed & {"kopf", "kubernetes"}


def test_every_cache_of_the_image_is_on_a_volume(trainer_image: str) -> None:
    """The image's environment points every library's cache at /cache or /tmp, never at the read-only home."""
    env = image_env(trainer_image)
    for variable in ("FINETUNE_CACHE_DIR", "HF_HOME", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[variable].startswith("/cache"), variable
    assert env["MPLCONFIGDIR"].startswith("/tmp")
    assert os.path.isabs(env["PATH"].split(":")[0])
