"""The moving average of the trained weights (``spec.training.ema``): diffusers' ``EMAModel``,
the one its full fine-tune scripts keep, over the parameters the optimizer trains (the UNet's,
a trained text encoder's, or a LoRA's adapters).

- Updated after every ``everySteps``-th optimizer step from ``startStep`` on; the update count
  ``t`` (not the step) drives the warm-up, and the first update copies the weights (decay 0).
- ``onCPU``: the average lives in host memory (pinned, on a GPU) and goes to the GPU for each
  update and back, as diffusers' ``--offload_ema``.
- Checkpointed by accelerate beside the models (``custom_checkpoint_0.pkl``), so a resumed run
  goes on from the same average; swapped into the models for the EMA samples and, unless
  ``export: false``, for the exports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from finetune_api.v1alpha1 import EMASettings

if TYPE_CHECKING:
    import torch

# diffusers' EMA warm-up exponent for runs of thousands (not millions) of steps: its docstring's
# "gamma=1, power=3/4 for models you plan to train for less".
WARMUP_POWER = 0.75


class MovingAverage:
    def __init__(self, parameters: Sequence[torch.nn.Parameter], settings: EMASettings, *, device: Any) -> None:
        import torch
        from diffusers.training_utils import EMAModel

        self.settings = settings
        self.parameters = list(parameters)
        self.device = torch.device(device)
        self.home = torch.device("cpu") if settings.on_cpu else self.device
        self.model = EMAModel(
            self.parameters,
            decay=settings.decay,
            min_decay=0.0,
            update_after_step=0,
            use_ema_warmup=settings.warmup,
            inv_gamma=1.0,
            power=WARMUP_POWER,
        )
        self._place()

    def _place(self) -> None:
        self.model.to(device=self.home)
        if self.home.type == "cpu" and self.device.type == "cuda":
            self.model.pin_memory()

    def due(self, step: int) -> bool:
        """Whether the optimizer step just taken (counting from 1) updates the average."""
        start = self.settings.start_step
        return step >= start and (step - start) % self.settings.every_steps == 0

    def update(self, step: int) -> None:
        if not self.due(step):
            return
        if self.home == self.device:
            self.model.step(self.parameters)
            return
        self.model.to(device=self.device, non_blocking=True)
        self.model.step(self.parameters)
        self.model.to(device=self.home, non_blocking=True)

    @property
    def updates(self) -> int:
        return int(self.model.optimization_step)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the trained parameters' places, the trained weights back after."""
        import torch

        with torch.no_grad():
            self.model.store(self.parameters)
            self.model.copy_to(self.parameters)
        try:
            yield
        finally:
            with torch.no_grad():
                self.model.restore(self.parameters)

    # accelerate's register_for_checkpointing saves and loads these.
    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
        self._place()
