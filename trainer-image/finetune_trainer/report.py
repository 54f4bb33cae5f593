"""What the trainer tells the world: JSON log lines, progress pushed to the operator, and the
summary in the termination message.

Every progress event is one JSON line on stdout (``"event": "progress"``) and, when
``FINETUNE_REPORT_URL`` is set, a POST to the operator from a background thread that never
holds up training: it keeps only the newest pending event, gives up on an unreachable
operator quickly, and gives the final event a few seconds at exit.  The summary written to
``FINETUNE_TERMINATION_LOG`` (default ``/dev/termination-log``) is the fallback when pushes
were lost; Kubernetes keeps at most 4 KiB of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from finetune_api import contract
from finetune_api.redact import redact
from finetune_api.report import (
    MAX_CHECKPOINTS_IN_EVENT,
    MAX_FILES_IN_EVENT,
    MAX_REPORT_BYTES,
    MAX_SAMPLES_IN_EVENT,
    MAX_SETTINGS_IN_EVENT,
    SUMMARY_LIMIT_BYTES,
    ProgressEvent,
    ProgressReply,
    Thumbnail,
    TrainerSummary,
)
from finetune_api.v1alpha1 import CheckpointRef, DatasetStatus, EvaluationStatus, OutputFile, Stage
from finetune_trainer import gpu_load

log = logging.getLogger("finetune_trainer")

DEFAULT_TERMINATION_LOG = contract.TERMINATION_LOG
DEFAULT_TOKEN_FILE = contract.TOKEN_FILE
# Smoothing of the reported loss (an exponential moving average); loss.png draws the same.
SMOOTHING = 0.9


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def wire(model: ProgressEvent | TrainerSummary) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- JSON log lines -----------------------------------------------------------------------------


class JsonLines(logging.Formatter):
    """One JSON object a line, with the job's name on every line."""

    def __init__(self, job: str) -> None:
        super().__init__()
        self.job = job

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "job": self.job,
            "event": getattr(record, "event", "log"),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            line["traceback"] = self.formatException(record.exc_info)
        # A URI of the spec may carry a password or a presigned query: never in a log line.
        return redact(json.dumps(line, default=str))


# Messages libraries print that are only noise to a person reading a run: (logger, text, why).
NOISE = (
    # bitsandbytes on a CPU with AVX-512 looks for an optional 4-bit kernel package at import;
    # nothing here uses 4-bit CPU matrix products.
    ("bitsandbytes.backends.cpu.ops", "gemm_4bit_forward", "an optional 4-bit CPU kernel"),
    # transformers without torchvision falls back to PIL image processors, which nothing of a
    # Stable Diffusion pipeline needs (its feature extractor is the unused safety checker's).
    ("transformers.utils.import_utils", "requires torchvision", "image processors the pipelines do not use"),
    # diffusers warns on every cast of a model with .to(dtype), even when no module of it must
    # stay in float32 (the list it names is empty).
    ("diffusers.models.modeling_utils", "should be kept in float32: []", "an empty list of float32 modules"),
)


class _DropNoise(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_noise() -> None:
    for name, text, _ in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) and f.text == text for f in logger.filters):
            logger.addFilter(_DropNoise(text))


def configure_logging(job: str, *, stream: IO[str] | None = None, main_process: bool = True) -> None:
    silence_noise()
    if not sys.stderr.isatty():
        # The libraries' progress bars (loading and writing weights) are noise in a pod's log,
        # where the trainer reports its own progress; read when huggingface_hub is imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonLines(job))
    log.handlers[:] = [handler]
    log.propagate = False
    # Other processes of a multi-GPU run say only what goes wrong.
    log.setLevel(logging.INFO if main_process else logging.WARNING)


# --- HTTP push ----------------------------------------------------------------------------------


def report_tls_context() -> ssl.SSLContext | None:
    """With ``FINETUNE_REPORT_CA_FILE`` set (the operator's CA bundle), pushes verify the
    operator's certificate against it; otherwise the system's CAs are used."""
    cafile = os.environ.get(contract.ENV_REPORT_CA_FILE)
    if not cafile:
        return None
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        # Pushes will then fail verification and be retried; the termination message still
        # carries the result.  Training must not stop for it.
        log.warning(
            f"FINETUNE_REPORT_CA_FILE {cafile} is not a readable CA bundle ({exc}); progress pushes will fail",
            extra={"event": "report-tls"},
        )
        return ssl.create_default_context()


def report_token() -> str | None:
    token = os.environ.get(contract.ENV_REPORT_TOKEN)
    if token:
        return token.strip()
    path = Path(os.environ.get(contract.ENV_REPORT_TOKEN_FILE, DEFAULT_TOKEN_FILE))
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None


class ReportPusher:
    """POSTs progress events to the operator from a daemon thread.

    Only the newest pending event is kept: a newer one says everything an older one did.
    The final event is never dropped, and ``close`` waits a few seconds for it.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | Callable[[], str | None] | None,
        timeout_s: float = 2.0,
        max_backoff_s: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.tls = tls
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s
        self.sent = 0
        self.failures = 0
        # What the operator's newest reply asks for (save, sample, stop -> the annotation's value).
        self.requests: dict[str, str] = {}
        self._sleep = sleep
        self._pending: ProgressEvent | None = None
        self._final = False
        self._closing = False
        self._delivered_final = threading.Event()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="report-push", daemon=True)
        self._thread.start()

    def submit(self, event: ProgressEvent, *, final: bool = False) -> None:
        with self._wake:
            if self._final and not final:
                return
            self._pending = event
            self._final = self._final or final
            self._wake.notify()

    def close(self, *, timeout_s: float = 5.0) -> bool:
        """Stop; wait up to ``timeout_s`` for a submitted final event.  True if it was delivered."""
        with self._wake:
            waiting_for_final = self._final
            self._closing = True
            self._wake.notify()
        delivered = self._delivered_final.wait(timeout_s) if waiting_for_final else True
        self._thread.join(timeout=0.1)
        return delivered

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._wake:
                while self._pending is None and not self._closing:
                    self._wake.wait()
                if self._pending is None:
                    return
                event, final = self._pending, self._final
                self._pending = None
            outcome = self._post(event)
            if outcome == "sent":
                self.sent += 1
                backoff = 0.5
                if final:
                    self._delivered_final.set()
                    return
                continue
            if outcome == "rejected":
                # The operator read it and said no (a stale attempt, say): sending it
                # again will not change that.  A final event still stops here.
                if final:
                    self._delivered_final.set()
                    return
                continue
            self.failures += 1
            with self._wake:
                if self._pending is None:
                    self._pending = event  # retry it unless something newer came
                if self._closing and not final:
                    return
            self._sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def _read_reply(self, body: bytes) -> None:
        """The requests waiting for this trainer, from the reply to a report; a reply without
        them (an older operator, a stand-in) asks for nothing."""
        try:
            reply = ProgressReply.model_validate_json(body) if body.strip() else ProgressReply()
        except ValueError:
            return
        self.requests = {k: v for k, v in reply.requests.items() if k in contract.REQUEST_ANNOTATIONS}

    def _post(self, event: ProgressEvent) -> str:
        body = json.dumps(wire(event)).encode()
        request = urllib.request.Request(self.url, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        # A callable is asked each time: the projected service-account token in the pod is
        # short-lived and the kubelet rewrites the file before it expires.
        token = self.token() if callable(self.token) else self.token
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.tls) as response:
                body = response.read()
            self._read_reply(body)
            return "sent"
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                log.warning(
                    "the operator refused a progress report",
                    extra={"event": "report-refused", "fields": {"status": exc.code, "seq": event.seq}},
                )
                return "rejected"
            return "failed"
        except (OSError, TimeoutError):
            return "failed"


# --- progress -----------------------------------------------------------------------------------


class TrainingClock:
    """Smoothed loss, recent speed and the time left."""

    def __init__(self, *, beta: float = SMOOTHING, window_s: float = 30.0) -> None:
        self.beta = beta
        self.window_s = window_s
        self._ema = 0.0
        self._count = 0
        self._marks: deque[tuple[float, int]] = deque()

    def update(self, step: int, loss: float | None, *, at: float | None = None) -> None:
        if loss is not None and math.isfinite(loss):
            self._ema = self.beta * self._ema + (1 - self.beta) * loss
            self._count += 1
        now = time.monotonic() if at is None else at
        self._marks.append((now, step))
        while len(self._marks) > 2 and now - self._marks[0][0] > self.window_s:
            self._marks.popleft()

    @property
    def loss(self) -> float | None:
        return self._ema / (1 - self.beta**self._count) if self._count else None

    @property
    def steps_per_second(self) -> float | None:
        if len(self._marks) < 2:
            return None
        (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def eta_seconds(self, step: int, total: int) -> int | None:
        speed = self.steps_per_second
        return max(0, math.ceil((total - step) / speed)) if speed else None


class ProgressReporter:
    """Builds progress events, logs each as a JSON line, and hands them to the pusher.

    Events go out at every stage change and at most every ``interval_s`` while training.
    On processes other than the main one of a multi-GPU run it stays silent.
    """

    def __init__(
        self,
        *,
        job: str,
        attempt: str | None = None,
        pusher: ReportPusher | None = None,
        interval_s: float = 3.0,
        enabled: bool = True,
        peak_memory: Callable[[], int | None] | None = None,
    ) -> None:
        self.job = job
        self.attempt = attempt or os.environ.get(contract.ENV_ATTEMPT) or socket.gethostname()
        self.pusher = pusher
        self.interval_s = interval_s
        self.enabled = enabled
        self.peak_memory = peak_memory or (lambda: None)
        # The GPU's utilization and memory in use (gpu_load.nvml_reader), where NVML is present.
        self.gpu_load: Callable[[], gpu_load.Reading | None] = lambda: None
        self.idle_watch = gpu_load.IdleWatch()
        self.clock = TrainingClock()
        self.stage = Stage.STARTING
        self.step = 0
        self.total_steps = 0
        self.learning_rate: float | None = None
        self.warnings: list[str] = []
        self.settings: dict[str, str] = {}
        self.dataset: DatasetStatus | None = None
        self.evaluation: EvaluationStatus | None = None
        self.checkpoints: list[CheckpointRef] = []
        self.output_uri: str | None = None
        self.files: list[OutputFile] = []
        self.samples: list[str] = []  # newest last
        self.thumbnails: list[Thumbnail] = []
        self.events: list[ProgressEvent] = []  # what was emitted, for tests and the summary
        # Requests acted on (save, sample, stop -> the annotation's value), on every later event.
        self.done: dict[str, str] = {}
        self._seq = 0
        self._last_emit = 0.0

    def warn(self, message: str) -> None:
        """A setting that could not be honoured, or input that was skipped: logged, and carried
        on every later event and in the summary, so that it reaches the resource."""
        if message in self.warnings:
            return
        self.warnings.append(message)
        log.warning(message, extra={"event": "warning"})

    def set_stage(self, stage: Stage, *, message: str = "") -> None:
        self.stage = stage
        self.emit(message=message)

    def due(self) -> bool:
        """Whether a training event would go out now: the trainer reads its losses back from
        the GPU only then."""
        return time.monotonic() - self._last_emit >= self.interval_s

    def record_step(
        self, step: int, *, loss: float | None, learning_rate: float | None, at: float | None = None
    ) -> None:
        """A finished step (``at``: when it finished, ``time.monotonic()``), without an event."""
        self.step = step
        self.learning_rate = learning_rate
        self.clock.update(step, loss, at=at)

    def training_step(
        self, step: int, *, loss: float | None, learning_rate: float | None, at: float | None = None
    ) -> None:
        """A finished step; an event goes out when one is due, and at the last step."""
        self.record_step(step, loss=loss, learning_rate=learning_rate, at=at)
        if self.due() or step >= self.total_steps:
            self.emit()

    def emit(self, *, message: str = "", final: bool = False) -> ProgressEvent | None:
        if not self.enabled:
            # Silent, but on the same clock: the other processes of a multi-GPU run read their
            # losses back as seldom as the main one.
            self._last_emit = time.monotonic()
            return None
        reading = self.gpu_load()
        idle = self.idle_watch.observe(
            time.monotonic(), reading[0] if reading else None, training=self.stage == Stage.TRAINING
        )
        if idle is not None:
            self.warn(idle)
        event = ProgressEvent(
            seq=self._seq,
            attempt=self.attempt[:253],
            time=now_rfc3339(),
            stage=self.stage,
            step=self.step,
            total_steps=self.total_steps,
            loss=_finite(self.clock.loss),
            learning_rate=_finite(self.learning_rate),
            steps_per_second=self.clock.steps_per_second,
            eta_seconds=self.clock.eta_seconds(self.step, self.total_steps) if self.stage == Stage.TRAINING else None,
            peak_memory_bytes=self.peak_memory(),
            gpu_utilization=reading[0] if reading else None,
            gpu_memory_bytes=reading[1] if reading else None,
            message=message[:2000],
            checkpoints=self.checkpoints[-MAX_CHECKPOINTS_IN_EVENT:],
            output_uri=self.output_uri,
            files=listed_files(self.files),
            samples=self.samples[-MAX_SAMPLES_IN_EVENT:],
            thumbnails=self.thumbnails[:16],
            warnings=[w[:1000] for w in self.warnings[:50]],
            settings={k[:128]: v[:1000] for k, v in list(self.settings.items())[:MAX_SETTINGS_IN_EVENT]},
            dataset=self.dataset,
            evaluation=self.evaluation,
            done=dict(self.done),
        )
        event = fit_event(event)
        self._seq += 1
        self._last_emit = time.monotonic()
        self.events.append(event)
        fields = wire(event)
        # The log line names the thumbnails; their pixels go to the operator only.
        for thumbnail in fields.get("thumbnails", []):
            thumbnail.pop("jpegBase64", None)
        log.info("progress", extra={"event": "progress", "fields": fields})
        if self.pusher is not None:
            self.pusher.submit(event, final=final)
        return event

    def requests(self) -> dict[str, str]:
        """Requests from the operator not acted on yet (kind -> the annotation's value)."""
        asked = self.pusher.requests if self.pusher is not None else {}
        return {kind: value for kind, value in asked.items() if self.done.get(kind) != value}

    def mark_done(self, kind: str, value: str, *, message: str) -> None:
        """A request acted on: said at once, and on every later event until the operator has
        removed its annotation."""
        self.done[kind] = value
        log.info(message, extra={"event": "request-done", "fields": {"request": kind, "value": value}})
        self.emit(message=message)

    def close(self, *, stage: Stage, message: str = "", final_timeout_s: float = 5.0) -> None:
        self.stage = stage
        self.emit(message=message, final=True)
        if self.pusher is not None:
            delivered = self.pusher.close(timeout_s=final_timeout_s)
            if not delivered:
                log.warning(
                    "the final progress report did not reach the operator; the termination message carries it",
                    extra={"event": "report-undelivered"},
                )


def listed_files(files: list[OutputFile]) -> list[OutputFile]:
    """The files a report lists, at most MAX_FILES_IN_EVENT, in written order: where there are
    more, those at the top of the output (the weights people load) go before those inside folders."""
    if len(files) <= MAX_FILES_IN_EVENT:
        return list(files)
    kept = {id(f) for f in sorted(files, key=lambda f: "/" in f.path)[:MAX_FILES_IN_EVENT]}
    return [f for f in files if id(f) in kept]


def fit_event(event: ProgressEvent, *, limit: int = MAX_REPORT_BYTES) -> ProgressEvent:
    """The event as the operator accepts it (at most ``limit`` bytes of JSON; a larger one is
    refused, and every later one would be too): older samples, thumbnails, files inside
    folders, older checkpoints go first."""

    def size() -> int:
        return len(json.dumps(wire(event), separators=(",", ":")).encode())

    if size() <= limit:
        return event
    event = event.model_copy(deep=True)
    steps: list[Callable[[], None]] = [
        lambda: setattr(event, "samples", event.samples[-256:]),
        lambda: setattr(event, "thumbnails", []),
        lambda: setattr(event, "samples", event.samples[-16:]),
        lambda: setattr(event, "files", [f for f in event.files if "/" not in f.path]),
        lambda: setattr(event, "checkpoints", event.checkpoints[-1:]),
        lambda: setattr(event, "warnings", [w[:200] for w in event.warnings[:10]]),
        lambda: setattr(event, "files", []),
    ]
    for step in steps:
        step()
        if size() <= limit:
            break
    return event


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def pusher_from_env() -> ReportPusher | None:
    url = os.environ.get(contract.ENV_REPORT_URL)
    return ReportPusher(url, token=report_token, tls=report_tls_context()) if url else None


# --- termination summary ------------------------------------------------------------------------


def fit_summary(summary: TrainerSummary, *, limit: int = SUMMARY_LIMIT_BYTES) -> bytes:
    """The summary as JSON of at most ``limit`` bytes, dropping detail in order of least use:
    older checkpoints, older samples (the newest step's stay longest), files inside folders,
    the settings (every progress event and the manifest have them too), then the rest, and
    finally shortening the message."""
    data = summary.model_copy(deep=True)

    def encoded() -> bytes:
        return json.dumps(wire(data), separators=(",", ":")).encode()

    steps: list[Callable[[], None]] = [
        lambda: setattr(data, "checkpoints", data.checkpoints[-1:]),
        lambda: setattr(data, "samples", data.samples[-16:]),
        lambda: setattr(data, "samples", data.samples[-1:]),
        lambda: setattr(data, "files", [f for f in data.files if "/" not in f.path]),
        lambda: setattr(data, "dataset", data.dataset and _dataset_totals(data.dataset)),
        lambda: setattr(data, "settings", {}),
        lambda: setattr(data, "warnings", [w[:200] for w in data.warnings[:5]]),
        lambda: setattr(data, "files", []),
        lambda: setattr(data, "samples", []),
        lambda: setattr(data, "warnings", []),
        lambda: setattr(data, "dataset", None),
    ]
    body = encoded()
    for step in steps:
        if len(body) <= limit:
            return body
        step()
        body = encoded()
    while len(body) > limit and data.message:
        data.message = data.message[: max(0, len(data.message) - (len(body) - limit) - 16)] + "..."
        body = encoded()
    return body


def _dataset_totals(dataset: DatasetStatus) -> DatasetStatus:
    """The dataset's totals without its per-concept and per-bucket lists."""
    return dataset.model_copy(update={"concepts": [], "buckets": []})


def write_summary(summary: TrainerSummary) -> Path | None:
    path = Path(os.environ.get(contract.ENV_TERMINATION_LOG, DEFAULT_TERMINATION_LOG))
    body = fit_summary(summary)
    log.info("summary", extra={"event": "summary", "fields": json.loads(body)})
    try:
        # Not atomic on purpose: the kubelet mounts this one file, so it cannot be
        # replaced by a rename; it is read only after the process exits.
        path.write_bytes(body)
    except OSError as exc:
        log.info(f"no termination message written to {path}: {exc}", extra={"event": "summary-skipped"})
        return None
    return path
