"""Several GPUs: one worker process per GPU, with the exit code that says why it ended.

``accelerate launch`` (and torchrun under it) ends with exit code 1 whenever a worker
fails, which would turn "bad input" (2) and "out of GPU memory" (3) into a retry.  So
``finetune-trainer run`` starts the workers itself when the job asks for more than one GPU:
each worker records its exit code in a folder, and this process ends with the most telling
one (out of memory, then bad input, then the launcher's own code).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from finetune_api.report import ExitCode

EXIT_CODE_DIR = "FINETUNE_EXIT_CODE_DIR"


def is_worker() -> bool:
    """True in a process started by a distributed launcher (it sets these for every worker)."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def record_exit_code(code: int) -> None:
    folder = os.environ.get(EXIT_CODE_DIR)
    if folder:
        rank = os.environ.get("RANK", "0")
        Path(folder, f"rank-{rank}").write_text(str(int(code)))


def combine(codes: Sequence[int], launcher_code: int) -> int:
    """The exit code of the whole run from each worker's and the launcher's."""
    if ExitCode.OUT_OF_MEMORY in codes:
        return int(ExitCode.OUT_OF_MEMORY)
    if ExitCode.BAD_INPUT in codes:
        return int(ExitCode.BAD_INPUT)
    if launcher_code == 0 and codes and all(c == ExitCode.SUCCESS for c in codes):
        return int(ExitCode.SUCCESS)
    return launcher_code or int(ExitCode.ERROR)


def accelerate_command(job: Path, num_processes: int, *, cpu: bool = False) -> list[str]:
    """One worker per GPU (``accelerate launch``).  ``cpu``: worker processes on the CPU that
    talk over gloo, started by torchrun (``accelerate launch --cpu`` starts one process unless
    given MPI); that is how the tests run data parallelism without a GPU."""
    if cpu:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(num_processes),
            "-m",
            "finetune_trainer",
            "run",
            str(job),
        ]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "-m",
        "finetune_trainer",
        "run",
        str(job),
    ]


def launch_workers(job: Path, num_processes: int, *, cpu: bool = False, command: Sequence[str] | None = None) -> int:
    """Run the job in ``num_processes`` workers and return the run's exit code."""
    with tempfile.TemporaryDirectory(prefix="finetune-exit-") as codes_dir:
        env = {**os.environ, EXIT_CODE_DIR: codes_dir}
        process = subprocess.Popen(list(command or accelerate_command(job, num_processes, cpu=cpu)), env=env)

        def forward(signum: int, frame: object) -> None:
            process.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            launcher_code = process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        codes = [int(p.read_text()) for p in Path(codes_dir).glob("rank-*")]
    return combine(codes, launcher_code)


def processes_for(gpus: int) -> int:
    """How many workers: one per GPU the job asks for, as far as this machine has them."""
    if gpus <= 1:
        return 1
    try:
        import torch

        available = torch.cuda.device_count()
    except Exception:
        available = 0
    return max(1, min(gpus, available))
