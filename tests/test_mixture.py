"""Weighted mixtures (`train_mixture`): sources are drawn in proportion to their weights, streamed or loaded; a loaded
mixture leaves no pair out and holds validation out of each source before mixing; bad weights are one-line errors;
sources in a config file are read against its folder, and a mixture trains through `run.main`."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
from conftest import write_shapes_csv
from test_webdataset import write_tar_shards

from clip_trainer.arguments import ConfigError, DataArguments
from clip_trainer.captions import image_key
from clip_trainer.command_line import parse_arguments
from clip_trainer.data import load_image_text_data
from clip_trainer.run import main


@pytest.fixture
def two_sources(tmp_path) -> tuple[str, str]:
    """Source a: 24 WebDataset samples in 2 tar shards (images as bytes); source b: 24 CSV rows (images as paths)."""
    write_tar_shards(tmp_path / "a", shards=2, per_shard=12)
    csv = write_shapes_csv(tmp_path / "b", repeats=1)
    return str(tmp_path / "a" / "{00000..00001}.tar"), str(csv)


def from_a(row: dict) -> bool:
    image = row["image"]  # source a's images are tar members (bytes), b's are files (paths)
    return isinstance(image, dict) and image.get("bytes") is not None


def assert_binomial(count: int, draws: int, probability: float) -> None:
    """`count` successes of `draws` within 4 standard deviations of the binomial mean (fails 6 times in 100,000)."""
    sigma = math.sqrt(draws * probability * (1 - probability))
    assert abs(count - draws * probability) <= 4 * sigma, (count, draws * probability, sigma)


def test_a_streamed_mixture_draws_sources_in_proportion_to_the_weights(two_sources, caplog):
    a, b = two_sources
    data_args = DataArguments(train_mixture={a: 3, b: 1}, streaming=True, shuffle_buffer_size=32)
    caplog.set_level("INFO", logger="clip_trainer")
    data = load_image_text_data(data_args, seed=0, evaluate=False)
    rows = list(data.train.take(800))
    assert_binomial(sum(map(from_a, rows)), len(rows), 0.75)
    assert len({(image_key(row, "image"), row["caption"]) for row in rows}) == 48  # every pair of both comes round
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "Mixing 2 training sources" in logged and "75.0%" in logged and "`all_exhausted`" in logged


def test_a_loaded_mixture_keeps_the_weights_leaves_no_pair_out_and_holds_out_each_source(two_sources):
    a, b = two_sources
    data = load_image_text_data(DataArguments(train_mixture={a: 1, b: 4}), seed=0)
    train = list(data.train)
    # all_exhausted: the mixture ends once both sources have been read through, the smaller draw repeated.
    assert_binomial(sum(map(from_a, train)), len(train), 0.2)
    pairs = {(image_key(row, "image"), row["caption"]) for row in train}
    held_out = {(image_key(row, "image"), row["caption"]) for row in data.validation}
    assert len(pairs) + len(held_out) == 48 and not pairs & held_out
    assert len(held_out) == 2 * 4  # 15% of each source's 24 pairs, before mixing
    first = load_image_text_data(
        DataArguments(train_mixture={a: 1, b: 4}, mixture_stopping_strategy="first_exhausted"), seed=0
    )
    assert len(first.train) < len(train)  # stops when source b runs out: part of a is never drawn


@pytest.mark.parametrize(
    "mixture, message",
    [
        ({"A": 0}, "weight of 'A' is 0; every weight must be a positive number"),
        ({"A": -1.5}, "weight of 'A' is -1.5"),
        ({"A": "3"}, "weight of 'A' is '3'"),
        ({"A": float("nan")}, "weight of 'A' is nan"),
        ('{"A": 1', "`train_mixture` is not valid JSON"),
        ("[1, 2]", "it must be a non-empty JSON object of source -> weight"),
    ],
)
def test_bad_weights_are_one_line_errors(two_sources, mixture, message):
    if isinstance(mixture, dict):
        mixture = {two_sources[0] if key == "A" else key: value for key, value in mixture.items()}
        message = message.replace("'A'", repr(two_sources[0]))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as error:
        DataArguments(train_mixture=mixture)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("weights", [(1e9, 1), (1, 5e-324), (1e308, 1e308)], ids=["1e9:1", "5e-324", "overflow"])
def test_extreme_weights_are_one_line_errors_not_out_of_memory(two_sources, weights):
    a, b = two_sources
    with pytest.raises(ConfigError) as error:
        DataArguments(train_mixture={a: weights[0], b: weights[1]})
    message = str(error.value)
    assert message.startswith("`train_mixture` weights") and "\n" not in message
    assert "beyond the 1,000,000 to 1 a mixture may span" in message and "e.g. 3 and 1" in message
    DataArguments(train_mixture={a: 1e6, b: 1})  # the bound itself is allowed


def test_extreme_weights_stop_the_command_with_exit_status_2(base_args, two_sources, capsys):
    from conftest import drop_option

    from clip_trainer.run import cli

    a, b = two_sources
    mixture = json.dumps({a: 1e9, b: 1})
    status = cli([*drop_option(base_args, "train_file"), "--train_mixture", mixture, "--max_steps", "2"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("run_clip.py: error: `train_mixture` weights") and "\n" not in err


def test_a_loaded_mixture_that_would_repeat_its_pairs_past_memory_is_refused(two_sources):
    a, b = two_sources
    # Weight 1 of 100,001 for b's 24 pairs: read through after 24 / (1 / 100,001) = 2,400,024 draws, 50,000 times
    # the 48 pairs of both sources.
    with pytest.raises(ConfigError) as error:
        load_image_text_data(DataArguments(train_mixture={a: 1e5, b: 1}), seed=0, evaluate=False)
    message = str(error.value)
    assert f"reads it through only after about {24 * 100_001:,} draws, {24 * 100_001 / 48:,.0f} times" in message
    assert repr(b) in message and "first_exhausted" in message and "\n" not in message
    # The same weights stopping at the first source's end, or streamed, hold no such table.
    first = load_image_text_data(
        DataArguments(train_mixture={a: 1e5, b: 1}, mixture_stopping_strategy="first_exhausted"),
        seed=0,
        evaluate=False,
    )
    assert 24 <= len(first.train) <= 26  # a is read through (b drawn once in 100,001, if at all)
    streamed = load_image_text_data(
        DataArguments(train_mixture={a: 1e5, b: 1}, streaming=True, shuffle_buffer_size=8), seed=0, evaluate=False
    )
    assert all(from_a(row) for row in streamed.train.take(48))


@pytest.mark.parametrize("key", ["train_file", "train_mixture"])
def test_a_brace_range_typo_of_a_hundred_million_names_is_a_one_line_error(tmp_path, monkeypatch, key):
    monkeypatch.chdir(tmp_path)
    pattern = "shard-{000000..99999999}.tar"  # one digit too many: 10^8 names
    with pytest.raises(ConfigError) as error:
        DataArguments(**{key: pattern if key == "train_file" else {pattern: 1}})
    message = str(error.value)
    assert message.startswith(f"`{key}` is {pattern!r}, a brace range of 100,000,000 names") and "\n" not in message
    assert "more than the 1,000,000 one pattern may name" in message and "fix the range" in message


def test_a_missing_source_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"`train_mixture` is '.*missing-\*.tar', a pattern that matches no file"):
        DataArguments(train_mixture={str(tmp_path / "missing-*.tar"): 1})


def test_a_source_without_the_caption_column_is_named(two_sources):
    with pytest.raises(ConfigError, match=r"source .*pairs.csv' has no 'text' column \(`caption_column`\)"):
        load_image_text_data(
            DataArguments(train_mixture={two_sources[1]: 1}, caption_column="text"), seed=0, evaluate=False
        )


def test_mixture_sources_in_a_config_file_are_read_against_its_folder_and_train(
    two_sources, tiny_clip_dir, tmp_path, monkeypatch
):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model_name_or_path": str(tiny_clip_dir),
                "train_mixture": {"a/{00000..00001}.tar": 2, "b/pairs.csv": 1},
                "streaming": True,
                "max_steps": 3,
                "per_device_train_batch_size": 8,
                "max_eval_samples": 8,
                "shuffle_buffer_size": 16,
                "output_dir": "out",
                "report_to": "none",
                "dataloader_num_workers": 0,
                "dataloader_persistent_workers": False,
                "eval_strategy": "no",
                "save_strategy": "no",
                "use_cpu": True,
            }
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _, data_args, _ = parse_arguments([str(config)])
    assert list(data_args.train_mixture) == [two_sources[0], two_sources[1]]
    main([str(config)])
    state = json.loads((elsewhere / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_bad_rows_of_a_mixture_are_named_by_source_and_numbered_as_in_its_file(
    two_sources, base_args, tmp_path, monkeypatch, caplog
):
    """Rows 3 (a missing image) and 5 (no caption) of the CSV source: reported against that source, numbered
    as its file is, before the hold-out and the mixing; the run trains on the rest, and the same rows without the
    mixture are reported the same way."""
    tars, csv_path = two_sources
    lines = open(csv_path).read().splitlines()
    header, rows = lines[0], lines[1:]
    rows[3] = "images/no_such_picture.png,a red circle,circle"
    image = rows[5].split(",")[0]
    rows[5] = f"{image},,circle"
    bad = tmp_path / "b" / "with_bad_rows.csv"
    bad.write_text("\n".join([header, *rows]) + "\n")
    monkeypatch.chdir(tmp_path)
    argv = [*base_args, "--train_mixture", json.dumps({tars: 1, str(bad): 1}), "--max_steps", "2",
            "--output_dir", "out", "--eval_strategy", "no", "--save_strategy", "no"]  # fmt: skip
    argv[argv.index("--train_file") : argv.index("--train_file") + 2] = []
    caplog.set_level("WARNING", logger="clip_trainer")
    main(argv)
    reports = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(reports) == 1, reports
    [report] = reports
    assert report.startswith(f"`train_mixture` source {str(bad)!r}: skipped 2 of 24 rows")
    assert "row 3: image file not found" in report and "row 5: missing caption" in report
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2

    # The same file alone gives the same row numbers.
    caplog.clear()
    load_image_text_data(DataArguments(train_file=str(bad)), seed=0, evaluate=False)
    [alone] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "row 3: image file not found" in alone and "row 5: missing caption" in alone


def test_replay_as_the_fine_tuning_docs_give_it_evaluates_on_the_users_pairs_alone(
    two_sources, tiny_clip_dir, tmp_path, monkeypatch
):
    """docs/fine-tuning.md's replay: your pairs mixed 1:1 with general ones, `validation_file` your held-out pairs and
    the general held-out pairs a reference set. Validation is exactly the file's rows (no general pair held out into
    it), an epoch reads every pair of both sources, and the reference set is evaluated beside it."""
    general, mine = two_sources
    held_out = write_shapes_csv(tmp_path / "b", repeats=1, name="held-out.csv")
    reference = write_shapes_csv(tmp_path / "general-val", repeats=1)
    monkeypatch.chdir(tmp_path)
    main(["--model_name_or_path", str(tiny_clip_dir), "--train_mixture", json.dumps({mine: 1, general: 1}),
          "--validation_file", str(held_out), "--extra_eval_sets", json.dumps({"general": str(reference)}),
          "--per_device_train_batch_size", "16", "--num_train_epochs", "1", "--do_train", "--do_eval",
          "--output_dir", "out", "--report_to", "none", "--dataloader_num_workers", "0", "--eval_strategy", "no",
          "--save_strategy", "no", "--use_cpu", "true", "--freeze_vision_model", "true",
          "--wise_ft_alpha", "0.75"])  # fmt: skip
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    # The docs' recipe ends with WiSE-FT at a = 0.75: the weights saved are 1/4 the starting model's, 3/4 the tuned.
    assert json.loads((tmp_path / "out" / "wise_ft_results.json").read_text())["alpha"] == 0.75
    rows_in_file = sum(1 for _ in held_out.open()) - 1
    assert results["eval_samples"] == rows_in_file == 24
    assert "eval_general_t2i_recall@1" in results
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == math.ceil((24 + 24) / 16)  # every pair of both sources, once


def test_the_card_of_a_mixture_with_several_captions_a_row_counts_rows_not_images(
    tiny_clip_dir, tmp_path, monkeypatch
):
    # Two sources over the same 12 pictures, one with two captions a row: the mixture's rows stay rows (its
    # repetitions are its weighting), so the card must not call them images, nor say one caption per image.
    from test_multi_caption import write_multi_caption_csv

    multi = write_multi_caption_csv(tmp_path / "multi", rows=12)
    single = tmp_path / "multi" / "single.csv"
    with multi.open() as source, single.open("w", newline="") as target:
        rows = list(csv.DictReader(source))
        writer = csv.writer(target)
        writer.writerow(["image", "caption"])
        writer.writerows([row["image"], json.loads(row["caption"])[0]] for row in rows)
    monkeypatch.chdir(tmp_path)
    main(["--model_name_or_path", str(tiny_clip_dir), "--train_mixture", json.dumps({str(multi): 1, str(single): 1}),
          "--validation_file", str(single), "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
          "--do_train", "--output_dir", "out", "--report_to", "none", "--dataloader_num_workers", "0",
          "--eval_strategy", "no", "--save_strategy", "no", "--use_cpu", "true"])  # fmt: skip
    card = (tmp_path / "out" / "README.md").read_text()
    [sentence] = re.findall(r"It was trained on [^.]*\.", card)
    assert "images" not in sentence and "one caption drawn per image" not in sentence
    # The epoch's rows as the mixture draws them (all-exhausted: both sources read through, the one that runs out
    # first repeated), and the captions they hold.
    mixture = DataArguments(train_mixture={str(multi): 1, str(single): 1}, validation_file=str(single))
    train = load_image_text_data(mixture, seed=42, evaluate=False).train
    captions = sum(len(value) if isinstance(value, list) else 1 for value in train["caption"])
    assert len(train) > 24 and captions > len(train)
    assert f"a mixture of sources, {len(train)} rows an epoch drawn by weight with {captions} captions" in sentence
    assert "one caption drawn per row each epoch" in sentence
