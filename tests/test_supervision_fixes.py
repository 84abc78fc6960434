"""Richer supervision as users write it, where it used to go wrong without a word: image ids that name several
files, hard negatives that are not text (or none usable), and a `caption_sampling` mapping with an unknown column."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import draw_shape, set_option

from clip_trainer.arguments import ConfigError
from clip_trainer.run import main


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def write_jsonl(folder, rows: list[dict]) -> str:
    (folder / "images").mkdir(exist_ok=True)
    lines = []
    for index, row in enumerate(rows):
        path = folder / "images" / f"{index}.png"
        draw_shape(*(("red", "circle"), ("blue", "square"), ("green", "triangle"))[index % 3], size=40 + index).save(
            path
        )
        lines.append(json.dumps({"image": str(path), **row}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "pairs.jsonl")


@pytest.mark.slow  # training runs, a few seconds each
def test_an_image_id_that_names_two_files_is_said(base_args, tmp_path, caplog):
    """Twelve pictures whose ids repeat in pairs (as ids written 10 and "10" do): the rows of one id are one image,
    so half of the pictures are never trained on; the log says so, with the first id and its two files."""
    data = write_jsonl(tmp_path, [{"caption": f"shape number {i}", "photo": str(i // 2)} for i in range(12)])
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    main([*set_option(base_args, "train_file", data), "--image_id_column", "photo", "--max_steps", "1",
          "--validation_split_percentage", "34", "--do_train", "--do_eval"])  # fmt: skip
    # Said once, though the held-out split and both splits look at the ids again.
    [message] = [m for m in _warnings(caplog) if "name more than one file" in m]
    assert message.startswith("6 image id(s) of `image_id_column` 'photo' name more than one file (first: id '0'")
    assert "images/0.png and " in message and "images/1.png" in message


@pytest.mark.slow  # training runs, a few seconds each
def test_hard_negatives_that_are_not_text_or_none_usable_are_said(base_args, tmp_path, caplog):
    rows = [{"caption": f"shape {i}", "negatives": [{"x": 1}, ["nested"], "a wrong shape"] if i == 2 else []}
            for i in range(9)]  # fmt: skip
    data = write_jsonl(tmp_path, rows)
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    argv = [*set_option(base_args, "train_file", data), "--hard_negative_column", "negatives", "--max_steps", "1",
            "--validation_split_percentage", "0"]  # fmt: skip
    main(argv)
    [message] = [m for m in _warnings(caplog) if "are not text" in m]
    assert message.startswith("2 hard negative(s) of `hard_negative_column` 'negatives' in the train data")
    assert "(first: row 2: {'x': 1})" in message
    assert not [m for m in _warnings(caplog) if "holds no usable hard negative" in m]  # row 2 keeps one

    caplog.clear()
    (tmp_path / "none").mkdir()
    data = write_jsonl(tmp_path / "none", [{"caption": f"shape {i}", "negatives": [" "]} for i in range(9)])
    main([*set_option(set_option(argv, "train_file", data), "output_dir", str(tmp_path / "out2"))])
    [message] = [m for m in _warnings(caplog) if "holds no usable hard negative" in m]
    assert "in the train data (9 rows: empty, missing or not text)" in message


def test_an_unknown_column_in_the_caption_sampling_mapping_names_the_key(base_args, tmp_path):
    data = write_jsonl(tmp_path, [{"caption": f"shape {i}", "title": f"title {i}"} for i in range(6)])
    with pytest.raises(ConfigError, match=r"`caption_sampling` weighs a column 'nope', but the train data has no such "
                                          r"column\. Its columns are: .*\. Use them as the mapping's keys"):  # fmt: skip
        main([*set_option(base_args, "train_file", data), "--caption_sampling", '{"caption": 1, "nope": 1}',
              "--max_steps", "1"])  # fmt: skip
