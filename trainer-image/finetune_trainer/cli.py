"""``finetune-trainer run JOB.yaml``: validate a FineTuneJob manifest and run it.

With ``spec.resources.gpus`` > 1 it starts one worker per GPU itself (see launch.py), so
this one command serves every pod: no ``accelerate launch`` in front of it, which would
turn every failure into exit code 1.

Exit codes (the operator's podFailurePolicy keys on them): 0 success; 2 bad input (not
retried); 3 out of GPU memory (not retried); anything else is transient and retried, and
the retry resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from finetune_api.report import ExitCode, FailureReason, TrainerSummary
from finetune_api.v1alpha1 import Reason, Stage
from finetune_trainer import credentials, launch, report
from finetune_trainer.errors import BadInput, Stopped, TrainerError

log = logging.getLogger("finetune_trainer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-trainer", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a FineTuneJob manifest (the file you would kubectl apply)")
    run.add_argument("job", type=Path, help="path of the FineTuneJob YAML")
    tiny = commands.add_parser(
        "tiny", help="write a tiny random Stable Diffusion pipeline, demo images and a job.yaml that trains on them"
    )
    tiny.add_argument("dest", type=Path, help="folder to write model/, images/ and job.yaml into")
    tiny.add_argument("--images", type=int, default=4, help="how many demo images (default 4)")
    tiny.add_argument("--size", type=int, default=64, help="demo image size in pixels (default 64)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "tiny":
        from finetune_trainer.storage import make_readable
        from finetune_trainer.tiny import build_tiny_pipeline, write_demo_images

        build_tiny_pipeline(args.dest / "model")
        write_demo_images(args.dest / "images", args.images, args.size)
        job = write_tiny_job(args.dest, size=args.size)
        # Its weights are for a pod of another uid to read (safetensors writes them 0600).
        make_readable(args.dest)
        print(f"wrote {args.dest / 'model'}, {args.dest / 'images'} and {job}; train with: finetune-trainer run {job}")
        return 0
    return run(args.job)


def write_tiny_job(dest: Path, *, size: int) -> Path:
    """``dest/job.yaml``: a FineTuneJob that trains the tiny pipeline on the demo images in a few
    seconds on a CPU, written to ``dest/output``."""
    import yaml

    root = dest.resolve()
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "method": "DreamBooth",
            "baseModel": {"uri": str(root / "model"), "type": "v1x"},
            "dataset": {
                "instanceImages": str(root / "images"),
                "instancePrompt": "a photo of sks toy",
                "resolution": max(64, size // 8 * 8),
            },
            "training": {
                "maxSteps": 20,
                "learningRate": 1.0e-4,
                "optimizer": "AdamW",
                "mixedPrecision": "no",
                "gradientCheckpointing": False,
            },
            "checkpoints": {"everySteps": 10, "keepLast": 1},
            "output": {"uri": str(root / "output"), "halfPrecision": True},
            "samples": {"prompts": ["a photo of sks toy on a table"], "everySteps": 10, "numInferenceSteps": 4},
        },
    }
    path = dest / "job.yaml"
    path.write_text(
        "# A tiny fine-tune of random weights (the pictures it makes are noise): finetune-trainer run job.yaml\n"
        + yaml.safe_dump(manifest, sort_keys=False)
    )
    return path


def _main_process() -> bool:
    # Set by accelerate/torchrun for every worker of a multi-GPU run.
    return os.environ.get("RANK", "0") == "0"


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Stopped(f"stopped by {signal.Signals(signum).name}; a retry resumes from the newest checkpoint")


def run(job_path: Path) -> int:
    """Run one job; never raises.  Writes the termination summary on every way out."""
    main_process = _main_process()
    report.configure_logging(job_path.stem, main_process=main_process)
    reporter = report.ProgressReporter(job=job_path.stem, enabled=main_process)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore_signals() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    summary: TrainerSummary
    code: int
    try:
        from finetune_trainer.job import load_job

        job = load_job(job_path)
        credentials.check_mounted()
        name = job.metadata.name or job_path.stem
        report.configure_logging(name, main_process=main_process)
        reporter.job = name
        reporter.pusher = report.pusher_from_env() if main_process else None
        gpus = job.spec.resources.gpus
        if not launch.is_worker() and gpus > 1:
            workers = launch.processes_for(gpus)
            if workers > 1:
                log.info(f"starting {workers} worker processes", extra={"event": "launch"})
                restore_signals()
                return launch.launch_workers(job_path, workers)
            reporter.warn(f"spec.resources.gpus: {gpus} GPUs asked for, {workers} usable here; training in one process")
        elif launch.is_worker() and 0 < launch.world_size() < gpus:
            reporter.warn(
                f"spec.resources.gpus: {gpus} GPUs asked for, {launch.world_size()} usable here; "
                f"training in {launch.world_size()} processes"
            )
        reporter.emit(message=f"starting {name}")

        from finetune_trainer.train import DreamBoothRecipe

        result = DreamBoothRecipe(job, reporter=reporter).run()
        code = ExitCode.SUCCESS
        stopped = f" of {result.total_steps}, stopped as asked" if result.stopped_early else ""
        summary = TrainerSummary(
            phase="Succeeded",
            reason=str(Reason.STOPPED_EARLY if result.stopped_early else Reason.COMPLETED),
            message=f"trained {result.step} steps{stopped}; the model is in {result.output}",
            step=result.step,
            total_steps=result.total_steps,
            output_uri=result.output,
            files=result.files,
            samples=result.samples,
        )
        reporter.close(stage=Stage.DONE, message=summary.message)
    except TrainerError as exc:
        code, summary = _failed(reporter, exc.exit_code, str(exc.reason), str(exc))
        log.error(str(exc), extra={"event": "failed"}, exc_info=not isinstance(exc, BadInput))
    except Stopped as exc:
        code, summary = _failed(reporter, ExitCode.ERROR, str(FailureReason.ERROR), str(exc))
        log.warning(str(exc), extra={"event": "stopped"})
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        code, summary = _failed(reporter, ExitCode.ERROR, str(FailureReason.ERROR), message)
        log.error(message, extra={"event": "failed"}, exc_info=True)
    finally:
        restore_signals()
    if main_process:
        summary.checkpoints = reporter.checkpoints
        summary.samples = summary.samples or list(reporter.samples)
        summary.warnings = reporter.warnings
        summary.settings = dict(reporter.settings)
        summary.dataset = reporter.dataset
        summary.evaluation = reporter.evaluation
        report.write_summary(summary)
    launch.record_exit_code(code)
    return int(code)


def _failed(reporter: report.ProgressReporter, code: int, reason: str, message: str) -> tuple[int, TrainerSummary]:
    summary = TrainerSummary(
        phase="Failed",
        reason=reason,
        message=message,
        step=reporter.step,
        total_steps=reporter.total_steps,
    )
    try:
        reporter.close(stage=Stage.FAILED, message=message)
    except Exception:  # the report must not hide the failure it reports
        log.exception("could not send the final report", extra={"event": "report-failed"})
    return code, summary


if __name__ == "__main__":
    sys.exit(main())
