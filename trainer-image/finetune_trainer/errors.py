"""Failures the trainer classifies, and the exit code each one ends the process with.

The operator's podFailurePolicy keys on the exit code: bad input and out-of-memory are
not retried (a retry would fail the same way); anything else is, and resumes.
"""

from __future__ import annotations

from finetune_api.report import ExitCode, FailureReason


class TrainerError(Exception):
    """A failure with a sentence a person can act on; transient unless a subclass says not."""

    exit_code: ExitCode = ExitCode.ERROR
    reason: FailureReason = FailureReason.ERROR


class BadInput(TrainerError):  # noqa: N818 (the reason a person reads, not an error type name)
    """The job cannot succeed as written.  The message names the field or file and the fix."""

    exit_code = ExitCode.BAD_INPUT
    reason = FailureReason.BAD_INPUT

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field and not message.startswith(field) else message)


class OutOfMemory(TrainerError):  # noqa: N818
    """The GPU ran out of memory; the message names the settings that would fit."""

    exit_code = ExitCode.OUT_OF_MEMORY
    reason = FailureReason.OUT_OF_MEMORY


class Stopped(BaseException):
    """SIGTERM or SIGINT (preemption, a deleted pod): transient, a retry resumes.

    A BaseException, like KeyboardInterrupt: the signal can land inside any library code,
    and one ``except Exception`` there must not swallow it and train on."""
