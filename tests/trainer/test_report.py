"""Progress reaches the operator without ever holding training up; the summary fits 4 KiB."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from finetune_api.report import SUMMARY_LIMIT_BYTES, ProgressEvent, TrainerSummary
from finetune_api.v1alpha1 import CheckpointRef, OutputFile, Stage
from finetune_trainer import report
from tests.certs import self_signed
from tests.trainer.operator_stub import Operator

pytestmark = pytest.mark.trainer


@pytest.fixture
def operator() -> Iterator[Operator]:
    server = Operator()
    yield server
    server.close()


def _event(seq: int, stage: Stage = Stage.TRAINING) -> ProgressEvent:
    return ProgressEvent(seq=seq, time=report.now_rfc3339(), stage=stage, step=seq, total_steps=100)


def test_events_are_posted_in_camel_case_with_the_token(operator: Operator) -> None:
    pusher = report.ReportPusher(operator.url, token="s3cret")
    pusher.submit(_event(1))
    pusher.submit(_event(2, Stage.DONE), final=True)
    assert pusher.close(timeout_s=5)
    body, auth = operator.received[-1]
    assert auth == "Bearer s3cret"
    assert body["stage"] == "done"
    assert body["totalSteps"] == 100
    assert "total_steps" not in body


def test_token_comes_from_the_env_or_the_mounted_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINETUNE_REPORT_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("FINETUNE_REPORT_TOKEN_FILE", str(token_file))
    assert report.report_token() == "from-file"
    monkeypatch.setenv("FINETUNE_REPORT_TOKEN", "from-env")
    assert report.report_token() == "from-env"


def test_only_the_newest_pending_event_is_kept_and_the_final_one_arrives() -> None:
    slow = Operator(delay_s=0.3)
    try:
        pusher = report.ReportPusher(slow.url, token=None)
        started = time.monotonic()
        for seq in range(50):
            pusher.submit(_event(seq))
        pusher.submit(_event(50, Stage.DONE), final=True)
        assert time.monotonic() - started < 0.2  # submitting never waits for the network
        assert pusher.close(timeout_s=5)
        seqs = [body["seq"] for body, _ in slow.received]
        assert seqs[-1] == 50
        assert len(seqs) < 5  # the 49 superseded events in between were never sent
    finally:
        slow.close()


def test_an_absent_operator_never_blocks_training() -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/report"
    pusher = report.ReportPusher(url, token=None, timeout_s=0.2)
    started = time.monotonic()
    for seq in range(100):
        pusher.submit(_event(seq))
    pusher.submit(_event(100, Stage.DONE), final=True)
    assert time.monotonic() - started < 0.2
    assert pusher.close(timeout_s=1.0) is False
    assert time.monotonic() - started < 3
    assert pusher.failures >= 1


def test_reporter_logs_json_lines_with_the_job_name_and_throttles(operator: Operator) -> None:
    stream = io.StringIO()
    report.configure_logging("nick-portrait", stream=stream)
    reporter = report.ProgressReporter(
        job="nick-portrait", attempt="pod-1", pusher=report.ReportPusher(operator.url, token="t"), interval_s=60
    )
    reporter.total_steps = 100
    reporter.set_stage(Stage.TRAINING)
    for step in range(1, 51):
        reporter.training_step(step, loss=1.0 / step, learning_rate=1e-4)
    reporter.warn("spec.training.attention: xformers needs a CUDA GPU; using sdpa instead")
    reporter.close(stage=Stage.DONE)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert all(line["job"] == "nick-portrait" for line in lines)
    progress = [line for line in lines if line["event"] == "progress"]
    assert [p["stage"] for p in progress] == ["training", "done"]  # throttled: no event per step
    assert progress[-1]["attempt"] == "pod-1"
    assert progress[-1]["warnings"] == ["spec.training.attention: xformers needs a CUDA GPU; using sdpa instead"]
    assert 0 < progress[-1]["loss"] < 1.0
    assert progress[-1]["step"] == 50
    assert operator.received[-1][0]["stage"] == "done"


def test_smoothed_loss_speed_and_eta() -> None:
    clock = report.TrainingClock()
    for step in range(1, 11):
        clock.update(step, 2.0, at=float(step))
    assert clock.loss == pytest.approx(2.0)
    assert clock.steps_per_second == pytest.approx(1.0)
    assert clock.eta_seconds(10, 100) == 90


def test_summary_fits_the_termination_message_limit() -> None:
    files = [
        OutputFile(path=f"diffusers/unet/shard-{i:03d}.safetensors", size_bytes=i, sha256="a" * 64) for i in range(200)
    ]
    files.append(OutputFile(path="nick.safetensors", size_bytes=1, sha256="b" * 64))
    summary = TrainerSummary(phase="Succeeded", reason="Completed", message="m" * 5000, step=10, files=files)
    body = report.fit_summary(summary)
    assert len(body) <= SUMMARY_LIMIT_BYTES
    decoded = json.loads(body)
    assert decoded["phase"] == "Succeeded"
    assert decoded["step"] == 10
    small = TrainerSummary(phase="Failed", reason="BadInput", message="spec.x: nope", files=files[-1:])
    assert json.loads(report.fit_summary(small))["files"][0]["path"] == "nick.safetensors"


def test_the_token_file_is_read_again_for_each_push(operator: Operator, tmp_path: Any, monkeypatch: Any) -> None:
    """The pod's projected service-account token is short-lived; the kubelet rewrites the
    file, and a long run must send the current one."""
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    monkeypatch.delenv("FINETUNE_REPORT_TOKEN", raising=False)
    monkeypatch.delenv("FINETUNE_REPORT_CA_FILE", raising=False)
    monkeypatch.setenv("FINETUNE_REPORT_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("FINETUNE_REPORT_URL", operator.url)
    pusher = report.pusher_from_env()
    assert pusher is not None
    pusher.submit(_event(1))
    deadline = time.monotonic() + 5
    while not operator.received and time.monotonic() < deadline:
        time.sleep(0.02)
    token_file.write_text("rotated\n")
    pusher.submit(_event(2, Stage.DONE), final=True)
    assert pusher.close(timeout_s=5)
    assert [auth for _, auth in operator.received] == ["Bearer first", "Bearer rotated"]


def test_https_pushes_verify_the_operator_against_the_ca_file(tmp_path: Any, monkeypatch: Any) -> None:
    cert, key = self_signed(tmp_path)
    server = Operator(tls=(cert, key))
    try:
        monkeypatch.setenv("FINETUNE_REPORT_URL", server.url)
        monkeypatch.setenv("FINETUNE_REPORT_TOKEN", "t")
        # Without the operator's CA the certificate is not trusted: nothing is delivered.
        monkeypatch.delenv("FINETUNE_REPORT_CA_FILE", raising=False)
        untrusting = report.pusher_from_env()
        assert untrusting is not None
        untrusting.timeout_s = 0.5
        untrusting.submit(_event(1, Stage.DONE), final=True)
        assert untrusting.close(timeout_s=1.5) is False
        assert server.received == []
        # With it, the same push goes through.
        monkeypatch.setenv("FINETUNE_REPORT_CA_FILE", cert)
        trusting = report.pusher_from_env()
        assert trusting is not None
        trusting.submit(_event(2, Stage.DONE), final=True)
        assert trusting.close(timeout_s=5)
        assert [body["seq"] for body, _ in server.received] == [2]
    finally:
        server.close()


def test_the_summary_keeps_the_newest_samples_longest() -> None:
    samples = [f"/data/outputs/nick/samples/step-{s:06d}-{i}.png" for s in range(100, 3100, 100) for i in range(4)]
    summary = TrainerSummary(phase="Succeeded", reason="Completed", message="done", samples=samples)
    decoded = json.loads(report.fit_summary(summary))
    assert decoded["samples"] == samples[-16:]


def test_an_event_always_fits_what_the_operator_accepts() -> None:
    """However much a run wrote, its reports stay within the operator's bytes and counts: the
    newest samples, the files at the top of the output and the newest checkpoints stay."""
    from finetune_api.report import MAX_CHECKPOINTS_IN_EVENT, MAX_FILES_IN_EVENT, MAX_REPORT_BYTES, Thumbnail

    reporter = report.ProgressReporter(job="j", attempt="pod-a")
    reporter.samples = [
        f"s3://a-bucket/with/a/long/prefix/nick/samples/step-{s:06d}-{i}.png" for s in range(62) for i in range(16)
    ]
    reporter.thumbnails = [Thumbnail(name=f"step-000061-{i}.png", step=61, jpeg_base64="A" * 40000) for i in range(16)]
    reporter.files = [
        OutputFile(path=f"diffusers/unet/shard-{i:04d}.safetensors", size_bytes=i, sha256="a" * 64) for i in range(3000)
    ]
    reporter.files.append(OutputFile(path="nick.safetensors", size_bytes=1, sha256="b" * 64))
    reporter.checkpoints = [CheckpointRef(step=s, uri=f"/data/out/checkpoint-{s}") for s in range(1000)]
    reporter.settings = {f"setting-{i}": "x" * 5000 for i in range(200)}
    reporter.warnings = ["w" * 5000] * 60
    fitted = reporter.emit()
    assert fitted is not None
    body = json.dumps(report.wire(fitted), separators=(",", ":")).encode()
    assert len(body) <= MAX_REPORT_BYTES
    ProgressEvent.model_validate_json(body)  # as the operator reads it
    assert fitted.samples[-1] == reporter.samples[-1]  # the newest stay
    assert "nick.safetensors" in {f.path for f in fitted.files}
    assert fitted.checkpoints[-1].step == 999
    small = report.listed_files(reporter.files[:10])
    assert small == reporter.files[:10] and MAX_FILES_IN_EVENT < 3000 and MAX_CHECKPOINTS_IN_EVENT < 1000
    listed = report.listed_files(reporter.files)
    assert len(listed) == MAX_FILES_IN_EVENT and listed[-1].path == "nick.safetensors"  # in written order
    event = _event(2)
    assert report.fit_event(event) is event


def test_a_silent_reporter_is_due_as_seldom_as_the_main_one() -> None:
    """The trainer reads its losses back from the GPU only when a report is due; the other
    processes of a multi-GPU run, which send nothing, must not do it at every step."""
    silent = report.ProgressReporter(job="j", enabled=False, interval_s=60)
    silent.total_steps = 100
    assert silent.due()
    silent.training_step(1, loss=1.0, learning_rate=1e-4)
    assert silent.events == []
    assert not silent.due()


def test_the_libraries_noise_is_dropped_and_their_other_messages_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    report.silence_noise()
    for name, text, _ in report.NOISE:
        logger = logging.getLogger(name)
        noise = logger.makeRecord(name, logging.WARNING, __file__, 0, f"before {text} after", (), None)
        other = logger.makeRecord(name, logging.WARNING, __file__, 0, "something a person must read", (), None)
        assert not logger.filter(noise), text
        assert logger.filter(other), text
    # The empty list is noise; a list that names modules is not.
    logger = logging.getLogger("diffusers.models.modeling_utils")
    named = "There are modules in UNet2DConditionModel that should be kept in float32: ['conv_in']."
    assert logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, named, (), None))


def test_progress_bars_stay_out_of_a_pods_log_and_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a pod's stderr: not a terminal
    report.configure_logging("job", stream=io.StringIO())
    assert report.os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    monkeypatch.setattr("sys.stderr", Terminal())
    report.configure_logging("job", stream=io.StringIO())
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in report.os.environ
