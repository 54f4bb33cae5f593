"""What a photo's prompt is at one step: caption dropout and tag shuffling (kohya's
``caption_dropout_rate``, ``shuffle_caption`` and ``keep_tokens``), drawn from the slot's own
generator like every other random choice, so a resumed run repeats them.  And which prompts
are longer than a text encoder reads: named, never cut short in silence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from finetune_trainer.data import Example


def vary(prompt: str, *, gen: torch.Generator, dropout: float, shuffle: bool, keep_tokens: int) -> str:
    """The prompt for this step: empty with probability ``dropout``; with ``shuffle`` its
    comma-separated tags in a new order, the first ``keep_tokens`` kept in front."""
    import torch

    if dropout > 0 and float(torch.rand(1, generator=gen)) < dropout:
        return ""
    if not shuffle:
        return prompt
    tags = [t.strip() for t in prompt.split(",") if t.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(rest), generator=gen).tolist() if len(rest) > 1 else list(range(len(rest)))
    return ", ".join(kept + [rest[i] for i in order])


def too_long(examples: Sequence[Example], tokenizer: Any, *, window: int | None = None) -> list[tuple[str, int]]:
    """(file, tokens) of each photo whose prompt is longer than the tokenizer's window (CLIP
    reads 75 tokens between its start and end tokens and drops the rest; Flux's T5, 511 before
    its end token)."""
    window = int(tokenizer.model_max_length) - 2 if window is None else window
    found: list[tuple[str, int]] = []
    counted: dict[str, int] = {}
    for example in examples:
        if example.prompt not in counted:
            counted[example.prompt] = len(tokenizer(example.prompt, add_special_tokens=False).input_ids)
        if counted[example.prompt] > window:
            found.append((example.path.name, counted[example.prompt]))
    return found


def too_long_warning(found: list[tuple[str, int]], tokenizer: Any, *, window: int | None = None) -> str:
    window = int(tokenizer.model_max_length) - 2 if window is None else window
    listed = ", ".join(f"{name} ({tokens} tokens)" for name, tokens in found[:10])
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    return (
        f"spec.dataset: {len(found)} prompt(s) are longer than the {window} tokens the text encoder reads, and "
        f"their ends are not learned: {listed}{more}; shorten those captions"
    )
