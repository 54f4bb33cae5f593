"""What the trainer tells the operator: progress events (pushed over HTTP, also logged as JSON
lines) and the final summary (the pod's termination message, under 4 KiB).

Paths in these reports are what the trainer sees: a local path under a mount
(``/mnt/outputs/nick/checkpoints/checkpoint-000100``) or an object-store URI.  The
operator maps mount paths back to the ``pvc://CLAIM/path`` form a person can use.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Literal

from pydantic import Field

# FailureReason lives with the status's other reasons; the trainer's summary names one.
from finetune_api.v1alpha1 import (
    CheckpointRef,
    DatasetStatus,
    EvaluationStatus,
    FailureReason,
    OutputFile,
    Stage,
    _Model,
)

__all__ = [
    "MAX_CHECKPOINTS_IN_EVENT",
    "MAX_FILES_IN_EVENT",
    "MAX_REPORT_BYTES",
    "MAX_SAMPLES_IN_EVENT",
    "MAX_SETTINGS_IN_EVENT",
    "SUMMARY_LIMIT_BYTES",
    "ExitCode",
    "FailureReason",
    "ProgressEvent",
    "ProgressReply",
    "Thumbnail",
    "TrainerSummary",
]

SUMMARY_LIMIT_BYTES = 4096
MAX_REPORT_BYTES = 256 * 1024
# What one report may list, each far above what a trainer writes (an output folder has a few dozen
# files): parsed, and copied into a status, a report costs the operator several times its bytes
# until the next one, so the number of entries is bounded as well as the bytes.
MAX_FILES_IN_EVENT = 256
MAX_SAMPLES_IN_EVENT = 256
MAX_CHECKPOINTS_IN_EVENT = 100
MAX_SETTINGS_IN_EVENT = 64


class ExitCode(IntEnum):
    """The trainer's exit codes; the operator's podFailurePolicy keys on them."""

    SUCCESS = 0
    ERROR = 1  # anything unexpected: treated as transient, retried
    BAD_INPUT = 2  # the job cannot succeed as written: not retried
    OUT_OF_MEMORY = 3  # the GPU ran out of memory: not retried; the message names settings that fit


class Thumbnail(_Model):
    """A small JPEG of a preview sample, carried in the report so the operator can show it."""

    name: str = Field(description="File name of the full sample, e.g. step-000200-0.png.")
    step: int = Field(ge=0)
    prompt: str = ""
    jpeg_base64: str = Field(max_length=48 * 1024, description="A JPEG of at most 128x128 pixels, base64.")


class ProgressEvent(_Model):
    """One progress report.  ``seq`` grows by one per event of one trainer process; with
    ``attempt`` (the pod's name) it lets the operator drop stale or repeated events."""

    seq: int = Field(ge=0)
    attempt: str = Field(default="", max_length=253, description="The reporting pod (or host) name.")
    time: str = Field(description="RFC 3339 time of the event.")
    stage: Stage
    step: int = Field(default=0, ge=0)
    total_steps: int = Field(default=0, ge=0)
    loss: float | None = None
    learning_rate: float | None = None
    steps_per_second: float | None = Field(default=None, ge=0)
    eta_seconds: int | None = Field(default=None, ge=0)
    peak_memory_bytes: int | None = Field(default=None, ge=0)
    gpu_utilization: float | None = Field(default=None, ge=0, le=100, description="GPU busy, percent (NVML).")
    gpu_memory_bytes: int | None = Field(default=None, ge=0, description="GPU memory in use (NVML).")
    message: str = Field(default="", max_length=2000)
    checkpoints: list[CheckpointRef] = Field(default_factory=list, max_length=MAX_CHECKPOINTS_IN_EVENT)
    output_uri: str | None = Field(default=None, max_length=2048)
    files: list[OutputFile] = Field(default_factory=list, max_length=MAX_FILES_IN_EVENT)
    samples: list[Annotated[str, Field(max_length=1024)]] = Field(default_factory=list, max_length=MAX_SAMPLES_IN_EVENT)
    thumbnails: list[Thumbnail] = Field(default_factory=list, max_length=16)
    warnings: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=50)
    settings: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=1000)]] = Field(
        default_factory=dict,
        max_length=MAX_SETTINGS_IN_EVENT,
        description="Choices the trainer made (precision, attention, compile, ...).",
    )
    dataset: DatasetStatus | None = None
    evaluation: EvaluationStatus | None = None
    done: dict[str, str] = Field(
        default_factory=dict,
        max_length=8,
        description="Requests the trainer has acted on: save, sample, stop -> the annotation's value.",
    )


class ProgressReply(_Model):
    """The operator's answer to an accepted report: whether it was kept, and the requests that
    are waiting for the trainer (save, sample, stop -> the annotation's value)."""

    accepted: bool = True
    requests: dict[str, str] = Field(default_factory=dict, max_length=8)


class TrainerSummary(_Model):
    """Written to the termination-message file at exit; the fallback when pushes were lost."""

    phase: Literal["Succeeded", "Failed"]
    reason: str = ""
    message: str = ""
    step: int = 0
    total_steps: int = 0
    output_uri: str | None = None
    files: list[OutputFile] = Field(default_factory=list)
    checkpoints: list[CheckpointRef] = Field(default_factory=list)
    samples: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    settings: dict[str, str] = Field(
        default_factory=dict, description="Choices the trainer made (precision, attention, compile, ...)."
    )
    dataset: DatasetStatus | None = None
    evaluation: EvaluationStatus | None = None
