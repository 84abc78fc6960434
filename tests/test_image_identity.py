"""One picture stored under two file names is one image everywhere a loaded training set is told apart by image: the
held-out split (no picture on both sides), the merging of an image's captions (the same count from a CSV as from its
prepared folder, which stores bytes) and the image ids of retrieval (what the card counts). Only files whose size
another file also has are read to find out."""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import sys
from pathlib import Path

import pytest
from conftest import draw_shape, shape_rows
from datasets import Dataset, load_from_disk

from clip_trainer import run
from clip_trainer.arguments import DataArguments
from clip_trainer.data import IMAGE_ID_COLUMN, add_image_ids, load_image_text_data

SEED = 3


def write_copies_csv(folder: Path, twice: int = 12, once: int = 12) -> Path:
    """`twice` shapes saved as `<n>_a.png` and `<n>_b.png` (the same bytes, one row each with the same caption), then
    `once` shapes saved once; returns the CSV of relative paths."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for number, (color, shape, background, caption) in enumerate(shape_rows()[: twice + once]):
            draw_shape(color, shape, background).save(folder / f"images/{number}_a.png")
            writer.writerow([f"images/{number}_a.png", caption])
            if number < twice:
                (folder / f"images/{number}_b.png").write_bytes((folder / f"images/{number}_a.png").read_bytes())
                writer.writerow([f"images/{number}_b.png", caption])
    return path


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def csv_pictures(csv_path: Path) -> list[str]:
    """Each CSV row's picture, by a digest of its file's bytes (computed here, not by the library)."""
    with csv_path.open(newline="") as handle:
        return [digest((csv_path.parent / row["image"]).read_bytes()) for row in csv.DictReader(handle)]


def split_pictures(dataset) -> set[str]:
    """The pictures of a split: its rows' image bytes (a prepared folder) or files, by digest."""
    pictures = set()
    for value in dataset.with_format(None)["image"]:
        if isinstance(value, dict):
            value = value["bytes"] or value["path"]
        pictures.add(digest(value if isinstance(value, bytes) else Path(value).read_bytes()))
    return pictures


def held_out_logged(caplog) -> tuple[int, int]:
    said = [m for m in (r.getMessage() for r in caplog.records) if m.startswith("Held out ")]
    assert len(said) == 1, said
    held_out, total = re.match(r"Held out (\d+) of (\d+) images", said[0]).groups()
    return int(held_out), int(total)


def test_no_picture_is_on_both_sides_of_the_split_and_the_log_counts_pictures(tmp_path, monkeypatch, caplog):
    """12 pictures under two names and 12 under one (36 rows), 25% held out by the command: the validation split
    shares no picture with the training split, and the log counts the 24 pictures and the held-out ones as they are."""
    csv_path = write_copies_csv(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="clip_trainer")
    run.main(["--train_file", "data/pairs.csv", "--validation_split_percentage", "25", "--prepare_only", "true",
              "--output_dir", "prepared", "--report_to", "none", "--use_cpu", "true", "--seed", str(SEED)])  # fmt: skip
    train, validation = load_from_disk("prepared/train"), load_from_disk("prepared/validation")
    train_pictures, validation_pictures = split_pictures(train), split_pictures(validation)
    assert not train_pictures & validation_pictures
    assert len(train) + len(validation) == 36
    pictures = set(csv_pictures(csv_path))
    assert len(pictures) == 24 and train_pictures | validation_pictures == pictures
    assert held_out_logged(caplog) == (len(validation_pictures), 24) == (6, 24)  # ceil(25% of 24) pictures


def test_a_csv_and_its_prepared_folder_train_on_the_same_images(tmp_path, monkeypatch):
    """The CSV's rows are merged by picture as the prepared folder's bytes are: the training split of both has one
    row per picture (each copied picture with its two captions), the same count as counted here."""
    csv_path = write_copies_csv(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    from_csv = load_image_text_data(DataArguments(train_file="data/pairs.csv"), seed=SEED)
    run.main(["--train_file", "data/pairs.csv", "--prepare_only", "true", "--output_dir", "prepared",
              "--report_to", "none", "--use_cpu", "true", "--seed", str(SEED)])  # fmt: skip
    from_folder = load_image_text_data(DataArguments(dataset_name="prepared"), seed=SEED)
    expected = len(set(csv_pictures(csv_path)) - split_pictures(from_csv.validation))
    assert len(from_csv.train) == len(from_folder.train) == expected == 20  # 24 pictures, ceil(15% of 24) held out
    assert split_pictures(from_csv.train) == split_pictures(from_folder.train)
    captions = sorted(len(row["caption"]) for row in from_csv.train.with_format(None))
    assert captions == sorted(len(row["caption"]) for row in from_folder.train.with_format(None))


# Every file this process opens while `_OPENED` is a list: `sys.addaudithook` sees the `open` of any reader (builtins,
# `io`, `os`, `pathlib`), so the check does not depend on how the library reads a file. A hook cannot be removed;
# outside the test it returns at once.
_OPENED: list[str] | None = None


def _record_open(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | Path):
        _OPENED.append(str(Path(args[0]).resolve()))


sys.addaudithook(_record_open)


@pytest.fixture
def opened():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def test_only_files_of_a_size_another_file_has_are_read(tmp_path, opened):
    """Retrieval ids of rows naming five files: two copies (100 bytes), a different file of the same size, and two of
    sizes no other file has (one named twice). The three of 100 bytes are read; the two others are not, and still
    count as one image per file."""
    files = {"copy_a": bytes(range(100)), "copy_b": bytes(range(100)), "same_size": bytes(range(1, 101))}
    files |= {"unique_57": b"x" * 57, "unique_80": b"y" * 80}
    for name, data in files.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    names = ["copy_a", "unique_57", "copy_b", "same_size", "unique_80", "unique_57"]
    dataset = Dataset.from_dict({"image": [str(tmp_path / f"{name}.png") for name in names], "caption": names})
    opened.clear()  # the writing above is no reading
    ids = add_image_ids(dataset, "image", None)[IMAGE_ID_COLUMN]
    read = {Path(path).stem for path in opened if Path(path).parent == tmp_path.resolve()}
    assert read == {"copy_a", "copy_b", "same_size"}
    by_name = dict(zip(names, ids))
    assert by_name["copy_a"] == by_name["copy_b"] and ids[1] == ids[5]
    assert len(set(ids)) == 4  # the copies are one image; the same size alone is not


@pytest.mark.slow
def test_the_card_and_the_log_count_the_pictures(tmp_path, monkeypatch, caplog, tiny_clip_dir):
    """A training run on the pictures saved twice, 25% held out: the log, the card's training sentence and its
    evaluation sentence count the 24 pictures (by their bytes, counted here) as 6 held out and 18 trained on."""
    csv_path = write_copies_csv(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="clip_trainer")
    run.main(["--model_name_or_path", str(tiny_clip_dir), "--train_file", "data/pairs.csv",
              "--validation_split_percentage", "25", "--output_dir", "out", "--max_steps", "1",
              "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "true",
              "--eval_strategy", "no", "--do_train", "true", "--do_eval", "true", "--save_strategy", "no",
              "--dataloader_num_workers", "0", "--seed", str(SEED)])  # fmt: skip
    rows = csv_pictures(csv_path)
    pictures = len(set(rows))
    held_out = -(-pictures * 25 // 100)
    assert held_out_logged(caplog) == (held_out, pictures) == (6, 24)
    card = " ".join(Path("out/README.md").read_text().split())
    pairs, images = re.search(r"evaluated on (\d+) pairs(?: of (\d+) images)?", card).groups()
    assert int(images or pairs) == held_out
    trained = re.search(r"trained on (\d+) images with (\d+) captions", card)
    assert trained is not None, card
    assert (int(trained[1]), int(trained[2])) == (pictures - held_out, len(rows) - int(pairs))
