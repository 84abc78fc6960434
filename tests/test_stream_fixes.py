"""What a streamed run says about its data: the validation pairs held out of a stream count against the shards they
came from in the uneven-shards warning; a streamed Parquet row whose image is embedded bytes, and a tar sample of a
streamed mixture, are named when left out; shard messages of a mixture source name the source; a caption that is
not UTF-8 is said to be so; a shard whose first samples differ names them."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import draw_shape, shape_rows
from test_webdataset import _add_member, write_tar_shards

from clip_trainer import run
from clip_trainer.arguments import ConfigError, DataArguments
from clip_trainer.data import is_unreadable_row, load_image_text_data
from clip_trainer.stream import check_shard_split


def logged(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def collate_pass(data, tiny_clip_dir: Path, rows: int) -> None:
    """Runs the first `rows` training rows of one pass through the run's collator (which names what it leaves out)."""
    from transformers import AutoProcessor

    from clip_trainer.collator import ImageTextCollator

    collator = ImageTextCollator.from_processor(AutoProcessor.from_pretrained(tiny_clip_dir))
    batch = list(data.one_pass.take(rows))
    collator(batch)


def png(index: int) -> bytes:
    color, shape, background, _ = shape_rows()[index % len(shape_rows())]
    buffer = io.BytesIO()
    draw_shape(color, shape, background, size=32 + index).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------
# Held-out rows and the uneven-shards warning
# --------------------------------------------------------------------------------------------------------------


def test_pairs_held_out_of_a_stream_count_against_their_shard_in_the_uneven_shards_warning(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    write_tar_shards(tmp_path / "shards", shards=4, per_shard=8)
    args = DataArguments(train_file="shards/{00000..00003}.tar", streaming=True, max_eval_samples=4)
    data = load_image_text_data(args, seed=1)
    held = [row["__url__"] for row in data.validation]
    assert held == ["shards/00000.tar"] * 4  # the head of the unshuffled stream: the first shard's first samples
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    check_shard_split(data.train, world_size=1, num_workers=2)
    log = logged(caplog)
    # Two readers of two shards each: the one dealt the first shard trains on 8 - 4 + 8 samples, the other on 16,
    # and both give half the batches.
    assert "1.33x as often as those of the reader with the most" in log
    assert f"{(3 * 8 + 4) / (2 * (4 + 8)):.2f}x as often as with an even split" in log
    assert "4 pairs are the first of the stream, from 1 shard(s) (first: shards/00000.tar)" in log
    assert "give a `validation_file`" in log and "`max_eval_samples`" in log
    assert "Write shards of equal size" not in log  # they are equal: the held-out pairs are the cause

    # Without the hold-out, the same shards are even: nothing to say.
    caplog.clear()
    (tmp_path / "val.csv").write_text("image,caption\n")  # unused: validation off
    data = load_image_text_data(
        DataArguments(train_file="shards/{00000..00003}.tar", streaming=True), 1, evaluate=False
    )
    check_shard_split(data.train, world_size=1, num_workers=2)
    assert "uneven" not in logged(caplog)


def test_a_few_held_out_pairs_among_large_shards_give_no_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    write_tar_shards(tmp_path / "shards", shards=2, per_shard=30)
    data = load_image_text_data(DataArguments(train_file="shards/*.tar", streaming=True, max_eval_samples=2), 1)
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    check_shard_split(data.train, world_size=1, num_workers=2)
    assert "uneven" not in logged(caplog)  # 28 against 30: 1.03x as often, below the warning's 1.1x


def test_fewer_shards_than_workers_say_the_workers_stop_not_that_sampling_is_uneven(
    shapes_csv, tmp_path, monkeypatch, caplog
):
    # One CSV is one shard: `datasets` stops the second worker, and the one left reads every row once a pass.
    monkeypatch.chdir(tmp_path)
    data = load_image_text_data(
        DataArguments(train_file=str(shapes_csv), streaming=True, validation_file=str(shapes_csv)), 1
    )
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    check_shard_split(data.train, world_size=1, num_workers=2)
    said = logged(caplog)
    assert "1 shard(s) for 2 readers (1 process(es) x 2 DataLoader workers): `datasets` stops the workers" in said
    assert "Set `dataloader_num_workers` to 1" in said and "come round more often" not in said


@pytest.mark.slow
def test_a_streamed_run_with_workers_warns_of_its_held_out_pairs(base_args, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    write_tar_shards(tmp_path / "shards", shards=4, per_shard=8)
    argv = list(base_args)
    argv[argv.index("--train_file") + 1] = "shards/{00000..00003}.tar"
    argv[argv.index("--dataloader_num_workers") + 1] = "2"
    argv[argv.index("--eval_strategy") + 1] = "steps"  # a run that evaluates holds validation out of the stream
    argv += ["--streaming", "true", "--max_steps", "2", "--eval_steps", "2", "--max_eval_samples", "4"]
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    run.main(argv)
    log = logged(caplog)
    assert "1.33x as often as those of the reader with the most" in log
    assert "The cause is the validation set held out of the stream" in log


# --------------------------------------------------------------------------------------------------------------
# Naming what a stream leaves out
# --------------------------------------------------------------------------------------------------------------


def write_parquet(path: Path, rows: int, bad: int, offset: int = 0) -> None:
    images = [{"bytes": png(offset + i) if i != bad else b"not an image" * 10, "path": None} for i in range(rows)]
    captions = [shape_rows()[(offset + i) % len(shape_rows())][3] for i in range(rows)]
    pd.DataFrame({"image": images, "caption": captions}).to_parquet(path)


def test_a_streamed_parquet_row_with_bad_image_bytes_is_named_by_file_and_row(
    tiny_clip_dir, shapes_csv, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_parquet(tmp_path / "data" / "a.parquet", rows=6, bad=-1)
    write_parquet(tmp_path / "data" / "b.parquet", rows=6, bad=4, offset=6)
    common = dict(train_file="data/*.parquet", validation_file=str(shapes_csv))
    streamed = load_image_text_data(DataArguments(streaming=True, **common), seed=1)
    loaded = load_image_text_data(DataArguments(**common), seed=1, evaluate=False)
    assert streamed.train.num_shards == 2  # still one shard per file, for processes and workers
    rows = list(streamed.one_pass)
    assert [row["caption"] for row in rows] == [shape_rows()[i % len(shape_rows())][3] for i in range(12)]
    assert rows[0]["image"]["bytes"] == png(0)
    assert rows[10]["_source_row"] == f"row 4 of {tmp_path / 'data' / 'b.parquet'}"
    assert f"({tmp_path / 'data' / 'b.parquet'}, its row 4)" in loaded.train["_source_row"][10]  # the same row
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    collate_pass(streamed, tiny_clip_dir, rows=12)
    assert f"Leaving out row 4 of {tmp_path / 'data' / 'b.parquet'} that cannot be used" in logged(caplog)


def bad_tar(path: Path, spoil: dict[int, dict[str, bytes | None]], samples: int = 6) -> None:
    """A tar of `samples` samples `k<i>` (png + txt); `spoil` replaces (or with `None` removes) members of some."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for index in range(samples):
            members = {"png": png(index), "txt": shape_rows()[index % len(shape_rows())][3].encode()}
            members.update(spoil.get(index, {}))
            for extension, data in members.items():
                if data is not None:
                    _add_member(tar, f"k{index:03d}.{extension}", data)


def test_a_tar_sample_of_a_streamed_mixture_is_named_and_so_is_the_mixture_source(
    tiny_clip_dir, shapes_csv, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    write_tar_shards(tmp_path / "good", shards=1, per_shard=6)
    bad_tar(tmp_path / "bad" / "00000.tar", {2: {"png": b"this is not a png" * 10}})
    (tmp_path / "bad" / "00001.tar").write_bytes(b"")
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    mixture = {"good/00000.tar": 1, "bad/*.tar": 1}
    args = DataArguments(train_mixture=mixture, streaming=True, validation_file=str(shapes_csv))
    data = load_image_text_data(args, seed=1)
    assert "`train_mixture` source `bad/*.tar`: left out 1 of 2 shard(s) that cannot be read" in logged(caplog)
    assert "`train_file`" not in logged(caplog)
    collate_pass(data, tiny_clip_dir, rows=12)
    assert "Leaving out a sample k002 of bad/00000.tar that cannot be used" in logged(caplog)

    (tmp_path / "bad" / "00000.tar").write_bytes(b"<html>gone</html>\n")
    with pytest.raises(ConfigError, match=r"None of the 2 shards of `train_mixture` source `bad/\*\.tar` can be read"):
        load_image_text_data(args, seed=1)


@pytest.mark.parametrize("streaming", [True, False])
def test_a_caption_that_is_not_utf8_is_said_to_be_so_naming_the_sample(
    tiny_clip_dir, shapes_csv, tmp_path, monkeypatch, caplog, streaming
):
    monkeypatch.chdir(tmp_path)
    bad_tar(tmp_path / "bad" / "00000.tar", {3: {"txt": "caf\xe9 cr\xe8me".encode("latin-1")}})
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    args = DataArguments(train_file="bad/00000.tar", streaming=streaming, validation_file=str(shapes_csv))
    data = load_image_text_data(args, seed=1)
    if streaming:
        collate_pass(data, tiny_clip_dir, rows=6)
    log = logged(caplog)
    assert "`train_file` shard 'bad/00000.tar': k003.txt is not UTF-8 text (invalid continuation byte at byte 3" in log
    assert "missing caption (None)" not in log
    if not streaming:
        assert len(data.train) == 5
    with pytest.raises(ConfigError, match=r"k003\.txt is not UTF-8 text .* Fix the sample, or set `on_bad_rows`"):
        data = load_image_text_data(
            DataArguments(train_file="bad/00000.tar", streaming=streaming, validation_file=str(shapes_csv),
                          on_bad_rows="error"), seed=1)  # fmt: skip
        list(data.one_pass)


def test_a_shard_whose_first_sample_lacks_its_caption_names_the_samples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad_tar(tmp_path / "bad" / "00000.tar", {0: {"txt": None}})
    with pytest.raises(ConfigError, match=r"\(k000 has no member but its image; k001 has txt\)"):
        load_image_text_data(DataArguments(train_file="bad/00000.tar", streaming=True), seed=1)


@pytest.mark.parametrize("streaming", ["true", "false"], ids=["streamed", "loaded"])
def test_a_parquet_file_with_other_columns_is_one_line_naming_it(base_args, tmp_path, streaming):
    """Streamed, every row of such a file was left out one by one as a "missing caption" and the run trained on the
    others; loaded, `datasets`' error named the first (good) file and no cause."""
    import pyarrow.parquet as pq
    from conftest import drop_option
    from test_streaming import write_parquet_shards

    shards = write_parquet_shards(tmp_path / "shards", shards=1)
    good = next(shards.glob("*.parquet"))
    table = pq.read_table(good).rename_columns(["img", "text"])
    pq.write_table(table, shards / "train-odd.parquet")
    with pytest.raises(ConfigError) as raised:
        run.main([*drop_option(base_args, "train_file"), "--train_file", str(shards / "*.parquet"),
              "--streaming", streaming, "--max_steps", "2"])  # fmt: skip
    message = str(raised.value)
    assert "train-odd.parquet has the columns ['img', 'text']" in message and "['image', 'caption']" in message


def test_uneven_parquet_files_of_a_stream_are_warned_of_as_tar_shards_are(base_args, tmp_path, monkeypatch, caplog):
    # Parquet files give their row counts from their footers: 30, 2, 3 and 1 rows for 2 DataLoader workers.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    offset = 0
    for index, rows in enumerate([30, 2, 3, 1]):
        write_parquet(tmp_path / "data" / f"train-{index}.parquet", rows=rows, bad=-1, offset=offset)
        offset += rows
    argv = list(base_args)
    argv[argv.index("--train_file") + 1] = "data/*.parquet"
    argv[argv.index("--dataloader_num_workers") + 1] = "2"
    argv[argv.index("--output_dir") + 1] = "out"
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    run.main([*argv, "--streaming", "true", "--max_steps", "1", "--validation_split_percentage", "0",
              "--eval_strategy", "no", "--shuffle_buffer_size", "8"])  # fmt: skip
    [message] = [line for line in logged(caplog).splitlines() if "shards are uneven" in line]
    # The fewest rows a worker can be dealt are its 2 smallest files', 1 + 2 = 3 of 36: half of the draws.
    assert "(1 to 30 samples, 36 in all) for 2 readers" in message
    assert f"up to {0.5 / (3 / 36):.2f}x as often as with an even split" in message

    # Files of equal size: nothing to say.
    caplog.clear()
    for index in range(4):
        write_parquet(tmp_path / "data" / f"train-{index}.parquet", rows=5, bad=-1, offset=5 * index)
    data = load_image_text_data(DataArguments(train_file="data/*.parquet", streaming=True), 1, evaluate=False)
    check_shard_split(data.train, world_size=1, num_workers=2)
    assert "uneven" not in logged(caplog)


def test_a_streamed_json_lines_row_with_bad_base64_image_is_named_by_file_and_row(
    base_args, shapes_csv, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for part in range(2):
        with open(tmp_path / "data" / f"train-{part}.jsonl", "w") as lines:
            for index in range(6):
                image = png(6 * part + index) if (part, index) != (1, 4) else b"not an image at all" * 5
                caption = shape_rows()[(6 * part + index) % len(shape_rows())][3]
                lines.write(json.dumps({"image": base64.b64encode(image).decode(), "caption": caption}) + "\n")
            lines.write("\n")  # a blank line, which is no row
    args = DataArguments(train_file="data/*.jsonl", streaming=True, validation_file=str(shapes_csv))
    data = load_image_text_data(args, seed=1)
    assert data.train.num_shards == 2  # still one shard per file, for processes and workers
    rows = list(data.one_pass)
    assert [row["caption"] for row in rows] == [shape_rows()[i % len(shape_rows())][3] for i in range(12)]
    assert rows[10]["_source_row"] == f"row 4 of {tmp_path / 'data' / 'train-1.jsonl'}"

    argv = list(base_args)
    argv[argv.index("--train_file") + 1] = "data/*.jsonl"
    argv[argv.index("--output_dir") + 1] = "out"
    argv[argv.index("--per_device_train_batch_size") + 1] = "12"
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    run.main([*argv, "--streaming", "true", "--max_steps", "1", "--validation_file", str(shapes_csv),
              "--eval_strategy", "no", "--shuffle_buffer_size", "1"])  # fmt: skip
    assert f"Leaving out row 4 of {tmp_path / 'data' / 'train-1.jsonl'} that cannot be used" in logged(caplog)


def test_a_streamed_run_leaves_out_a_bad_json_line_or_a_cut_parquet_file_and_goes_on(
    base_args, shapes_csv, tmp_path, monkeypatch, caplog
):
    # The second file of each stream is damaged: a JSON Lines file with a line cut short and a line that is no
    # object, a Parquet file whose pages do not decode. `datasets` would stop the run there, after the first file.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "parquet").mkdir()
    for part in range(2):
        with open(tmp_path / "jsonl" / f"train-{part}.jsonl", "w") as lines:
            for index in range(6):
                image = base64.b64encode(png(6 * part + index)).decode()
                caption = shape_rows()[(6 * part + index) % len(shape_rows())][3]
                lines.write(json.dumps({"image": image, "caption": caption}) + "\n")
                if part == 1 and index == 2:
                    lines.write('["a list", "not an object"]\n')
            if part == 1:
                lines.write('{"image": "iVBORw0KGgo", "capt')  # cut short mid-line
        write_parquet(tmp_path / "parquet" / f"train-{part}.parquet", rows=6, bad=-1, offset=6 * part)
    cut = tmp_path / "parquet" / "train-1.parquet"
    data = bytearray(cut.read_bytes())
    data[4:300] = bytes(296)  # its first pages overwritten (a disk or copy fault); its footer still says 6 rows
    cut.write_bytes(bytes(data))

    caplog.set_level(logging.WARNING, logger="clip_trainer")
    jsonl = load_image_text_data(
        DataArguments(train_file="jsonl/*.jsonl", streaming=True, validation_file=str(shapes_csv)), seed=1
    )
    rows = list(jsonl.one_pass)
    named = tmp_path / "jsonl" / "train-1.jsonl"
    # Every good line, once, and each bad line as a row that names it and holds nothing (the trainer counts it).
    assert len([row for row in rows if not is_unreadable_row(row)]) == 12
    assert [row["_source_row"] for row in rows if is_unreadable_row(row)] == [f"line {n} of {named}" for n in (4, 8)]
    assert f"Leaving out line 4 of {named}: it is a JSON list, not an object" in logged(caplog)
    assert f"Leaving out line 8 of {named}: it is not JSON (Unterminated string" in logged(caplog)

    parquet = load_image_text_data(
        DataArguments(train_file="parquet/*.parquet", streaming=True, validation_file=str(shapes_csv)), seed=1
    )
    rows = [row for row in parquet.one_pass if not is_unreadable_row(row)]
    assert len(rows) == 6 and all(row["_source_row"].endswith("train-0.parquet") for row in rows)
    lost = [row["_source_row"] for row in parquet.one_pass if is_unreadable_row(row)]
    assert lost == [f"row {n} of {cut}" for n in range(6)]  # the rows its footer counts
    assert f"Leaving out {cut} from its row" in logged(caplog) and "it cannot be read" in logged(caplog)

    # The command trains past both, to its last step.
    for folder, pattern in (("jsonl", "jsonl/*.jsonl"), ("parquet", "parquet/*.parquet")):
        argv = list(base_args)
        argv[argv.index("--train_file") + 1] = pattern
        argv[argv.index("--output_dir") + 1] = f"out-{folder}"
        results = run.main([*argv, "--streaming", "true", "--max_steps", "4", "--validation_file", str(shapes_csv),
                            "--eval_strategy", "no", "--shuffle_buffer_size", "1"])  # fmt: skip
        assert json.loads((tmp_path / f"out-{folder}" / "trainer_state.json").read_text())["global_step"] == 4
        # What was left out is counted: 4 steps of 8 rows read the 14 (or 12) rows of the stream twice and more.
        assert results["skipped_samples"] >= 2 * (2 if folder == "jsonl" else 6)


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "loaded"])
def test_a_json_lines_file_whose_line_is_no_object_names_the_line(shapes_csv, tmp_path, streaming):
    # pyarrow says "Column() changed from object to string in row 0" of a list line, or names a cut line's row.
    for bad, said in (('["a list"]', "line 3 is a JSON list, not an object"),
                      ('{"image": "a.png", "capt', "line 3 is not JSON (Unterminated string")):  # fmt: skip
        path = tmp_path / "pairs.jsonl"
        path.write_text('{"image": "a.png", "caption": "a"}\n{"image": "b.png", "caption": "b"}\n' + bad)  # its end
        with pytest.raises(ConfigError, match=re.escape(f"`train_file` {str(path)!r}: {said}")):
            load_image_text_data(
                DataArguments(train_file=str(path), streaming=streaming, validation_file=str(shapes_csv)), seed=1
            )


def test_a_streamed_csv_glob_with_an_overlong_row_names_its_file_and_line_and_goes_on(
    shapes_csv, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "csvs").mkdir()
    lines = shapes_csv.read_text().splitlines()
    (tmp_path / "csvs" / "a.csv").write_text("\n".join(lines[:6]) + "\n")
    (tmp_path / "csvs" / "b.csv").write_text("\n".join([lines[0], *lines[6:9], lines[9] + ",extra"]) + "\n")
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    data = load_image_text_data(
        DataArguments(train_file="csvs/*.csv", streaming=True, validation_file=str(shapes_csv)), 1
    )
    assert [row["caption"] for row in data.one_pass if not is_unreadable_row(row)] == [
        line.split(",")[1] for line in lines[1:9]
    ]
    assert (
        f"Leaving out line 5 of {tmp_path / 'csvs' / 'b.csv'}: it has 4 fields where the header has 3; a caption "
        'with a comma must be quoted ("a red, round sign")'
    ) in logged(caplog)


# Good rows before the damaged ones, past the head (256 KiB) that is checked for another encoding at the start: the
# damage is met mid-stream, as in a large file.
PADDING_ROWS = 300


def damaged_csv(folder: Path, shapes_csv: Path) -> tuple[Path, list[str]]:
    """A CSV of the shapes data with, after `PADDING_ROWS` good rows of 1 KB each, among its rows: a caption with
    quoted commas and a line break, one with quotes in it, a line that is not UTF-8, a quote left open (the lines it
    would swallow are good rows), a row with a field too many; returns it and the captions of its good rows, in
    order."""
    rows = [line.split(",") for line in shapes_csv.read_text().splitlines()[1:13]]
    images = [image for image, *_ in rows]
    good = [caption for _, caption, _ in rows]
    good[1] = 'a red, round "sign"\non two lines'
    padding = [f"{index} {'a long caption ' * 70}" for index in range(PADDING_ROWS)]
    text = [b"\xef\xbb\xbfimage,caption,shape\n"]  # a byte-order mark, as Excel writes
    text += [f"{images[index % len(images)]},{caption},NA\n".encode() for index, caption in enumerate(padding)]
    good = padding + good
    for index, (image, caption) in enumerate(zip(images, good[PADDING_ROWS:])):
        quoted = '"' + caption.replace('"', '""') + '"'
        text.append(f"{image},{quoted},NA\n".encode())
        if index == 3:
            text.append(f"{image},caf\xe9 in Latin-1,shape\n".encode("latin-1"))
        if index == 6:
            text.append(f'{image},"a caption cut short,circle\n'.encode())
        if index == 9:
            text.append(f"{image},a caption,circle,one field too many\n".encode())
    path = shapes_csv.parent / f"damaged-{folder.name}.csv"  # beside the images, whose paths are relative
    path.write_bytes(b"".join(text))
    return path, good


def test_a_streamed_csv_leaves_out_the_records_it_cannot_read_and_keeps_every_other_row(
    base_args, shapes_csv, tmp_path, monkeypatch, caplog
):
    # `datasets` reads a streamed CSV with pandas in blocks of 10,000 rows, and stops the run at the first block with
    # a record pandas cannot read, hours in. The good rows read as pandas reads the file without the bad records.
    monkeypatch.chdir(tmp_path)
    path, good = damaged_csv(tmp_path, shapes_csv)
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    data = load_image_text_data(
        DataArguments(train_file=str(path), streaming=True, validation_file=str(shapes_csv)), 1
    )
    rows = [row for row in data.one_pass if not is_unreadable_row(row)]
    assert [row["caption"] for row in rows] == good
    assert all(row["shape"] == "NA" for row in rows)  # text as written, as a loaded file's (not pandas' missing)
    at = PADDING_ROWS  # the lines below count from the first line after the padding
    named = [row["_source_row"] for row in rows[at : at + 4]]
    assert named == [f"line {at + n} of {path}" for n in (2, 3, 5, 6)]
    said = logged(caplog)
    assert f"Leaving out line {at + 7} of {path}: it is not UTF-8 text (invalid continuation byte)" in said
    assert f"Leaving out line {at + 11} of {path}: a quote opened there is never closed" in said
    assert f"Leaving out line {at + 15} of {path}: it has 4 fields where the header has 3" in said
    assert said.count(f"Leaving out line {at + 7} of {path}") == 1  # once, however often the stream is read
    # The reference: pandas reading the file without the records left out.
    left_out = {at + 7, at + 11, at + 15}
    kept = b"".join(
        line for number, line in enumerate(path.read_bytes().splitlines(True), 1) if number not in left_out
    )
    reference = pd.read_csv(io.BytesIO(kept), keep_default_na=False, dtype=str)
    assert reference["caption"].tolist() == good and reference["shape"].tolist() == ["NA"] * len(good)
    assert [str(shapes_csv.parent / image) for image in reference["image"]] == [row["image"] for row in rows]

    # The records left out hold their place in the stream, as rows that name them.
    unreadable = [row["_source_row"] for row in data.one_pass if is_unreadable_row(row)]
    assert unreadable == [f"line {at + n} of {path}" for n in (7, 11, 15)]

    # The command trains past all of them, to its last step, and counts them.
    argv = list(base_args)
    argv[argv.index("--train_file") + 1] = str(path)
    steps = (len(good) + 3) // 8 + 1  # one pass, and a step more
    results = run.main([*argv, "--streaming", "true", "--max_steps", str(steps), "--validation_file",
                        str(shapes_csv), "--eval_strategy", "no", "--shuffle_buffer_size", "1"])  # fmt: skip
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == steps
    assert results["skipped_samples"] == 3
    assert f"Leaving out line {at + 7} of {path} that cannot be used (no image and no caption" in logged(caplog)
