"""How busy the GPU is: NVML's utilization and memory in use, read where the driver's library is
(``libnvidia-ml.so.1``, which the NVIDIA container runtime mounts into every GPU container), with
no Python package needed; and the warning when a training GPU idles for minutes, which is almost
always a data-loading bottleneck.

NVML's utilization is the percentage of the last sample period (1/6 s to 1 s) in which a kernel
ran; read at each progress report, its average over minutes is a fair picture of a steady run.
"""

from __future__ import annotations

import ctypes
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("finetune_trainer")

Reading = tuple[float, int]  # (utilization in percent, memory in use in bytes)

# A GPU busy less than this share of the time over WINDOW_S seconds of training is idling.
IDLE_PERCENT = 50.0
WINDOW_S = 300.0


class _Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def nvml_reader(index: int, uuid: str | None = None) -> Callable[[], Reading | None] | None:
    """A function reading GPU ``index`` (by ``uuid`` where given: NVML numbers every GPU the
    container sees, CUDA only those CUDA_VISIBLE_DEVICES names), or None where NVML is absent."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        handle = ctypes.c_void_p()
        found = 1
        if uuid:
            found = nvml.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle))
        if found != 0:
            found = nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle))
        if found != 0:
            return None
    except (OSError, AttributeError):
        return None

    def read() -> Reading | None:
        busy, memory = _Utilization(), _Memory()
        if nvml.nvmlDeviceGetUtilizationRates(handle, ctypes.byref(busy)) != 0:
            return None
        if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
            return None
        return float(busy.gpu), int(memory.used)

    return read


@dataclass
class IdleWatch:
    """Warns once when every reading over ``window_s`` seconds of training averages under
    ``idle_percent``."""

    idle_percent: float = IDLE_PERCENT
    window_s: float = WINDOW_S
    readings: deque[tuple[float, float]] = field(default_factory=deque)
    warned: bool = False

    def observe(self, at: float, percent: float | None, *, training: bool) -> str | None:
        if not training or percent is None:
            self.readings.clear()  # only an unbroken stretch of training counts
            return None
        self.readings.append((at, percent))
        while self.readings and at - self.readings[0][0] > self.window_s:
            self.readings.popleft()
        covered = at - self.readings[0][0] >= self.window_s * 0.9 and len(self.readings) >= 3
        if self.warned or not covered:
            return None
        average = sum(p for _, p in self.readings) / len(self.readings)
        if average >= self.idle_percent:
            return None
        self.warned = True
        minutes = self.window_s / 60
        return (
            f"the GPU was busy only {average:.0f}% of the time over {minutes:.0f} minutes of training (NVML): it waits "
            "for its data. spec.training.cacheLatents: true (each photo encoded once, not at every step) and more CPU "
            "for the pod (spec.resources.cpu) usually help"
        )
