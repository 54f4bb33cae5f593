"""spec.evaluation on tiny random CLIP and DINO models built offline: the DreamBooth paper's scores
equal a direct computation with transformers' own models; the photos score higher than noise; a
run scores every checkpoint, keeps the best one through keepLast, and output.select: best exports
it when it is not the last."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune_api.report import ExitCode
from finetune_api.v1alpha1 import Evaluation
from tests.trainer.conftest import base_spec, manifest, run_cli

PROMPTS = ["a photo of sks ball", "a sks ball on a beach"]


@pytest.fixture(scope="module")
def scorers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from finetune_trainer.tiny import build_tiny_clip, build_tiny_dino

    root = tmp_path_factory.mktemp("scorers")
    return build_tiny_clip(root / "clip"), build_tiny_dino(root / "dino")


def _photos(folder: Path) -> list[Image.Image]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    assert len(files) == 4
    return [Image.open(p).convert("RGB") for p in files]


def _noise(count: int, seed: int = 1) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)) for _ in range(count)]


def _scorer(scorers: tuple[Path, Path], photos: Path) -> Any:
    from finetune_trainer import evaluation

    clip, dino = scorers
    settings = Evaluation(prompts=PROMPTS, clip_model=clip.as_uri(), dino_model=dino.as_uri())
    scorer = evaluation.Scorer(settings, locate=lambda uri, field: Path(uri.removeprefix("file://")))
    scorer.set_reference(_photos(photos))
    return scorer


def test_the_scores_equal_a_direct_computation_with_transformers(scorers: tuple[Path, Path], photos: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

    scorer = _scorer(scorers, photos)
    images = _noise(2) + _photos(photos)[:1]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    ours = scorer.score(images, prompts)

    clip, processor = CLIPModel.from_pretrained(scorers[0]), CLIPProcessor.from_pretrained(scorers[0])
    dino, dino_processor = ViTModel.from_pretrained(scorers[1]), ViTImageProcessor.from_pretrained(scorers[1])
    references = _photos(photos)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        clip_out = clip(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
        clip_ref = clip(**processor(text=prompts[:1], images=references, return_tensors="pt", padding=True))
        generated, photo_embeds = unit(clip_out.image_embeds), unit(clip_ref.image_embeds)
        texts = unit(clip_out.text_embeds)
        dino_gen = unit(dino(**dino_processor(images=images, return_tensors="pt")).last_hidden_state[:, 0])
        dino_ref = unit(dino(**dino_processor(images=references, return_tensors="pt")).last_hidden_state[:, 0])
    direct = {
        "dino": float(np.mean([float(g @ r) for g in dino_gen for r in dino_ref])),
        "clipI": float(np.mean([float(g @ r) for g in generated for r in photo_embeds])),
        "clipT": float(np.mean([float(g @ t) for g, t in zip(generated, texts, strict=True)])),
    }
    assert ours.keys() == direct.keys()
    for name, value in direct.items():
        assert ours[name] == pytest.approx(value, abs=1e-5), name


def test_the_photos_themselves_score_higher_than_noise(scorers: tuple[Path, Path], photos: Path) -> None:
    scorer = _scorer(scorers, photos)
    themselves = scorer.score(_photos(photos), [PROMPTS[0]] * 4)
    noise = scorer.score(_noise(4), [PROMPTS[0]] * 4)
    assert themselves["dino"] > noise["dino"]
    assert themselves["clipI"] > noise["clipI"]


def test_the_rule_ranks_by_its_score_above_the_floors() -> None:
    from finetune_trainer import evaluation

    settings = Evaluation(prompts=PROMPTS, clip_model="hf://a/b", dino_model="hf://a/c", floors={"clipT": 0.3})
    candidates = [
        (2, {"dino": 0.9, "clipT": 0.1}),  # the subject, but not the prompt: under the floor
        (4, {"dino": 0.7, "clipT": 0.35}),
        (6, {"dino": 0.7, "clipT": 0.31}),  # a tie with step 4 goes to the later step
    ]
    assert evaluation.best(candidates, settings) == candidates[2]
    assert evaluation.best(candidates[:1], settings) == candidates[0]  # none reaches the floor: all rank
    assert evaluation.rule_text(settings) == "highest dino among checkpoints with clipT >= 0.3"


def test_a_run_scores_every_checkpoint_and_exports_the_best_kept_through_keep_last(
    scorers: tuple[Path, Path], tiny_model: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DINO score is made to fall after the first checkpoint (the rendering and the other
    scores are real): the first checkpoint is the best, survives keepLast 1 and is exported."""
    from finetune_trainer import evaluation

    falling = itertools.chain([0.9, 0.5, 0.4])
    real = evaluation.Scorer.score

    def score(self: Any, images: Any, prompts: Any, *, device: Any = "cpu") -> dict[str, float]:
        scores = real(self, images, prompts, device=device)
        assert len(images) == len(PROMPTS) * 2
        return {**scores, "dino": next(falling)}

    monkeypatch.setattr(evaluation.Scorer, "score", score)
    clip, dino = scorers
    output = tmp_path / "out"
    spec = base_spec(tiny_model, photos, output, maxSteps=6, batchSize=2, learningRate=3.0e-2, seed=3)
    spec["method"] = "LoRA"
    spec["training"]["lora"] = {"rank": 4, "alpha": 4}
    spec["checkpoints"] = {"everySteps": 2, "keepLast": 1}
    spec["samples"] = {"prompts": [], "numInferenceSteps": 2}
    spec["evaluation"] = {
        "prompts": PROMPTS,
        "imagesPerPrompt": 2,
        "clipModel": clip.as_uri(),
        "dinoModel": dino.as_uri(),
    }
    spec["output"]["select"] = "best"
    run = run_cli(manifest(tmp_path / "job.yaml", name="scored", **spec), output, tmp_path / "termination-log")
    assert run.code == ExitCode.SUCCESS, run.summary

    kept = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert kept == ["checkpoint-000002", "checkpoint-000006"]  # 4 pruned; 2, the best, kept
    for seed in (0, 1):
        for step in (2, 4, 6):
            for index in range(len(PROMPTS)):
                assert (output / "evaluation" / f"seed-{seed}" / f"step-{step:06d}-{index}.png").is_file()
    states = {
        s: json.loads((output / "checkpoints" / f"checkpoint-{s:06d}" / "trainer_state.json").read_text())
        for s in (2, 6)
    }
    assert states[2]["scores"]["dino"] == 0.9 and states[6]["scores"]["dino"] == 0.4
    assert {"clipI", "clipT"} <= states[2]["scores"].keys()
    # On the report: each checkpoint's scores, and the best with the rule.
    assert [c["scores"]["dino"] for c in run.summary["checkpoints"]] == [0.9, 0.4]
    assert run.summary["evaluation"]["bestStep"] == 2
    assert run.summary["evaluation"]["rule"] == "highest dino"
    # The export is the checkpoint of step 2: its adapters, not the last step's.
    exported = load_file(str(output / "lora" / "pytorch_lora_weights.safetensors"))
    at_2 = load_file(str(output / "checkpoints" / "checkpoint-000002" / "model.safetensors"))
    at_6 = load_file(str(output / "checkpoints" / "checkpoint-000006" / "model.safetensors"))
    pairs = [(exported[k], at_2[key], at_6[key]) for key in at_2 for k in exported if k.endswith(key)]
    assert len(pairs) == len(at_2)
    assert all(torch.equal(e, two) for e, two, _ in pairs)
    assert any(not torch.equal(e, six) for e, _, six in pairs)
    card = (output / "README.md").read_text()
    assert "This model is the checkpoint of step 2 (output.select: best)." in card
    assert "| 2 (exported) | 0.9000 |" in card


def test_held_out_photos_are_never_trained_on_and_their_loss_ranks_the_checkpoints(
    tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    spec = base_spec(tiny_model, photos, output, maxSteps=4, batchSize=2, learningRate=3.0e-2, seed=3)
    spec["method"] = "LoRA"
    spec["training"]["lora"] = {"rank": 4, "alpha": 4}
    spec["checkpoints"] = {"everySteps": 2, "keepLast": 1}
    spec["samples"] = {"prompts": []}
    spec["evaluation"] = {"holdOut": 1, "rankBy": "holdOutLoss"}
    spec["output"]["select"] = "best"
    run = run_cli(manifest(tmp_path / "job.yaml", name="held", **spec), output, tmp_path / "termination-log")
    assert run.code == ExitCode.SUCCESS, run.summary
    # The last photo by name is held out: the training set is the other three.
    held = [line for line in run.lines if line.get("event") == "held-out"]
    assert held and "subject-03.jpg" in held[0]["message"]
    assert run.summary["dataset"]["images"] == 3
    assert not (output / "evaluation").exists()  # no scoring model: nothing rendered
    losses = {c["step"]: c["scores"]["holdOutLoss"] for c in run.summary["checkpoints"]}
    best = run.summary["evaluation"]
    assert best["rule"] == "lowest holdOutLoss"
    assert best["bestStep"] == min(losses, key=lambda s: (losses[s], -s))
    assert best["bestScores"]["holdOutLoss"] == min(losses.values())


def test_holding_out_every_photo_is_refused_naming_the_field(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    spec = base_spec(tiny_model, photos, output)
    spec["evaluation"] = {"holdOut": 4, "rankBy": "holdOutLoss"}
    run = run_cli(manifest(tmp_path / "job.yaml", name="all-held", **spec), output, tmp_path / "termination-log")
    assert run.code == ExitCode.BAD_INPUT, run.summary
    assert "spec.evaluation.holdOut" in run.summary["message"] and "at most 3" in run.summary["message"]
