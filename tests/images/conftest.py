"""The image tests: the images ``make images`` built, run as a cluster would run them.

They run in ``make check-images`` (after ``make images``; ``.ci/run`` calls both after ``make
test``), which sets FINETUNE_IMAGE_TESTS=1. Elsewhere they are skipped, saying how to run them;
under check-images a missing image is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from finetune_devcluster.images import PODMAN, default_tag, images

ENABLED = os.environ.get("FINETUNE_IMAGE_TESTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="the image tests run in make check-images (after make images builds them)")
    for item in items:
        if "tests/images/" in item.nodeid:
            item.add_marker(skip)


def built(key: str) -> str:
    """The reference of the image ``key`` as make images tags it (TAG= as there); it must exist."""
    assert shutil.which("podman"), "the image tests need podman (make images installs nothing: apt-get install podman)"
    image = next(i for i in images() if i.key == key)
    reference = image.reference(os.environ.get("REGISTRY") or None, os.environ.get("TAG") or default_tag())
    found = subprocess.run([*PODMAN, "image", "exists", reference], check=False)
    assert found.returncode == 0, f"{reference} is not built: make images"
    return reference


@pytest.fixture(scope="session")
def trainer_image() -> str:
    return built("trainer")


@pytest.fixture(scope="session")
def operator_image() -> str:
    return built("operator")
