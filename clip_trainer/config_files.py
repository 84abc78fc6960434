"""Reading config files: JSON objects of option names and values, with the mistakes JSON itself lets through
(a key given twice keeps the last value without a word) refused, and the closest valid name suggested for a wrong one.

Standard library only: the command line is checked with it before torch and transformers are imported.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError


def did_you_mean(name: str, choices: list[str] | tuple[str, ...], prefix: str = "") -> str:
    """`" Did you mean `x`?"` for the closest of `choices` to `name`, or `""` when none is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean `{prefix}{match[0]}`?" if match else ""


# Option names of the tools clip-trainer users come from, for the message about an unknown flag or key: difflib
# alone points at the nearest spelling, which can be the opposite tower (`freeze_image_encoder` -> freeze_text_model)
# or an unrelated option (`batch_size` -> auto_find_batch_size, `precision` -> hub_revision). Keys are the names as
# written in a config file or as a flag with hyphens made underscores; each value is (whose name it is, what to use).
# In the text, `<option value>` is rendered as a flag (`--option value`) or as a config-file entry (`"option": value`)
# to match what the user wrote, and `<@ value>` is the user's own name with that value. A test checks that every
# option named here exists.
KNOWN_FOREIGN_NAMES: dict[str, tuple[str, str]] = {
    # open_clip (`python -m open_clip_train.main`)
    "train_data": ("open_clip's", "use <train_file>"),
    "val_data": ("open_clip's", "use <validation_file>"),
    "csv_img_key": ("open_clip's", "use <image_column>"),
    "csv_caption_key": ("open_clip's", "use <caption_column>"),
    "model": (
        "open_clip's and the seed project's",
        "use <model_name_or_path> (a transformers model's Hub id or folder, e.g. openai/clip-vit-base-patch32), or "
        "<config_name> to train from scratch",
    ),
    "pretrained": (
        "open_clip's",
        "use <model_name_or_path> (a transformers model; `clip-trainer import-open-clip` converts an "
        "open_clip checkpoint into one)",
    ),
    "epochs": ("open_clip's", "use <num_train_epochs>"),
    "lr": ("open_clip's and Lightning's", "use <learning_rate>"),
    "wd": ("open_clip's", "use <weight_decay>"),
    "beta1": ("open_clip's", "use <adam_beta1>"),
    "beta2": ("open_clip's", "use <adam_beta2>"),
    "eps": ("open_clip's", "use <adam_epsilon>"),
    "warmup": ("open_clip's", "use <warmup_steps>"),
    "lr_scheduler": ("open_clip's", "use <lr_scheduler_type>"),
    "grad_clip_norm": ("open_clip's", "use <max_grad_norm>"),
    "batch_size": ("open_clip's and Lightning's", "use <per_device_train_batch_size> (per device, as there)"),
    "accum_freq": (
        "open_clip's",
        "use <gradient_accumulation_steps> (which, like open_clip, contrasts the whole accumulated batch)",
    ),
    "precision": (
        "open_clip's and Lightning's",
        "<@ bf16> (amp_bf16, bf16-mixed) is <bf16 true>, <@ fp16> (amp, 16-mixed) is <fp16 true>, and 32-bit is the "
        "default",
    ),
    "grad_checkpointing": ("open_clip's", "use <activation_checkpointing true>"),
    "force_patch_dropout": ("open_clip's", "use <patch_dropout> (e.g. 0.5)"),
    "lock_image": ("open_clip's", "use <freeze_vision_model true>"),
    "lock_text": ("open_clip's", "use <freeze_text_model true>"),
    "lock_image_unlocked_groups": (
        "open_clip's",
        "use <vision_trainable_layers> without <freeze_vision_model> (N groups there are N - 1 layers here: "
        "open_clip counts the projection as a group)",
    ),
    "lock_text_unlocked_layers": ("open_clip's", "use <text_trainable_layers> without <freeze_text_model>"),
    "siglip": ("open_clip's", "use <loss_type sigmoid>"),
    "distill_model": ("open_clip's", "use <teacher_model_name_or_path>"),
    "workers": ("open_clip's", "use <dataloader_num_workers>"),
    "logs": ("open_clip's", "use <output_dir>"),
    "name": ("open_clip's", "use <run_name>"),
    "resume": ("open_clip's", "use <resume_from_checkpoint>"),
    "save_frequency": ("open_clip's", "use <save_strategy epoch>"),
    "val_frequency": ("open_clip's", "use <eval_strategy epoch>"),
    "torchcompile": ("open_clip's", "use <torch_compile true>"),
    # PyTorch Lightning's Trainer, and the Lightning + Hydra seed project (docs/coming-from-lightning-hydra.md)
    "max_epochs": ("Lightning's", "use <num_train_epochs>"),
    "accumulate_grad_batches": ("Lightning's", "use <gradient_accumulation_steps>"),
    "gradient_clip_val": ("Lightning's", "use <max_grad_norm>"),
    "default_root_dir": ("Lightning's", "use <output_dir>"),
    "log_every_n_steps": ("Lightning's", "use <logging_steps>"),
    "check_val_every_n_epoch": ("Lightning's", "use <eval_strategy epoch>"),
    "val_check_interval": ("Lightning's", "use <eval_strategy steps> with <eval_steps>"),
    "ckpt_path": ("Lightning's", "use <resume_from_checkpoint>"),
    "num_workers": ("Lightning's", "use <dataloader_num_workers>"),
    "accelerator": ("Lightning's", "the device is found by itself; use <use_cpu true> for the CPU"),
    "patience": ("Lightning's", "use <early_stopping_patience>"),
    "min_delta": ("Lightning's", "use <early_stopping_threshold>"),
    "early_stopping": ("the seed project's", "use <early_stopping_patience> (with <early_stopping_threshold>)"),
    "dataset": ("the seed project's", "use <dataset_name> (a Hub id or a local folder) or <train_file>"),
    "optimizer": ("the seed project's", "use <optim> (adam: Adam, adamw_torch_fused: AdamW)"),
    "scheduler": ("the seed project's", "use <lr_scheduler_type> (cosine_lr: cosine, steplr: step, none: constant)"),
    "betas": ("the seed project's", "use <adam_beta1> and <adam_beta2>"),
    "freeze_image_encoder": ("the seed project's", "use <freeze_vision_model true>"),
    "freeze_text_encoder": ("the seed project's", "use <freeze_text_model true>"),
    "data_dir": (
        "Lightning's and transformers' run_clip.py's",
        "use <dataset_name> (a folder of images with metadata.csv, or a prepared folder) or <train_file> (a CSV, "
        "JSON Lines or Parquet file)",
    ),
    # TrainingArguments options transformers 5 removed (difflib would offer a neighbour: `logging_dir` ->
    # logging_first_step, `save_safetensors` -> save_steps)
    "logging_dir": (
        "transformers 4's",
        "removed in transformers 5; TensorBoard writes into output_dir/runs, or into the folder the "
        "TENSORBOARD_LOGGING_DIR environment variable names",
    ),
    "no_cuda": ("transformers 4's", "use <use_cpu true>"),
    "use_mps_device": (
        "transformers 4's",
        "removed in transformers 5; the MPS device is used whenever it is available (<use_cpu true> for the CPU)",
    ),
    "save_safetensors": ("transformers 4's", "removed in transformers 5; weights are always saved as safetensors"),
    "fp16_opt_level": (
        "transformers 4's",
        "removed in transformers 5 with apex AMP; use <fp16 true> or <bf16 true> (torch's mixed precision)",
    ),
}

# Words other tools use for what clip-trainer's option names call otherwise (`image` is `vision`, an encoder is a
# model), tried before difflib so that `freeze_image_model` finds freeze_vision_model, not the nearer spelling
# freeze_text_model.
_SYNONYMS = (("image", "vision"), ("encoder", "model"), ("tower", "model"))


def _spell(option: str, value: str | None, as_flag: bool) -> str:
    if as_flag:
        return f"`--{option}{f' {value}' if value is not None else ''}`"
    if value is None:
        return f"`{option}`"
    try:
        json.loads(value)  # true, false, a number: as it is in JSON
        written = value
    except json.JSONDecodeError:
        written = json.dumps(value)
    return f'`"{option}": {written}`'


def unknown_option_hint(name: str, options: list[str] | tuple[str, ...], as_flag: bool) -> str:
    """The end of the message about an unknown flag (`as_flag`) or config-file key `name`: what to use instead.

    A name another tool uses (open_clip, Lightning, transformers' run_clip.py; see `KNOWN_FOREIGN_NAMES`) gets that
    tool's mapping; otherwise the closest of `options`, after the other tools' words for clip-trainer's (`image` for
    `vision`) are translated. Starts with the punctuation that ends the message's first part (`.` or ` (`).
    """
    typed = name.lstrip("-")
    # Hyphens as flags allow them; a Hydra-style dotted key (`trainer.max_epochs`) by its last part.
    normalized = typed.replace("-", "_").lower().rsplit(".", 1)[-1]
    known = KNOWN_FOREIGN_NAMES.get(normalized)
    if known is not None:
        tools, text = known

        def render(match: re.Match) -> str:
            option, value = match.group(1), match.group(2)
            return _spell(typed if option == "@" else option, value, as_flag)

        return f" ({tools} name): {re.sub(r'<([@a-z0-9_]+)(?: ([^>]+))?>', render, text)}."
    translated = normalized
    for theirs, ours in _SYNONYMS:
        translated = translated.replace(theirs, ours)
    if translated in options:
        return f". Did you mean `{translated}`?"
    # The closer of the two spellings' matches: the translation helps `freeze_image_modle`, but must not take
    # `image_colum` (image_column) away to a `vision_*` option.
    matches = [
        (difflib.SequenceMatcher(None, spelling, match).ratio(), match)
        for spelling in {normalized, translated}
        for match in difflib.get_close_matches(spelling, list(options), n=1, cutoff=0.6)
    ]
    return f". Did you mean `{max(matches)[1]}`?" if matches else "."


REPEATED_KEY_FIXES = {
    "extra_eval_sets": "give each set its own name",
    "train_mixture": "give each source once, with the weights added up",
}
_REPEATED_KEY_FIX = "keep one of them"


def _first_repeated_key(pairs: list[tuple[Any, Any]]) -> Any:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None


def refuse_repeated_keys(option: str) -> Any:
    """A `json.loads` `object_pairs_hook` for the JSON text of `option` (on the command line) that refuses a key given
    twice in any of its objects."""

    def hook(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        key = _first_repeated_key(pairs)
        if key is not None:
            fix = REPEATED_KEY_FIXES.get(option, _REPEATED_KEY_FIX)
            raise ConfigError(f"`{option}` has the key {key!r} twice; {fix}.")
        return dict(pairs)

    return hook


class _RepeatedKeys(dict):
    """A JSON object of a config file in which the key `repeated` was given more than once; kept (not refused on the
    spot) so that the message can say which option holds it."""

    repeated: Any = None


def _mark_repeated_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    key = _first_repeated_key(pairs)
    if key is None:
        return dict(pairs)
    marked = _RepeatedKeys(pairs)
    marked.repeated = key
    return marked


def _find_repeated_key(value: Any, where: tuple[str, ...] = ()) -> tuple[tuple[str, ...], Any] | None:
    """`(the keys leading to the object, the key given twice)` of the first object in `value` with a repeated key."""
    if isinstance(value, _RepeatedKeys):
        return where, value.repeated
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = _find_repeated_key(child, (*where, str(key)))
        if found is not None:
            return found
    return None


def written_as_path(value: str) -> bool:
    """Whether a model or file option's value can only be a path: a Hub id is `name` or `owner/name`, so a value
    starting with `.`, `/` or `~`, with more than one `/`, or naming a `.json` file is none."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or value.endswith(".json")


def read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path!r} does not exist.")
    try:
        # `utf-8-sig`: an editor's byte-order mark (Windows Notepad writes one) is not JSON, but says nothing either.
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"), object_pairs_hook=_mark_repeated_keys)
    except json.JSONDecodeError as error:
        raise ConfigError(f"Config file {path!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path!r} must hold one JSON object of option names and values.")
    found = _find_repeated_key(data)
    if found is not None:
        where, key = found
        inside = f" in `{'.'.join(where)}`" if where else ""
        fix = REPEATED_KEY_FIXES.get(where[0], _REPEATED_KEY_FIX) if where else _REPEATED_KEY_FIX
        raise ConfigError(
            f"Config file {path!r} has the key {key!r} twice{inside}; JSON would keep only the last one without a "
            f"word, so {fix}."
        )
    return data
