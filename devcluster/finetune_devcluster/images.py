"""``make images``: the operator and the trainer image, built with podman from the repository's Dockerfiles.

This module owns how the two images are named, built and pushed, and the Debian base that
stands in for ``debian:bookworm-slim`` where no registry of images can be reached: a root file
system made by ``debootstrap --variant=minbase bookworm`` from Debian's packages and turned into an
image by ``podman import``, made once and kept in podman's own storage.

The names are the chart's defaults (``helm/finetune-operator/values.yaml``: ``image.repository``
and ``trainer.image.repository``, tagged with the chart's appVersion), so the chart installs what
this builds; ``REGISTRY=`` and ``TAG=`` name another place, and ``--push`` sends both there.

podman runs here as root with Debian's runc (``--runtime runc``: Debian's crun refuses cgroups in
hybrid mode) and with rlimits no higher than the host's: podman's defaults ask for more than a
container host may grant ("setrlimit ... Operation not permitted").
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "finetune-operator"

# What the Dockerfiles name as their base, and the image made from Debian's packages that stands
# in for it where it cannot be pulled.
UPSTREAM_BASE = "docker.io/library/debian:bookworm-slim"
STAND_IN_BASE = "localhost/finetune-debian-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"

PODMAN = ("podman", "--runtime", "runc")
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000")


@dataclass(frozen=True)
class Image:
    """One of the project's images: its Dockerfile and the chart value that names its repository."""

    key: str
    dockerfile: str
    default_repository: str

    def reference(self, registry: str | None, tag: str) -> str:
        repository = self.default_repository
        if registry:
            repository = f"{registry.rstrip('/')}/{repository.rsplit('/', 1)[-1]}"
        return f"{repository}:{tag}"


def _chart_defaults() -> tuple[str, str, str]:
    """The operator's and the trainer's repository in the chart's values, and its appVersion."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return values["image"]["repository"], values["trainer"]["image"]["repository"], str(chart["appVersion"])


def images() -> tuple[Image, Image]:
    operator_repo, trainer_repo, _ = _chart_defaults()
    return (
        Image("operator", "operator/Dockerfile", operator_repo),
        Image("trainer", "trainer-image/Dockerfile", trainer_repo),
    )


def default_tag() -> str:
    return _chart_defaults()[2]


def say(message: str) -> None:
    print(f"[images] {message}", flush=True)


def podman(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess[str]:
    if shutil.which("podman") is None:
        raise SystemExit(
            "make images needs podman (Debian: apt-get install podman runc) or, to build with Docker, "
            "the docker build commands at the top of each Dockerfile"
        )
    return subprocess.run([*PODMAN, *args], check=check, text=True, capture_output=capture)


def image_exists(reference: str) -> bool:
    return podman("image", "exists", reference, check=False).returncode == 0


def base_image() -> str:
    """The base to build on: $BASE_IMAGE, else the Dockerfiles' own where it can be pulled, else the stand-in."""
    chosen = os.environ.get("BASE_IMAGE", "")
    if chosen:
        return chosen
    if image_exists(UPSTREAM_BASE):
        return UPSTREAM_BASE
    pulled = podman("pull", "--quiet", UPSTREAM_BASE, check=False, capture=True)
    if pulled.returncode == 0:
        return UPSTREAM_BASE
    reason = (pulled.stderr.strip().splitlines() or ["no reason given"])[-1]
    say(f"{UPSTREAM_BASE} cannot be pulled ({reason[:160]}); a Debian 12 base made from Debian's packages stands in")
    ensure_stand_in_base()
    return STAND_IN_BASE


def ensure_stand_in_base() -> None:
    """Debian 12 (minbase) from Debian's packages, as ``STAND_IN_BASE``: made once, kept by podman."""
    if image_exists(STAND_IN_BASE):
        return
    if shutil.which("debootstrap") is None:
        raise SystemExit(
            f"{UPSTREAM_BASE} cannot be pulled and debootstrap is not installed to make a stand-in "
            "(Debian: apt-get install debootstrap), or set BASE_IMAGE= to a Debian 12 image you have"
        )
    started = time.monotonic()
    say(f"making {STAND_IN_BASE}: debootstrap --variant=minbase bookworm (about 1-2 minutes, once)")
    with tempfile.TemporaryDirectory(prefix="finetune-base-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # As Debian's own images: security updates on, no downloaded packages or lists kept.
        (rootfs / "etc" / "apt" / "sources.list").write_text(
            f"deb {DEBIAN_MIRROR} bookworm main\n"
            f"deb {DEBIAN_MIRROR} bookworm-updates main\n"
            "deb http://deb.debian.org/debian-security bookworm-security main\n"
        )
        for folder in (rootfs / "var" / "cache" / "apt" / "archives", rootfs / "var" / "lib" / "apt" / "lists"):
            for entry in folder.glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        imported = subprocess.run(
            [*PODMAN, "import", "--change", "CMD /bin/bash", "-", STAND_IN_BASE],
            stdin=tar.stdout,
            stdout=subprocess.DEVNULL,
            check=False,
        )
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise SystemExit(f"podman import of the Debian root file system failed (exit {imported.returncode})")
    say(f"{STAND_IN_BASE} made in {time.monotonic() - started:.0f} s")


def build_ca_secret() -> tuple[str, ...]:
    """The CA bundle pip trusts here ($PIP_CERT, else $SSL_CERT_FILE), for a network that inspects TLS.

    It reaches the build as the secret ``pip-ca``, which only the pip steps mount: nothing of it is
    in a layer.  With neither set, pip in the build trusts its own CAs.
    """
    for variable in ("PIP_CERT", "SSL_CERT_FILE"):
        path = os.environ.get(variable, "")
        if path and Path(path).is_file():
            return ("--secret", f"id=pip-ca,src={path}")
    return ()


def build(image: Image, reference: str, base: str) -> None:
    started = time.monotonic()
    say(f"building {reference} from {image.dockerfile} on {base}")
    podman(
        "build",
        *ULIMITS,
        *build_ca_secret(),
        "--file",
        image.dockerfile,
        "--ignorefile",
        f"{image.dockerfile}.dockerignore",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--tag",
        reference,
        str(ROOT),
    )
    say(f"{reference}: built in {time.monotonic() - started:.0f} s, {size_of(reference)}")


def size_of(reference: str) -> str:
    found = podman("image", "inspect", "--format", "{{.Size}}", reference, capture=True)
    return f"{int(found.stdout.strip()) / 1e9:.2f} GB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_devcluster.images", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--registry",
        default=os.environ.get("REGISTRY", ""),
        help="push to this registry instead of the chart's default repositories ($REGISTRY)",
    )
    parser.add_argument("--tag", default=os.environ.get("TAG", ""), help="the images' tag ($TAG; default appVersion)")
    parser.add_argument("--push", action="store_true", help="push both images after building them")
    parser.add_argument("--only", choices=["operator", "trainer"], help="build one image only")
    args = parser.parse_args(argv)
    tag = args.tag or default_tag()
    os.chdir(ROOT)
    base = base_image()
    built = []
    for image in images():
        if args.only and image.key != args.only:
            continue
        reference = image.reference(args.registry or None, tag)
        build(image, reference, base)
        built.append(reference)
    for reference in built:
        if args.push:
            say(f"pushing {reference}")
            podman("push", reference)
    say("built: " + ", ".join(built))
    return 0


if __name__ == "__main__":
    sys.exit(main())
