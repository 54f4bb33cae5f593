"""Where a base model can come from, and what the trainer says when it cannot be used."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from finetune_api.v1alpha1 import BaseModelSource
from finetune_trainer import convert
from finetune_trainer.errors import BadInput
from finetune_trainer.model import load_base_model, read_checkpoint

pytestmark = pytest.mark.trainer


def _load(uri: str, tmp_path: Path, model_type: str = "v1x") -> object:
    return load_base_model(BaseModelSource(uri=uri, type=model_type), cache_dir=tmp_path / "cache")


def _fake_hub_cache(root: Path, repo: str, model: Path) -> Path:
    """The Hugging Face cache layout, as a download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(model, repo_dir / "snapshots" / commit)
    return root


def test_an_hf_model_loads_from_the_cache_when_offline(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(_fake_hub_cache(tmp_path / "hub", "acme/tiny-sd", tiny_model))
    )
    base = _load("hf://acme/tiny-sd", tmp_path)
    assert "snapshots" in base.source  # type: ignore[attr-defined]
    with pytest.raises(BadInput) as caught:
        _load("hf://acme/not-downloaded", tmp_path)
    assert str(caught.value).startswith(
        "spec.baseModel.uri: hf://acme/not-downloaded is not in the local Hugging Face cache"
    )
    assert "HF_HUB_OFFLINE" in str(caught.value)


def test_a_ckpt_in_a_folder_is_found_and_checked_against_the_model_type(tiny_model: Path, tmp_path: Path) -> None:
    """A .ckpt carries no architecture: the shipped SD 1.x config is used, and a tiny model
    does not fit it; the message says so instead of loading garbage."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    state = convert.to_original(
        convert.Components(
            pipe.unet.state_dict(),
            pipe.vae.state_dict(),
            [pipe.text_encoder.state_dict()],
            pipe.unet.config,
            pipe.vae.config,
            convert.SD1_TEXT,
        )
    )
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"state_dict": state, "global_step": 1}, folder / "model.ckpt")
    loaded, _ = read_checkpoint(folder / "model.ckpt")
    assert loaded.keys() == state.keys()
    with pytest.raises(BadInput) as caught:
        _load(str(folder), tmp_path)
    assert str(caught.value).startswith("spec.baseModel.type: model.ckpt")
    assert "does not match the v1x architecture" in str(caught.value)


def test_files_that_are_not_models_are_bad_input(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BadInput, match=r"^spec\.baseModel\.uri: .*notes\.txt is not a \.safetensors or \.ckpt"):
        _load(str(tmp_path / "notes.txt"), tmp_path)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(BadInput, match="is not a readable checkpoint"):
        _load(str(tmp_path / "broken.safetensors"), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInput, match="neither a diffusers folder"):
        _load(str(empty), tmp_path)
