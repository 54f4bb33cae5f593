"""The trainer image, read statically (make check-images runs the built one): its entrypoint is
the command the operator renders, it runs as the user the operator runs pods as, it installs
only the locked packages, and hadolint passes."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from finetune_api import contract
from finetune_operator import render

pytestmark = pytest.mark.trainer

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "trainer-image"
DOCKERFILE = IMAGE / "Dockerfile"
LOCK = IMAGE / "requirements.lock"
GPU_STACK = {
    "torch": "2.15.0",
    "bitsandbytes": "0.50.2",
    "diffusers": "0.42.1",
    "transformers": "5.23.0",
    "accelerate": "1.15.0",
    "peft": "0.21.2",
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in logical]


def final_stage() -> list[tuple[str, str]]:
    parsed = instructions(DOCKERFILE)
    last_from = max(i for i, (name, _) in enumerate(parsed) if name == "FROM")
    return parsed[last_from:]


def exec_form(name: str) -> list[str]:
    """The last ``name`` instruction of the final stage, which must be in exec form (a JSON array)."""
    found = [args for instruction, args in final_stage() if instruction == name]
    assert found, f"the final stage has no {name}"
    value = json.loads(found[-1])
    assert isinstance(value, list), f"{name} must be a JSON array (exec form), not a shell string"
    return [str(v) for v in value]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    return {
        normalize(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9._-]+)==([^\s\\]+)", LOCK.read_text(), re.MULTILINE)
    }


def test_the_image_entrypoint_is_the_command_the_operator_renders() -> None:
    assert exec_form("ENTRYPOINT") + exec_form("CMD") == contract.trainer_command()
    # "python" is the image's environment, where the trainer and its locked packages are.
    env = " ".join(args for name, args in final_stage() if name == "ENV")
    assert re.search(r"\bPATH=/opt/venv/bin:", env)


def copied_sources(dockerfile: Path) -> set[str]:
    """The repository folders a Dockerfile copies (sources, not single files)."""
    sources: set[str] = set()
    for name, args in instructions(dockerfile):
        if name == "COPY" and not args.startswith("--from"):
            *paths, _ = args.split()
            sources.update(p for p in paths if not p.startswith("--") and "." not in Path(p).name)
    return sources


def test_each_image_carries_the_api_package_and_its_own_code_only() -> None:
    assert copied_sources(DOCKERFILE) == {"api/finetune_api", "trainer-image/finetune_trainer"}
    assert copied_sources(ROOT / "operator" / "Dockerfile") == {"api/finetune_api", "operator/finetune_operator"}


def test_the_image_runs_as_the_user_the_operator_runs_pods_as() -> None:
    users = [args for name, args in final_stage() if name == "USER"]
    uid = inspect.signature(render.render).parameters["trainer_uid"].default
    assert users[-1] == f"{uid}:{uid}"
    volumes = json.loads(next(args for name, args in final_stage() if name == "VOLUME"))
    assert {"/cache", "/data", "/tmp"} <= set(volumes)


def test_the_lock_pins_the_gpu_stack_and_covers_the_trainer_extra() -> None:
    pins = lock_pins()
    assert {name: pins.get(name) for name in GPU_STACK} == GPU_STACK
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["trainer"]]
    names = {normalize(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]) for requirement in wanted}
    assert names - pins.keys() == set(), "regenerate requirements.lock (see requirements.in)"
    # Every pin carries hashes, so the image installs with --require-hashes.
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n", 2)[2])
    assert all("--hash=sha256:" in block for block in blocks if "==" in block)
    # The image runs what the tests ran.
    constraints = {
        normalize(m[1]): m[2]
        for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    }
    differ = {n: (v, constraints[n]) for n, v in pins.items() if n in constraints and constraints[n] != v}
    assert differ == {}


def test_the_image_installs_only_what_is_locked_and_copies_what_exists() -> None:
    runs = " ".join(args for name, args in instructions(DOCKERFILE) if name == "RUN")
    assert "pip install --no-deps --require-hashes -r /tmp/requirements.lock" in runs
    installs = re.findall(r"pip install [^&;]*", runs)
    assert all("--no-deps" in command for command in installs), installs
    allowed = [
        line[1:].rstrip("/")
        for line in (IMAGE / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for name, args in instructions(DOCKERFILE):
        if name != "COPY" or args.startswith("--from"):
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), (
                f"{source} is left out of the build context by Dockerfile.dockerignore"
            )


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--config", str(IMAGE / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
