"""Where a tensor was made, followed through every operation: what a GPU would refuse, seen on a CPU.

On a GPU, an operation on a tensor made on the host (a factory call without ``device=``: the
default, the CPU) and one on the GPU raises.  On a CPU both are CPU tensors and nothing is said,
which is how a CPU-only test suite misses the defect.  ``DeviceProvenance`` is a torch function
mode that tags each tensor: the models' parameters and buffers, and whatever is made with a ``device``
given or computed from a device tensor, are *device*; what a factory makes without a device, and
what is computed from host tensors only, is *host*.  The first operation that takes a host
tensor of more than one element beside a device tensor is recorded (``first``): a 0-dim host
tensor is allowed beside CUDA tensors, as PyTorch allows it.  ``.to(device)`` makes a device
tensor, as on a GPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

HOST, DEVICE = "host", "device"


def _placement(value: Any) -> str | None:
    """What a device argument of ``.to()`` says: the run's device (a ``torch.device``, as the
    trainer and the pipelines pass it, or a GPU named in words), the host (the word "cpu", as code
    that means the host writes it, e.g. diffusers' ``sigmas.to("cpu")``), or nothing (a dtype)."""
    if isinstance(value, torch.device):
        return DEVICE
    if isinstance(value, str):
        if value == "cpu":
            return HOST
        try:
            torch.device(value)
        except RuntimeError:
            return None
        return DEVICE
    return None


class DeviceProvenance(TorchFunctionMode):
    """Followed at the level of torch's Python API, where a call says whether it named a device
    (below it, in the dispatcher, every factory call has the default device filled in)."""

    def __init__(self, device_tensors: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self._tags: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        for tensor in device_tensors:
            self._tag(tensor, DEVICE)
        self.first: str | None = None

    @classmethod
    def of_models(cls, *models: Any) -> DeviceProvenance:
        """With every parameter and buffer of ``models`` on the device."""
        return cls(t for m in models if m is not None for t in (*m.parameters(), *m.buffers()))

    def _tag(self, tensor: torch.Tensor, tag: str) -> None:
        self._tags[id(tensor)] = (weakref.ref(tensor), tag)

    def tag_of(self, tensor: torch.Tensor) -> str | None:
        entry = self._tags.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs:
            return out
        name = getattr(func, "__name__", "")
        device = kwargs.get("device")
        tag: str | None
        if name == "cpu":
            tag = HOST
        elif name in ("to", "cuda"):
            placed = [_placement(a) for a in (*args[1:], device)]
            tag = DEVICE if DEVICE in placed else HOST if HOST in placed else self.tag_of(args[0])
        elif not inputs:
            # A factory: on the host unless it names a device; ``device=other.device`` is beside
            # whatever ``other`` is (unknown here), so it goes with what it is computed with.
            tag = HOST if device is None or device == "cpu" else None
        else:
            tags = [self.tag_of(t) for t in inputs]
            host = [t for t, g in zip(inputs, tags, strict=True) if g == HOST and t.dim() > 0]
            on_device = [t for t, g in zip(inputs, tags, strict=True) if g == DEVICE]
            # A 0-dim device tensor used as an index reads as a number (as on a GPU).
            indexing = name in ("__getitem__", "__setitem__") and all(t.dim() == 0 for t in on_device)
            if on_device and host and not indexing and self.first is None and name != "copy_":
                shapes = [tuple(t.shape) for t in host][:3]
                self.first = f"{name}: host tensor(s) of shape {shapes} beside device tensors"
            tag = DEVICE if on_device else (HOST if HOST in tags else None)
        if tag is not None:
            for tensor in outputs:
                self._tag(tensor, tag)
        return out
