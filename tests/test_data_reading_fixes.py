"""Reading data as the user wrote it: a JSON list of captions in WebDataset shards (several captions per image, as in
a JSON Lines file), rows whose image is embedded bytes named when it does not decode, a streamed blank caption named
by its image, an empty image member of a tar shard called empty, and CSV headers that pandas would misread (a
tab- or semicolon-separated `.csv`, `.tsv` files, repeated column names, spaces around a column name)."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from conftest import TINY_TEXT, TINY_VISION, draw_shape, shape_rows

from clip_trainer import run
from clip_trainer.arguments import ConfigError, DataArguments
from clip_trainer.data import load_image_text_data
from clip_trainer.images import load_image

# --------------------------------------------------------------------------------------------------------------
# Data made here
# --------------------------------------------------------------------------------------------------------------


def _png(index: int) -> bytes:
    """A distinct picture per index (its shape, colours and size)."""
    color, shape, background, _ = shape_rows()[index % 24]
    buffer = io.BytesIO()
    draw_shape(color, shape, background, size=36 + index // 24).save(buffer, format="PNG")
    return buffer.getvalue()


def _captions(index: int) -> list[str]:
    """Two captions of image `index`, neither of which holds a bracket, a quote or a comma."""
    color, shape, background, caption = shape_rows()[index % 24]
    return [f"{caption} number {index}", f"{shape} in {color} number {index}"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _caption_list_shard(path: Path, images: range, captions=_captions) -> dict[str, list[str]]:
    """A tar shard whose samples are `<key>.png` + `<key>.json` holding `{"captions": [...], "id": ...}`; returns
    each sample's captions by key."""
    written = {}
    with tarfile.open(path, "w") as tar:
        for index in images:
            key = f"img{index:03d}"
            _add(tar, f"{key}.png", _png(index))
            _add(tar, f"{key}.json", json.dumps({"captions": captions(index), "id": index}).encode())
            written[key] = captions(index)
    return written


def _tiny_config(folder: Path) -> Path:
    """A tiny CLIP configuration to train from scratch (the run trains its tokenizer on the training captions)."""
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config={**TINY_TEXT, "max_position_embeddings": 32}, vision_config=TINY_VISION, projection_dim=16
    )
    path = folder / "tiny.json"
    path.write_text(config.to_json_string())
    return path


def _run_args(config: Path, output: str = "out", *extra: str) -> list[str]:
    return ["--config_name", str(config), "--tokenizer_vocab_size", "400", "--output_dir", output,
            "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "32", "--max_steps", "1",
            "--report_to", "none", "--dataloader_num_workers", "0", "--save_strategy", "no", "--use_cpu", "true",
            "--seed", "0", *extra]  # fmt: skip


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


# --------------------------------------------------------------------------------------------------------------
# 1. A JSON list of captions in tar shards
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def caption_list_data(tmp_path, monkeypatch) -> dict:
    """Training shards of 12 images and a validation shard of 4, two captions each in a json list; and the same
    pairs as JSON Lines files of image paths and caption lists (the form whose reading is the reference)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    train = {**_caption_list_shard(tmp_path / "shards/00000.tar", range(6)),
             **_caption_list_shard(tmp_path / "shards/00001.tar", range(6, 12))}  # fmt: skip
    validation = _caption_list_shard(tmp_path / "val.tar", range(12, 16))
    (tmp_path / "images").mkdir()
    for name, indices in (("train.jsonl", range(12)), ("val.jsonl", range(12, 16))):
        with open(tmp_path / name, "w") as handle:
            for index in indices:
                (tmp_path / f"images/{index}.png").write_bytes(_png(index))
                handle.write(json.dumps({"image": f"images/{index}.png", "captions": _captions(index)}) + "\n")
    return {"train": train, "validation": validation}


@pytest.mark.parametrize("column", ["json.captions", "captions"])
def test_a_json_list_of_captions_in_shards_is_read_as_a_list_of_captions(caption_list_data, column):
    data = load_image_text_data(
        DataArguments(train_file="shards/{00000..00001}.tar", validation_file="val.tar", caption_column=column), seed=0
    )
    assert {row["__key__"]: row[column] for row in data.train} == caption_list_data["train"]
    expected = [caption for captions in caption_list_data["validation"].values() for caption in captions]
    assert sorted(data.validation[column]) == sorted(expected)  # one row per caption, 4 images x 2
    assert len(set(data.validation["_image_id"])) == 4
    trained = sorted(caption for captions in caption_list_data["train"].values() for caption in captions)
    assert sorted(data.training_captions(column)) == trained
    # Exactly as the same captions in a JSON Lines file.
    twin = load_image_text_data(
        DataArguments(train_file="train.jsonl", validation_file="val.jsonl", caption_column="captions"), seed=0
    )
    assert sorted(twin.validation["captions"]) == sorted(data.validation[column])
    assert sorted(twin.training_captions("captions")) == trained
    assert data.train.features[column] == twin.train.features["captions"]


@pytest.mark.slow
def test_a_stream_of_shards_with_caption_lists_draws_one_caption_of_the_list(caption_list_data):
    data = load_image_text_data(
        DataArguments(
            train_file="shards/{00000..00001}.tar", caption_column="json.captions", streaming=True, max_eval_samples=4
        ),
        seed=0,
    )
    captions = {**caption_list_data["train"]}
    # The held-out head of the stream: its first 4 images, every caption a row.
    held_out = [key for key in list(captions)[:4]]
    assert sorted(data.validation["json.captions"]) == sorted(c for key in held_out for c in captions[key])
    rows = list(data.train.take(16))
    assert {row["__key__"] for row in rows} == set(captions) - set(held_out)
    assert all(row["json.captions"] in captions[row["__key__"]] for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_a_run_on_shards_with_caption_lists_scores_every_caption_and_learns_tokens_from_captions(
    caption_list_data, tmp_path, streaming
):
    config = _tiny_config(tmp_path)
    extra = ["--train_file", "shards/{00000..00001}.tar", "--validation_file", "val.tar",
             "--caption_column", "json.captions", "--streaming", str(streaming).lower(), "--do_train", "--do_eval"]  # fmt: skip
    metrics = run.main(_run_args(config, "out", *extra))
    # 4 validation images of 2 captions each: 8 pairs scored (one row per image before the fix).
    assert metrics["eval_samples"] == sum(len(c) for c in caption_list_data["validation"].values()) == 8
    results = json.loads((tmp_path / "out/eval_results.json").read_text())
    assert results["eval_samples"] == 8
    # The tokenizer learnt its merges from the captions, which hold no bracket, quote or comma: the text of a
    # Python list would have given it tokens such as "['" and "',".
    from transformers import AutoTokenizer

    vocabulary = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert not [token for token in vocabulary if len(token) > 1 and set(token) & set("[]',") and "|" not in token]


def test_a_caption_key_that_holds_no_caption_is_a_one_line_error_naming_the_shard_and_member(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _caption_list_shard(tmp_path / "00000.tar", range(4), captions=lambda index: {"en": _captions(index)[0]})
    config = _tiny_config(tmp_path)
    with pytest.raises(ConfigError) as error:
        run.main(_run_args(config, "out", "--train_file", "00000.tar", "--caption_column", "json.captions"))
    message = str(error.value)
    assert "\n" not in message
    assert "00000.tar" in message and "img000.json key 'captions'" in message and "JSON object" in message
    assert "a caption must be a string or a list of strings" in message and "caption_column" in message


def test_a_later_sample_whose_caption_is_no_caption_is_named_and_left_out(tmp_path, monkeypatch, caplog):
    """Past the first samples (from which the columns are learnt), a caption value that is no caption leaves its
    sample out, named with its shard (`on_bad_rows` skip), or stops the run naming them (`error`)."""
    monkeypatch.chdir(tmp_path)
    _caption_list_shard(tmp_path / "00000.tar", range(8), captions=lambda i: _captions(i) if i != 6 else [1, [2]])
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    data = load_image_text_data(
        DataArguments(train_file="00000.tar", caption_column="json.captions"), seed=0, evaluate=False
    )
    assert len(data.train) == 7 and "img006" not in data.train["__key__"]
    assert any("00000.tar" in m and "img006.json key 'captions' holds a list" in m for m in _warnings(caplog))
    with pytest.raises(ConfigError, match=r"00000.tar.*img006.json key 'captions'.*on_bad_rows"):
        load_image_text_data(
            DataArguments(train_file="00000.tar", caption_column="json.captions", on_bad_rows="error"),
            seed=0,
            evaluate=False,
        )


def test_captions_of_one_kind_or_another_in_the_first_samples_are_lists(tmp_path, monkeypatch):
    """A json member whose first samples hold one caption as text and another a list: all lists, as text and a
    list in one JSON Lines column are (a number is text, as `check_caption` reads it)."""
    monkeypatch.chdir(tmp_path)
    values = {0: "one caption", 1: ["two", "captions"], 2: 1999, 3: ["a", 2.0]}
    _caption_list_shard(tmp_path / "00000.tar", range(4), captions=lambda index: values[index])
    data = load_image_text_data(DataArguments(train_file="00000.tar", caption_column="captions"), seed=0,
                                evaluate=False)  # fmt: skip
    assert data.train["captions"] == [["one caption"], ["two", "captions"], ["1999"], ["a", "2"]]


# --------------------------------------------------------------------------------------------------------------
# 2. Rows whose image is embedded bytes, named when it does not decode; a streamed blank caption named by its image
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_undecodable_image_bytes_are_named_by_their_row_and_file(tmp_path, monkeypatch, caplog):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    good = [(_png(index), _captions(index)[0]) for index in range(10)]
    truncated = (_png(30)[:120], "a picture cut short")
    rows = good[:4] + [truncated] + good[4:]  # row 4
    pd.DataFrame([{"image": {"bytes": data, "path": None}, "caption": text} for data, text in rows]).to_parquet(
        "train.parquet"
    )
    with open("train.jsonl", "w") as handle:  # row 7: base64 text that decodes to no image; row 2: a data URI
        for index, (data, text) in enumerate(good):
            encoded = base64.b64encode(data if index != 7 else b"no picture here " * 8).decode()
            image = "data:image/png;base64," + encoded if index == 2 else encoded
            handle.write(json.dumps({"image": image, "caption": text}) + "\n")
    config = _tiny_config(tmp_path)
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    for name, row, reason in (("train.parquet", 4, "truncated image"), ("train.jsonl", 7, "not an image")):
        caplog.clear()
        run.main(_run_args(config, f"out-{name}", "--train_file", name, "--validation_split_percentage", "0"))
        left_out = [message for message in _warnings(caplog) if message.startswith("Leaving out")]
        assert left_out and all(f"Leaving out row {row} of {tmp_path / name} that cannot be used" in m
                                for m in left_out), left_out  # fmt: skip
        assert reason in left_out[0]


def test_rows_of_image_bytes_in_several_parquet_files_are_named_by_file_and_row(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    (tmp_path / "parts").mkdir()
    for part, indices in enumerate((range(3), range(3, 7))):
        rows = [{"image": {"bytes": _png(index), "path": None}, "caption": _captions(index)[0]} for index in indices]
        pd.DataFrame(rows).to_parquet(f"parts/train-{part}.parquet")
    data = load_image_text_data(DataArguments(train_file="parts/train-*.parquet"), seed=0, evaluate=False)
    first, second = tmp_path / "parts/train-0.parquet", tmp_path / "parts/train-1.parquet"
    assert data.train["_source_row"] == [f"row {i} ({first}, its row {i})" for i in range(3)] + [
        f"row {3 + i} ({second}, its row {i})" for i in range(4)
    ]


@pytest.mark.slow
def test_a_streamed_blank_caption_is_called_empty_and_named_by_its_image(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    with open("pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for index in range(12):
            (tmp_path / f"images/{index}.png").write_bytes(_png(index))
            writer.writerow([f"images/{index}.png", "  \t " if index == 5 else _captions(index)[0]])
    config = _tiny_config(tmp_path)
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    run.main(_run_args(config, "out", "--train_file", "pairs.csv", "--streaming", "true",
                       "--validation_split_percentage", "0"))  # fmt: skip
    left_out = {message for message in _warnings(caplog) if message.startswith("Leaving out")}
    image, csv_file = tmp_path / "images/5.png", tmp_path / "pairs.csv"
    # Named by its line of the CSV too, which the stream reads record by record.
    assert left_out == {f"Leaving out line 7 of {csv_file} that cannot be used (empty caption (image {image}))."}


# --------------------------------------------------------------------------------------------------------------
# 3. An empty image member of a tar shard
# --------------------------------------------------------------------------------------------------------------


def _shard_with_an_empty_image(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for index in range(6):
            _add(tar, f"k{index:04d}.jpg", b"" if index == 3 else _png(index))
            _add(tar, f"k{index:04d}.txt", _captions(index)[0].encode())


def test_an_empty_image_member_of_a_shard_is_called_empty_in_that_shard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _shard_with_an_empty_image(tmp_path / "00000.tar")
    config = _tiny_config(tmp_path)
    with pytest.raises(ConfigError) as error:
        run.main(_run_args(config, "out", "--train_file", "00000.tar", "--on_bad_rows", "error",
                           "--validation_split_percentage", "0"))  # fmt: skip
    message = str(error.value)
    assert "row 3: empty image (0 bytes): k0003.jpg (sample k0003 of 00000.tar)" in message
    assert "not found" not in message


@pytest.mark.slow
def test_a_streamed_empty_image_member_is_called_empty(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    _shard_with_an_empty_image(tmp_path / "00000.tar")
    config = _tiny_config(tmp_path)
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    run.main(_run_args(config, "out", "--train_file", "00000.tar", "--streaming", "true",
                       "--validation_split_percentage", "0"))  # fmt: skip
    left_out = {message for message in _warnings(caplog) if message.startswith("Leaving out")}
    assert left_out == {
        "Leaving out a sample k0003 of 00000.tar that cannot be used (empty image (0 bytes): k0003.jpg)."
    }, left_out


# --------------------------------------------------------------------------------------------------------------
# 4. CSV headers
# --------------------------------------------------------------------------------------------------------------


def _write_delimited(path: Path, header: list[str], separator: str = ",", rows: int = 12) -> None:
    (path.parent / "images").mkdir(exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=separator)
        writer.writerow(header)
        for index in range(rows):
            (path.parent / f"images/{index}.png").write_bytes(_png(index))
            caption = _captions(index)[0] if index != 1 else 'a "red", round thing'
            values = {"image": f"images/{index}.png", "caption": caption, "label": f"class {index % 3}"}
            writer.writerow([values.get(name.strip(), "other") for name in header])


@pytest.mark.parametrize(
    "separator, named, fix",
    [
        ("\t", "tab-separated", "name it .tsv"),
        (";", "semicolon-separated", "`pd.read_csv(path, sep=';').to_csv(out, index=False)`"),
        # Flickr30k's results.csv: pipes with spaces around them.
        ("|", "pipe-separated", r"`pd.read_csv(path, sep=r'\s*\|\s*', engine='python').to_csv(out, index=False)`"),
    ],
)
def test_a_csv_written_with_another_separator_says_so(tmp_path, monkeypatch, separator, named, fix):
    monkeypatch.chdir(tmp_path)
    _write_delimited(tmp_path / "pairs.csv", ["image", "caption", "label"], separator)
    with pytest.raises(ConfigError) as error:
        run.main(_run_args(_tiny_config(tmp_path), "out", "--train_file", "pairs.csv"))
    message = str(error.value)
    assert "\n" not in message and "\t" not in message
    assert f"`train_file` 'pairs.csv' looks {named}" in message and fix in message


def test_a_csv_header_with_a_repeated_column_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_delimited(tmp_path / "pairs.csv", ["image", "caption", "caption"])
    with pytest.raises(ConfigError) as error:
        run.main(_run_args(_tiny_config(tmp_path), "out", "--train_file", "pairs.csv"))
    message = str(error.value)
    assert "\n" not in message
    assert "'pairs.csv' has two columns named 'caption' (columns 2 and 3 of its header" in message


def test_a_column_name_with_spaces_around_it_is_named_as_such(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_delimited(tmp_path / "pairs.csv", ["image", " caption"])
    with pytest.raises(ConfigError) as error:
        run.main(_run_args(_tiny_config(tmp_path), "out", "--train_file", "pairs.csv"))
    message = str(error.value)
    assert "`caption_column` is 'caption'" in message and "its column ' caption' has spaces around its name" in message


@pytest.mark.slow
def test_a_tsv_file_trains_and_evaluates_as_its_csv_twin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tsv").mkdir()
    (tmp_path / "csv").mkdir()
    # A caption with a comma and one with a quote: tabs separate, so neither needs quoting in the .tsv.
    _write_delimited(tmp_path / "tsv/pairs.tsv", ["image", "caption", "label"], "\t")
    _write_delimited(tmp_path / "csv/pairs.csv", ["image", "caption", "label"], ",")
    config = _tiny_config(tmp_path)
    results = {}
    for name in ("tsv/pairs.tsv", "csv/pairs.csv"):
        results[name] = run.main(_run_args(config, f"out-{name[:3]}", "--train_file", name, "--do_train", "--do_eval",
                                           "--label_column", "label", "--validation_split_percentage", "50"))  # fmt: skip
    tsv, csv_ = results["tsv/pairs.tsv"], results["csv/pairs.csv"]
    assert tsv["eval_samples"] == csv_["eval_samples"] == 6  # half of the 12 rows
    for key in ("eval_loss", "eval_mean_recall", "eval_zeroshot_top1"):
        assert tsv[key] == pytest.approx(csv_[key]), key


def test_a_class_label_column_as_captions_trains_on_the_class_names(tmp_path, monkeypatch):
    # An imagefolder's class folders, or a classification dataset saved with `save_to_disk`: `datasets` stores the
    # class number, and the captions must be the names zero-shot reads from the same column.
    import datasets

    monkeypatch.chdir(tmp_path)
    names = ["red circle", "green square", "blue triangle"]
    images = [{"bytes": _png(index), "path": None} for index in range(12)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    data = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(12)]}, features=features)
    datasets.DatasetDict(train=data, validation=data.select(range(6))).save_to_disk("classes")
    loaded = load_image_text_data(DataArguments(dataset_name="classes", caption_column="label"), seed=1)
    assert sorted(set(loaded.train["label"])) == sorted(names)
    assert [loaded.validation[i]["label"] for i in range(3)] == names


def test_local_file_urls_train_and_evaluate_as_the_paths_they_name(tmp_path, monkeypatch):
    # img2dataset's input lists and some exports name local images as `file:///...` URLs, with spaces as `%20`.
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "my images"
    folder.mkdir()
    rows = []
    for index in range(12):
        (folder / f"{index} a.png").write_bytes(_png(index))
        rows.append((folder / f"{index} a.png", _captions(index)[0]))
    with open("paths.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("image", "caption"), *((f"my images/{p.name}", c) for p, c in rows)])
    # The three local forms: `file:///`, `file://localhost/` and RFC 8089's short `file:/` (Java, Spark).
    forms = [lambda p: p.as_uri(), lambda p: p.as_uri().replace("file://", "file://localhost"),
             lambda p: p.as_uri().replace("file://", "file:")]  # fmt: skip
    with open("urls.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("image", "caption"), *((forms[i % 3](p), c) for i, (p, c) in enumerate(rows))])
    assert "%20" in Path("urls.csv").read_text() and "file:/" + str(folder)[1:4] in Path("urls.csv").read_text()
    config = _tiny_config(tmp_path)
    results = {
        name: run.main(
            _run_args(
                config,
                f"out-{name}",
                "--train_file",
                f"{name}.csv",
                "--do_train",
                "--do_eval",
                "--validation_split_percentage",
                "50",
            )
        )  # fmt: skip
        for name in ("paths", "urls")
    }
    assert results["urls"]["eval_samples"] == results["paths"]["eval_samples"] == 6
    for key in ("eval_loss", "eval_mean_recall", "train_loss"):
        assert results["urls"][key] == pytest.approx(results["paths"][key]), key
    assert not Path("out-urls/dropped_rows.jsonl").exists()
    # Streamed, every row reads its image (one pass of the stream, which otherwise repeats).
    streamed = load_image_text_data(DataArguments(train_file="urls.csv", streaming=True, max_eval_samples=2), seed=0)
    images = [load_image(row["image"]) for row in streamed.one_pass]
    assert len(images) == 12 and {image.size for image in images} == {(36, 36)}
    # A file URL on another machine is a URL that is not fetched, said so with the local form, not a made-up path.
    Path("remote.csv").write_text(Path("paths.csv").read_text() + "file://otherhost/data/x.png,a picture elsewhere\n")
    run.main(_run_args(config, "out-remote", "--train_file", "remote.csv", "--do_train"))
    (dropped,) = [json.loads(line) for line in Path("out-remote/dropped_rows.jsonl").read_text().splitlines()]
    assert "file:// URL on another machine ('otherhost')" in dropped["reason"]
    assert "file:///absolute/path" in dropped["reason"] and "/file:" not in dropped["reason"]
