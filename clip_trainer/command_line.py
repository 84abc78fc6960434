"""The command line: `run_clip.py [CONFIG.json ...] [--option value ...]` into the three argument classes.

Two passes. The first, [`check_command_line`], needs only the standard library: it reads the config files, checks
every key and flag name against the options, and answers `--help`, so that a typo or `--help` answers at once,
before torch and transformers are imported (they take seconds). The options are read from the source of the argument
classes and of transformers' `TrainingArguments` (their fields, help, defaults and choices), not by importing them.
The second, [`parse_arguments`], builds the dataclasses with transformers' `HfArgumentParser`, which checks the values.

Config files apply left to right, then flags; a relative path in a config file is read beside it first (see
`CONFIG_RELATIVE_PATH_KEYS`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import glob
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config_files import read_config_file, refuse_repeated_keys, unknown_option_hint, written_as_path
from .errors import ConfigError, InvalidValueError

if TYPE_CHECKING:
    from .arguments import CLIPTrainingArguments, DataArguments, ModelArguments

# --------------------------------------------------------------------------------------------------------------
# The options, read from source (no torch)
# --------------------------------------------------------------------------------------------------------------

# `--help` shows the groups in this order: the project's own options first, then the data, then transformers'.
OPTION_GROUPS = (
    ("ModelArguments", "model options"),
    ("CLIPTrainingArguments", "clip-trainer training options"),
    ("DataArguments", "data options"),
    (
        "TrainingArguments",
        "transformers TrainingArguments options (https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments)",
    ),
)


@dataclass(frozen=True)
class Option:
    """One option as `--help` shows it: its name, group, help, default (as written in the source) and choices."""

    name: str
    group: str
    help: str
    default: str
    choices: tuple[str, ...] | None
    is_bool: bool


def _constants(tree: ast.Module) -> dict[str, Any]:
    """The module's top-level constants that are plain literals (for help texts built from them)."""
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, SyntaxError, TypeError):
                pass
    return values


def _text(node: ast.AST | None, constants: dict[str, Any]) -> str:
    """A help text or default as the user should read it: literals evaluated, f-strings filled in from the module's
    constants where they can be, anything else as its source."""
    if node is None:
        return ""
    try:
        return str(ast.literal_eval(node))
    except (ValueError, SyntaxError, TypeError):
        pass
    if isinstance(node, ast.JoinedStr):
        pieces = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                pieces.append(str(part.value))
            elif isinstance(part, ast.FormattedValue):
                source = ast.unparse(part.value)
                pieces.append(str(constants.get(source, source)))
        return "".join(pieces)
    if isinstance(node, ast.BinOp):  # "..." + "..." or a literal joined to a constant
        return _text(node.left, constants) + _text(node.right, constants)
    if isinstance(node, ast.Name) and node.id in constants:
        return str(constants[node.id])
    return ast.unparse(node)


def _class_options(path: Path, class_name: str, group: str) -> list[Option]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants = _constants(tree)
    found = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if found is None:
        return []
    options = []
    for node in found.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        keywords = {}
        if isinstance(node.value, ast.Call):
            keywords = {keyword.arg: keyword.value for keyword in node.value.keywords if keyword.arg}
            if isinstance(keywords.get("init"), ast.Constant) and keywords["init"].value is False:
                continue
        metadata = {}
        if isinstance(keywords.get("metadata"), ast.Dict):
            metadata = {
                key.value: value
                for key, value in zip(keywords["metadata"].keys, keywords["metadata"].values)
                if isinstance(key, ast.Constant)
            }
        choices = None
        if "choices" in metadata:
            try:
                choices = tuple(str(choice) for choice in ast.literal_eval(metadata["choices"]))
            except (ValueError, SyntaxError, TypeError):
                value = constants.get(ast.unparse(metadata["choices"]))
                choices = tuple(str(choice) for choice in value) if isinstance(value, list | tuple) else None
        default = keywords.get("default", node.value if not isinstance(node.value, ast.Call) else None)
        if default is not None and ast.unparse(default).startswith("TrainingArguments."):
            default = ast.Constant("transformers' own")  # read from transformers, which this fast pass does not import
        options.append(
            Option(
                name=node.target.id,
                group=group,
                help=" ".join(_text(metadata.get("help"), constants).split()),
                default=_text(default, constants) if default is not None else "",
                choices=choices,
                is_bool="bool" in ast.unparse(node.annotation),
            )
        )
    return options


def missing_install_message(interpreter: str = sys.executable, venv: Path | None = None) -> str:
    """What to do when this Python has no transformers: most often the clip-trainer environment exists (`make demo`
    made `.venv` beside `run_clip.py`) and the command was run with another Python."""
    venv = venv if venv is not None else Path(__file__).resolve().parents[1] / ".venv"
    if (venv / "bin" / "python").exists() and not Path(interpreter).absolute().is_relative_to(venv):
        return (
            f"this Python ({interpreter}) has no transformers; clip-trainer is installed in {venv}: run "
            f"`source {venv}/bin/activate` first, or use `{venv}/bin/python` (see README, Install)."
        )
    return (
        f"this Python ({interpreter}) has no transformers: install clip-trainer into it, "
        '`pip install torch==2.13.0 -e ".[lora,onnx]"` in the clone, or run `make demo` there (see README, Install).'
    )


# Set in the environment of a command run again by [`rerun_in_project_environment`], so that it happens once.
RERUN_MARK = "CLIP_TRAINER_RERUN_IN_PROJECT_ENVIRONMENT"


def rerun_in_project_environment(argv: list[str], venv: Path | None = None) -> None:
    """`python run_clip.py ...` run by a Python without transformers, in a clone where `make` made `.venv`: the same
    command again with that environment's Python (one line on stderr says so), as if it had been activated. Returns
    when there is nothing to do: the install is here, there is no project environment, or this is the second run.
    """
    if importlib.util.find_spec("transformers") is not None or os.environ.get(RERUN_MARK):
        return
    venv = venv if venv is not None else Path(__file__).resolve().parents[1] / ".venv"
    python = venv / "bin" / "python"
    if not python.exists() or Path(sys.executable).absolute().is_relative_to(venv):
        return
    print(
        f"{Path(argv[0]).name}: this Python ({sys.executable}) has no transformers; running with the project's "
        f"environment, {python}.",
        file=sys.stderr,
        flush=True,
    )
    os.execve(python, [str(python), *argv], {**os.environ, RERUN_MARK: "1"})


def _transformers_training_args_path() -> Path:
    spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(missing_install_message())
    return Path(next(iter(spec.submodule_search_locations))) / "training_args.py"


@functools.cache
def option_table() -> tuple[Option, ...]:
    """Every option of `run_clip.py`, grouped as `--help` shows them; an option that clip-trainer re-declares (to
    change its default) is listed once, with clip-trainer's."""
    ours = Path(__file__).with_name("arguments.py")
    sources = {
        "ModelArguments": ours,
        "CLIPTrainingArguments": ours,
        "DataArguments": ours,
        "TrainingArguments": _transformers_training_args_path(),
    }
    table: list[Option] = []
    seen: set[str] = set()
    for class_name, group in OPTION_GROUPS:
        for option in _class_options(sources[class_name], class_name, group):
            if option.name not in seen:
                seen.add(option.name)
                table.append(option)
    return tuple(table)


def _flag_names(options: tuple[Option, ...]) -> dict[str, str]:
    """Every flag spelling `HfArgumentParser` accepts (`--name`, `--name-with-dashes`, `--no_name` for booleans) ->
    the option's name."""
    names = {}
    for option in options:
        for spelling in {option.name, option.name.replace("_", "-")}:
            names[spelling] = option.name
            if option.is_bool:
                names[f"no_{spelling}"] = option.name
                names[f"no-{spelling}"] = option.name
    return names


def help_text(prog: str) -> str:
    """`--help` of the command `prog`: its usage, then every option by group, from the options' own help."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [CONFIG.json ...] [--option value ...]",
        description=(
            "Evaluate a CLIP-style model (`model_name_or_path`) on evaluation data, with the training command's options."
            if prog.endswith(" eval")
            else "Train or fine-tune a CLIP-style model."
        )
        + " Config files (JSON objects of option names and values) apply left to right, then the flags. Every option "
        "is also a config-file key.",
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-h", "--help", action="store_true", help="Show this message and exit.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in option_table():
        group = groups.get(option.group) or groups.setdefault(option.group, parser.add_argument_group(option.group))
        text = option.help
        if option.choices:
            text += f" One of: {', '.join(option.choices)}."
        if option.default not in ("", "None"):
            text += f" Default: {option.default}."
        group.add_argument(f"--{option.name}", metavar="", help=text.replace("%", "%%"))
    return parser.format_help()


def _config_files(argv: list[str]) -> tuple[list[str], list[str]]:
    """The leading config files of `argv`, and the rest."""
    count = 0
    while count < len(argv) and argv[count].endswith(".json") and not argv[count].startswith("-"):
        count += 1
    return argv[:count], argv[count:]


def check_command_line(argv: list[str], prog: str = "run_clip.py") -> bool:
    """The fast first pass: `--help` (printed; returns True), config files that exist, hold one JSON object and no
    repeated key, and every key and flag an option. Imports nothing heavy.

    Raises:
        [`ConfigError`]: for the first mistake, naming the closest valid option.
    """
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(prog))
        return True
    options = option_table()
    names = [option.name for option in options]
    flags = _flag_names(options)
    config_files, rest = _config_files(argv)
    for path in config_files:
        for key in read_config_file(path):
            if key not in names:
                raise ConfigError(f"Unknown key `{key}` in {path}{unknown_option_hint(key, names, as_flag=False)}")
    for arg in rest:
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:].split("=", 1)[0]
            if name not in flags:
                raise ConfigError(f"Unknown option `--{name}`{unknown_option_hint(name, names, as_flag=True)}")
    return False


# --------------------------------------------------------------------------------------------------------------
# The full parse (imports transformers)
# --------------------------------------------------------------------------------------------------------------


def _extra_eval_set_path_keys() -> tuple[str, ...]:
    from .arguments import EXTRA_EVAL_SET_PATH_KEYS

    return EXTRA_EVAL_SET_PATH_KEYS


class _ChoicesInHelp:
    """`HfArgumentParser` that leaves the options' `choices` and `bounds` to [`check_field_values`]: argparse would
    check choices on the command line only (never in a config file) and does not know `bounds`. The choices are
    listed in the option's help instead."""

    def add_argument(self, *names: str, **kwargs: Any) -> Any:
        kwargs.pop("bounds", None)
        choices = kwargs.pop("choices", None)
        if choices is not None:
            listed = f"One of: {', '.join(str(choice) for choice in choices)}."
            kwargs["help"] = f"{kwargs['help']} {listed}" if kwargs.get("help") else listed
        return super().add_argument(*names, **kwargs)


def build_parser():
    """The `HfArgumentParser` of the three argument classes, grouped in `--help` as they are in the docs."""
    from transformers import HfArgumentParser

    from .arguments import ARGUMENT_CLASSES

    parser = type("_ArgumentParser", (_ChoicesInHelp, HfArgumentParser), {})(ARGUMENT_CLASSES)
    parser.description = (
        "Train or fine-tune a CLIP model. Usage: run_clip.py [CONFIG.json ...] [--flag value ...]. Config files are "
        "applied left to right, then command-line flags."
    )
    # An abbreviated flag (--learning_rat) would otherwise be silently taken for another.
    parser.allow_abbrev = False
    parser.error = _raise_config_error  # type: ignore[method-assign]
    return parser


def _raise_config_error(message: str) -> None:
    # argparse's own `error` prints the usage line of every option (hundreds) before the one line that matters, and
    # exits from inside the parser; a ConfigError reaches `cli`, which prints the message alone with status 2.
    raise ConfigError(f"{message}. See `run_clip.py --help`.")


# Keys whose value is a path the run reads. In a config file, a relative one is looked up beside the config file
# first (the rule of tools such as Hydra or tsconfig: a config and what it names travel together), then in the
# working folder, and a Hub id stays a Hub id. `output_dir` is what the run writes, so it stays relative to the
# working folder, like every path given on the command line.
CONFIG_RELATIVE_PATH_KEYS = (
    "model_name_or_path",
    "config_name",
    "vision_model_name_or_path",
    "text_model_name_or_path",
    "teacher_model_name_or_path",
    "teacher_embeddings",
    "tokenizer_name",
    "image_processor_name",
    "dataset_name",
    "train_file",
    "validation_file",
    "train_mixture",
    "clip_benchmark_dataset",
    "resume_from_checkpoint",
    "deepspeed",
    "fsdp_config",
    "extra_eval_sets",  # the paths inside each entry (`EXTRA_EVAL_SET_PATH_KEYS`)
)


def _resolve_against_config(value: Any, config_dir: Path) -> Any:
    """`value` read beside its config file when something is there (a file, a folder, or a glob's matches); for a
    `train_mixture` object, each of its sources."""
    if isinstance(value, dict):
        return {_resolve_against_config(source, config_dir): weight for source, weight in value.items()}
    if isinstance(value, str) and value.startswith("~"):  # a shell expands it on the command line; a file must
        value = os.path.expanduser(value)
    if not isinstance(value, str) or not value or os.path.isabs(value) or value.lower() in ("true", "false"):
        return value
    candidate = config_dir / value
    if glob.has_magic(value) or "{" in value:
        from .sources import expand_pattern

        return str(candidate) if expand_pattern(str(candidate))[0] else value
    return str(candidate) if candidate.exists() else value


# Keys whose value names something that must exist (a model, a file): written as a path in a config file and found
# neither beside the file nor in the working folder, it is refused with both places named. (A Hub id, `name` or
# `owner/name`, is looked up later; the data keys' patterns and folders have their own messages.)
MUST_EXIST_KEYS = (
    "model_name_or_path",
    "config_name",
    "vision_model_name_or_path",
    "text_model_name_or_path",
    "teacher_model_name_or_path",
    "tokenizer_name",
    "image_processor_name",
    "train_file",
    "validation_file",
    "clip_benchmark_dataset",
    "deepspeed",
    "fsdp_config",
)


def _refuse_path_found_nowhere(key: str, value: Any, config_file: str) -> None:
    """A config file's relative path that is neither beside the config file nor in the working folder: the error
    names both places (the one a later check would name is only the working folder's)."""
    if key not in MUST_EXIST_KEYS or not isinstance(value, str) or not value or os.path.isabs(value):
        return
    if glob.has_magic(value) or "{" in value or os.path.exists(value):
        return
    if written_as_path(value) or key in ("train_file", "validation_file"):
        beside = Path(config_file).resolve().parent / value
        raise ConfigError(
            f"`{key}` {value!r} in {config_file} is not on this machine: a relative path in a config file is "
            f"looked up beside the file ({beside}), then in the working folder ({Path(value).resolve()}), and "
            f"neither exists. Correct it in {config_file}, or give --{key} on the command line."
        )


def _resolve_extra_eval_sets(value: Any, config_dir: Path) -> Any:
    """`extra_eval_sets` from a config file, each entry's paths read beside the config file like other path keys."""
    if isinstance(value, str):
        try:
            value = json.loads(value, object_pairs_hook=refuse_repeated_keys("extra_eval_sets"))
        except json.JSONDecodeError:
            return value  # reported by DataArguments, with the fix
    if not isinstance(value, dict):
        return value
    resolved = {}
    for name, entry in value.items():
        if isinstance(entry, str):
            entry = _resolve_against_config(entry, config_dir)
        elif isinstance(entry, dict):
            entry = {
                key: _resolve_against_config(item, config_dir) if key in _extra_eval_set_path_keys() else item
                for key, item in entry.items()
            }
        resolved[name] = entry
    return resolved


def _resolve_config_value(key: str, value: Any, config_dir: Path) -> Any:
    if key == "extra_eval_sets":
        return _resolve_extra_eval_sets(value, config_dir)
    if key == "train_mixture" and isinstance(value, str) and value.lstrip().startswith("{"):
        try:  # the object written as JSON text: its sources are read beside the config file too
            value = json.loads(value, object_pairs_hook=refuse_repeated_keys("train_mixture"))
        except json.JSONDecodeError:
            return value  # reported by DataArguments, with the fix
    return _resolve_against_config(value, config_dir) if key in CONFIG_RELATIVE_PATH_KEYS else value


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, CLIPTrainingArguments]:
    """Parses `[CONFIG.json ...] [--flag value ...]` into the three argument dataclasses.

    Args:
        argv (`list[str]`, *optional*):
            The command line without the program name; defaults to `sys.argv[1:]`.

    Raises:
        [`ConfigError`]: for an unknown key or flag (naming the closest valid one), a missing or malformed config
            file, or a value that fails validation.
    """
    from .arguments import ARGUMENT_CLASSES

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    valid_keys = sorted(f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init)

    config_files = []
    while argv and argv[0].endswith(".json") and not argv[0].startswith("-"):
        config_files.append(argv.pop(0))
    merged: dict[str, Any] = {}
    set_in: dict[str, str] = {}  # key -> the config file whose value is used, for the error messages
    for path in config_files:
        config_dir = Path(path).resolve().parent
        for key, value in read_config_file(path).items():
            if key not in valid_keys:
                raise ConfigError(
                    f"Unknown key `{key}` in {path}{unknown_option_hint(key, valid_keys, as_flag=False)}"
                )
            merged[key] = _resolve_config_value(key, value, config_dir)
            set_in[key] = path
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)  # a boolean's own flag, not its `--no_` twin (no type) added after it
    for key in merged:
        if not _given_as_flag(key, argv):  # a flag wins, whatever the file holds
            _refuse_path_found_nowhere(key, merged[key], set_in[key])
            merged[key] = _config_value(actions[key], key, merged[key], set_in[key])
    _refuse_repeated_flags(argv, actions)
    # An empty value (`--max_seq_length ""`) gives an option its default, unsetting what a config file set: argparse
    # would try to read "" as a number (or a list of one empty value).
    argv, emptied = _without_empty_values(argv, actions)
    # Values from files become the parser's defaults, so that flags on the command line win.
    parser.set_defaults(**merged)
    namespace, remaining = parser.parse_known_args(argv)
    for key in emptied:
        setattr(namespace, key, _field_default(key))
    if remaining:
        flag = next((arg for arg in remaining if arg.startswith("-")), remaining[0])
        name = flag.lstrip("-").split("=")[0]
        if not flag.startswith("-"):
            if flag.endswith(".json"):
                raise ConfigError(
                    f"Unexpected argument `{flag}`: config files come first, before every flag (`run_clip.py "
                    f"{flag} ... --option value`); a flag's value is the one word after it."
                )
            if Path(flag).suffix.lower() in (".json", ".jsonc", ".json5", ".yaml", ".yml", ".toml"):
                raise ConfigError(
                    f"Unexpected argument `{flag}`: a config file is JSON without comments, named *.json (lower "
                    "case); convert it to one and give it first."
                )
            position = argv.index(flag) if flag in argv else -1
            before = _flag_name(argv[position - 2], actions) if position >= 2 else None
            if before is not None and actions[before].nargs is None and actions[before].type is not None:
                # `--report_to tensorboard wandb`: a one-value option given two words.
                raise ConfigError(
                    f"Unexpected argument `{flag}`: `--{before}` takes one value ({argv[position - 1]!r}); "
                    + ("separate several loggers with commas: --report_to tensorboard,wandb." if before == "report_to"
                       else "quote a value that has spaces.")
                )  # fmt: skip
            raise ConfigError(f"Unexpected argument `{flag}`.")
        raise ConfigError(f"Unknown option `{flag}`{unknown_option_hint(name, valid_keys, as_flag=True)}")
    # A run that turns on none of do_train/do_eval/do_predict trains (and evaluates when eval_strategy asks for it):
    # `--do_eval false` alone means "train, without the final evaluation", not "evaluate". Decided on the raw
    # options: TrainingArguments turns do_eval on by itself whenever eval_strategy is not "no".
    named = [
        stage for stage in ("do_train", "do_eval", "do_predict") if stage in merged or _given_as_flag(stage, argv)
    ]
    best_given = "load_best_model_at_end" in merged or _given_as_flag("load_best_model_at_end", argv)
    if best_given and not namespace.load_best_model_at_end and namespace.early_stopping_patience is not None:
        raise ConfigError(
            "`early_stopping_patience` saves the best checkpoint as the model (it turns on `load_best_model_at_end`), "
            "and `load_best_model_at_end` is set to false: drop one of them."
        )
    if "do_train" not in named and not any(getattr(namespace, stage) for stage in named):
        namespace.do_train = True
    outputs = []
    try:
        for cls in ARGUMENT_CLASSES:
            names = {f.name for f in fields(cls) if f.init}
            values = {name: value for name, value in vars(namespace).items() if name in names}
            outputs.append(cls(**values))
    except InvalidValueError as error:
        if error.key in set_in and not _given_as_flag(error.key, argv):
            raise InvalidValueError(error.key, f"{error} (It is set in {set_in[error.key]}.)") from None
        raise
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        # TrainingArguments validates with ValueError; its messages name the fields.
        raise ConfigError(str(error)) from None
    if "do_eval" in named and namespace.do_eval is False:
        # TrainingArguments turns do_eval on whenever eval_strategy is not "no"; said false, there is no final
        # evaluation (the evaluations `eval_strategy` asks for during training still run).
        outputs[-1].do_eval = False
    return tuple(outputs)  # type: ignore[return-value]


# What a value must be, by the type `HfArgumentParser` gave the option's flag (one value, a list's values).
_EXPECTED = {
    int: ("a whole number", "whole numbers"),
    float: ("a number", "numbers"),
    "string_to_bool": ("true or false", "booleans"),
}


def _whole(value: Any) -> Any:
    """A float that is a whole number as that int: JSON has one number type, and configs write `1e6` for 1000000."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _config_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A config file's `value` of `key`, read as its flag reads text: a whole-number float for an integer option
    becomes an int, and a string is converted by the flag's type (`"10"` for an integer, `"false"` for a boolean, as
    on the command line). argparse would convert such a string itself, but its error names the flag, not the file.
    Any other JSON value is kept for the argument classes' checks, which name the file (a number is not a boolean).
    """
    if action.type is int:
        value = [_whole(item) for item in value] if isinstance(value, list) else _whole(value)
    if not isinstance(value, str) or action.type in (None, str):
        return value
    try:
        return action.type(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        expected = _EXPECTED.get(action.type) or _EXPECTED.get(getattr(action.type, "__name__", ""))
        if expected is None:
            what = f"what `--{key}` takes on the command line"
        elif action.nargs in ("+", "*"):
            what = f"a JSON list of {expected[1]}"
        else:
            what = expected[0]
        raise InvalidValueError(key, f"`{key}` is {value!r} in {path}; it must be {what}.") from None


def _spelled_name(arg: str) -> str | None:
    """The name a command-line word spells as a flag (`--do-eval=true` -> `do_eval`), or None for a value."""
    return arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else None


def _flag_name(arg: str, actions: dict[str, argparse.Action]) -> str | None:
    """The option a command-line word sets (`--do-eval=true`, `--no_do_eval` -> `do_eval`), or None for a value."""
    name = _spelled_name(arg)
    if name is not None and name not in actions and name.startswith("no_") and name[3:] in actions:
        name = name[3:]  # a boolean's `--no_` twin sets the same option
    return name if name in actions else None


# Options whose value is a list or a JSON object: given twice, the second would drop the first's values, which a user
# adding a set, a source or an alpha means to keep. (A single value given twice keeps the last, as in most commands:
# scripts append an override to a shared list of flags.)
COLLECTION_OPTIONS = ("extra_eval_sets", "train_mixture", "caption_sampling")


def _refuse_repeated_flags(argv: list[str], actions: dict[str, argparse.Action]) -> None:
    """A list or JSON option given twice on the command line: argparse keeps the last one without a word, and the
    first one's values are lost (a config file's repeated key is refused for the same reason)."""
    seen: set[str] = set()
    for arg in argv:
        name = _flag_name(arg, actions)
        if name is None or not (actions[name].nargs in ("+", "*") or name in COLLECTION_OPTIONS):
            continue
        if name in seen:
            raise ConfigError(
                f"`--{name}` is given twice on the command line; the second would drop the first's values. Give "
                "all its values after one flag (--wise_ft_alphas 0.25 0.5; one JSON object for a mapping)."
            )
        seen.add(name)


def _takes_empty_as_default(action: argparse.Action) -> bool:
    """Whether an empty value of this option means its default: any option whose value is not one text (a number,
    a boolean, a list), and `report_to` (a list of loggers written as one text)."""
    return action.type not in (None, str) or action.nargs in ("+", "*") or action.dest == "report_to"


def _without_empty_values(argv: list[str], actions: dict[str, argparse.Action]) -> tuple[list[str], list[str]]:
    """`argv` without the options given an empty value (`--dropout ""`, `--dropout=`) that `_takes_empty_as_default`,
    and those options."""
    kept: list[str] = []
    emptied: list[str] = []
    index = 0
    while index < len(argv):
        arg, name = argv[index], _flag_name(argv[index], actions)
        if name is not None and _takes_empty_as_default(actions[name]) and not arg[2:].startswith("no"):
            if "=" in arg and arg.split("=", 1)[1] == "":
                emptied.append(name)
                index += 1
                continue
            if "=" not in arg and index + 1 < len(argv) and argv[index + 1] == "":
                emptied.append(name)
                index += 2
                continue
        kept.append(arg)
        index += 1
    return kept, emptied


def _field_default(key: str) -> Any:
    """The default of option `key` in its argument dataclass."""
    from .arguments import ARGUMENT_CLASSES, field_default

    item = next(item for cls in ARGUMENT_CLASSES for item in fields(cls) if item.name == key)
    default = field_default(item)
    return None if default is dataclasses.MISSING else default


def _given_as_flag(key: str, argv: list[str]) -> bool:
    return any(_spelled_name(arg) in (key, f"no_{key}") for arg in argv)
