"""Scores on every checkpoint (``spec.evaluation``), as the DreamBooth paper measures a fine-tune
(Ruiz et al., "DreamBooth", CVPR 2023, section 4.1 and its DreamBench protocol):

- ``dino``: subject fidelity, the mean cosine similarity between the DINO ViT CLS embeddings of
  each generated image and of each instance photo (the paper's ViT-S/16, ``facebook/dino-vits16``);
- ``clipI``: the same with CLIP's image embeddings;
- ``clipT``: prompt fidelity, the mean cosine similarity between each image's CLIP embedding and
  its prompt's.

The paper's figures are the anchor: DreamBooth on Stable Diffusion scores DINO 0.668, CLIP-I 0.803,
CLIP-T 0.305; the real photos against each other DINO 0.774, CLIP-I 0.885.

The scoring models are read once from their URIs (``hf://``, a volume, an object store, as the
base model), kept in host memory between checkpoints and brought to the device only while they
score; the instance photos' embeddings are computed once.  Checkpoints keep their scores in their
state file, so a resumed run ranks the ones it did not score itself, and the one the rule ranks
first is never pruned.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.v1alpha1 import Evaluation

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger("finetune_trainer")

FIELD = "spec.evaluation"
EVALUATION_DIR = "evaluation"
# What a hub repository of a scoring model needs: configs, weights, the tokenizer's files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.bin"]


# Scores where lower is better.
LOWER_IS_BETTER = {"holdOutLoss"}


def rule_text(settings: Evaluation) -> str:
    floors = ", ".join(f"{name} >= {value:g}" for name, value in sorted(settings.floors.items()))
    best = "lowest" if str(settings.rank_by) in LOWER_IS_BETTER else "highest"
    return f"{best} {settings.rank_by}" + (f" among checkpoints with {floors}" if floors else "")


def best(
    candidates: Sequence[tuple[int, dict[str, float]]], settings: Evaluation
) -> tuple[int, dict[str, float]] | None:
    """The (step, scores) the rule ranks first: the highest ``rankBy`` among those that reach
    every floor (all of them where none does); a tie goes to the later step."""
    scored = [(step, scores) for step, scores in candidates if str(settings.rank_by) in scores]
    if not scored:
        return None
    passing = [c for c in scored if all(c[1].get(k, -math.inf) >= v for k, v in settings.floors.items())]
    sign = -1 if str(settings.rank_by) in LOWER_IS_BETTER else 1
    return max(passing or scored, key=lambda c: (sign * c[1][str(settings.rank_by)], c[0]))


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns the model output with the projected embedding as pooler_output;
    # earlier versions the tensor itself.
    return output if not hasattr(output, "pooler_output") else output.pooler_output


@dataclass
class _Model:
    model: Any
    processor: Any


class Scorer:
    """The scoring models and the instance photos' embeddings."""

    def __init__(self, settings: Evaluation, *, locate: Callable[[str, str], Path]) -> None:
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        self.settings = settings
        self.clip: _Model | None = None
        self.dino: _Model | None = None
        if settings.clip_model is not None:
            path = locate(settings.clip_model, f"{FIELD}.clipModel")
            self.clip = _Model(CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path))
        if settings.dino_model is not None:
            path = locate(settings.dino_model, f"{FIELD}.dinoModel")
            self.dino = _Model(AutoModel.from_pretrained(path).eval(), AutoImageProcessor.from_pretrained(path))
        self.reference: dict[str, torch.Tensor] = {}

    def _on(self, device: Any) -> None:
        for part in (self.clip, self.dino):
            if part is not None:
                part.model.to(device)

    def image_embeddings(self, images: Sequence[Image.Image], device: Any = "cpu") -> dict[str, torch.Tensor]:
        """Each scoring model's unit-length embedding of each image."""
        import torch

        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.clip is not None:
                pixels = self.clip.processor(images=list(images), return_tensors="pt")["pixel_values"]
                embeds = _features(self.clip.model.get_image_features(pixel_values=pixels.to(device)))
                out["clip"] = torch.nn.functional.normalize(embeds.float(), dim=-1).cpu()
            if self.dino is not None:
                pixels = self.dino.processor(images=list(images), return_tensors="pt")["pixel_values"]
                hidden = self.dino.model(pixel_values=pixels.to(device)).last_hidden_state
                out["dino"] = torch.nn.functional.normalize(hidden[:, 0].float(), dim=-1).cpu()
        return out

    def text_embeddings(self, prompts: Sequence[str], device: Any = "cpu") -> torch.Tensor:
        import torch

        assert self.clip is not None
        with torch.no_grad():
            tokens = self.clip.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
            embeds = _features(
                self.clip.model.get_text_features(
                    input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
                )
            )
        return torch.nn.functional.normalize(embeds.float(), dim=-1).cpu()

    def set_reference(self, photos: Sequence[Image.Image]) -> None:
        """The instance photos, embedded once."""
        self.reference = self.image_embeddings(photos)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], *, device: Any = "cpu") -> dict[str, float]:
        """dino, clipI and clipT (those the models given can score) of generated ``images``, each
        rendered from the prompt at the same index of ``prompts``."""
        if not self.reference:
            raise RuntimeError("set_reference first")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        self._on(device)
        try:
            embedded = self.image_embeddings(images, device)
            scores: dict[str, float] = {}
            if "dino" in embedded:
                scores["dino"] = float((embedded["dino"] @ self.reference["dino"].T).mean())
            if "clip" in embedded:
                scores["clipI"] = float((embedded["clip"] @ self.reference["clip"].T).mean())
                texts = self.text_embeddings(prompts, device)
                scores["clipT"] = float((embedded["clip"] * texts).sum(dim=-1).mean())
        finally:
            self._on("cpu")
        return {k: round(v, 6) for k, v in scores.items()}
