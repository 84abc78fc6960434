"""What a data path is, decided by one rule (`resolve_data_path`) for every option that takes one: Hub ids, files,
globs, brace ranges, shards, image folders, prepared folders and folders of data files; extra evaluation sets given as
shards, ranges or globs are evaluated whole; a local `dataset_name` that is not there, or a Hub id with the Hub
offline, is one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import drop_option, write_shapes_csv
from test_image_folders import write_caption_folder, write_metadata_folder
from test_webdataset import write_tar_shards

from clip_trainer import run
from clip_trainer.arguments import ConfigError, DataArguments
from clip_trainer.data import load_image_text_data
from clip_trainer.sources import resolve_data_path


@pytest.fixture
def paths(tmp_path, monkeypatch) -> Path:
    """A working folder with data of every kind, named as a user types them (relative)."""
    monkeypatch.chdir(tmp_path)
    write_tar_shards(tmp_path / "shards", shards=2, per_shard=6)
    write_shapes_csv(tmp_path / "csv", repeats=1)
    write_caption_folder(tmp_path / "captioned")
    write_metadata_folder(tmp_path / "with-metadata")
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (tmp_path / "parquet-folder").mkdir()
    (tmp_path / "parquet-folder" / "train.parquet").write_bytes(b"")
    (tmp_path / "nothing-here").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "path, kind",
    [
        ("emoji", "bundled"),
        ("openai/some-dataset", "hub"),
        ("mnist", "hub"),
        ("csv/pairs.csv", "files"),
        ("csv/*.csv", "files"),
        ("shards/00000.tar", "shards"),
        ("shards/*.tar", "shards"),
        ("shards/{00000..00001}.tar", "shards"),
        ("./shards/{00000..00001}.tar", "shards"),
        ("captioned", "image_folder"),
        ("with-metadata", "image_folder"),
        ("prepared", "prepared"),
        ("parquet-folder", "data_folder"),
        ("shards", "data_folder"),
    ],
)
def test_one_rule_says_what_a_path_is(paths, path, kind):
    assert resolve_data_path("dataset_name", path).kind == kind


@pytest.mark.parametrize(
    "path, message",
    [
        ("./mydata", "a local path that does not exist (looked for {cwd}/mydata)"),
        ("../mydata", "a local path that does not exist"),
        ("data/pets/", "a local path that does not exist"),  # a trailing separator: no Hub id
        ("data/pets/train", "a local path that does not exist"),  # two separators: no Hub id
        ("/no/such/folder", "a local path that does not exist (looked for /no/such/folder)"),
        ("~/no-such-folder-here", "a local path that does not exist"),
        ("missing.tar", "which does not exist"),
        ("shards/{00000..00003}.tar", "2 of the files it names do not exist"),
        ("csv/images/red_circle_white_0.png", "it must be a .csv, .json, .jsonl or .parquet file, or .tar"),
        ("nothing-here", "a folder without data"),
    ],
)
def test_paths_that_name_no_data_are_one_line_errors_naming_the_key(paths, path, message):
    with pytest.raises(ConfigError) as error:
        resolve_data_path("dataset_name", path)
    text = str(error.value)
    assert text.startswith(f"`dataset_name` is {path!r}") and "\n" not in text
    assert message.format(cwd=paths) in text


def test_every_option_that_takes_a_path_follows_the_rule(paths):
    # dataset_name as shards: its samples are the training split.
    data = load_image_text_data(
        DataArguments(dataset_name="shards/{00000..00001}.tar", validation_split_percentage=0), seed=0, evaluate=False
    )
    assert len(data.train) == 12
    # A folder of shards as dataset_name: read by clip-trainer's shard reader (a bad shard is named, not fatal).
    (paths / "shards" / "00002.tar").write_bytes(b"")
    data = load_image_text_data(DataArguments(dataset_name="shards", validation_split_percentage=0), seed=0)
    assert len(data.train) == 12 and data.shard_report.skipped_shards == 1
    # A mixture source: a local folder that is not there is named, not looked up on the Hub.
    with pytest.raises(ConfigError, match=r"^`train_mixture` is './gone', a local path that does not exist"):
        load_image_text_data(DataArguments(train_mixture={"./gone": 1, "csv/pairs.csv": 1}), seed=0)


def test_extra_eval_sets_given_as_a_tar_a_brace_range_and_a_glob_are_evaluated_whole(base_args, paths):
    sets = {"tar": "shards/00000.tar", "range": "shards/{00000..00001}.tar", "glob": "shards/*.tar"}
    argv = drop_option(base_args, "output_dir")
    results = run.main(
        [*argv, "--output_dir", "out", "--extra_eval_sets", json.dumps(sets), "--max_steps", "1",
         "--do_train", "true", "--do_eval", "true"]
    )  # fmt: skip
    # 6 samples in a shard, 12 in both: every one evaluated (an extra set is not split).
    assert (results["eval_tar_samples"], results["eval_range_samples"], results["eval_glob_samples"]) == (6, 12, 12)
    assert all(f"eval_{name}_t2i_recall@1" in results for name in sets)


@pytest.mark.parametrize(
    "name, message",
    [
        ("./mydata", "`dataset_name` is './mydata', a local path that does not exist"),
        ("data/pets/", "`dataset_name` is 'data/pets/', a local path that does not exist"),
        ("data/pets", "`dataset_name` 'data/pets' is not on this machine"),
        ("mydata", "`dataset_name` 'mydata' is not on this machine"),
    ],
)
def test_a_dataset_name_that_is_not_there_is_one_line_and_exit_status_2(base_args, paths, capsys, name, message):
    status = run.cli([*drop_option(base_args, "train_file"), "--dataset_name", name, "--max_steps", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"run_clip.py: error: {message}")
    if not name.startswith("./") and not name.endswith("/"):
        # A Hub id form: the Hub is offline in the tests, which the message says, with both ways to fix it.
        assert "cannot be loaded from the Hub (HF_HUB_OFFLINE is set)" in lines[0]
        assert f"(e.g. ./{name})" in lines[0] and "a Hub dataset id with the network on" in lines[0]
