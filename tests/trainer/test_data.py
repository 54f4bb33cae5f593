"""Reading a user's photo folder: what is used, what is skipped and said so, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune_trainer import data
from finetune_trainer.errors import BadInput

pytestmark = pytest.mark.trainer


def _load(folder: Path, resolution: int = 64) -> data.ImageFolder:
    return data.load_folder(folder, prompt="a photo of sks dog", resolution=resolution, field_name="spec.x")


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 80 wide x 40 high with "rotate 90" in EXIF: a person sees it 40 wide x 80 high.
    image = Image.new("RGB", (80, 40), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.JPG", exif=exif.tobytes())
    (example,) = _load(tmp_path).examples
    _, height, width = example.pixels.shape
    assert (width, height) == (64, 128)  # shorter side to 64, portrait kept


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 32, 64))
    image.save(tmp_path / "cutout.PNG")
    (example,) = _load(tmp_path).examples
    assert example.pixels[:, 10, 50].tolist() == [255, 255, 255]
    assert example.pixels[:, 10, 10].tolist() == [0, 0, 255]


def test_any_case_suffixes_captions_and_skipped_files(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.JPEG", "c.Png", "d.webp"):
        Image.new("RGB", (70, 90), (10, 20, 30)).save(tmp_path / name)
    (tmp_path / "b.txt").write_text("sks dog on a beach\n")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "orphan.txt").write_text("a caption without its image")
    loaded = _load(tmp_path)
    assert [e.path.name for e in loaded.examples] == ["a.jpg", "b.JPEG", "c.Png", "d.webp"]
    prompts = {e.path.name: e.prompt for e in loaded.examples}
    assert prompts["b.JPEG"] == "sks dog on a beach"
    assert prompts["a.jpg"] == "a photo of sks dog"
    warning = loaded.skipped_warning("spec.dataset.instanceImages")
    assert warning is not None
    assert warning.startswith("spec.dataset.instanceImages: skipped 2 file(s)")
    assert "notes.md" in warning and "orphan.txt (caption without an image)" in warning


def test_an_image_that_cannot_be_read_is_bad_input_naming_it(tmp_path: Path) -> None:
    Image.new("RGB", (70, 90), (10, 20, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadInput, match=r"broken\.png is not a readable image"):
        _load(tmp_path)


def test_filewords_in_the_prompt_takes_the_caption() -> None:
    assert data.prompt_for("on a beach", "a photo of sks dog, [filewords]") == "a photo of sks dog, on a beach"
    assert data.prompt_for(None, "a photo of sks dog [filewords]") == "a photo of sks dog"


def test_a_folder_of_only_files_that_are_not_images_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "one.gif").write_bytes(b"GIF89a")
    (tmp_path / "notes.md").write_text("")
    with pytest.raises(BadInput) as caught:
        _load(tmp_path)
    message = str(caught.value)
    assert message.startswith("spec.x:")
    assert "holds no images" in message
    assert "one.gif" in message and "notes.md" in message


def test_missing_and_empty_folders_are_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="does not exist"):
        _load(tmp_path / "nope")
    with pytest.raises(BadInput, match=r"holds no images \(looked for \.jpg, \.jpeg, \.png, \.webp\)"):
        _load(tmp_path)


def test_crops_are_square_at_the_resolution_and_repeatable(tmp_path: Path) -> None:
    Image.new("RGB", (160, 90), (1, 2, 3)).save(tmp_path / "wide.png")
    (example,) = _load(tmp_path).examples
    assert example.pixels.shape == (3, 64, 114)
    first = data.crop_and_flip(example.pixels, 64, center=False, flip=True, gen=data.generator(1, 2))
    again = data.crop_and_flip(example.pixels, 64, center=False, flip=True, gen=data.generator(1, 2))
    assert first.shape == (3, 64, 64)
    assert torch.equal(first, again)
    assert float(first.min()) >= -1.0
    assert float(first.max()) <= 1.0


def test_every_example_is_seen_once_an_epoch_in_a_seeded_order() -> None:
    order = data.ExampleOrder(num_examples=5, seed=7)
    epoch0 = order.examples(range(5))
    assert sorted(epoch0) == [0, 1, 2, 3, 4]
    assert order.example(7) == data.ExampleOrder(num_examples=5, seed=7).example(7)
    orders = {tuple(order.examples(range(e * 5, e * 5 + 5))) for e in range(4)}
    assert len(orders) > 1  # reshuffled between epochs


def test_the_slots_of_a_micro_batch_do_not_depend_on_how_it_is_split_over_processes() -> None:
    one = data.slots_of(3, batch_size=4, num_processes=1, process_index=0)
    two = [s for p in range(2) for s in data.slots_of(3, batch_size=2, num_processes=2, process_index=p)]
    four = [s for p in range(4) for s in data.slots_of(3, batch_size=1, num_processes=4, process_index=p)]
    assert one == two == four == [12, 13, 14, 15]
