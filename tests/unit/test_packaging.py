"""What the operator image carries: the operator and the API, not the local control plane, the
demo or the trainer (they live in finetune_devcluster and finetune_trainer)."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "finetune_operator"
# Packages the operator must never import: the dev cluster (and the demo in it), the trainer,
# and torch, which the operator image does not install.
FOREIGN = ("finetune_devcluster", "finetune_trainer", "torch")


def _foreign(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in FOREIGN)


def operator_modules() -> list[str]:
    names = []
    for path in sorted(OPERATOR.rglob("*.py")):
        parts = path.relative_to(OPERATOR.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue  # runs the operator
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_importing_every_operator_module_loads_no_dev_cluster_demo_or_trainer() -> None:
    modules = operator_modules()
    assert "finetune_operator.handlers" in modules and "finetune_operator.cli" in modules
    script = "import importlib, json, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    script += "print(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", script, *modules], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert set(modules) <= set(loaded)
    assert [name for name in loaded if _foreign(name)] == []


def test_no_operator_module_imports_the_dev_cluster_or_the_trainer_even_lazily() -> None:
    found = []
    for path in sorted(OPERATOR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names if _foreign(name)]
    assert found == []


# Inside the operator: the pure computations depend on no side that renders or talks to the
# cluster. status.py computes a status from what it is given (not from rendering); leader.py is
# about the Lease (not the status).
INNER_RULES = {
    "finetune_operator.status": (
        "finetune_operator.render",
        "finetune_operator.reconciler",
        "finetune_operator.kubeapi",
    ),
    "finetune_operator.leader": ("finetune_operator.status", "finetune_operator.render"),
    "finetune_operator.claims": ("finetune_operator.render", "finetune_operator.status"),
    "finetune_operator.timestamps": ("finetune_operator",),
}


def _imported(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


def test_status_claims_and_the_lease_import_nothing_that_renders_or_reconciles() -> None:
    broken = []
    for module, banned in INNER_RULES.items():
        path = OPERATOR.parent / (module.replace(".", "/") + ".py")
        for name in _imported(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                broken.append(f"{module} imports {name}")
    assert broken == []


def dockerfile_copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """The (sources, destination) of each COPY from the build context."""
    copies = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY" or any(w.startswith("--from") for w in words[1:]):
            continue
        paths = [w for w in words[1:] if not w.startswith("--")]
        copies.append((paths[:-1], paths[-1]))
    return copies


def test_the_operator_image_installs_no_dev_cluster_demo_or_trainer(tmp_path: Path) -> None:
    """The wheel of exactly what operator/Dockerfile copies, as its `pip install .` builds it."""
    context = tmp_path / "src"
    copies = dockerfile_copies(ROOT / "operator" / "Dockerfile")
    assert copies, "operator/Dockerfile copies nothing"
    for sources, into in copies:
        if not into.startswith("/src/"):
            continue  # the lock, installed before the project
        destination = into.removeprefix("/src/")
        for source in sources:
            origin = ROOT / source
            into_folder = destination.endswith("/") or len(sources) > 1
            target = context / destination / origin.name if into_folder else context / destination
            target.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, target)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", "dist", "."],
        cwd=context,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (context / "dist").glob("*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    assert "finetune_operator/cli.py" in files and "finetune_api/v1alpha1.py" in files
    packages = {name.split("/")[0] for name in files if not name.split("/")[0].endswith(".dist-info")}
    assert packages == {"finetune_api", "finetune_operator"}
    assert [name for name in files if "devcluster" in name or name.endswith(("demo.py", "podexec.py"))] == []


def test_the_operator_image_installs_only_what_its_lock_pins_with_hashes() -> None:
    """The operator image's pip install had no hashes: it installs operator/requirements.lock
    (the `operator` extra, held to constraints.txt) with --require-hashes, then the project alone."""
    import re
    import tomllib

    dockerfile = (ROOT / "operator" / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^&;\\\n]*", dockerfile)
    assert installs and all("--no-deps" in command for command in installs), installs
    assert "pip install --no-deps --require-hashes -r /tmp/requirements.lock" in dockerfile
    lock = (ROOT / "operator" / "requirements.lock").read_text()
    pins = {m[1].lower().replace("_", "-"): m[2] for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", lock, re.M)}
    blocks = re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 2)[2])
    assert all("--hash=sha256:" in block for block in blocks if "==" in block)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["operator"]]
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in wanted}
    assert names - pins.keys() == set(), "regenerate operator/requirements.lock (see operator/requirements.in)"
    assert "torch" not in pins
    constraints = {
        m[1].lower().replace("_", "-"): m[2]
        for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    }
    assert {n: v for n, v in pins.items() if n in constraints and constraints[n] != v} == {}
