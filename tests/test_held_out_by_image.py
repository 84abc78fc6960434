"""The validation pairs held out of the training data are held out by image: every row of an image lands on one
side, loaded or streamed, so a model is never scored on an image it trained on. Data with one row per image is split
as `datasets` splits it (the same pairs as before)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
from conftest import shape_rows, write_shapes_csv
from datasets import load_from_disk
from test_multi_caption import write_multi_caption_csv

from clip_trainer import run
from clip_trainer.arguments import DataArguments
from clip_trainer.data import load_image_text_data


def image_files(dataset) -> set[str]:
    """Each row's image file, or for images stored as bytes (a prepared folder) a digest of the bytes."""
    column = dataset.with_format(None)["image"]
    return {
        hashlib.sha1(value["bytes"]).hexdigest() if isinstance(value, dict) and value.get("bytes") else
        (value["path"] if isinstance(value, dict) else value)
        for value in column
    }  # fmt: skip


def test_rows_of_one_image_are_held_out_together_through_the_command(tmp_path, monkeypatch):
    """A preparation run (no model) of 12 images with two rows each, 25% held out: 3 whole images (6 rows) in the
    validation split, none of them in the training split."""
    write_multi_caption_csv(tmp_path / "data", rows=12, shared_rows=True)
    monkeypatch.chdir(tmp_path)
    run.main(["--train_file", "data/multi.csv", "--validation_split_percentage", "25", "--prepare_only", "true",
              "--output_dir", "prepared", "--report_to", "none", "--use_cpu", "true", "--seed", "3"])  # fmt: skip
    train, validation = load_from_disk("prepared/train"), load_from_disk("prepared/validation")
    assert len(train) + len(validation) == 24
    train_images, validation_images = image_files(train), image_files(validation)
    assert len(validation_images) == 3 and len(validation) == 6
    assert len(train_images) == 9 and not train_images & validation_images


def test_one_row_per_image_is_split_as_datasets_splits_it(tmp_path):
    csv_path = write_shapes_csv(tmp_path, repeats=1)
    data = load_image_text_data(DataArguments(train_file=str(csv_path), validation_split_percentage=25), seed=5)
    from datasets import load_dataset

    rows = load_dataset("csv", data_files=str(csv_path))["train"]
    expected = rows.train_test_split(test_size=0.25, seed=5)
    assert sorted(data.validation["caption"]) == sorted(expected["test"]["caption"])
    assert len(data.train) == len(expected["train"])


def test_a_stream_drops_every_row_of_a_held_out_image(tmp_path):
    """The head of a stream is held out; later rows showing one of its images (another caption) are not trained on."""
    folder = tmp_path / "data"
    write_multi_caption_csv(folder, rows=12)
    files = [f"images/{color}_{shape}_{background}.png" for color, shape, background, _ in shape_rows()[:12]]
    path = folder / "stream.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for file in files:
            writer.writerow([file, f"first caption of {file}"])
        for file in files:
            writer.writerow([file, f"second caption of {file}"])
    args = DataArguments(train_file=str(path), streaming=True, max_eval_samples=4, shuffle_buffer_size=8)
    data = load_image_text_data(args, seed=0)
    held_out = image_files(data.validation)
    assert len(held_out) == 4
    trained = []
    for row in data.train:
        trained.append(row)
        if len(trained) == 16:  # the stream repeats without end: two passes of the 8 images left
            break
    images = {Path(row["image"]["path"] if isinstance(row["image"], dict) else row["image"]).name for row in trained}
    assert len(images) == 8 and not images & {Path(file).name for file in held_out}


@pytest.mark.slow
def test_the_card_counts_images_and_captions(tmp_path, monkeypatch, tiny_clip_dir):
    """12 images with two captions in one cell each: 3 images (6 pairs) held out; the card says 9 images with 18
    captions were trained on and 6 pairs of 3 images evaluated."""
    write_multi_caption_csv(tmp_path / "data", rows=12)
    monkeypatch.chdir(tmp_path)
    run.main(["--model_name_or_path", str(tiny_clip_dir), "--train_file", "data/multi.csv",
              "--validation_split_percentage", "25", "--output_dir", "out", "--max_steps", "1",
              "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "true",
              "--eval_strategy", "no", "--do_train", "true", "--do_eval", "true", "--save_strategy", "no",
              "--dataloader_num_workers", "0"])  # fmt: skip
    card = Path("out/README.md").read_text()
    assert "trained on 9 images with 18 captions" in card
    assert "evaluated on 6 pairs of 3 images" in card
