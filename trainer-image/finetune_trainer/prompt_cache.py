"""The frozen text encoders' output for each distinct prompt, kept so it is computed once.

Bounded in bytes, not in prompts: a Flux.1 prompt (T5-XXL: 512 tokens x 4,096) is 4-8 MiB, an
SD 1.x one 120-240 KiB.  The first ``device_bytes`` stay on the training device (read every step
for free); the rest wait in host memory (pinned on a GPU, so the copy of a step's few MiB does
not hold the host up) up to ``host_bytes``; beyond that nothing more is kept and the caller
encodes the prompt again.  The device's share is what the up-front memory check counts
(``job.memory_check``)."""

from __future__ import annotations

from typing import Any

from finetune_trainer.families import Conditioning

# What of the training device the cache may hold: a few hundred Flux prompts' worth would be
# gigabytes no estimate counted; 256 MiB holds some 2,000 SD 1.x prompts or 32 of Flux.1.
DEVICE_BYTES = 256 * 2**20
# What host memory may hold beyond that (a pod has some 32 GiB of memory).
HOST_BYTES = 4 * 2**30
# At most this many prompts in all, whatever their size (each is a few Python objects).
MAX_PROMPTS = 4096


def size_of(conditioning: Conditioning) -> int:
    tensors = [conditioning.hidden] + ([] if conditioning.pooled is None else [conditioning.pooled])
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors)


class PromptCache:
    """prompt -> Conditioning, on ``device`` while its share lasts, else in host memory."""

    def __init__(
        self,
        *,
        device: Any,
        device_bytes: int = DEVICE_BYTES,
        host_bytes: int = HOST_BYTES,
        max_prompts: int = MAX_PROMPTS,
    ) -> None:
        import torch

        self.device = device
        # Read at every step (get): decided once.
        self._remote = torch.device(device).type != "cpu"
        self.device_bytes = device_bytes
        self.host_bytes = host_bytes
        self.max_prompts = max_prompts
        self.on_device = 0  # bytes held on the device
        self.on_host = 0  # bytes held in host memory
        self._entries: dict[str, Conditioning] = {}

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def remote(self) -> bool:
        """Whether the training device is not host memory (a GPU)."""
        return self._remote

    def get(self, prompt: str) -> Conditioning | None:
        """The prompt's conditioning on the training device, or None where it is not kept."""
        found = self._entries.get(prompt)
        if found is None or not self.remote or found.hidden.device.type != "cpu":
            return found
        return Conditioning(
            found.hidden.to(self.device, non_blocking=True),
            None if found.pooled is None else found.pooled.to(self.device, non_blocking=True),
        )

    def put(self, prompt: str, conditioning: Conditioning) -> bool:
        """Keep ``conditioning`` (on the device where its share lasts); False where it is full."""
        if prompt in self._entries:
            return True
        if len(self._entries) >= self.max_prompts:
            return False
        size = size_of(conditioning)
        if not self.remote:
            # Host memory is the device: one budget for both.
            if self.on_device + size > self.device_bytes + self.host_bytes:
                return False
            self.on_device += size
            self._entries[prompt] = conditioning
            return True
        if self.on_device + size <= self.device_bytes:
            self.on_device += size
            self._entries[prompt] = _to(conditioning, self.device)
            return True
        if self.on_host + size <= self.host_bytes:
            self.on_host += size
            self._entries[prompt] = _to(conditioning, "cpu", pin=True)
            return True
        return False


def _to(conditioning: Conditioning, device: Any, *, pin: bool = False) -> Conditioning:
    import torch

    pin = pin and torch.cuda.is_available()

    def move(tensor: Any) -> Any:
        moved = tensor.to(device)
        return moved.pin_memory() if pin else moved

    return Conditioning(move(conditioning.hidden), None if conditioning.pooled is None else move(conditioning.pooled))
