"""The command line: config files layered left to right, flags on top, unknown keys named with a suggestion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clip_trainer.arguments import CLIPTrainingArguments, parse_arguments

REPO = Path(__file__).resolve().parent.parent


def write_json(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def data_file(tmp_path) -> str:
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\na.png,a cat\n")
    return str(path)


def test_files_apply_left_to_right_and_flags_win(tmp_path, data_file):
    first = write_json(
        tmp_path / "a.json",
        {"config_name": "x", "train_file": data_file, "learning_rate": 1e-3, "num_train_epochs": 4, "seed": 7},
    )
    second = write_json(tmp_path / "b.json", {"learning_rate": 2e-3, "freeze_vision_model": True})
    model_args, data_args, training_args = parse_arguments(
        [first, second, "--learning_rate", "1e-4", "--output_dir", str(tmp_path / "o")]
    )
    assert training_args.learning_rate == 1e-4  # flag beats both files
    assert training_args.num_train_epochs == 4  # only in the first file
    assert training_args.seed == 7
    assert training_args.freeze_vision_model is True  # only in the second file
    assert data_args.train_file == data_file
    # The second file beats the first when no flag is given.
    _, _, training_args = parse_arguments([first, second, "--output_dir", str(tmp_path / "o")])
    assert training_args.learning_rate == 2e-3


def test_clip_defaults_are_set_by_the_project(tmp_path, data_file):
    _, _, training_args = parse_arguments(
        ["--config_name", "x", "--train_file", data_file, "--output_dir", str(tmp_path)]
    )
    assert isinstance(training_args, CLIPTrainingArguments)
    assert training_args.remove_unused_columns is False
    assert (training_args.adam_beta2, training_args.adam_epsilon, training_args.weight_decay) == (0.98, 1e-6, 0.2)
    # Naming no stage means: train (and evaluate every epoch, the default eval_strategy).
    assert training_args.do_train is True


def test_eval_only_when_only_do_eval_is_given(tmp_path, data_file):
    _, _, training_args = parse_arguments(
        ["--config_name", "x", "--train_file", data_file, "--output_dir", str(tmp_path), "--do_eval"]
    )
    assert training_args.do_eval is True and training_args.do_train is False


def test_better_transformer_maps_to_sdpa_with_a_warning(tmp_path, data_file):
    with pytest.warns(FutureWarning, match="BetterTransformer"):
        model_args, _, _ = parse_arguments(
            ["--config_name", "x", "--train_file", data_file, "--better_transformer", "true",
             "--attn_implementation", "eager"]
        )  # fmt: skip
    assert model_args.attn_implementation == "sdpa"


def test_seed_project_optimizer_and_schedule_names_are_accepted(tmp_path, data_file):
    _, _, training_args = parse_arguments(
        ["--config_name", "x", "--train_file", data_file, "--optim", "adam", "--lr_scheduler_type", "step",
         "--lr_step_size", "3", "--lr_step_gamma", "0.5"]
    )  # fmt: skip
    assert training_args.optim == "adam"
    assert training_args.lr_scheduler_type == "step"


def test_median_rank_as_best_metric_is_lower_is_better(tmp_path, data_file):
    _, _, training_args = parse_arguments(
        ["--config_name", "x", "--train_file", data_file, "--metric_for_best_model", "eval_t2i_median_rank"]
    )
    assert training_args.greater_is_better is False
    _, _, training_args = parse_arguments(
        ["--config_name", "x", "--train_file", data_file, "--metric_for_best_model", "eval_t2i_recall@5"]
    )
    assert training_args.greater_is_better is True


def test_help_lists_every_option_with_its_help():
    result = subprocess.run(
        [sys.executable, "run_clip.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for option in ("--model_name_or_path", "--freeze_vision_model", "--validation_split_percentage",
                   "--learning_rate", "--early_stopping_patience", "--accumulation_mode", "--push_to_hub"):  # fmt: skip
        assert option in result.stdout
    assert "Stream the training data" in result.stdout  # help texts are shown, not only names
