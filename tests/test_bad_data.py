"""Data as users bring it, handled as they mean it, through the documented command or the data loader:

batches of nothing but unusable samples, image dicts in JSON Lines and parquet, numeric captions, blank labels, the
same picture under two names, no held-out split when nothing evaluates, `validation_split_percentage` 0, evaluation
that never drops a partial batch, and a preparation step that copies only images.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import draw_shape, set_option, shape_rows, write_shapes_csv
from PIL import Image

from clip_trainer import run
from clip_trainer.arguments import DataArguments
from clip_trainer.data import IMAGE_ID_COLUMN, LABEL_COLUMN, load_image_text_data
from clip_trainer.run import main


def png(color: str = "red", shape: str = "circle", size: int = 40) -> bytes:
    buffer = io.BytesIO()
    draw_shape(color, shape, size=size).save(buffer, format="PNG")
    return buffer.getvalue()


def history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


# --------------------------------------------------------------------------------------------------------------
# Batches of unusable samples
# --------------------------------------------------------------------------------------------------------------


def test_a_batch_of_only_unusable_samples_does_not_stop_the_run(base_args, tmp_path):
    """Files that exist but do not decode pass the up-front check; a whole batch of them is skipped, not fatal."""
    folder = tmp_path / "data"
    train = write_shapes_csv(folder, repeats=1)
    rows = list(csv.reader(train.open()))
    for index in range(6):  # the first batch (no shuffling below) is all corrupt
        # Six different files: six copies of the same bytes would be one image (its rows merged into one).
        (folder / f"images/corrupt_{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really %d" % index)
        rows.insert(1, [f"images/corrupt_{index}.png", f"corrupt {index}", "circle"])
    with train.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    out = tmp_path / "out"
    argv = set_option(set_option(base_args, "train_file", str(train)), "per_device_train_batch_size", "6")
    main([*argv, "--max_steps", "4", "--logging_steps", "1", "--train_sampling_strategy", "sequential"])
    logged = [entry for entry in history(out) if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]
    assert logged[0]["skipped_samples"] == 6
    # The run's summary and the model card say so too.
    assert json.loads((out / "train_results.json").read_text())["skipped_samples"] == 6
    assert "; 6 of the samples drawn were left out as unusable" in (out / "README.md").read_text()


@pytest.mark.slow  # a training run with a final save, about 3 s
def test_the_card_and_summary_count_unusable_evaluation_pairs(base_args, tmp_path):
    """A validation image that does not decode is left out of the metrics; the model card says how many were, and
    over how many pairs the metrics are."""
    folder = tmp_path / "val"
    validation = write_shapes_csv(folder, repeats=1)
    rows = list(csv.reader(validation.open()))
    (folder / "images/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows.append(["images/corrupt.png", "a broken picture", "circle"])
    with validation.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    out = tmp_path / "out"
    results = main([*base_args, "--max_steps", "1", "--validation_file", str(validation), "--do_train", "--do_eval"])
    assert results["eval_unusable_pairs"] == 1 and results["eval_samples"] == 25
    card = (out / "README.md").read_text()
    assert "the 25 evaluation pairs (1 of them unusable, left out of the metrics" in card
    assert "1 of them could not be used (their images did not decode), and the metrics are over the other 24" in card


def test_an_image_limit_that_refuses_everything_stops_with_one_line(base_args, capsys):
    status = run.cli([*base_args, "--max_image_pixels", "10", "--max_steps", "20", "--max_nonfinite_steps", "3"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    message = next(line for line in err.splitlines() if line.startswith("run_clip.py: error:"))
    assert "No batch had a usable image-caption pair for 3 optimizer steps in a row" in message
    assert "`max_image_pixels`" in message


def test_a_stream_with_missing_files_trains_at_batch_size_2(base_args, tmp_path):
    folder = tmp_path / "data"
    train = write_shapes_csv(folder, repeats=2)
    for path in sorted((folder / "images").glob("*_0.png"))[:5]:  # about 10% of the files are gone
        path.unlink()
    argv = set_option(set_option(base_args, "train_file", str(train)), "per_device_train_batch_size", "2")
    main([*argv, "--streaming", "true", "--max_steps", "30", "--shuffle_buffer_size", "16", "--logging_steps", "30"])
    assert [entry["step"] for entry in history(tmp_path / "out") if "loss" in entry] == [30]


# --------------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------------


def test_json_lines_with_image_dicts_and_base64_images(base_args, tmp_path):
    lines = []
    for index, (color, shape, _, caption) in enumerate(shape_rows()):
        encoded = base64.b64encode(png(color, shape, 40 + index % 3)).decode()
        if index % 2:
            lines.append({"image": {"bytes": encoded, "path": f"{index}.png"}, "caption": caption})
        else:
            lines.append({"image": encoded, "caption": caption})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = load_image_text_data(DataArguments(train_file=str(path)), seed=0)
    assert len(data.train) + len(data.validation) == 24  # no row lost as "file not found"
    main([*set_option(base_args, "train_file", str(path)), "--max_steps", "2"])


def test_json_lines_with_photo_sized_bare_base64_images_keep_every_row(base_args, tmp_path):
    """A base64 string longer than a file name may be ("File name too long" from the system, not "not found") is an
    image all the same: every row is kept, up front and in training."""
    generator = np.random.default_rng(0)
    lines = []
    for *_, caption in shape_rows():
        noise = generator.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # incompressible: about 16,000 characters
        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, format="PNG")
        lines.append({"image": base64.b64encode(buffer.getvalue()).decode(), "caption": caption})
    assert min(len(line["image"]) for line in lines) > 4096  # longer than any path the system takes
    path = tmp_path / "photos.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = load_image_text_data(DataArguments(train_file=str(path)), seed=0)
    assert len(data.train) + len(data.validation) == len(lines)
    main([*set_option(base_args, "train_file", str(path)), "--max_steps", "2"])
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2


def test_parquet_with_relative_image_paths_resolves_them_beside_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    csv_path = write_shapes_csv(folder, repeats=1)
    rows = list(csv.DictReader(csv_path.open()))
    # As pandas or pyarrow write it: a struct of (bytes, path) per image, the paths relative to the file's folder.
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = pa.array([{"bytes": None, "path": row["image"]} for row in rows],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # fmt: skip
    pq.write_table(pa.table({"image": images, "caption": [row["caption"] for row in rows]}), folder / "pairs.parquet")
    monkeypatch.chdir(tmp_path)  # not the data's folder
    data = load_image_text_data(DataArguments(train_file="data/pairs.parquet"), seed=0)
    assert len(data.train) + len(data.validation) == 24
    assert all(Path(value["path"]).is_file() for value in data.train["image"])


def test_numeric_captions_are_text(base_args, tmp_path):
    folder = tmp_path / "data"
    source = write_shapes_csv(folder, repeats=1)
    rows = list(csv.reader(source.open()))
    path = folder / "codes.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(rows[0])
        for index, row in enumerate(rows[1:]):
            writer.writerow([row[0], f"{1000 + index:05d}", row[2]])  # "01000": a code, leading zero and all
    data = load_image_text_data(DataArguments(train_file=str(path)), seed=0)
    captions = set(data.train["caption"]) | set(data.validation["caption"])
    assert "01000" in captions and all(isinstance(caption, str) for caption in captions)


def test_words_pandas_takes_for_missing_values_are_captions_but_missing_labels_and_ids(
    base_args, tmp_path, monkeypatch, caplog
):
    """ "NA", "None", "null", "nan", "N/A": captions as written (an empty field is still a missing caption); in the
    label and image id columns they are missing values, as R and spreadsheets write them (an id "NA" on six rows
    must not make their six pictures one image). Through the command, from another working folder."""
    folder = tmp_path / "data"
    source = write_shapes_csv(folder, repeats=1)
    rows = list(csv.reader(source.open()))
    words = ["NA", "None", "null", "nan", "N/A", "NULL"]
    for row, word in zip(rows[1:], words):
        row[1] = word
    rows[7][2] = "NA"  # a missing label
    rows[8][1] = ""  # missing
    with source.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    monkeypatch.chdir(tmp_path / "data" / "images")
    argv = list(base_args)
    argv[argv.index("--train_file") + 1] = "../pairs.csv"
    caplog.set_level("WARNING", logger="clip_trainer")
    results = main([*argv, "--max_steps", "1", "--validation_split_percentage", "0"])
    assert results["train_samples"] == len(rows) - 2  # the header and the one empty caption
    [report] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "skipped 1 of 24 rows" in report and "row 7: missing caption" in report
    data = load_image_text_data(DataArguments(train_file="../pairs.csv", label_column="shape"), seed=0)
    captions = set(data.train["caption"]) | set(data.validation["caption"])
    labels = set(data.train["shape"]) | set(data.validation["shape"])
    assert set(words) <= captions and "NA" not in labels and None in labels

    # Image ids written "NA" on the first six rows (six different pictures): missing, so each row is its own image.
    rows[8][1] = "a caption"
    with source.open("w", newline="") as handle:
        csv.writer(handle).writerows([[*row, "image_id" if index == 0 else ("NA" if index <= 6 else f"id{index}")]
                                      for index, row in enumerate(rows)])  # fmt: skip
    ids = DataArguments(train_file="../pairs.csv", image_id_column="image_id", validation_split_percentage=0)
    train = load_image_text_data(ids, seed=0, evaluate=False).train
    assert len(train) == len(rows) - 1  # no rows merged


# --------------------------------------------------------------------------------------------------------------
# Splits and evaluation sets
# --------------------------------------------------------------------------------------------------------------


def test_nothing_is_held_out_when_nothing_evaluates(base_args, tmp_path, shapes_csv):
    results = main([*base_args, "--max_steps", "1"])  # eval_strategy no, no do_eval
    assert results["train_samples"] == 72


def test_validation_split_percentage_0_trains_on_everything(base_args, tmp_path):
    results = main([*base_args, "--max_steps", "1", "--validation_split_percentage", "0", "--eval_strategy", "epoch",
                    "--save_strategy", "epoch", "--load_best_model_at_end", "true"])  # fmt: skip
    assert results["train_samples"] == 72 and not any(key.startswith("eval_") for key in results)


def test_blank_labels_count_for_retrieval_not_for_zero_shot(tmp_path):
    folder = tmp_path / "data"
    source = write_shapes_csv(folder, repeats=1)
    rows = list(csv.reader(source.open()))
    for row in rows[1:7]:
        row[2] = ""
    with source.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    data = load_image_text_data(DataArguments(validation_file=str(source), label_column="shape"), seed=0, train=False)
    assert data.class_names == ["circle", "square", "triangle"]  # no class "None" or ""
    labels = data.validation[LABEL_COLUMN]
    assert len(labels) == 24 and labels.count(-1) == 6


def test_the_same_picture_under_two_names_is_one_image(tmp_path):
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(png("red"))
    (folder / "images" / "copy-of-a.png").write_bytes(png("red"))
    (folder / "images" / "b.png").write_bytes(png("blue"))
    path = folder / "val.csv"
    path.write_text("image,caption\nimages/a.png,a red circle\nimages/copy-of-a.png,red circle\nimages/b.png,blue\n")
    data = load_image_text_data(DataArguments(validation_file=str(path)), seed=0, train=False)
    assert data.validation[IMAGE_ID_COLUMN] == [0, 0, 1]


def test_evaluation_covers_the_whole_set_with_drop_last(base_args, tmp_path):
    common = [*base_args, "--do_eval", "--per_device_eval_batch_size", "8"]
    kept = main([*set_option(common, "output_dir", str(tmp_path / "a"))])
    dropped = main([*set_option(common, "output_dir", str(tmp_path / "b")), "--dataloader_drop_last", "true"])
    assert kept["eval_samples"] == dropped["eval_samples"] == 11  # 15% of 72, not a multiple of 8
    for key in kept:
        if "recall" in key or "rank" in key:
            assert dropped[key] == kept[key], key


def test_prepare_only_copies_only_images(base_args, tmp_path, caplog):
    folder = tmp_path / "data"
    train = write_shapes_csv(folder, repeats=1)
    secret = tmp_path / "secret.txt"
    secret.write_text("password: hunter2\n" * 100)
    with train.open("a", newline="") as handle:
        csv.writer(handle).writerow(["../secret.txt", "a blue circle on white", "circle"])  # readable, no image
    out = tmp_path / "prepared"
    caplog.set_level(logging.INFO, logger="clip_trainer")
    main([*set_option(set_option(base_args, "train_file", str(train)), "output_dir", str(out)), "--prepare_only"])
    prepared = datasets.load_from_disk(str(out))
    total = sum(len(split) for split in prepared.values())
    assert total == 24
    # The log counts rows (a prepared folder keeps an image's rows apart), before and after the row left out.
    messages = [r.getMessage() for r in caplog.records]
    written = f"Prepared rows written: train {len(prepared['train'])}; validation {len(prepared['validation'])}"
    assert written in messages
    assert any(m.startswith("training rows: ") for m in messages)
    assert not any("training pairs: " in m for m in messages)
    # The row left out is named with its file, not by its place in a shuffled split (which is no row of the file),
    # and the prepared folder names it in `dropped_rows.jsonl`, which loading the folder ignores.
    said = [r.getMessage() for r in caplog.records if "whose image does not decode" in r.getMessage()]
    assert len(said) == 1 and "left out 1 row(s)" in said[0] and "data/../secret.txt" in said[0]
    assert "row " not in said[0]
    named = [json.loads(line) for line in (out / "dropped_rows.jsonl").read_text().splitlines()]
    assert len(named) == 1 and "data/../secret.txt" in named[0]["reason"]
    for split in prepared.values():
        assert all(
            b"hunter2" not in (value["bytes"] or b"")
            for value in split.cast_column("image", datasets.Image(decode=False))["image"]
        )


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_captions_are_rows_to_skip_not_errors(tmp_path, bad):
    folder = tmp_path / "data"
    source = write_shapes_csv(folder, repeats=1)
    rows = list(csv.reader(source.open()))
    rows[1][1] = bad
    with source.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    data = load_image_text_data(DataArguments(train_file=str(source)), seed=0, evaluate=False)
    assert len(data.train) == 23


def test_max_eval_samples_draws_from_the_whole_validation_file(base_args, tmp_path, monkeypatch):
    """A validation file sorted by class: `max_eval_samples` scores rows drawn with the run's seed across the file
    (the rows an independent draw with that seed picks), not its first rows, which are one or two classes."""
    import numpy as np

    folder = tmp_path / "data"
    source = write_shapes_csv(folder, repeats=2)
    header, *rows = list(csv.reader(source.open()))
    rows.sort(key=lambda row: row[2])  # by shape
    sorted_csv = folder / "by_shape.csv"
    with sorted_csv.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    monkeypatch.chdir(folder)
    argv = [*base_args, "--do_eval", "--validation_file", "by_shape.csv", "--max_eval_samples", "12", "--seed", "5"]
    results = main(argv)
    assert results["eval_samples"] == 12
    data = load_image_text_data(
        DataArguments(validation_file="by_shape.csv", max_eval_samples=12), seed=5, train=False
    )
    expected = [rows[index] for index in sorted(np.random.default_rng(5).choice(len(rows), 12, replace=False))]
    assert [Path(path).name for path in data.validation["image"]] == [Path(row[0]).name for row in expected]
    assert len({row[2] for row in expected}) == 3  # every shape, where the first 12 rows hold one
