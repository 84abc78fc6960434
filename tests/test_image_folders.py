"""Image folders as `dataset_name`: images with a `metadata.csv` / `metadata.jsonl` (datasets' imagefolder convention,
`file_name` column), and images each with a same-named `.txt` caption; both load, split by sub-folder, report an image
without a caption like any row without one, and train through `run.main`."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from conftest import draw_shape, shape_rows

from clip_trainer.arguments import DataArguments
from clip_trainer.data import load_image_text_data
from clip_trainer.run import cli, main
from clip_trainer.sources import image_folder_kind


def write_metadata_folder(folder: Path, metadata: str = "csv", subfolder: str = "") -> Path:
    """The 24 shape pairs as PNGs under `folder/subfolder/images/` and a `metadata.<csv|jsonl>` naming them."""
    root = folder / subfolder
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for color, shape, background, caption in shape_rows():
        name = f"images/{color}_{shape}_{background}.png"
        draw_shape(color, shape, background).save(root / name)
        rows.append({"file_name": name, "text": caption, "shape": shape})
    if metadata == "csv":
        with (root / "metadata.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def write_caption_folder(folder: Path, missing_caption: str | None = None) -> Path:
    """The 24 shape pairs as `folder/<shape>/<color>_<background>.jpg`, each with a `.txt` caption beside it."""
    for color, shape, background, caption in shape_rows():
        image = folder / shape / f"{color}_{background}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        draw_shape(color, shape, background).save(image, format="JPEG")
        if image.relative_to(folder).as_posix() != missing_caption:
            image.with_suffix(".txt").write_text(caption + "\n")
    return folder


@pytest.mark.parametrize("metadata", ["csv", "jsonl"])
def test_a_folder_with_metadata_loads_as_datasets_imagefolder(tmp_path, metadata):
    folder = write_metadata_folder(tmp_path / "pets", metadata)
    assert image_folder_kind(str(folder)) == "metadata"
    data = load_image_text_data(
        DataArguments(dataset_name=str(folder), caption_column="text", label_column="shape"), seed=0
    )
    assert len(data.train) + len(data.validation) == 24
    row = data.train[0]
    assert Path(row["image"]["path"]).is_file() and row["image"]["path"].endswith(".png")
    assert row["text"].startswith("a ")
    assert sorted(data.class_names) == ["circle", "square", "triangle"]  # metadata columns are kept


def test_train_and_validation_subfolders_are_the_splits(tmp_path):
    folder = write_metadata_folder(tmp_path / "split", "jsonl", subfolder="train")
    write_metadata_folder(folder, "jsonl", subfolder="validation")
    data = load_image_text_data(DataArguments(dataset_name=str(folder), caption_column="text"), seed=0)
    assert (len(data.train), len(data.validation)) == (24, 24)
    assert all("/validation/" in row["image"]["path"] for row in data.validation)


def test_a_folder_of_images_with_txt_captions_loads(tmp_path, caplog):
    folder = write_caption_folder(tmp_path / "captioned", missing_caption="circle/red_white.jpg")
    assert image_folder_kind(str(folder)) == "captions"
    data = load_image_text_data(
        DataArguments(dataset_name=str(folder), validation_split_percentage=0), seed=0, evaluate=False
    )
    # The image without its .txt is reported and left out, like any row without a caption.
    assert len(data.train) == 23
    by_image = {Path(row["image"]["path"]).relative_to(folder).as_posix(): row["caption"] for row in data.train}
    assert by_image["square/blue_black.jpg"] == "a blue square on black"
    assert "circle/red_white.jpg" not in by_image
    assert any("missing caption" in record.getMessage() for record in caplog.records)
    assert sorted(set(data.train["label"])) == [0, 1, 2]  # one class per sub-folder, as datasets' imagefolder gives
    streamed = load_image_text_data(
        DataArguments(dataset_name=str(folder), streaming=True, shuffle_buffer_size=8, validation_split_percentage=0),
        seed=0,
        evaluate=False,
    )
    rows = list(streamed.train.take(24))  # one pass of 24, the captionless image's row among them with no caption
    assert {Path(row["image"]["path"]).relative_to(folder).as_posix() for row in rows} == {
        *by_image,
        "circle/red_white.jpg",
    }
    assert all(
        row["caption"] == by_image.get(Path(row["image"]["path"]).relative_to(folder).as_posix()) for row in rows
    )


def test_a_folder_of_data_files_is_not_an_image_folder(tmp_path):
    from conftest import write_shapes_csv

    write_shapes_csv(tmp_path / "csv")  # images/ + pairs.csv: not imagefolder's metadata name
    assert image_folder_kind(str(tmp_path / "csv")) is None


@pytest.mark.parametrize("kind", ["metadata", "captions"])
def test_image_folders_train_through_run_main(base_args, tmp_path, kind):
    if kind == "metadata":
        folder, extra = write_metadata_folder(tmp_path / "folder"), ["--caption_column", "text"]
    else:
        folder, extra = write_caption_folder(tmp_path / "folder"), []
    args = list(base_args)
    index = args.index("--train_file")
    del args[index : index + 2]
    main([*args, "--dataset_name", str(folder), *extra, "--max_steps", "4", "--eval_strategy", "steps",
          "--eval_steps", "4"])  # fmt: skip
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert any("eval_t2i_recall@1" in entry for entry in state["log_history"])


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
def test_a_utf8_byte_order_mark_is_not_part_of_the_caption(tmp_path, streaming):
    folder = write_caption_folder(tmp_path / "notepad")
    for text_file in folder.rglob("*.txt"):  # as Windows Notepad saves "UTF-8"
        text_file.write_bytes(b"\xef\xbb\xbf" + text_file.read_bytes())
    data_args = DataArguments(
        dataset_name=str(folder), streaming=streaming, shuffle_buffer_size=8, validation_split_percentage=0
    )
    train = load_image_text_data(data_args, seed=0, evaluate=False).train
    rows = list(train.take(24)) if streaming else list(train)
    expected = {f"{shape}/{color}_{background}.jpg": caption for color, shape, background, caption in shape_rows()}
    by_image = {Path(row["image"]["path"]).relative_to(folder).as_posix(): row["caption"] for row in rows}
    assert by_image == expected


def test_a_skipped_row_of_a_caption_folder_names_its_file(base_args, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.chdir(tmp_path)
    folder = write_caption_folder(tmp_path / "captioned")
    (folder / "circle" / "red_white.txt").write_text("  \n")  # empty
    (folder / "square" / "blue_black.txt").write_bytes("un carré bleu".encode("latin-1"))  # not UTF-8
    (folder / "triangle" / "green_white.txt").unlink()  # missing
    args = list(base_args)
    del args[args.index("--train_file") : args.index("--train_file") + 2]
    argv = [*args, "--dataset_name", "captioned", "--validation_split_percentage", "0", "--num_train_epochs", "1"]
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    results = main(argv)
    assert results["train_samples"] == 24 - 3
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for name, problem in (
        ("circle/red_white.txt", "is empty"),
        ("square/blue_black.txt", "is not UTF-8 text (invalid continuation byte at byte 7); save it as UTF-8"),
        ("triangle/green_white.txt", "is missing (no caption for"),
    ):
        assert f"Caption file {folder / name} {problem}" in logged, name
    # The rows report names each row's image too, and so does the stop of `on_bad_rows error`.
    assert f"empty caption (image {folder / 'circle' / 'red_white.jpg'})" in logged
    status = cli([*argv, "--on_bad_rows", "error", "--output_dir", "stopped"])
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_clip.py: error:")]
    assert status == 2 and "3 of 24 rows cannot be used (2 missing caption, 1 empty caption)" in line
    assert f"(image {folder / 'circle' / 'red_white.jpg'})" in line and "`on_bad_rows` to `skip`" in line


def _folder_args(base_args: list[str], folder: str, *extra: str) -> list[str]:
    args = list(base_args)
    del args[args.index("--train_file") : args.index("--train_file") + 2]
    return [*args, "--dataset_name", folder, "--validation_split_percentage", "0", "--num_train_epochs", "1", *extra]


def test_images_that_the_metadata_file_does_not_name_are_counted_and_named(base_args, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    folder = write_metadata_folder(tmp_path / "pets")
    with (folder / "metadata.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    unlisted = sorted(row["file_name"] for row in rows[20:])
    with (folder / "metadata.csv").open("w", newline="") as handle:  # the last 4 images are not named
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:20])
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    results = main(_folder_args(base_args, "pets", "--caption_column", "text"))
    assert results["train_samples"] == 20
    [line] = [record.getMessage() for record in caplog.records if "not in its metadata file" in record.getMessage()]
    assert "4 of its 24 images are not in its metadata file (metadata.csv) and are left out" in line
    assert f"{unlisted[0]}, {unlisted[1]}, {unlisted[2]} and 1 more" in line
    assert "list each in the metadata file" in line


def test_a_caption_file_whose_extension_is_upper_case_is_read(base_args, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    folder = write_caption_folder(tmp_path / "camera")
    (folder / "circle" / "red_white.txt").rename(folder / "circle" / "red_white.TXT")  # as Windows tools write it
    (folder / "square" / "blue_black.txt").rename(folder / "square" / "blue_black.TXT")
    (folder / "square" / "blue_black.Txt").write_text("another caption")  # two captions of one image
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    results = main(_folder_args(base_args, "camera"))
    assert results["train_samples"] == 23
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "red_white" not in logged
    both = f"{folder / 'square' / 'blue_black.TXT'} and {folder / 'square' / 'blue_black.Txt'}"
    assert f"Caption file {both} are both the caption of {folder / 'square' / 'blue_black.jpg'}; keep one" in logged


def write_folder_with_entries_that_are_no_file(folder: Path) -> Path:
    """The caption folder with a broken link `circle/broken.jpg` and a folder `square/folder.jpg`, each with a .txt."""
    write_caption_folder(folder)
    (folder / "circle" / "broken.jpg").symlink_to("gone.jpg")  # a link to nothing
    (folder / "circle" / "broken.txt").write_text("a broken link")
    (folder / "square" / "folder.jpg").mkdir()
    (folder / "square" / "folder.txt").write_text("a directory")
    return folder


def test_entries_named_like_images_that_are_no_file_are_bad_rows(base_args, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.chdir(tmp_path)
    folder = write_folder_with_entries_that_are_no_file(tmp_path / "captioned")
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    results = main(_folder_args(base_args, "captioned"))
    assert results["train_samples"] == 24
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "skipped 2 of 26 rows (1 image" in logged
    assert f"image file not found: {folder / 'circle' / 'broken.jpg'}" in logged
    assert f"image path is a directory: {folder / 'square' / 'folder.jpg'}" in logged
    status = cli([*_folder_args(base_args, "captioned"), "--on_bad_rows", "error", "--output_dir", "stopped"])
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_clip.py: error:")]
    assert status == 2 and "2 of 26 rows cannot be used" in line and "`on_bad_rows` to `skip`" in line


def test_entries_named_like_images_that_are_no_file_are_one_line_when_streamed(
    base_args, tmp_path, monkeypatch, capsys
):
    """A stream has no rows check before training: they are said in one line (a warning; here the stop of
    `on_bad_rows error`, which says the same before any model is built)."""
    monkeypatch.chdir(tmp_path)
    folder = write_folder_with_entries_that_are_no_file(tmp_path / "captioned")
    args = _folder_args(base_args, "captioned", "--streaming", "true", "--max_steps", "1")
    status = cli([*args, "--on_bad_rows", "error"])
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_clip.py: error:")]
    assert status == 2 and "2 entries named like images are no image file" in line
    assert f"{folder / 'circle' / 'broken.jpg'} is no file (a broken link?)" in line
    assert f"{folder / 'square' / 'folder.jpg'} is a directory" in line
    assert "`on_bad_rows` to `skip`" in line
