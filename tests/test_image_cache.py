"""Training images decoded once (image_cache.py): the same batches and the same run as decoding them at every epoch,
each image decoded once, an image that does not decode met at each epoch as before, and the cases left out."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from conftest import build_trainer, set_option, write_shapes_csv
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor

import clip_trainer.collator as collator_module
from clip_trainer.augmentation import ImageAugmentation
from clip_trainer.captions import image_key
from clip_trainer.collator import ImageTextCollator
from clip_trainer.image_cache import decode_training_images, most_bytes
from clip_trainer.images import BadSampleError
from clip_trainer.run import main


def _rows_with_a_corrupt_image(folder):
    """The shapes' rows as a user's CSV has them (relative paths resolved), one image named twice, a file that exists
    but does not decode, and pictures in other modes (grayscale, transparent, palette) and of another shape."""
    train = write_shapes_csv(folder, repeats=1)
    rows = list(csv.reader(train.open()))
    (folder / "images/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows.insert(3, ["images/corrupt.png", "a broken picture", "circle"])
    rows.append([rows[1][0], "the first picture again", rows[1][2]])
    for index, mode in enumerate(["L", "RGBA", "P"]):
        picture = Image.open(folder / rows[5 + index][0]).convert(mode)
        picture.resize((picture.width * 2, picture.height)).save(folder / rows[5 + index][0])
    with train.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return train, [{"image": str(folder / path), "caption": caption} for path, caption, _ in rows[1:]]


def test_the_kept_pixels_are_the_collators_and_its_batches_unchanged(tiny_clip_dir, tmp_path, monkeypatch, caplog):
    _, rows = _rows_with_a_corrupt_image(tmp_path)
    whole = (tmp_path / rows[-1]["image"]).read_bytes()
    (tmp_path / "images/truncated.png").write_bytes(whole[: len(whole) // 2])
    rows.append({"image": str(tmp_path / "images/truncated.png"), "caption": "half a picture"})
    collator = ImageTextCollator.from_processor(AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil"))
    cache = decode_training_images(rows, collator, workers=0)
    # 27 rows: 24 pictures kept once each (the one named twice shares its entry), the corrupt and the truncated files
    # not kept.
    assert len(rows) == 27 and len(cache.slots) == 24 and cache.pixels.shape == (24, 3, 32, 32)
    for row in rows:
        if "corrupt" in row["image"] or "truncated" in row["image"]:
            assert cache.lookup(image_key(row, "image")) is None
        else:
            assert (cache.lookup(image_key(row, "image")) == collator.decode_image(row["image"])).all()
    # Built in a DataLoader worker: the same pixels.
    in_worker = decode_training_images(rows, collator, workers=1)
    assert in_worker.slots == cache.slots and (in_worker.pixels == cache.pixels).all()
    # The budget is checked against one image per row, the most the pixels can take.
    assert most_bytes(rows, collator) == 27 * 3 * 32 * 32

    expected = collator(rows)
    decoded = []

    def refuse(image, **kwargs):
        decoded.append(image)
        raise BadSampleError("decoded again")

    monkeypatch.setattr(collator_module, "load_image", refuse)
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    batch = dataclasses.replace(collator, decoded_images=cache)(rows)
    # Only the corrupt and truncated images are decoded again (here: refused by the stand-in), and left out with
    # their warnings.
    assert decoded == [rows[2]["image"], rows[-1]["image"]]
    assert batch.keys() == expected.keys()
    assert all(torch.equal(batch[key], expected[key]) for key in batch if key != "valid")
    assert batch["valid"].tolist() == [index not in (2, 26) for index in range(27)] == expected["valid"].tolist()
    assert any("Leaving out" in record.getMessage() for record in caplog.records)


def test_decoded_pictures_are_told_apart_by_mode_shape_and_palette(tiny_clip_dir):
    """A training set of decoded PIL images (a `datasets.Dataset` built in memory): pictures with the same raw bytes
    under another palette, or in another shape, are different pictures, each with its own pixels."""
    indices = np.zeros((40, 40), np.uint8)
    indices[10:30, 5:20] = 1
    pictures = []
    for colour in [(255, 0, 0), (0, 0, 255), (0, 0, 0)]:  # one icon under three palettes
        picture = Image.fromarray(indices, "P")
        picture.putpalette([255, 255, 255, *colour] + [0] * 762)
        pictures.append(picture)
    stripes = np.arange(20 * 60 * 3, dtype=np.uint8)
    pictures += [Image.fromarray(stripes.reshape(20, 60, 3)), Image.fromarray(stripes.reshape(60, 20, 3))]
    rows = [{"image": picture, "caption": f"picture {index}"} for index, picture in enumerate(pictures)]
    collator = ImageTextCollator.from_processor(AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil"))
    cache = decode_training_images(rows, collator, workers=0)
    assert len(cache.slots) == 5
    for row in rows:
        assert (cache.lookup(image_key(row, "image")) == collator.decode_image(row["image"])).all()
    assert torch.equal(dataclasses.replace(collator, decoded_images=cache)(rows)["pixel_values"],
                       collator(rows)["pixel_values"])  # fmt: skip


def _trained(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry], load_file(out / "model.safetensors")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_with_the_images_kept_trains_as_one_that_decodes_them_every_epoch(
    base_args, tmp_path, monkeypatch, caplog, workers
):
    """Through the command, from a user's CSV with a corrupt image: the same logged losses and weights; each image
    decoded once (the corrupt one at each epoch, as before)."""
    train, rows = _rows_with_a_corrupt_image(tmp_path / "data")
    argv = set_option(set_option(base_args, "train_file", str(train)), "num_train_epochs", "3")
    argv = set_option(set_option(argv, "validation_split_percentage", "0"), "dataloader_num_workers", str(workers))
    argv = set_option(argv, "dataloader_persistent_workers", str(workers > 0).lower())
    # Dropout draws from torch's global generator, which decoding ahead must leave where it was.
    argv = set_option(argv, "dropout", "0.1")
    decoded = []
    load_image = collator_module.load_image
    monkeypatch.setattr(
        collator_module, "load_image", lambda image, **kw: decoded.append(image) or load_image(image, **kw)
    )
    caplog.set_level(logging.INFO, logger="clip_trainer")

    main(set_option(argv, "output_dir", str(tmp_path / "kept")))
    said = [r.getMessage() for r in caplog.records if "Decoded the training set's" in r.getMessage()]
    assert said and "24 images once" in said[0] and "1 row(s) whose image cannot be used" in said[0]
    # The picture named twice is one training row with two captions: 25 training rows.
    if workers == 0:  # counted in this process: the first pass, then the corrupt image at each of 3 epochs
        assert len(decoded) == 25 + 3
    decoded.clear()
    main(set_option(set_option(argv, "output_dir", str(tmp_path / "decoded")), "decoded_image_cache_mb", "0"))
    if workers == 0:
        assert len(decoded) == 3 * 25

    kept_losses, kept_weights = _trained(tmp_path / "kept")
    losses, weights = _trained(tmp_path / "decoded")
    assert kept_losses == losses and len(losses) >= 3
    assert kept_weights.keys() == weights.keys()
    assert all(torch.equal(kept_weights[name], weights[name]) for name in weights)


def test_when_the_images_are_not_kept(tiny_clip_dir, shapes_csv, tmp_path, caplog):
    """Augmented images, a run that reads them less than twice, a budget too small or 0: the collator decodes at
    every epoch, and the log says why where there is something to change."""
    caplog.set_level(logging.INFO, logger="clip_trainer")

    def kept(augment: bool = False, **training) -> bool:
        trainer = build_trainer(tmp_path, tiny_clip_dir, shapes_csv, **training)
        if augment:
            trainer.data_collator = dataclasses.replace(trainer.data_collator, augmentation=ImageAugmentation())
        trainer.get_train_dataloader()
        return trainer.data_collator.decoded_images is not None

    assert kept()  # two epochs of the 72 shapes, no augmentation
    assert not kept(num_train_epochs=1)
    assert not kept(decoded_image_cache_mb=0)
    assert not kept(decoded_image_cache_mb=0.1)  # 72 images of 3 KiB
    assert (
        "could take up to 0.2 MiB (one 32x32 image for each of the 72 training rows), more than `decoded_image_cache_mb` (0.1); raise it"
        in caplog.text
    )
    assert not kept(augment=True)
    assert "decoded at every epoch: they are augmented" in caplog.text
    # By steps: 18 steps of 8 read the 72 rows twice, 17 do not.
    assert kept(max_steps=18) and not kept(max_steps=17)
