"""One dataset with every kind of broken row, and images in every odd mode that must be kept: the run trains, skips
and counts the bad rows and says which they were; `--on_bad_rows error` stops before training with the same report."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import draw_shape, write_shapes_csv
from PIL import Image

from clip_trainer import run
from clip_trainer.collator import ImageTextCollator

MAX_PIXELS = 5000  # the shapes are at most 56x56 = 3,136 pixels; the "bomb" below has 10,000
LONG_CAPTION = " ".join(["a red circle on white with a long and winding description"] * 12)

# Rows the cheap up-front check drops (it reads no pixels), in the order they are appended to the CSV.
UP_FRONT_BAD = {
    "images/missing.png": "image file not found",
    "images/empty.png": "empty image file",
    "whitespace caption": "empty caption",
    "missing caption": "missing caption",
}
# Rows that pass the up-front check and are skipped when their batch is built.
BATCH_TIME_BAD = {
    "images/truncated.png": "truncated image",
    # Pillow's own words for a cut file vary by format and place ("Truncated File Read", "cannot load this image",
    # "could not create decoder object"); each is named as what it is.
    "images/truncated.jpg": "truncated image",
    "images/truncated_smooth.jpg": "truncated image",
    "images/truncated.webp": "truncated image",
    "images/not_an_image.jpg": "not an image",
    "images/bomb.png": "image too large",
}
# Images in modes other than RGB, all of which must be kept.
ODD_MODES = (
    "grey.png",
    "rgba.png",
    "palette.png",
    "palette_transparent.png",
    "cmyk.jpg",
    "sixteen_bit.png",
    "one_bit.png",
)


def _encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def write_odd_images(images: Path) -> None:
    """Every bad image file, and every odd image mode, under `images/`."""
    shape = draw_shape("blue", "circle", size=48)
    png, jpeg = _encoded(shape, "PNG"), _encoded(shape, "JPEG")
    (images / "empty.png").write_bytes(b"")
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    smooth = Image.linear_gradient("L").resize((90, 70)).convert("RGB")  # compresses small: cut inside its tables
    smooth_jpeg, webp = _encoded(smooth, "JPEG"), _encoded(draw_shape("red", "square", size=64), "WEBP")
    (images / "truncated_smooth.jpg").write_bytes(smooth_jpeg[: len(smooth_jpeg) // 2])
    (images / "truncated.webp").write_bytes(webp[: len(webp) // 2])
    (images / "not_an_image.jpg").write_text("this is a caption file, not a JPEG\n")
    draw_shape("red", "square", size=100).save(images / "bomb.png")

    shape.convert("L").save(images / "grey.png")
    rgba = shape.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(images / "rgba.png")
    shape.convert("P").save(images / "palette.png")
    shape.convert("P").save(images / "palette_transparent.png", transparency=0)
    shape.convert("CMYK").save(images / "cmyk.jpg")
    sixteen = (np.asarray(shape.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(images / "sixteen_bit.png")
    shape.convert("1").save(images / "one_bit.png")
    assert Image.open(images / "sixteen_bit.png").mode.startswith("I")  # really 16-bit
    assert Image.open(images / "cmyk.jpg").mode == "CMYK"


def write_bad_dataset(folder: Path) -> tuple[Path, Path, dict[str, int]]:
    """The shapes CSV with bad and odd rows appended, and a JSON-lines validation file with non-string captions.

    Returns the two files and the CSV row index of each planted row (0-based, as the report numbers them).
    """
    train = write_shapes_csv(folder, repeats=2)  # 48 good rows
    images = folder / "images"
    write_odd_images(images)
    planted = [
        ("images/missing.png", "a yellow square on black"),
        ("images/empty.png", "a green circle on white"),
        ("images/red_circle_white_0.png", "   "),  # whitespace-only: empty after stripping
        ("images/blue_square_white_0.png", None),  # an empty cell: read back as a missing value
        *((path, "a blue circle on white") for path in BATCH_TIME_BAD),
        *((f"images/{name}", "a blue circle on white") for name in ODD_MODES),
        ("images/red_triangle_black_1.png", LONG_CAPTION),
    ]
    rows = list(csv.reader(train.open()))
    index = {}
    with train.open("a", newline="") as handle:
        writer = csv.writer(handle)
        for path, caption in planted:
            key = {"   ": "whitespace caption", None: "missing caption"}.get(caption, path)
            index[key] = len(rows) - 1 + len(index)  # minus the header row
            writer.writerow([path, "" if caption is None else caption, "circle"])

    validation = folder / "validation.jsonl"
    good = [{"image": f"images/{c}_{s}_{b}_1.png", "caption": f"a {c} {s} on {b}"} for c, s, b in
            [("red", "circle", "white"), ("green", "square", "black"), ("blue", "triangle", "white")]]  # fmt: skip
    bad = [
        {"image": "images/green_circle_white_0.png", "caption": 42},  # a number where a caption should be
        {"image": "images/green_square_white_0.png", "caption": None},
        {"image": "images/truncated.png", "caption": "a blue circle on white"},
    ]
    validation.write_text("".join(json.dumps(row) + "\n" for row in [*good, *bad]))
    return train, validation, index


def bad_data_args(base_args: list[str], train: Path, validation: Path) -> list[str]:
    argv = list(base_args)
    argv[argv.index("--train_file") + 1] = str(train)
    return [*argv, "--validation_file", str(validation), "--max_image_pixels", str(MAX_PIXELS),
            "--num_train_epochs", "1", "--logging_steps", "1", "--eval_strategy", "epoch"]  # fmt: skip


@pytest.fixture
def batch_widths(monkeypatch) -> list[int]:
    """Records the token width of every batch the run's collator builds."""
    widths: list[int] = []

    original = ImageTextCollator.__call__

    class RecordingCollator:
        def __call__(self, rows):
            batch = original(self, rows)
            widths.append(batch["input_ids"].shape[1])
            return batch

    monkeypatch.setattr(ImageTextCollator, "__call__", RecordingCollator.__call__)
    return widths


def messages(caplog, logger: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == logger]


def test_bad_rows_are_skipped_counted_and_reported(base_args, tmp_path, caplog, batch_widths):
    train, validation, index = write_bad_dataset(tmp_path / "data")
    num_rows = len(list(csv.reader(train.open()))) - 1
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    # Every row a pair (`caption_sampling all`): the long caption's image has other captions too, and by default one
    # caption per image is drawn each epoch, which might leave the long one out of this short run.
    run.main([*bad_data_args(base_args, train, validation), "--caption_sampling", "all"])

    # --- the up-front report: a count, the kinds, and the first rows with their reasons ---------------------------
    train_report = next(m for m in messages(caplog, "clip_trainer.data") if m.startswith("train data:"))
    assert f"skipped 4 of {num_rows} rows" in train_report
    for kind in ("image file not found", "empty image file", "empty caption", "missing caption"):
        assert f"1 {kind}" in train_report
    listed = [int(row) for row in re.findall(r"row (\d+):", train_report)]
    assert listed == sorted(index[key] for key in UP_FRONT_BAD)[:3]
    assert "(and 1 more, each named in `dropped_rows.jsonl` in the output folder)" in train_report
    assert "missing.png" in train_report  # the reason names the file
    validation_report = next(m for m in messages(caplog, "clip_trainer.data") if m.startswith("validation data:"))
    # The number 42 is a caption like any other (a product code, a year); the missing one is skipped.
    assert "skipped 1 of 6 rows" in validation_report and "missing caption" in validation_report

    # --- every row left out up front is in the output folder: named, counted in the results and the card ---------
    out = tmp_path / "out"
    named = [json.loads(line) for line in (out / "dropped_rows.jsonl").read_text().splitlines()]
    assert [(entry["where"], entry["row"]) for entry in named] == [
        *(("train data", index[key]) for key in sorted(UP_FRONT_BAD, key=index.get)),
        ("validation data", 4),  # the JSON-lines file's fifth row, its caption null
    ]
    assert "missing.png" in named[0]["reason"] and named[-1]["reason"].startswith("missing caption")
    assert json.loads((out / "train_results.json").read_text())["dropped_rows"] == 5
    assert json.loads((out / "all_results.json").read_text())["dropped_rows"] == 5
    assert "5 rows of the data were left out before training as unusable" in (out / "README.md").read_text()

    # --- the rows only decoding can find are skipped when their batch is built, named and counted ---------------
    skip_warnings = [m for m in messages(caplog, "clip_trainer.collator") if m.startswith("Leaving out a sample")]
    train_skips = skip_warnings[: len(BATCH_TIME_BAD)]
    for path, reason in BATCH_TIME_BAD.items():
        assert any(reason in m and Path(path).name in m for m in train_skips), (path, train_skips)
    # The odd modes and the long caption were kept: no warning names them, and the count is exactly the planted rows.
    for name in ODD_MODES:
        assert not any(name in m for m in skip_warnings), name
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    counts = [entry["skipped_samples"] for entry in state["log_history"] if "skipped_samples" in entry]
    assert counts and max(counts) == len(BATCH_TIME_BAD)
    assert any("eval_loss" in entry for entry in state["log_history"])  # evaluation ran on what was left
    # The long caption was cut at the text model's 16 positions, not refused.
    assert max(batch_widths) == 16


def test_on_bad_rows_error_stops_before_training_with_the_same_report(base_args, tmp_path, capsys, monkeypatch):
    train, validation, index = write_bad_dataset(tmp_path / "data")
    num_rows = len(list(csv.reader(train.open()))) - 1

    def refuse(*args, **kwargs):
        raise AssertionError("the model should not be loaded when the data is refused")

    monkeypatch.setattr(run, "load_model", refuse)
    status = run.cli([*bad_data_args(base_args, train, validation), "--on_bad_rows", "error"])
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err
    message = next(line for line in err.splitlines() if line.startswith("run_clip.py: error:"))
    assert f"train data: 4 of {num_rows} rows cannot be used" in message
    # Every bad row is named, so that one run finds all there is to fix.
    assert [int(row) for row in re.findall(r"row (\d+):", message)] == sorted(index[k] for k in UP_FRONT_BAD)
    assert message.endswith(". Fix or remove these rows, or set `on_bad_rows` to `skip`.")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_evaluation_of_training_data_says_it_scores_the_held_out_share(tiny_clip_dir, shapes_csv, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    metrics = run.main(["--model_name_or_path", str(tiny_clip_dir), "--train_file", str(shapes_csv), "--do_eval",
                        "--output_dir", str(tmp_path / "eval"), "--report_to", "none", "--use_cpu", "true",
                        "--dataloader_num_workers", "0"])  # fmt: skip
    said = [m for m in messages(caplog, "clip_trainer.data") if m.startswith("Evaluating ")]
    assert said == [f"Evaluating {metrics['eval_samples']} of the data's 72 rows: the held-out 15% "
                    "(`validation_split_percentage`), the split a training run with the same seed holds out. Give "
                    "the data as `validation_file` to score all of it."]  # fmt: skip


def test_an_evaluation_counts_the_pairs_it_could_not_score(tiny_clip_dir, tmp_path):
    folder = tmp_path / "val"
    csv_path = write_shapes_csv(folder, repeats=1)
    rows = list(csv.reader(csv_path.open()))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows[3][0] = "broken.png"
    with csv_path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    metrics = run.main(["--model_name_or_path", str(tiny_clip_dir), "--validation_file", str(csv_path), "--do_eval",
                        "--output_dir", str(tmp_path / "eval"), "--report_to", "none", "--use_cpu", "true",
                        "--dataloader_num_workers", "0"])  # fmt: skip
    assert metrics["eval_samples"] == 24 and metrics["eval_unusable_pairs"] == 1
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["eval_unusable_pairs"] == 1


def test_bad_rows_of_data_split_for_validation_are_numbered_as_in_the_file(base_args, tmp_path, caplog):
    """With part of the training file held out, the up-front report numbers each bad row as the file does (row 0 is
    the first data row), and every bad row is in the one report, whichever side of the split it would have fallen."""
    folder = tmp_path / "data"
    csv_path = write_shapes_csv(folder, repeats=1)
    rows = list(csv.reader(csv_path.open()))
    rows[1 + 3][1] = ""  # data row 3: an empty caption
    rows[1 + 23][0] = "images/missing.png"  # the last data row: a file that is not there
    with csv_path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    args = [*base_args[: base_args.index("--train_file") + 1], str(csv_path),
            *base_args[base_args.index("--train_file") + 2 :], "--validation_split_percentage", "25",
            "--max_steps", "1", "--eval_strategy", "steps", "--eval_steps", "1"]  # fmt: skip
    run.main(args)
    reports = [m for m in messages(caplog, "clip_trainer.data") if "skipped" in m and "rows" in m]
    assert len(reports) == 1 and reports[0].startswith("train data: skipped 2 of 24 rows")
    assert [int(row) for row in re.findall(r"row (\d+):", reports[0])] == [3, 23]
    assert "images/missing.png" in reports[0]
