"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL and the families after
them, each in a module of its own (see ``base.py`` for what a family provides).  A new family
is a module and one line in ``FAMILIES``."""

from __future__ import annotations

from finetune_api.v1alpha1 import ModelType
from finetune_trainer.families.base import BaseModel, Conditioning, LoadOptions, MemoryEstimate, ModelFamily, stack
from finetune_trainer.families.flux import FLUX
from finetune_trainer.families.sd import SD
from finetune_trainer.families.sdxl import SDXL

FAMILIES: dict[ModelType, ModelFamily] = {
    ModelType.V1X: SD,
    ModelType.V2X_512: SD,
    ModelType.V2X: SD,
    ModelType.SDXL: SDXL,
    ModelType.FLUX1: FLUX,
}


def family_of(model_type: ModelType | str) -> ModelFamily:
    return FAMILIES[ModelType(model_type)]


__all__ = [
    "FAMILIES",
    "BaseModel",
    "Conditioning",
    "LoadOptions",
    "MemoryEstimate",
    "ModelFamily",
    "family_of",
    "stack",
]
