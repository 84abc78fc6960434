"""Configuration mistakes through `run_clip.py`'s entry point: exit status 2, one message naming the key and the fix,
no traceback, and (wherever the data is not needed to tell) before any data or weights are loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip_trainer import run


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fails the test if the run gets as far as loading data or weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the configuration error should have stopped the run before this")

    monkeypatch.setattr(run, "load_image_text_data", refuse)
    monkeypatch.setattr(run, "load_model", refuse)


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fails the test if the run gets as far as loading the model's weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the data error should have stopped the run before the model was loaded")

    monkeypatch.setattr(run, "load_model", refuse)


def error_of(argv: list[str], capsys) -> str:
    """Runs the command line; asserts exit status 2, no traceback and a one-message stderr; returns the message."""
    status = run.cli(argv)
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("run_clip.py: error:")]
    assert len(errors) == 1, captured.err
    return errors[0]


def test_wrong_column_name_lists_the_columns_that_exist(base_args, capsys, no_weights_loaded):
    message = error_of([*base_args, "--caption_column", "text"], capsys)
    assert "`caption_column` is 'text'" in message
    for column in ("image", "caption", "shape"):
        assert column in message
    assert "Set `caption_column` to one of them" in message


def test_wrong_label_column_is_named(base_args, capsys, no_weights_loaded):
    message = error_of([*base_args, "--label_column", "colour"], capsys)
    assert "`label_column` is 'colour'" in message and "shape" in message


@pytest.mark.parametrize(
    ("metric", "expected", "not_expected"),
    [
        ("eval_zeroshot_top1", "(zero-shot metrics need `label_column`)", "did you mean"),
        ("eval_mean_recal", "(did you mean `eval_mean_recall`?)", "label_column"),
        ("eval_foo", "never computes. Choose one of", "label_column"),
    ],
)
def test_best_model_metric_that_is_never_computed(base_args, capsys, nothing_loaded, metric, expected, not_expected):
    message = error_of([*base_args, "--metric_for_best_model", metric], capsys)
    assert f"`metric_for_best_model` is '{metric}', which evaluation never computes" in message
    assert expected in message and not_expected not in message
    assert "eval_loss" in message and "eval_t2i_recall@5" in message  # the valid choices are listed


def test_load_best_model_at_end_needs_matching_strategies(base_args, capsys, nothing_loaded):
    # transformers' own ValueError, turned into a configuration error by parse_arguments.
    argv = [*base_args, "--load_best_model_at_end", "true", "--eval_strategy", "epoch"]
    argv += ["--save_strategy", "steps", "--save_steps", "5"]
    message = error_of(argv, capsys)
    assert "load_best_model_at_end" in message
    assert "save and eval strategy to match" in message or "strategy" in message


def test_both_towers_frozen_leaves_nothing_to_train(base_args, capsys, nothing_loaded):
    message = error_of([*base_args, "--freeze_vision_model", "true", "--freeze_text_model", "true"], capsys)
    assert "`freeze_vision_model` and `freeze_text_model`" in message
    assert "unfreeze_after_steps" in message  # the fix


def test_max_seq_length_beyond_the_text_model(base_args, capsys, nothing_loaded):
    message = error_of([*base_args, "--max_seq_length", "100"], capsys)  # the tiny model has 16 positions
    assert "`max_seq_length` is 100" in message and "set it to 16 or less" in message


def test_unknown_key_in_config_file_suggests_the_closest(base_args, tmp_path, capsys, nothing_loaded):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"learning_rte": 1e-4}))
    message = error_of([str(config), *base_args], capsys)
    assert "Unknown key `learning_rte`" in message and str(config) in message
    assert "Did you mean `learning_rate`?" in message


def test_unknown_flag_suggests_the_closest(base_args, capsys, nothing_loaded):
    message = error_of([*base_args, "--per_device_batch_size", "4"], capsys)
    assert "Unknown option `--per_device_batch_size`" in message
    assert (
        "Did you mean `per_device_train_batch_size`?" in message
        or "Did you mean `per_device_eval_batch_size`?" in message
    )


def test_missing_config_file(base_args, tmp_path, capsys, nothing_loaded):
    missing = tmp_path / "nowhere.json"
    message = error_of([str(missing), *base_args], capsys)
    assert f"Config file '{missing}' does not exist" in message


def test_malformed_json_config_file(base_args, tmp_path, capsys, nothing_loaded):
    config = tmp_path / "broken.json"
    config.write_text('{"learning_rate": 1e-4,}')
    message = error_of([str(config), *base_args], capsys)
    assert "is not valid JSON" in message and "line 1" in message


def test_config_file_that_is_not_an_object(base_args, tmp_path, capsys, nothing_loaded):
    config = tmp_path / "list.json"
    config.write_text("[1, 2]")
    message = error_of([str(config), *base_args], capsys)
    assert "must hold one JSON object" in message


def test_missing_train_file(base_args, tmp_path, capsys, nothing_loaded):
    argv = [*base_args]
    argv[argv.index("--train_file") + 1] = str(Path(tmp_path) / "missing.csv")
    message = error_of(argv, capsys)
    assert "`train_file`" in message and "does not exist" in message


def test_bad_value_for_a_typed_option(base_args, capsys, nothing_loaded):
    # argparse would print the usage of every option (hundreds of lines) and exit from inside the parser.
    message = error_of([*base_args, "--learning_rate", "fast"], capsys)
    assert "learning_rate" in message and "fast" in message


def test_bad_choice_names_the_choices(base_args, capsys, nothing_loaded):
    message = error_of([*base_args, "--on_bad_rows", "ignore"], capsys)
    assert "on_bad_rows" in message and "skip" in message and "error" in message


def test_unknown_logger_in_report_to(base_args, capsys, nothing_loaded):
    message = error_of([*base_args, "--report_to", "tensorbord"], capsys)
    assert "`report_to` names 'tensorbord'" in message and "Did you mean `tensorboard`?" in message


def test_logger_that_is_not_installed(base_args, capsys, nothing_loaded):
    from transformers.integrations import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed here")
    message = error_of([*base_args, "--report_to", "wandb"], capsys)
    assert "`report_to` includes wandb, which is not installed" in message and "clip-trainer[wandb]" in message
