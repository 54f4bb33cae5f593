"""A person's requests to a running job (``contract.REQUEST_ANNOTATIONS``: save, sample, stop
now), between the FineTuneJob's annotations and the trainer.

The operator adds no channel of its own: the requests ride on the reply to the trainer's
progress report (``waiting``), and the trainer's reports say which it has acted on (``done``).
An annotation is removed once the trainer has acted on its value, or once the job is final and
nothing can act on it any more, each with an Event.  Setting the annotation needs patch rights
on the FineTuneJob: the annotation is the authorization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_api.contract import MAX_REQUEST_VALUE, REQUEST_ANNOTATIONS
from finetune_api.report import ProgressEvent
from finetune_api.v1alpha1 import Reason

# The Event of a request acted on, by kind.
DONE_REASONS = {"save": "SavedOnRequest", "sample": "SampledOnRequest", "stop": str(Reason.STOPPED_EARLY)}
NOT_DONE_REASON = "RequestNotDone"


def waiting(body: dict[str, Any]) -> dict[str, str]:
    """The requests on a FineTuneJob (kind -> the annotation's value)."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    found = {kind: str(annotations[key]) for kind, key in REQUEST_ANNOTATIONS.items() if annotations.get(key)}
    return {kind: value[:MAX_REQUEST_VALUE] for kind, value in found.items()}


@dataclass(frozen=True)
class Settled:
    """A request whose annotation goes: what the Event says."""

    annotation: str
    value: str
    type: str
    reason: str
    message: str


def settled(body: dict[str, Any], event: ProgressEvent | None, *, final: bool, reason: str | None) -> list[Settled]:
    """The requests to remove now: those the trainer has acted on (its newest report's ``done``
    holds their value), and on a final job all the others (``reason``: the final status's)."""
    done = event.done if event is not None else {}
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    out = []
    for kind, value in waiting(body).items():
        annotation = REQUEST_ANNOTATIONS[kind]
        raw = str(annotations[annotation])
        step = f" at step {event.step}" if event is not None else ""
        if done.get(kind) == value or (kind == "stop" and final and reason == Reason.STOPPED_EARLY):
            what = {"save": "a checkpoint saved", "sample": "samples rendered", "stop": "stopped; the model exported"}
            message = f"{what[kind]}{step}, as {annotation}={value} asked"
            out.append(Settled(annotation, raw, "Normal", DONE_REASONS[kind], message))
        elif final:
            message = f"{annotation}={value} was not acted on: the job ended first"
            out.append(Settled(annotation, raw, "Normal", NOT_DONE_REASON, message))
    return out


def removal(settled_: Settled) -> list[dict[str, Any]]:
    """A JSON patch that removes the annotation only while it still holds the value acted on (a
    newer request set meanwhile stays)."""
    path = "/metadata/annotations/" + settled_.annotation.replace("~", "~0").replace("/", "~1")
    return [{"op": "test", "path": path, "value": settled_.value}, {"op": "remove", "path": path}]
