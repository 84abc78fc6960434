"""The command line for users coming from transformers' run_clip.py, open_clip and Lightning + Hydra: the options that
look right to them but cannot work are refused up front, their tools' names point at clip-trainer's options, and a
config file's values are read as its JSON means them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import drop_option

from clip_trainer import run
from clip_trainer.cli import run_command
from clip_trainer.command_line import option_table, parse_arguments
from clip_trainer.config_files import KNOWN_FOREIGN_NAMES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def user_folder(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "user"
    folder.mkdir()
    monkeypatch.chdir(folder)  # a user's working folder, not the repository
    return folder


@pytest.fixture
def stops_before_the_data(monkeypatch):
    """Fails the test if the run reaches its data: every mistake here is known from the arguments alone."""

    def load_data(*args, **kwargs):
        raise AssertionError("the mistake should have stopped the run before the data was read")

    monkeypatch.setattr(run, "load_image_text_data", load_data)


def error_line(status: int, stderr: str, prog: str = "run_clip.py") -> str:
    """The one error line of a command that stopped on a mistake (status 2, no traceback)."""
    assert status == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def write_config(folder: Path, values: dict, name: str = "run.json") -> str:
    (folder / name).write_text(json.dumps(values))
    return name


# --- remove_unused_columns -----------------------------------------------------------------------------------------


def test_remove_unused_columns_true_is_refused_before_the_data(base_args, user_folder, stops_before_the_data, capsys):
    # transformers' default, passed from habit: the Trainer would drop the caption column and train on nothing.
    line = error_line(run.cli([*base_args, "--remove_unused_columns", "true"]), capsys.readouterr().err)
    assert "`remove_unused_columns` is true" in line and "collator reads the raw image and caption columns" in line
    assert "leave it false" in line
    # The same from a config file.
    config = write_config(user_folder, {"remove_unused_columns": True})
    line = error_line(run.cli([config, *base_args]), capsys.readouterr().err)
    assert "`remove_unused_columns` is true" in line


def test_remove_unused_columns_false_is_accepted(base_args, user_folder, tiny_clip_dir):
    from clip_trainer.modeling import load_model_config
    from clip_trainer.validation import check_arguments

    model_args, data_args, training_args = parse_arguments([*base_args, "--remove_unused_columns", "false"])
    assert training_args.remove_unused_columns is False
    check_arguments(model_args, data_args, training_args, None, config=load_model_config(model_args))


# --- other tools' option names -------------------------------------------------------------------------------------

# (what the user typed, what the message must say, an option the message must not offer)
FOREIGN_FLAGS = [
    ("--freeze_image_encoder", "`--freeze_vision_model true`", "freeze_text_model"),
    ("--freeze_text_encoder", "`--freeze_text_model true`", "freeze_vision_model"),
    ("--freeze_image_model", "Did you mean `freeze_vision_model`?", "freeze_text_model"),
    ("--batch_size", "`--per_device_train_batch_size`", "auto_find_batch_size"),
    ("--batch-size", "`--per_device_train_batch_size`", "auto_find_batch_size"),
    ("--max_epochs", "`--num_train_epochs`", "max_steps"),
    ("--epochs", "`--num_train_epochs`", None),
    ("--precision", "`--precision bf16` (amp_bf16, bf16-mixed) is `--bf16 true`", "hub_revision"),
    ("--data_dir", "`--dataset_name`", "data_seed"),
    ("--lock-image", "`--freeze_vision_model true`", None),
    ("--lock-text", "`--freeze_text_model true`", None),
    ("--lr", "`--learning_rate`", None),
    ("--wd", "`--weight_decay`", None),
    ("--warmup", "`--warmup_steps`", None),
    ("--force-patch-dropout", "`--patch_dropout`", None),
    ("--train-data", "`--train_file`", None),
    ("--csv-img-key", "`--image_column`", None),
    ("--csv-caption-key", "`--caption_column`", None),
    ("--grad-checkpointing", "`--activation_checkpointing true`", None),
    ("--accum-freq", "`--gradient_accumulation_steps`", None),
    ("--model", "`--model_name_or_path`", None),
    ("--pretrained", "`--model_name_or_path`", None),
    ("--accumulate_grad_batches", "`--gradient_accumulation_steps`", None),
    ("--gradient_clip_val", "`--max_grad_norm`", None),
    # transformers 4's TrainingArguments, removed in transformers 5
    ("--logging_dir", "TENSORBOARD_LOGGING_DIR environment variable", "logging_first_step"),
    ("--no_cuda", "`--use_cpu true`", None),
    ("--use_mps_device", "the MPS device is used whenever it is available (`--use_cpu true` for the CPU)", None),
    ("--save_safetensors", "weights are always saved as safetensors", "save_steps"),
    ("--fp16_opt_level", "apex AMP; use `--fp16 true` or `--bf16 true`", "fp16_full_eval"),
]


@pytest.mark.parametrize(("flag", "expected", "wrong"), FOREIGN_FLAGS, ids=[flag for flag, _, _ in FOREIGN_FLAGS])
def test_other_tools_flags_point_at_the_right_option(flag, expected, wrong, base_args, user_folder, capsys):
    # The fast first pass (run_clip.py, clip-trainer train) and the full parse (run.main) say the same.
    fast = error_line(run_command([*base_args, flag, "1"]), capsys.readouterr().err)
    full = error_line(run.cli([*base_args, flag, "1"]), capsys.readouterr().err)
    for line in (fast, full):
        assert f"Unknown option `{flag}`" in line and expected in line, line
        assert wrong is None or wrong not in line, line


def test_other_tools_config_keys_point_at_the_right_option(base_args, user_folder, capsys):
    cases = {
        "freeze_image_encoder": '`"freeze_vision_model": true`',
        "max_epochs": "`num_train_epochs`",
        "batch_size": "`per_device_train_batch_size`",
        "lr": "`learning_rate`",
        "precision": '`"precision": "bf16"` (amp_bf16, bf16-mixed) is `"bf16": true`',
        "lock-image": '`"freeze_vision_model": true`',
        "trainer.max_epochs": "`num_train_epochs`",  # a Hydra key, flattened
        "no_cuda": '`"use_cpu": true`',  # transformers 4's
        "logging_dir": "TENSORBOARD_LOGGING_DIR environment variable",
    }
    for key, expected in cases.items():
        config = write_config(user_folder, {key: 1})
        for command in (run_command, run.cli):
            line = error_line(command([config, *base_args]), capsys.readouterr().err)
            assert f"Unknown key `{key}` in run.json" in line and expected in line, line
            assert "--" not in line.split("in run.json", 1)[1], line  # a config file's key is named as a key


def test_difflib_stays_the_fallback_and_image_means_vision(base_args, user_folder, capsys):
    cases = {
        "--learning_rat": "Did you mean `learning_rate`?",
        "--num-train-epoch": "Did you mean `num_train_epochs`?",  # hyphens read as underscores
        "--freeze_image_modle": "Did you mean `freeze_vision_model`?",
        "--image_trainable_layers": "Did you mean `vision_trainable_layers`?",
        "--image_colum": "Did you mean `image_column`?",  # the translation does not take it to a vision option
    }
    for flag, expected in cases.items():
        line = error_line(run_command([*base_args, flag, "1"]), capsys.readouterr().err)
        assert expected in line, line
    line = error_line(run_command([*base_args, "--zzzz", "1"]), capsys.readouterr().err)
    assert line.endswith("Unknown option `--zzzz`.")


def test_every_option_the_table_names_exists():
    names = {option.name for option in option_table()}
    named = set()
    for tools, text in KNOWN_FOREIGN_NAMES.values():
        assert tools.endswith("'s") and "\n" not in text
        named |= {name for name in re.findall(r"<([a-z0-9_@]+)", text) if name != "@"}
    assert named and named <= names, sorted(named - names)
    # A name of another tool that is also one of clip-trainer's would never be looked up.
    assert not set(KNOWN_FOREIGN_NAMES) & names


# --- config-file value types ---------------------------------------------------------------------------------------


def test_a_whole_number_written_as_a_float_is_an_integer(base_args, user_folder):
    config = write_config(user_folder, {"max_steps": 1e6, "clip_benchmark_recall_k": [1.0, 5.0], "seed": 3.0})
    _, data_args, training_args = parse_arguments([config, *base_args[:-2]])  # base_args ends with --seed 1
    assert training_args.max_steps == 1_000_000 and type(training_args.max_steps) is int
    assert training_args.seed == 3 and type(training_args.seed) is int
    assert data_args.clip_benchmark_recall_k == [1, 5] and all(
        type(k) is int for k in data_args.clip_benchmark_recall_k
    )
    # A fraction is still refused, naming the file.
    config = write_config(user_folder, {"max_steps": 2.5})
    with pytest.raises(Exception, match=r"`max_steps` is 2.5; it must be a whole number.*It is set in run.json"):
        parse_arguments([config, *base_args])


def test_a_value_that_is_not_the_options_type_names_the_file_and_key(
    base_args, user_folder, stops_before_the_data, capsys
):
    cases = {
        ("num_train_epochs", "one"): "`num_train_epochs` is 'one' in run.json; it must be a number.",
        ("max_steps", "ten"): "`max_steps` is 'ten' in run.json; it must be a whole number.",
        ("freeze_vision_model", "sometimes"): "`freeze_vision_model` is 'sometimes' in run.json; it must be true or false.",
        # A boolean whose default is true, which has a `--no_` flag too.
        ("dataloader_pin_memory", "sometimes"): "`dataloader_pin_memory` is 'sometimes' in run.json; it must be true or false.",
        ("wise_ft_alphas", "half"): "`wise_ft_alphas` is 'half' in run.json; it must be a JSON list of numbers.",
    }  # fmt: skip
    for (key, value), expected in cases.items():
        config = write_config(user_folder, {key: value})
        flags = drop_option(base_args, key) if f"--{key}" in base_args else base_args  # a flag would win
        line = error_line(run.cli([config, *flags]), capsys.readouterr().err)
        assert expected in line, line
        assert "argument --" not in line, line  # argparse's wording, which names no file
    # A flag over the file's value wins, as for every other mistake in a file.
    config = write_config(user_folder, {"num_train_epochs": "one"})
    assert parse_arguments([config, *base_args])[2].num_train_epochs == 2


def test_booleans_in_a_config_file_are_json_booleans_or_the_command_lines_words(base_args, user_folder):
    # The rule: a value of the option's JSON type, or a string read as the same text on the command line. A number is
    # neither, for a boolean (whereas 1e6 is a number, as an integer option wants).
    for value, expected in ((True, True), ("yes", True), ("true", True), ("1", True), (False, False), ("no", False)):
        config = write_config(user_folder, {"freeze_vision_model": value})
        assert parse_arguments([config, *base_args])[2].freeze_vision_model is expected, value
        assert (
            parse_arguments([*base_args, "--freeze_vision_model", json.dumps(value).strip('"').lower()])[
                2
            ].freeze_vision_model
            is expected
        )
    for value in (1, 0):
        config = write_config(user_folder, {"freeze_vision_model": value})
        with pytest.raises(Exception, match=rf"`freeze_vision_model` is {value}; it must be true or false.*run.json"):
            parse_arguments([config, *base_args])


@pytest.mark.slow
def test_a_run_configured_with_whole_floats_trains_that_many_steps(base_args, user_folder):
    config = write_config(user_folder, {"max_steps": 3.0, "per_device_train_batch_size": 4.0, "logging_steps": 1.0})
    run.main([config, *drop_option(drop_option(base_args, "per_device_train_batch_size"), "logging_steps")])
    state = json.loads((Path(base_args[base_args.index("--output_dir") + 1]) / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["train_batch_size"] == 4
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]
    assert state["epoch"] == pytest.approx(3 * 4 / 72)  # 3 batches of 4 of the 72 training pairs


# --- a frozen tower and its trainable layers -----------------------------------------------------------------------


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_a_frozen_tower_with_trainable_layers_is_refused(tower, base_args, user_folder, stops_before_the_data, capsys):
    flags = [f"--freeze_{tower}_model", "true", f"--{tower}_trainable_layers", "1"]
    line = error_line(run.cli([*base_args, *flags]), capsys.readouterr().err)
    assert f"`freeze_{tower}_model` fixes the whole {tower} tower for the run" in line
    assert f"`{tower}_trainable_layers` (1) would train nothing" in line and "unfreeze_after_steps" in line


def test_a_frozen_tower_that_unfreezes_to_its_top_layers_is_accepted(base_args, user_folder):
    from clip_trainer.modeling import load_model_config
    from clip_trainer.validation import check_arguments

    flags = ["--freeze_vision_model", "true", "--vision_trainable_layers", "1", "--unfreeze_after_steps", "2"]
    model_args, data_args, training_args = parse_arguments([*base_args, *flags])
    check_arguments(model_args, data_args, training_args, None, config=load_model_config(model_args))


# --- options that act only with another ----------------------------------------------------------------------------


def test_prepare_only_with_push_to_hub_is_refused_before_the_data(
    base_args, user_folder, stops_before_the_data, capsys
):
    # A preparation run trains nothing: the flag would be dropped without a word (or push an empty model repo).
    args = [*base_args, "--prepare_only", "true", "--push_to_hub", "true", "--hub_model_id", "me/shapes"]
    line = error_line(run.cli(args), capsys.readouterr().err)
    assert "`push_to_hub` uploads a trained model, but `prepare_only` trains none" in line
    assert "--repo-type dataset" in line


@pytest.mark.parametrize(
    ("flags", "named", "needs"),
    [
        (["--color_jitter", "0.4", "--grayscale_probability", "0.1"], "`color_jitter` and `grayscale_probability`",
         "`augment`"),
        (["--shuffle_buffer_size", "500"], "`shuffle_buffer_size`", "`streaming`"),
        (["--mixture_stopping_strategy", "first_exhausted"], "`mixture_stopping_strategy`", "`train_mixture`"),
        (["--clip_benchmark_split", "val"], "`clip_benchmark_split`", "`clip_benchmark_dataset`"),
        (["--early_stopping_threshold", "0.01"], "`early_stopping_threshold`", "`early_stopping_patience`"),
        (["--lr_step_size", "50"], "`lr_step_size`", "`lr_scheduler_type step`, but the scheduler is constant"),
    ],
)  # fmt: skip
def test_an_option_without_the_one_it_needs_is_warned_of_by_name(
    base_args, user_folder, stops_before_the_data, flags, named, needs
):
    # Set alone, each would be ignored without a word; the run still goes on (a config may keep them for later).
    config = write_config(user_folder, {"augment": False})
    with pytest.warns(UserWarning) as caught:
        with pytest.raises(AssertionError, match="should have stopped the run before the data"):
            run.main([config, *base_args, *flags])
    said = [str(warning.message) for warning in caught if "acts only with" in str(warning.message)
            or "act only with" in str(warning.message)]  # fmt: skip
    assert len(said) == 1 and said[0].startswith(named) and f"only with {needs}" in said[0], said


def test_an_option_with_the_one_it_needs_is_not_warned_of(base_args, user_folder, stops_before_the_data, recwarn):
    with pytest.raises(AssertionError, match="should have stopped the run before the data"):
        run.main([*base_args, "--augment", "true", "--color_jitter", "0.4", "--clip_benchmark_split", "test",
                  "--lr_scheduler_type", "step", "--lr_step_size", "50"])  # fmt: skip
    assert not [w for w in recwarn if "only with" in str(w.message)]


# --- a config file's paths ------------------------------------------------------------------------------------------


def test_a_copied_config_whose_path_is_nowhere_names_both_places_tried(user_folder, stops_before_the_data, capsys):
    # The demo config copied into a folder of its own: its `models/...` is beside neither the copy nor the user.
    (user_folder / "mine").mkdir()
    (user_folder / "mine" / "demo.json").write_text((REPO / "configs" / "demo.json").read_text())
    line = error_line(run.cli(["mine/demo.json", "--output_dir", "out"]), capsys.readouterr().err)
    beside = user_folder.resolve() / "mine" / "models" / "clip-tiny-64px.json"
    here = user_folder.resolve() / "models" / "clip-tiny-64px.json"
    assert "`config_name` 'models/clip-tiny-64px.json' in mine/demo.json is not on this machine" in line
    assert f"beside the file ({beside})" in line and f"in the working folder ({here})" in line
    # Found in either place, or given on the command line, it is not refused here.
    (user_folder / "models").mkdir()
    (user_folder / "models" / "clip-tiny-64px.json").write_text(
        (REPO / "configs" / "models" / "clip-tiny-64px.json").read_text()
    )
    with pytest.raises(AssertionError, match="should have stopped the run before the data"):
        run.main(["mine/demo.json", "--output_dir", "out", "--report_to", "none"])


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--ema_decay", "0.99"], "`ema_decay` changes"), (["--patch_dropout", "0.5"], "`patch_dropout` changes"),
     (["--ema_decay", "0.99", "--patch_dropout", "0.5"], "`ema_decay` and `patch_dropout` change")],
)  # fmt: skip
def test_a_training_option_on_a_run_that_only_evaluates_is_refused(
    base_args, user_folder, stops_before_the_data, capsys, flags, named
):
    # It would be accepted and do nothing (LoRA's adapters would even be counted as training in the log).
    line = error_line(run.cli([*base_args, "--do_eval", *flags]), capsys.readouterr().err)
    assert f"{named} how a model trains, but this run only evaluates (no --do_train)" in line
    assert '--ema_decay ""' in line or '--patch_dropout ""' in line
