from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.render.trainer import trainer_job


@pytest.fixture
def job() -> dict[str, Any]:
    """The trainer's Job before any builder has shaped it."""
    return trainer_job(
        name="nick-portrait",
        namespace="team-a",
        uid="1234-uid",
        image="trainer:1",
        image_pull_policy="IfNotPresent",
        shm_size="8Gi",
    )
