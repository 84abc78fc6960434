"""The command line: config files layered left to right, flags on top, unknown keys named with a suggestion."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from clip_trainer.arguments import (
    ARGUMENT_CLASSES,
    TRAINING_ARGUMENT_BOUNDS,
    CLIPTrainingArguments,
    ConfigError,
    DataArguments,
    ModelArguments,
)
from clip_trainer.command_line import parse_arguments

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


def test_a_stage_turned_off_alone_still_trains(tmp_path, data_file):
    """`--do_eval false` means "train without the final evaluation", not "evaluate"; `--do_train false` is obeyed."""
    common = ["--config_name", "x", "--train_file", data_file, "--output_dir", str(tmp_path)]
    assert parse_arguments([*common, "--do_eval", "false"])[2].do_train is True
    # With evaluations during training, `--do_eval false` still means no final evaluation.
    training_args = parse_arguments([*common, "--eval_strategy", "epoch", "--do_eval", "false"])[2]
    assert training_args.do_train is True and training_args.do_eval is False
    assert parse_arguments([*common, "--do_train", "false", "--do_eval"])[2].do_train is False


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


# --------------------------------------------------------------------------------------------------------------
# Every option's value is checked the same way from a config file, a flag and Python
# --------------------------------------------------------------------------------------------------------------
# The fields are walked here from the dataclasses themselves (annotations and metadata), not from the module's own
# list, so that an option the check forgets is found.


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _choices(cls, f) -> list | None:
    if "choices" in f.metadata:
        return list(f.metadata["choices"])
    members = typing.get_args(_hints(cls)[f.name]) or (_hints(cls)[f.name],)
    enums = [member for member in members if isinstance(member, type) and issubclass(member, enum.Enum)]
    return [item.value for item in enums[0]] if enums else None


def _walk(predicate):
    for cls in ARGUMENT_CLASSES:
        for f in dataclasses.fields(cls):
            if f.init and predicate(cls, f):
                yield cls, f


CHOICE_FIELDS = [(cls, f) for cls, f in _walk(lambda cls, f: _choices(cls, f) is not None)]
BASE_VALUES = {"config_name": "x", "dataset_name": "emoji", "report_to": "none"}


def parse_files(tmp_path: Path, values: dict) -> tuple:
    """`run_clip.py base.json values.json`: the walked key in the second file, which wins over the first."""
    base = write_json(tmp_path / "base.json", {**BASE_VALUES, "output_dir": str(tmp_path / "out")})
    return parse_arguments([base, write_json(tmp_path / "values.json", values)])


def build(cls, tmp_path: Path, **values):
    """The argument class as a Python user builds it, with what it needs besides `values`."""
    if cls is ModelArguments:
        return cls(**{"config_name": "x", **values})
    if cls is CLIPTrainingArguments:
        return cls(**{"output_dir": str(tmp_path / "out"), "report_to": "none", **values})
    return cls(**values)


def test_the_walk_finds_every_option_with_choices():
    names = {f.name for _, f in CHOICE_FIELDS}
    # clip-trainer's own, and transformers' (metadata choices and enum-typed fields).
    assert {"attn_implementation", "on_bad_rows", "mixture_stopping_strategy", "loss_type", "accumulation_mode",
            "optim", "lr_scheduler_type", "eval_strategy", "save_strategy", "logging_strategy", "hub_strategy",
            "log_level", "ddp_backend", "train_sampling_strategy"} <= names  # fmt: skip


@pytest.mark.parametrize("cls, f", CHOICE_FIELDS, ids=[f.name for _, f in CHOICE_FIELDS])
def test_a_value_outside_the_choices_is_refused_from_every_source(cls, f, tmp_path):
    choices = [str(choice) for choice in _choices(cls, f)]
    for bad in ("hinge", 3, [choices[0]]):
        with pytest.raises(ConfigError) as error:
            parse_files(tmp_path, {f.name: bad})
        message = str(error.value)
        assert f"`{f.name}` is {bad!r}" in message and "values.json" in message and "\n" not in message
        assert ", ".join(choices) in message  # every allowed value, in order
        with pytest.raises(ConfigError, match=f"`{f.name}` is {re.escape(repr(bad))}; set it to one of"):
            build(cls, tmp_path, **{f.name: bad})
    with pytest.raises(ConfigError, match=f"`{f.name}` is 'hinge'; set it to one of: {re.escape(', '.join(choices))}"):
        parse_arguments([*sum(([f"--{k}", v] for k, v in BASE_VALUES.items()), []), f"--{f.name}", "hinge"])


@pytest.mark.parametrize(
    "key, values",
    [("loss_type", ["auto", "softmax", "sigmoid"]), ("accumulation_mode", ["cached", "independent"]),
     ("on_bad_rows", ["skip", "error"]), ("mixture_stopping_strategy", ["all_exhausted", "first_exhausted"]),
     ("attn_implementation", ["sdpa", "eager"]), ("optim", ["adam", "adamw_torch", "sgd"]),
     ("lr_scheduler_type", ["step", "linear"]), ("eval_strategy", ["no", "epoch"]), ("log_level", ["info"])],
)  # fmt: skip
def test_every_allowed_value_is_kept(key, values, tmp_path):
    for value in values:
        parsed = parse_files(tmp_path, {key: value})
        assert [getattr(args, key) for args in parsed if hasattr(args, key)] == [value]


def _bounds(cls, f):
    return f.metadata.get("bounds", TRAINING_ARGUMENT_BOUNDS.get(f.name))


def _outside(bounds, integer: bool) -> list:
    """Values just outside `bounds`, of the field's own type."""
    step = 1 if integer else 0.5
    values = []
    if bounds.low is not None:
        values.append(bounds.low if bounds.low_open else bounds.low - step)
    if bounds.high is not None:
        values.append(bounds.high if bounds.high_open else bounds.high + step)
    return [int(value) if integer else float(value) for value in values]


BOUNDED_FIELDS = [(cls, f) for cls, f in _walk(lambda cls, f: _bounds(cls, f) is not None)]


def test_the_options_with_a_range_include_the_reported_ones():
    names = {f.name for _, f in BOUNDED_FIELDS}
    assert {"retrieval_chunk_size", "peak_tflops", "max_logit_scale", "lora_rank", "wise_ft_alphas",
            "per_device_train_batch_size", "learning_rate", "validation_split_percentage", "dropout"} <= names  # fmt: skip


@pytest.mark.parametrize("cls, f", BOUNDED_FIELDS, ids=[f.name for _, f in BOUNDED_FIELDS])
def test_a_value_outside_the_range_is_refused_from_a_file_and_from_python(cls, f, tmp_path):
    bounds = _bounds(cls, f)
    hint = _hints(cls)[f.name]
    is_list = typing.get_origin(hint) is list or list in map(typing.get_origin, typing.get_args(hint))
    integer = int in (hint, *typing.get_args(hint))
    bad_values = _outside(bounds, integer)
    if not integer:
        bad_values.append(float("nan"))
    for bad in bad_values:
        value = [bad] if is_list else bad
        with pytest.raises(ConfigError) as error:
            parse_files(tmp_path, {f.name: value})
        message = str(error.value)
        assert f"`{f.name}` {'has' if is_list else 'is'} {bad!r}" in message, message
        assert bounds.describe() in message and "values.json" in message
        with pytest.raises(ConfigError, match=f"`{f.name}`"):
            build(cls, tmp_path, **{f.name: value})


def test_the_reported_values_are_refused_naming_the_range(tmp_path):
    cases = {
        "retrieval_chunk_size": (0, "`retrieval_chunk_size` is 0; it must be at least 1."),
        "peak_tflops": (0, "`peak_tflops` is 0; it must be above 0"),
        "max_logit_scale": (float("nan"), "`max_logit_scale` is nan; it must be a number above 1 (CLIP uses 100)"),
    }
    for key, (value, expected) in cases.items():
        with pytest.raises(ConfigError, match=re.escape(expected)):
            parse_files(tmp_path, {key: value})
    with pytest.raises(ConfigError, match="`max_logit_scale` is nan"):
        parse_arguments(["--config_name", "x", "--dataset_name", "emoji", "--max_logit_scale", "nan"])


def _scalar(hint) -> type | None:
    members = [member for member in (typing.get_args(hint) or (hint,)) if member is not type(None)]
    if typing.get_origin(hint) not in (None, typing.Union, types.UnionType) or len(members) != 1:
        return None
    return members[0] if members[0] in (bool, int, float, str) else None


# transformers takes more than the annotation says for these two (`fsdp`: a list or a bool; `resume_from_checkpoint`:
# JSON's true), so they are not held to it.
LOOSE = {"fsdp", "resume_from_checkpoint"}
SCALAR_FIELDS = [(cls, f) for cls, f in _walk(lambda cls, f: _scalar(_hints(cls)[f.name]) and f.name not in LOOSE)]
LIST_FIELDS = [
    (cls, f)
    for cls, f in _walk(
        lambda cls, f: (
            any(typing.get_origin(t) is list for t in (_hints(cls)[f.name], *typing.get_args(_hints(cls)[f.name])))
            and _choices(cls, f) is None
            and len([t for t in typing.get_args(_hints(cls)[f.name]) if t is not type(None)]) <= 1
        )
    )
]


def test_a_list_for_a_scalar_option_is_refused(tmp_path):
    assert len(SCALAR_FIELDS) > 100  # every bool, int, float and str option of the three classes
    for cls, f in SCALAR_FIELDS:
        scalar = _scalar(_hints(cls)[f.name])
        sample = {bool: True, int: 2, float: 0.5, str: "x"}[scalar]
        with pytest.raises(ConfigError) as error:
            parse_files(tmp_path, {f.name: [sample]})
        assert f"`{f.name}` is [{sample!r}]" in str(error.value), (f.name, str(error.value))


def test_a_string_for_a_list_option_is_refused_not_split_into_characters(tmp_path):
    names = {f.name for _, f in LIST_FIELDS}
    assert {"zeroshot_templates", "lora_target_modules", "wise_ft_alphas", "label_names"} <= names
    for _, f in LIST_FIELDS:
        with pytest.raises(ConfigError, match=f.name):  # a float list's value fails argparse's conversion first
            parse_files(tmp_path, {f.name: "a photo of {}"})
    with pytest.raises(ConfigError) as error:
        parse_files(tmp_path, {"zeroshot_templates": "a photo of {}"})
    assert "it must be a list of strings" in str(error.value) and '["a photo of {}"]' in str(error.value)
    with pytest.raises(ConfigError, match="`lora_target_modules` is 'q_proj'; it must be a list of strings"):
        build(CLIPTrainingArguments, tmp_path, lora_target_modules="q_proj")
    with pytest.raises(ConfigError, match="`wise_ft_alphas` is 0.5; it must be a list of numbers"):
        parse_files(tmp_path, {"wise_ft_alphas": 0.5})
    with pytest.raises(ConfigError, match="`lora_target_modules` has 3; each of its values must be a string"):
        parse_files(tmp_path, {"lora_target_modules": ["q_proj", 3]})
    # A JSON list and the flag's list are the same thing.
    from_file = parse_files(tmp_path, {"zeroshot_templates": ["a photo of {}"]})[2]
    from_flag = parse_arguments(["--config_name", "x", "--dataset_name", "emoji", "--zeroshot_templates", "a photo of {}"])[2]  # fmt: skip
    assert from_file.zeroshot_templates == from_flag.zeroshot_templates == ["a photo of {}"]


def test_wrong_json_types_are_refused(tmp_path):
    cases = [
        ({"augment": 1}, "`augment` is 1; it must be true or false (a JSON boolean, without quotes)"),
        ({"freeze_vision_model": "sometimes"}, "sometimes"),
        ({"image_column": 3}, "`image_column` is 3; it must be a string"),
        ({"max_eval_samples": 2.5}, "`max_eval_samples` is 2.5; it must be a whole number of at least 1"),
        ({"seed": [1]}, "`seed` is [1]"),
        ({"learning_rate": True}, "`learning_rate` is True; it must be a number of at least 0"),
    ]
    for values, expected in cases:
        with pytest.raises(ConfigError) as error:
            parse_files(tmp_path, values)
        assert expected in str(error.value) and next(iter(values)) in str(error.value), str(error.value)
    # A bool as a string: the command line's spellings are read the same from a file; Python gets no such reading.
    assert parse_files(tmp_path, {"augment": "false"})[1].augment is False
    with pytest.raises(ConfigError, match="`augment` is 'false'; it must be true or false"):
        DataArguments(dataset_name="emoji", augment="false")


def test_a_flag_over_a_bad_file_value_wins_and_the_message_says_where_the_value_is(tmp_path):
    _, _, training_args = parse_arguments(
        [write_json(tmp_path / "c.json", {**BASE_VALUES, "loss_type": "hinge"}), "--loss_type", "sigmoid"]
    )
    assert training_args.loss_type == "sigmoid"
    with pytest.raises(ConfigError) as error:
        parse_arguments([write_json(tmp_path / "c.json", {**BASE_VALUES, "loss_type": "softmax"}), "--loss_type", "sigmod"])  # fmt: skip
    assert "Did you mean `sigmoid`?" in str(error.value) and "c.json" not in str(error.value)


def test_help_lists_the_choices():
    from clip_trainer.command_line import build_parser

    text = " ".join(build_parser().format_help().split())  # unwrapped
    assert "One of: auto, softmax, sigmoid." in text and "One of: cached, independent." in text


def test_arguments_survive_a_copy_with_replace(tmp_path):
    # `dataclasses.replace` runs `__post_init__` again on values transformers has already converted (enums, lists).
    model_args, data_args, training_args = parse_files(
        tmp_path, {"optim": "adam", "lr_scheduler_type": "step", "eval_strategy": "epoch", "report_to": "none"}
    )
    assert dataclasses.replace(training_args).optim == "adam"
    dataclasses.replace(model_args)
    dataclasses.replace(data_args)


def test_a_repeated_key_inside_a_json_string_of_a_config_file_is_refused(tmp_path):
    # `extra_eval_sets` given as the command line's JSON text, but in a config file.
    with pytest.raises(ConfigError, match="`extra_eval_sets` has the key 'ref' twice; give each set its own name"):
        parse_files(tmp_path, {"extra_eval_sets": '{"ref": "a.csv", "ref": "b.csv"}'})
    # Equal keys in different objects are no repetition.
    text = '{"config_name": "x", "dataset_name": "emoji", "extra_eval_sets": {"a": {"path": "emoji"}, "b": {"path": "emoji"}}}'
    (tmp_path / "ok.json").write_text(text)
    _, data_args, _ = parse_arguments([str(tmp_path / "ok.json"), "--report_to", "none"])
    assert set(data_args.extra_eval_sets) == {"a", "b"}
