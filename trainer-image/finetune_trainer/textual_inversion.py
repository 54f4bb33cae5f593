"""Textual Inversion: a new word learned as vectors of the text encoders' embedding tables, with
everything else frozen (diffusers' ``textual_inversion.py`` and ``textual_inversion_sdxl.py``,
kohya's ``train_textual_inversion.py``, A1111's embeddings).

- The word (``spec.textualInversion.token``) and, for more than one vector, ``token_1``,
  ``token_2``... (diffusers' convention, which its pipelines expand in prompts by themselves)
  are added to every tokenizer; each text encoder's table grows by as many rows, started from
  the initializer words' embeddings in turn.
- Only those rows learn: the optimizer holds each encoder's table (its gradient is dense), and
  after every optimizer step the other rows are put back as they were, as diffusers' script does
  (AdamW's weight decay would move them otherwise).  The UNet, the VAE and the rest of the text
  encoders never get a gradient.
- Checkpoints hold the learned rows only; a resume writes them back into the grown tables.
- Exports: ``learned_embeds.safetensors`` ({token: vectors}; SDXL's second encoder in
  ``learned_embeds_2.safetensors``), which diffusers' ``load_textual_inversion`` reads, and
  ``<name>.safetensors`` in the web UIs' layout (``emb_params``; SDXL: ``clip_l`` and
  ``clip_g``), which A1111, Forge, ComfyUI and InvokeAI read.
- Pivotal tuning (``spec.training.lora.newTokens``, diffusers' advanced DreamBooth LoRA script):
  the same word learned in the same steps as a LoRA, for the first ``trainFraction`` of the run
  (then frozen), and exported beside the LoRA's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.v1alpha1 import TextualInversionSettings
from finetune_trainer import storage
from finetune_trainer.errors import BadInput

if TYPE_CHECKING:
    import torch

DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
# The web UIs' keys: one text encoder (SD 1.x/2.x), or SDXL's two.
WEBUI_KEYS = {1: ("emb_params",), 2: ("clip_l", "clip_g")}
FIELD = "spec.textualInversion"
# A checkpoint's text-encoder file: the word's vectors under this name.
CHECKPOINT_KEY = "vectors"


def token_names(settings: TextualInversionSettings) -> list[str]:
    """The word and its further vectors' names: ``<t>``, ``<t>_1``, ... (diffusers' convention)."""
    return [settings.token, *(f"{settings.token}_{i}" for i in range(1, settings.vectors))]


def expand(prompt: str, settings: TextualInversionSettings) -> str:
    """The prompt with the word standing for all its vectors, as diffusers' pipelines expand it
    (``maybe_convert_prompt``)."""
    if settings.vectors == 1:
        return prompt
    return prompt.replace(settings.token, " ".join(token_names(settings)))


@dataclass
class Learned:
    """The new rows of each text encoder's table, and what the other rows must stay."""

    settings: TextualInversionSettings
    ids: list[list[int]]  # per text encoder: the rows of token_names(settings)
    kept: list[Any]  # per text encoder: a bool mask of the rows that must not move
    original: list[Any]  # per text encoder: the table as it started
    # Pivotal tuning after newTokens.trainFraction of the run: the tables no longer learn.
    frozen: bool = False

    def restore(self, encoders: list[Any]) -> None:
        """Put every row but the word's back as it was."""
        import torch

        if self.frozen:
            return  # no gradient, so the optimizer leaves the tables alone (weight decay too)
        with torch.no_grad():
            for encoder, kept, original in zip(encoders, self.kept, self.original, strict=True):
                weight = encoder.get_input_embeddings().weight
                weight[kept] = original[kept].to(weight.device, weight.dtype)

    def learn(self, encoders: list[Any]) -> None:
        """Let the tables learn (again, after something froze the encoders: peft's adapters do)."""
        for encoder in encoders:
            encoder.get_input_embeddings().weight.requires_grad_(not self.frozen)

    def freeze(self, encoders: list[Any]) -> None:
        """From now on the word stays as it is: the tables get no gradient, so the optimizer
        (AdamW skips a parameter without one) leaves them alone."""
        self.frozen = True
        self.learn(encoders)

    def vectors(self, encoders: list[Any]) -> list[torch.Tensor]:
        """The word's vectors in each text encoder: (vectors, width)."""
        return [e.get_input_embeddings().weight[ids].detach() for e, ids in zip(encoders, self.ids, strict=True)]

    def one(self, index: int) -> Learned:
        """What concerns text encoder ``index`` alone."""
        return Learned(self.settings, [self.ids[index]], [self.kept[index]], [self.original[index]], self.frozen)

    def load_checkpoint(self, encoders: list[Any], state: dict[str, Any], *, source: Path) -> None:
        """The word's vectors from a checkpoint's file of these text encoders (taken out of ``state``)."""
        vectors = state.pop(CHECKPOINT_KEY, None)
        if vectors is None or vectors.shape[0] != self.settings.vectors:
            raise BadInput(f"{source} does not hold this run's {self.settings.vectors} vector(s)", field=FIELD)
        self.load(encoders, [vectors])

    def load(self, encoders: list[Any], vectors: list[torch.Tensor]) -> None:
        import torch

        with torch.no_grad():
            for encoder, ids, values in zip(encoders, self.ids, vectors, strict=True):
                weight = encoder.get_input_embeddings().weight
                weight[ids] = values.to(weight.device, weight.dtype)


def add_word(
    tokenizers: list[Any], encoders: list[Any], settings: TextualInversionSettings, *, field: str = FIELD
) -> Learned:
    """Add the word to every tokenizer and text encoder, started from the initializer's
    embeddings; freeze each encoder but its embedding table.  Refuses a word the tokenizer
    already has (it would not be new: its learned vectors would replace a real word's)."""
    import torch

    names = token_names(settings)
    ids, kept, original = [], [], []
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        known = [n for n in names if n in tokenizer.get_vocab()]
        if known:
            raise BadInput(
                f"{settings.token!r} is already a word of the tokenizer ({known[0]!r}); choose a new one, such as "
                f"<{settings.token.strip('<>')}-ti>",
                field=f"{field}.token",
            )
        start = tokenizer.encode(settings.initializer, add_special_tokens=False)
        if not start:
            raise BadInput(f"{settings.initializer!r} has no tokens", field=f"{field}.initializer")
        tokenizer.add_tokens(names)
        rows = tokenizer.convert_tokens_to_ids(names)
        encoder.resize_token_embeddings(len(tokenizer))
        encoder.requires_grad_(False)
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for i, row in enumerate(rows):
                table[row] = table[start[i % len(start)]].clone()
        table.requires_grad_(True)
        mask = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
        mask[rows] = False
        ids.append(rows)
        kept.append(mask)
        original.append(table.detach().clone())
    return Learned(settings=settings, ids=ids, kept=kept, original=original)


def register_checkpoint_hooks(accelerator: Any, learned: Learned) -> None:
    """Checkpoints of a Textual Inversion run hold the word's vectors, not the frozen models:
    accelerate's model files (one per text encoder, the only models it was given) are swapped
    for them on save and read back into the grown tables on load."""
    from safetensors.torch import load_file

    def save(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        for index in range(len(weights)):
            vectors = learned.one(index).vectors([accelerator.unwrap_model(models[index])])[0]
            weights[index] = {CHECKPOINT_KEY: vectors}

    def load(models: list[Any], input_dir: str) -> None:
        for index, model in enumerate(list(models)):
            name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
            path = Path(input_dir) / name
            learned.one(index).load_checkpoint([accelerator.unwrap_model(model)], load_file(str(path)), source=path)
        models.clear()  # loaded here; accelerate must not load them again as full models

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


# --- files people load -----------------------------------------------------------------------------


def export(
    learned: Learned, encoders: list[Any], output: Path, *, webui_name: str, dtype: torch.dtype, title: str, step: int
) -> list[Path]:
    """``learned_embeds.safetensors`` (and ``_2`` for SDXL's second encoder) and the web UIs'
    ``<webui_name>``."""
    from safetensors.torch import save_file

    vectors = [v.to(dtype).cpu().contiguous() for v in learned.vectors(encoders)]
    token = learned.settings.token
    written = []
    for name, values in zip(DIFFUSERS_FILES, vectors, strict=False):
        path = output / name
        with storage.atomic_path(path) as tmp:
            save_file({token: values}, str(tmp), metadata={"format": "pt"})
            storage.make_readable(tmp)
        written.append(path)
    keys = WEBUI_KEYS.get(len(vectors))
    if keys is None:
        raise ValueError(f"no web-UI embedding layout for {len(vectors)} text encoders")
    metadata = {
        "format": "pt",
        "modelspec.title": title,
        "modelspec.textual_inversion_token": token,
        "ss_steps": str(step),
    }
    path = output / webui_name
    with storage.atomic_path(path) as tmp:
        save_file(dict(zip(keys, vectors, strict=True)), str(tmp), metadata=metadata)
        storage.make_readable(tmp)
    written.append(path)
    return written
