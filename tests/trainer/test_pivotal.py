"""Pivotal tuning (``spec.training.lora.newTokens``) on the tiny model: a new word learned in the
text encoder together with a LoRA (on the UNet and the text encoder), the word for the first half
of the run only; the adapters and the word exported in both layouts, loaded through diffusers'
own loaders together to the text-encoder output the run ended with; a killed run resumes to the
same word and adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.conftest import (
    Run,
    base_spec,
    encoded,
    killed_and_resumed,
    manifest,
    run_watching_the_export,
    sd_pipeline,
)

NAME = "tiny-pivotal"
TOKEN, INITIALIZER, VECTORS = "<zqx>", "ball", 2
PROMPT = f"a photo of {TOKEN} ball"
STEPS, EVERY, FRACTION = 8, 4, 0.5  # the word learns in steps 1-4; the adapters in all 8


def pivotal_spec(model: Path, photos: Path, output: Path) -> dict[str, Any]:
    spec = base_spec(model, photos, output, maxSteps=STEPS, batchSize=2, learningRate=3.0e-2, seed=5)
    spec["method"] = "LoRA"
    spec["training"]["lora"] = {
        "rank": 4,
        "alpha": 4,
        "trainTextEncoder": True,
        "newTokens": {"token": TOKEN, "initializer": INITIALIZER, "vectors": VECTORS, "trainFraction": FRACTION},
    }
    spec["dataset"]["instancePrompt"] = PROMPT
    spec["checkpoints"] = {"everySteps": EVERY, "keepLast": 2}
    spec["samples"] = {"prompts": [f"{PROMPT} on a beach"], "numInferenceSteps": 2}
    return spec


# The text encoder's output for PROMPT as the run left it, taken where the exports are made.
FINAL: dict[str, torch.Tensor] = {}


@pytest.fixture(scope="module")
def pivotal_run(tiny_model: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    from finetune_trainer import textual_inversion

    root = tmp_path_factory.mktemp("pivotal")
    output = root / "out"
    job = manifest(root / "job.yaml", name=NAME, **pivotal_spec(tiny_model, photos, output))

    def keep_the_text_encoders_output(trained: Any) -> None:
        tokenizer, encoder = trained.base.tokenizers[0], trained.text_encoders[0]
        prompt = textual_inversion.expand(PROMPT, trained.learned.settings)
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            FINAL["hidden"] = encoder(ids.input_ids.to(encoder.device))[0].cpu()

    return run_watching_the_export(job, output, root, keep_the_text_encoders_output)


def _checkpoint(run: Run, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's UNet file and text encoder file."""
    folder = run.output / "checkpoints" / f"checkpoint-{step:06d}"
    return load_file(str(folder / "model.safetensors")), load_file(str(folder / "model_1.safetensors"))


def test_the_word_learns_in_the_first_part_of_the_run_and_the_adapters_throughout(pivotal_run: Run) -> None:
    unet_at_4, text_at_4 = _checkpoint(pivotal_run, EVERY)
    unet_at_8, text_at_8 = _checkpoint(pivotal_run, STEPS)
    # The text encoder's file holds its adapters and the word's vectors.
    assert "vectors" in text_at_8 and any("lora_A" in k for k in text_at_8)
    assert text_at_8["vectors"].shape == (VECTORS, 32)
    assert torch.equal(text_at_4["vectors"], text_at_8["vectors"])  # frozen after half of the run
    assert any(not torch.equal(unet_at_4[k], unet_at_8[k]) for k in unet_at_8)
    assert any(not torch.equal(text_at_4[k], text_at_8[k]) for k in text_at_8 if k != "vectors")
    exported = load_file(str(pivotal_run.output / "learned_embeds.safetensors"))[TOKEN]
    torch.testing.assert_close(exported, text_at_8["vectors"], rtol=0, atol=0)
    events = [line for line in pivotal_run.lines if line.get("event") == "word-frozen"]
    assert events, "no word-frozen event"


def test_a_pivotal_run_writes_the_adapters_and_the_word_in_both_layouts(pivotal_run: Run, tiny_model: Path) -> None:
    out = pivotal_run.output
    listed = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert {
        f"{NAME}-lora.safetensors",
        "lora/pytorch_lora_weights.safetensors",
        "learned_embeds.safetensors",
        f"{NAME}_emb.safetensors",
    } <= listed
    assert not (out / "diffusers").exists()
    webui = load_file(str(out / f"{NAME}_emb.safetensors"))
    assert set(webui) == {"emb_params"}
    assert torch.equal(webui["emb_params"], load_file(str(out / "learned_embeds.safetensors"))[TOKEN])
    # The word moved from where it started (the initializer's embedding).
    table = sd_pipeline(tiny_model).text_encoder.get_input_embeddings().weight
    start = table[sd_pipeline(tiny_model).tokenizer.encode(INITIALIZER, add_special_tokens=False)[0]]
    assert (webui["emb_params"] - start.detach()).abs().max() > 1e-3
    card = (out / "README.md").read_text()
    assert "| pivotal tuning | word <zqx>, 2 vector(s), from 'ball', learned in the first 50% of the run |" in card
    assert 'pipe.load_lora_weights("lora")' in card
    assert f'pipe.load_textual_inversion("learned_embeds.safetensors", token="{TOKEN}")' in card
    assert f"`{NAME}_emb`" in card


@pytest.mark.parametrize("layout", ["diffusers", "web UI"])
def test_adapters_and_word_load_together_in_diffusers_to_the_runs_text_encoder(
    pivotal_run: Run, tiny_model: Path, layout: str
) -> None:
    """The LoRA file and the word's file, each layout through diffusers' own loaders, give the
    text-encoder output the run ended with; without the word the prompt is another."""
    out = pivotal_run.output
    pipe = sd_pipeline(tiny_model)
    if layout == "diffusers":
        pipe.load_lora_weights(str(out / "lora"))
        pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    else:
        pipe.load_lora_weights(str(out), weight_name=f"{NAME}-lora.safetensors")
        pipe.load_textual_inversion(str(out / f"{NAME}_emb.safetensors"), token=TOKEN)
    torch.testing.assert_close(encoded(pipe, PROMPT), FINAL["hidden"], rtol=0, atol=1e-4)
    adapters_only = sd_pipeline(tiny_model)
    adapters_only.load_lora_weights(str(out / "lora"))
    assert (encoded(adapters_only, PROMPT) - FINAL["hidden"]).abs().max() > 1e-3


def test_a_killed_pivotal_run_resumes_to_the_same_word_and_adapters(
    pivotal_run: Run, tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    job = manifest(tmp_path / "job.yaml", name=NAME, **pivotal_spec(tiny_model, photos, output))
    killed_and_resumed(job, output, tmp_path, kill_at=STEPS, resume_from=EVERY)
    for name in ("learned_embeds.safetensors", f"{NAME}-lora.safetensors"):
        ours, theirs = load_file(str(output / name)), load_file(str(pivotal_run.output / name))
        assert ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
