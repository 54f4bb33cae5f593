"""method: TextualInversion on the tiny model: a new word with two vectors learned in the text
encoder, the rest frozen; both files load through diffusers' own ``load_textual_inversion`` to
the same text-encoder output, and the learned word lowers the denoising loss of its prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune_api.report import ExitCode
from tests.trainer.conftest import (
    Run,
    base_spec,
    encoded,
    killed_and_resumed,
    manifest,
    run_cli,
    run_watching_the_export,
    sd_pipeline,
)

NAME = "tiny-ti"
TOKEN, INITIALIZER, VECTORS = "<zqx>", "ball", 2
PROMPT = f"a photo of {TOKEN}"
STEPS, EVERY = 8, 4


def ti_spec(model: Path, photos: Path, output: Path) -> dict[str, Any]:
    spec = base_spec(model, photos, output, maxSteps=STEPS, batchSize=2, learningRate=5.0e-2, seed=11)
    spec["method"] = "TextualInversion"
    spec["textualInversion"] = {"token": TOKEN, "initializer": INITIALIZER, "vectors": VECTORS}
    spec["dataset"]["instancePrompt"] = PROMPT
    spec["checkpoints"] = {"everySteps": EVERY, "keepLast": 2}
    spec["samples"] = {"prompts": [f"{PROMPT} on a beach"], "numInferenceSteps": 2}
    return spec


# The UNet as the run left it, taken where the exports are made (the run is in this process).
FINAL_UNET: dict[str, torch.Tensor] = {}


@pytest.fixture(scope="module")
def ti_run(tiny_model: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("ti")
    output = root / "out"
    job = manifest(root / "job.yaml", name=NAME, **ti_spec(tiny_model, photos, output))

    def keep_the_unet(trained: Any) -> None:
        FINAL_UNET.update({k: v.detach().cpu().clone() for k, v in trained.unet.state_dict().items()})

    return run_watching_the_export(job, output, root, keep_the_unet)


def test_the_unet_is_bit_for_bit_the_base_models_after_training(ti_run: Run, tiny_model: Path) -> None:
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_model / "unet").state_dict()
    assert FINAL_UNET.keys() == base.keys()
    assert all(torch.equal(FINAL_UNET[k], base[k]) for k in base)


def _denoising_loss(pipe: Any, photos: Path, prompt: str) -> float:
    """The UNet's noise-prediction error on the photos under ``prompt``, at fixed noise and steps."""
    from diffusers import DDPMScheduler

    from finetune_trainer import data

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    examples = data.load_folder(photos, prompt=prompt, resolution=64, field_name="x").examples
    pixels = torch.stack([data.crop_and_flip(e.pixels, 64, center=True, flip=False) for e in examples])
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        hidden = encoded(pipe, prompt).expand(len(examples), -1, -1)
        total = 0.0
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=generator)
            steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(examples),), generator=generator)
            prediction = pipe.unet(scheduler.add_noise(latents, noise, steps), steps, hidden).sample
            total += float(torch.nn.functional.mse_loss(prediction, noise))
    return total / 8


def test_a_ti_run_writes_the_word_in_both_layouts_and_nothing_of_the_model(ti_run: Run) -> None:
    out = ti_run.output
    listed = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert {"learned_embeds.safetensors", f"{NAME}.safetensors", "README.md"} <= listed | {"README.md"}
    assert not (out / "diffusers").exists()
    diffusers_file = load_file(str(out / "learned_embeds.safetensors"))
    webui_file = load_file(str(out / f"{NAME}.safetensors"))
    assert set(diffusers_file) == {TOKEN}
    assert set(webui_file) == {"emb_params"}
    assert diffusers_file[TOKEN].shape == (VECTORS, 32)  # the tiny CLIP's width
    assert torch.equal(diffusers_file[TOKEN], webui_file["emb_params"])
    # Checkpoints hold the word's vectors, and the optimizer held the text encoder's table alone:
    # the UNet never had a parameter in it.
    checkpoint = out / "checkpoints" / f"checkpoint-{STEPS:06d}"
    assert set(load_file(str(checkpoint / "model.safetensors"))) == {"vectors"}
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    assert [len(g["params"]) for g in optimizer["param_groups"]] == [1]
    card = (out / "README.md").read_text()
    assert f'pipe.load_textual_inversion("learned_embeds.safetensors", token="{TOKEN}")' in card
    assert "| Textual Inversion | word <zqx>, 2 vector(s), from 'ball' |" in card
    assert ti_run.summary["samples"]


def test_both_files_load_in_diffusers_to_the_same_text_encoder_output(ti_run: Run, tiny_model: Path) -> None:
    out = ti_run.output
    base = sd_pipeline(tiny_model)
    before = encoded(base, PROMPT)
    from_diffusers_file = sd_pipeline(tiny_model)
    from_diffusers_file.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    from_webui_file = sd_pipeline(tiny_model)
    from_webui_file.load_textual_inversion(str(out / f"{NAME}.safetensors"), token=TOKEN)
    learned = encoded(from_diffusers_file, PROMPT)
    torch.testing.assert_close(encoded(from_webui_file, PROMPT), learned, rtol=0, atol=0)
    assert (learned - before).abs().max() > 1e-3
    # A prompt without the word is the base model's, to the bit.
    assert torch.equal(encoded(from_diffusers_file, "a photo of a dog"), encoded(base, "a photo of a dog"))


def test_the_learned_word_lowers_the_denoising_loss_of_its_prompt(ti_run: Run, tiny_model: Path, photos: Path) -> None:
    """Against the word as it started (its vectors the initializer's embedding): the same
    UNet, the same noise; only the word's vectors differ."""
    learned = sd_pipeline(tiny_model)
    learned.load_textual_inversion(str(ti_run.output / "learned_embeds.safetensors"))
    start = sd_pipeline(tiny_model)
    table = start.text_encoder.get_input_embeddings().weight
    initial = table[start.tokenizer.encode(INITIALIZER, add_special_tokens=False)[0]].detach()
    start.load_textual_inversion({TOKEN: initial.expand(VECTORS, -1).clone()}, token=TOKEN)
    after, before = _denoising_loss(learned, photos, PROMPT), _denoising_loss(start, photos, PROMPT)
    assert after < before, (before, after)


def test_a_killed_ti_run_resumes_to_the_same_word(ti_run: Run, tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    job = manifest(tmp_path / "job.yaml", name=NAME, **ti_spec(tiny_model, photos, output))
    killed_and_resumed(job, output, tmp_path, kill_at=STEPS, resume_from=EVERY)
    ours, theirs = (
        load_file(str(output / "learned_embeds.safetensors")),
        load_file(str(ti_run.output / "learned_embeds.safetensors")),
    )
    torch.testing.assert_close(ours[TOKEN], theirs[TOKEN], rtol=0, atol=1e-6)


def test_only_the_words_rows_move_under_adamw_weight_decay() -> None:
    """The restore after each optimizer step: AdamW's weight decay shrinks every row of the
    table it holds; the others are put back."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from finetune_api.v1alpha1 import TextualInversionSettings
    from finetune_trainer import textual_inversion

    config = CLIPTextConfig(
        vocab_size=1000, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    encoder = CLIPTextModel(config)

    class Tokenizer:
        def __init__(self) -> None:
            self.vocab = {f"w{i}": i for i in range(1000)}

        def get_vocab(self) -> dict[str, int]:
            return dict(self.vocab)

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [self.vocab[w] for w in text.split()]

        def add_tokens(self, names: list[str]) -> int:
            for name in names:
                self.vocab[name] = len(self.vocab)
            return len(names)

        def convert_tokens_to_ids(self, names: list[str]) -> list[int]:
            return [self.vocab[n] for n in names]

        def __len__(self) -> int:
            return len(self.vocab)

    settings = TextualInversionSettings(token="<q>", initializer="w5 w6", vectors=3)
    learned = textual_inversion.add_word([Tokenizer()], [encoder], settings)
    table = encoder.get_input_embeddings().weight
    assert table.shape[0] == 1003
    torch.testing.assert_close(table[1000], table[5])
    torch.testing.assert_close(table[1001], table[6])
    torch.testing.assert_close(table[1002], table[5])
    assert [p for p in encoder.parameters() if p.requires_grad] == [table]
    before = table.detach().clone()
    optimizer = torch.optim.AdamW([table], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        encoder(torch.tensor([[1, 1000, 1001, 1002, 2]]))[0].square().sum().backward()
        optimizer.step()
        learned.restore([encoder])
        optimizer.zero_grad()
    assert torch.equal(table[:1000], before[:1000])
    assert (table[1000:] - before[1000:]).abs().min() > 0
    assert textual_inversion.expand("a <q> toy", settings) == "a <q> <q>_1 <q>_2 toy"


def test_sdxl_learns_the_word_in_both_text_encoders_and_both_layouts_load(photos: Path, tmp_path: Path) -> None:
    """SDXL (diffusers' textual_inversion_sdxl.py): the word in CLIP-L and in OpenCLIP bigG,
    ``learned_embeds.safetensors`` and ``learned_embeds_2.safetensors``, and the web UIs' file
    with ``clip_l`` and ``clip_g``; loaded either way through diffusers, the same prompt embeds."""
    from diffusers import StableDiffusionXLPipeline

    from finetune_trainer.tiny import build_tiny_sdxl_pipeline

    model = build_tiny_sdxl_pipeline(tmp_path / "xl")
    output = tmp_path / "out"
    spec = ti_spec(model, photos, output)
    spec["baseModel"]["type"] = "sdxl"
    spec["training"]["maxSteps"] = 2
    spec["checkpoints"] = {"everySteps": 0}
    spec["samples"] = {"prompts": []}
    run = run_cli(manifest(tmp_path / "job.yaml", name="xl-ti", **spec), output, tmp_path / "termination-log")
    assert run.code == ExitCode.SUCCESS, run.summary
    first, second = (load_file(str(output / f)) for f in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"))
    webui = load_file(str(output / "xl-ti.safetensors"))
    assert set(webui) == {"clip_l", "clip_g"}
    assert torch.equal(webui["clip_l"], first[TOKEN])
    assert torch.equal(webui["clip_g"], second[TOKEN])
    assert first[TOKEN].shape[0] == second[TOKEN].shape[0] == VECTORS
    assert first[TOKEN].shape[1] != second[TOKEN].shape[1]  # the two encoders' widths

    def embeds(pipe: Any) -> torch.Tensor:
        with torch.no_grad():
            return pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)[0]

    def loaded(left: Any, right: Any) -> Any:
        pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=torch.float32)
        pipe.load_textual_inversion(left, token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(right, token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        return pipe

    from_diffusers = loaded(str(output / "learned_embeds.safetensors"), str(output / "learned_embeds_2.safetensors"))
    from_webui = loaded(webui["clip_l"], webui["clip_g"])
    torch.testing.assert_close(embeds(from_webui), embeds(from_diffusers), rtol=0, atol=0)
    # Both encoders' vectors moved from where they started (the initializer's embedding).
    base = StableDiffusionXLPipeline.from_pretrained(model, dtype=torch.float32)
    for tokenizer, encoder, vectors in (
        (base.tokenizer, base.text_encoder, first),
        (base.tokenizer_2, base.text_encoder_2, second),
    ):
        start = encoder.get_input_embeddings().weight[tokenizer.encode(INITIALIZER, add_special_tokens=False)[0]]
        assert (vectors[TOKEN] - start.detach()).abs().max() > 1e-4
