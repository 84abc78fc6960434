"""The configuration reference, `docs/configuration.md`, generated from the argument dataclasses.

Every option's name, type, default, help and choices live in the `field(...)` metadata of [`ModelArguments`],
[`DataArguments`] and [`CLIPTrainingArguments`] (the same text `run_clip.py --help` prints); this module renders them
as Markdown so that the manual cannot drift from the code. Of `transformers.TrainingArguments` it lists only what
clip-trainer adds or changes (a default, or extra choices), and links to transformers' documentation for the rest.

```bash
python -m clip_trainer.config_reference          # (re)writes docs/configuration.md
python -m clip_trainer.config_reference --check  # exit status 1 when docs/configuration.md is out of date
```

transformers' documentation generator reads docstrings, not dataclass metadata, and `HfArgumentParser` renders the
metadata only as argparse help text, so the Markdown rendering is written here.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import json
import sys
import typing
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from .arguments import CLIPTrainingArguments, DataArguments, ModelArguments, field_default
from .command_line import CONFIG_RELATIVE_PATH_KEYS

__all__ = ["REGENERATE_COMMAND", "default_output_path", "main", "render_configuration_reference"]

REGENERATE_COMMAND = "python -m clip_trainer.config_reference"
TRAINING_ARGUMENTS_DOCS = (
    "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"
)

_INTRODUCTION = """\
Every option below can go in a JSON config file or on the command line; `python run_clip.py --help` prints the same
help. Config files are applied left to right, then command-line flags win:

```bash
python run_clip.py configs/default.json configs/my-overrides.json --learning_rate 1e-4 --num_train_epochs 5
```

- An unknown key or flag stops the run at once and names the closest valid option
  (`Unknown option --learning_rat. Did you mean learning_rate?`).
- An empty value on the command line unsets what a config file set, giving the option its default:
  `--dataset_name ""` with `--train_file`, `--dropout ""`, `--wise_ft_alphas ""`.
- Every spelling of a flag is the same flag: `--do_eval`, `--do_eval true`, `--do_eval=true`, `--do-eval`. A
  single-valued flag given twice keeps the last (as in most commands: a script may append an override); a list or
  JSON-object option given twice is refused, since the second would drop the first's values.
- A config file is JSON (no comments), named `*.json`; a byte-order mark at its start is ignored.
- A default of – means no value; the option's help says what the run does then.
- An option that acts only with another (`color_jitter` with `augment`, `shuffle_buffer_size` with `streaming`,
  `mixture_stopping_strategy` with `train_mixture`, the `clip_benchmark_*` options with `clip_benchmark_dataset`,
  `early_stopping_threshold` with `early_stopping_patience`, `lr_step_size` / `lr_step_gamma` with the `step`
  scheduler) set without it is named in a warning, and the run goes on without it. One that would change what trains
  (`lora_alpha` without `lora_rank`, `patch_dropout_off_after_steps` without `patch_dropout`, `unfreeze_after_steps`
  without a frozen tower, `wise_ft_min_retention` without `wise_ft_alphas`) stops the run.
- `report_to: wandb` (or `tensorboard,wandb`) logs to Weights & Biases: `pip install 'clip-trainer[wandb]'`.
- Booleans are `true`/`false` in JSON and on the command line (`--augment true`); lists are JSON lists in a config
  file and space-separated values on the command line (`--wise_ft_alphas 0.25 0.5`); `train_mixture` and
  `extra_eval_sets` are JSON objects (a quoted JSON string on the command line).
- A run that names none of `do_train` / `do_eval` trains (and evaluates on `eval_strategy`); `--do_eval` alone
  evaluates `model_name_or_path` (see [Evaluation](evaluation.md)).
- **One seed, one run**: `seed` fixes everything random (the held-out split, the tokenizer trained for a new model, a
  new model's weights, the data order, dropout, augmentation): two runs of one config on one machine give the same
  step-0 evaluation and final weights. `full_determinism: true` also makes the kernels deterministic, at some speed.

**Paths in a config file** are read beside the config file: a relative value of {path_keys} is looked up in the
config file's folder first, then in the working folder (a Hub id stays a Hub id; `~` is your home folder), so
`python ~/clip-trainer/run_clip.py ~/clip-trainer/configs/demo.json` works from any folder. A model or file path
found in neither place stops the run with both places named. `output_dir`, what the
run writes, stays relative to the working folder, as does every path given on the command line.
"""


def _format_default(value: Any) -> str:
    """A default as it is written in a JSON config file; – for no value."""
    if value is None:
        return "–"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"`{int(value)}`"
    return f"`{json.dumps(value)}`"


def _declared_type(item: Field) -> Any:
    """The type as the class declares it. `field.type` is not read: `HfArgumentParser` rewrites it in place (it strips
    `None` from optional types) once a parser has been built in the process."""
    for cls in (ModelArguments, DataArguments, *CLIPTrainingArguments.__mro__):
        annotations = inspect.get_annotations(cls) if isinstance(cls, type) else {}
        if item.name in annotations:
            return annotations[item.name]
    return item.type


def _format_type(annotation: Any) -> str:
    # Under `from __future__ import annotations` (arguments.py) the type is its source text already.
    if not isinstance(annotation, str):
        annotation = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return _escape_cell(f"`{annotation}`")


def _escape_cell(text: str) -> str:
    """`text` safe inside one Markdown table cell: no line breaks, `|` escaped (GitHub needs it even inside code
    spans), and `<...>` outside code spans shown rather than read as HTML."""
    text = " ".join(text.split())
    parts = text.split("`")
    for index in range(0, len(parts), 2):  # outside code spans
        parts[index] = parts[index].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def _resolved_type(item: Field) -> Any:
    """The evaluated type of a `TrainingArguments` field, from its class rather than the (rewritable) field."""
    return typing.get_type_hints(TrainingArguments).get(item.name, item.type)


def _enum_values(annotation: Any) -> list[str]:
    """The values of an `Enum` type among `annotation`'s members (`OptimizerNames | str` -> every optimizer name)."""
    members = typing.get_args(annotation) or (annotation,)
    values: list[str] = []
    for member in members:
        if inspect.isclass(member) and issubclass(member, enum.Enum):
            values += [str(option.value) for option in member]
    return values


def _help(item: Field, extra_choices: list[str] | None = None) -> str:
    text = item.metadata.get("help", "").strip()
    choices = extra_choices if extra_choices is not None else item.metadata.get("choices")
    if choices:
        listed = ", ".join(f"`{choice}`" for choice in choices)
        text += f" Adds {listed} to transformers' choices." if extra_choices is not None else f" One of: {listed}."
    return _escape_cell(text)


def _declared_fields(cls: type) -> list[Field]:
    """The init fields of `cls` in declaration order, those its own body declares (or re-declares) only."""
    own = inspect.get_annotations(cls)
    by_name = {item.name: item for item in fields(cls) if item.init}
    return [by_name[name] for name in own if name in by_name]


def _option_table(items: list[Field]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for item in items:
        default = _format_default(field_default(item)) if field_default(item) is not MISSING else "required"
        lines.append(f"| `{item.name}` | {_format_type(_declared_type(item))} | {default} | {_help(item)} |")
    return lines


def _changed_training_fields() -> list[tuple[Field, Field, list[str] | None]]:
    """(clip-trainer's field, transformers' field, the choices added or None) for each inherited option whose default
    or choices `CLIPTrainingArguments` changes; a re-declaration that changes neither is left out."""
    parent = {item.name: item for item in fields(TrainingArguments)}
    changed = []
    for item in _declared_fields(CLIPTrainingArguments):
        base = parent.get(item.name)
        if base is None:
            continue
        base_choices = list(base.metadata.get("choices") or _enum_values(_resolved_type(base)))
        added = [choice for choice in item.metadata.get("choices") or [] if choice not in base_choices]
        if field_default(item) != field_default(base) or added:
            changed.append((item, base, added or None))
    return changed


def render_configuration_reference() -> str:
    """
    Renders the configuration reference (`docs/configuration.md`) from the argument dataclasses' metadata.

    Returns:
        `str`: Markdown: how options are given, then one table per class (the model, the data, clip-trainer's
        training options), then the `transformers.TrainingArguments` options whose default or choices clip-trainer
        changes, with a link to transformers' documentation for all the others.
    """
    parent_names = {item.name for item in fields(TrainingArguments)}
    own_training = [item for item in _declared_fields(CLIPTrainingArguments) if item.name not in parent_names]
    path_keys = ", ".join(f"`{key}`" for key in CONFIG_RELATIVE_PATH_KEYS)
    lines = [
        f"<!-- Generated by `{REGENERATE_COMMAND}` from the argument dataclasses' metadata "
        "(clip_trainer/arguments.py); do not edit by hand. -->",
        "",
        "# Configuration reference",
        "",
        _INTRODUCTION.format(path_keys=path_keys).rstrip(),
        "",
        "## Model (`ModelArguments`)",
        "",
        *_option_table(_declared_fields(ModelArguments)),
        "",
        "## Data (`DataArguments`)",
        "",
        *_option_table(_declared_fields(DataArguments)),
        "",
        "## Training (`CLIPTrainingArguments`)",
        "",
        "`CLIPTrainingArguments` is a `transformers.TrainingArguments`: every option of "
        f"[`TrainingArguments`]({TRAINING_ARGUMENTS_DOCS}) is available with its own meaning "
        "(`per_device_train_batch_size`, `learning_rate`, `num_train_epochs`, `max_steps`, `bf16`, `seed`, "
        "`push_to_hub`, `resume_from_checkpoint`, ...). These are the options clip-trainer adds:",
        "",
        *_option_table(own_training),
        "",
        "### transformers' options whose defaults or choices clip-trainer changes",
        "",
        "| key | transformers' default | clip-trainer's default | meaning |",
        "|---|---|---|---|",
    ]
    for item, base, added in _changed_training_fields():
        lines.append(
            f"| `{item.name}` | {_format_default(field_default(base))} | {_format_default(field_default(item))} "
            f"| {_help(item, added)} |"
        )
    lines += [
        "",
        f"Every other option of `TrainingArguments` keeps transformers' default: see [its documentation]"
        f"({TRAINING_ARGUMENTS_DOCS}).",
        "",
    ]
    return "\n".join(lines)


def default_output_path() -> Path:
    """`docs/configuration.md` of the checkout this package is imported from."""
    return Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def main(argv: list[str] | None = None) -> int:
    """
    Command line: writes the configuration reference, or with `--check` compares it with the file.

    Returns:
        `int`: 0 when written or up to date, 1 when `--check` finds the file missing or different.
    """
    parser = argparse.ArgumentParser(
        prog=REGENERATE_COMMAND, description="Write docs/configuration.md from the argument dataclasses."
    )
    parser.add_argument("--output", type=Path, default=default_output_path(), help="Default: %(default)s.")
    parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 when the file is out of date.")
    args = parser.parse_args(argv)
    text = render_configuration_reference()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is out of date: regenerate it with `{REGENERATE_COMMAND}`.", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"Wrote {args.output}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
