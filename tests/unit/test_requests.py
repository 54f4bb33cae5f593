"""A person's requests to a running job: which annotations go, with which Event."""

from __future__ import annotations

from typing import Any

from finetune_api.report import ProgressEvent
from finetune_operator import requests


def _body(**annotations: str) -> dict[str, Any]:
    return {"metadata": {"name": "j", "namespace": "n", "annotations": {"other": "kept", **annotations}}}


def _event(**done: str) -> ProgressEvent:
    return ProgressEvent(seq=1, time="2026-12-07T00:00:00Z", stage="training", step=12, done=done)


SAVE, STOP = "finetune.dev/save-now", "finetune.dev/stop-now"


def test_what_waits_is_the_request_annotations_only() -> None:
    assert requests.waiting(_body(**{SAVE: "t1"})) == {"save": "t1"}
    assert requests.waiting(_body()) == {}
    assert requests.waiting({"metadata": {}}) == {}


def test_an_annotation_goes_once_its_value_is_done_and_a_newer_one_stays() -> None:
    body = _body(**{SAVE: "t2", STOP: "t3"})
    # Done with an older save (t1): the newer one (t2) waits; the stop has not been acted on.
    assert requests.settled(body, _event(save="t1"), final=False, reason=None) == []
    (done,) = requests.settled(body, _event(save="t2"), final=False, reason=None)
    assert (done.annotation, done.reason) == (SAVE, "SavedOnRequest")
    assert done.message == "a checkpoint saved at step 12, as finetune.dev/save-now=t2 asked"
    # The patch removes it only while it still says t2.
    assert requests.removal(done) == [
        {"op": "test", "path": "/metadata/annotations/finetune.dev~1save-now", "value": "t2"},
        {"op": "remove", "path": "/metadata/annotations/finetune.dev~1save-now"},
    ]


def test_on_a_final_job_every_request_goes_and_says_whether_it_was_done() -> None:
    body = _body(**{SAVE: "t2", STOP: "t3"})
    gone = {s.annotation: s for s in requests.settled(body, None, final=True, reason="StoppedEarly")}
    assert gone[STOP].reason == "StoppedEarly"
    assert gone[SAVE].reason == "RequestNotDone"
    assert gone[SAVE].message == "finetune.dev/save-now=t2 was not acted on: the job ended first"
    completed = {s.annotation: s.reason for s in requests.settled(body, None, final=True, reason="Completed")}
    assert completed == {SAVE: "RequestNotDone", STOP: "RequestNotDone"}
