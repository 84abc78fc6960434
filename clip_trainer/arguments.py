"""Argument dataclasses and the config-file-plus-overrides command line.

`python run_clip.py a.json b.json --learning_rate 1e-4` applies the JSON files left to right, then the flags.
Every field of [`ModelArguments`], [`DataArguments`] and [`CLIPTrainingArguments`] (which is a
`transformers.TrainingArguments`) can be set either way. A relative path in a config file is read against the config
file's folder when something exists there, else against the working folder (see [`CONFIG_RELATIVE_PATH_KEYS`]).

Validation lives here, in two steps: each dataclass's `__post_init__` checks its own fields (first every value against
its type, `choices` and `bounds` with [`check_field_values`], the same for a flag, a config file or Python), and
[`check_arguments`] checks what needs several of them or the model's config (known before any data or weights are
loaded).
"""

from __future__ import annotations

import copy
import enum
import functools
import importlib.util
import json
import math
import os
import re
import types
import typing
import warnings
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
from transformers.training_args import OptimizerNames

from .config_files import did_you_mean, refuse_repeated_keys
from .errors import ConfigError, InvalidValueError

__all__ = ["ARGUMENT_CLASSES", "CLIPTrainingArguments", "ConfigError", "DataArguments", "ModelArguments"]


def describe_load_error(error: Exception) -> str:
    """One line for a model, config or processor that `from_pretrained` could not load; for one that needs its own
    code (`auto_map` in its config), what to do instead."""
    text = str(error).strip()
    if "trust_remote_code" in text:
        return (
            "it needs its own Python code (`auto_map` in its config.json), which clip-trainer never runs; use a model "
            "that transformers implements itself (CLIP, SigLIP, SigLIP 2, a vision-text dual encoder)."
        )
    return text.splitlines()[0] if text else type(error).__name__


# LoRA's default targets: the attention projections of both CLIP towers.
DEFAULT_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


def is_peft_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


ATTENTION_IMPLEMENTATIONS = ["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"]
# 256 byte tokens, the pad token and bos/eos (see tokenization.py).
MIN_TOKENIZER_VOCAB_SIZE = 259
# Optimizers and schedules the seed project offered that `TrainingArguments` lacks; the trainer builds them.
EXTRA_OPTIMIZERS = ["adam"]
EXTRA_SCHEDULERS = ["step"]


# --------------------------------------------------------------------------------------------------------------
# One check of every option's value, whatever its source
# --------------------------------------------------------------------------------------------------------------
# argparse checks `choices` and types only for what is typed on the command line: values from a config file become
# the parser's defaults, which it never checks, and a dataclass built in Python meets no parser at all. So each
# argument class's `__post_init__` starts with [`check_field_values`], which reads every field's type annotation,
# its `choices` and its `bounds` from the field's metadata; the parser leaves both to it (see `build_parser`), so the
# command line, a config file and Python give the same one-line error.


def field_default(item: Field) -> Any:
    """A dataclass field's default (its `default_factory` called), or `MISSING` for a required field."""
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:
        return item.default_factory()
    return MISSING


@dataclass(frozen=True)
class Bounds:
    """The interval a numeric option must lie in (the field metadata key `bounds`); each end is included unless it is
    `*_open`, and `hint` follows the error message (in parentheses)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """`at least 1`, `above 1`, `in (0, 1]`."""
        if self.high is None:
            return f"{'above' if self.low_open else 'at least'} {_number(self.low)}"
        if self.low is None:
            return f"{'below' if self.high_open else 'at most'} {_number(self.high)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


# Bounds of `TrainingArguments` fields that clip-trainer does not redeclare (the redeclared ones carry their own in
# their metadata). transformers checks none of these ranges itself, or only deep inside training.
TRAINING_ARGUMENT_BOUNDS = {
    "per_device_train_batch_size": Bounds(1),
    "per_device_eval_batch_size": Bounds(1),
    "gradient_accumulation_steps": Bounds(1),
    "num_train_epochs": Bounds(0),
    "max_steps": Bounds(-1, hint="-1: train for `num_train_epochs`"),
    "warmup_steps": Bounds(0, hint="below 1: a fraction of the steps"),
    "learning_rate": Bounds(0, hint="e.g. 1e-4"),
    "adam_beta1": Bounds(0, 1, high_open=True),
    "max_grad_norm": Bounds(0, hint="0: no clipping"),
    "eval_steps": Bounds(0, low_open=True, hint="below 1: a fraction of the steps"),
    "save_steps": Bounds(0, low_open=True, hint="below 1: a fraction of the steps"),
    "seed": Bounds(0, 2**32 - 1),
}
# `TrainingArguments` fields that take more than their annotation says: `fsdp` a list or a bool as well as a string,
# `resume_from_checkpoint` JSON's `true` (the newest checkpoint) as well as a path.
_LOOSELY_TYPED_FIELDS = frozenset({"fsdp", "resume_from_checkpoint"})
_SCALAR_TYPES = (bool, int, float, str)
WISE_FT_MIX = "WiSE-FT mixes (1 - a) x pretrained + a x fine-tuned"


@functools.cache
def _field_specs(cls: type) -> tuple[tuple[str, type | None, bool, bool, tuple | None, Bounds | None], ...]:
    """Per init field of `cls`: (name, scalar type or None when the annotation is not one this check reads, may be
    None, is a list, choices, bounds)."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in fields(cls):
        if not f.init:
            continue
        scalar, optional, is_list, enum_choices = _read_annotation(hints[f.name])
        choices = f.metadata.get("choices", enum_choices)
        bounds = f.metadata.get("bounds", TRAINING_ARGUMENT_BOUNDS.get(f.name))
        if f.name in _LOOSELY_TYPED_FIELDS:
            scalar = None
        specs.append((f.name, scalar, optional, is_list, None if choices is None else tuple(choices), bounds))
    return tuple(specs)


def _read_annotation(hint: Any) -> tuple[type | None, bool, bool, list | None]:
    """`(scalar type, may be None, is a list, the values of an Enum in it)` of an annotation such as `int | None`,
    `list[str]` or `IntervalStrategy | str`; the scalar type is None for anything else (a dict, a union of several
    types), which the option's own parsing checks."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in members
    members = tuple(member for member in members if member is not type(None))
    enums = [member for member in members if isinstance(member, type) and issubclass(member, enum.Enum)]
    if enums:
        # transformers' `IntervalStrategy | str` and the like: a string, one of the enum's values.
        only_enum = all(member in (*enums, str) for member in members)
        return (str if only_enum else None), optional, False, [item.value for item in enums[0]]
    if len(members) != 1:
        return None, optional, False, None
    (member,) = members
    if typing.get_origin(member) is list and typing.get_args(member) and typing.get_args(member)[0] in _SCALAR_TYPES:
        return typing.get_args(member)[0], optional, True, None
    return (member if member in _SCALAR_TYPES else None), optional, False, None


def _has_type(value: Any, scalar: type) -> bool:
    if scalar is bool or isinstance(value, bool):
        return isinstance(value, bool) and scalar is bool  # True is an int to Python, never a number here
    if scalar is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, scalar)


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
_LIST_TYPE_NAMES = {bool: "booleans", int: "whole numbers", float: "numbers", str: "strings"}


def unset_empty_text_options(instance: Any) -> None:
    """An empty value of an optional text option (`--label_column ""` on the command line) unsets what a config file
    set: the option becomes None, as if neither had named it."""
    for name, scalar, optional, is_list, _, _ in _field_specs(type(instance)):
        if scalar is str and optional and not is_list and getattr(instance, name) == "":
            setattr(instance, name, None)


def check_field_values(instance: Any) -> None:
    """Checks every init field of an argument dataclass against its annotation's type, its `choices` and its
    `bounds`, whatever set it (a flag, a config file, Python).

    Raises:
        [`InvalidValueError`]: one line naming the key, the value, what it may be and how to fix it.
    """
    for name, scalar, optional, is_list, choices, bounds in _field_specs(type(instance)):
        value = getattr(instance, name)
        if value is None and (optional or scalar is None):
            continue
        if choices is not None:
            if name == "loss_type" and isinstance(value, str) and value not in choices:
                # A loss added in Python (a `ContrastiveLoss` subclass) is chosen by its name like the built-in ones.
                from .losses import ContrastiveLoss

                choices = (*choices, *(n for n in ContrastiveLoss.registry if n not in choices))
            if not isinstance(value, str) or value not in choices:  # every option's choices are strings
                hint = did_you_mean(value, [str(choice) for choice in choices]) if isinstance(value, str) else ""
                raise InvalidValueError(
                    name,
                    f"`{name}` is {value!r}; set it to one of: {', '.join(str(choice) for choice in choices)}.{hint}",
                )
            continue
        if scalar is None:
            continue
        empty = ", or empty (null)" if optional else ""
        if is_list:
            if not isinstance(value, list | tuple):
                example = (
                    json.dumps([value]) if _has_type(value, scalar) else f"[{'0.5' if scalar is float else '...'}]"
                )
                raise InvalidValueError(
                    name,
                    f"`{name}` is {value!r}; it must be a list of {_LIST_TYPE_NAMES[scalar]}{empty} (on the command "
                    f"line: --{name} A B ...; in a config file a JSON list, e.g. {example}).",
                )
            for item in value:
                if not _has_type(item, scalar) or (bounds is not None and item not in bounds):
                    what = _TYPE_NAMES[scalar] + _of(bounds)
                    raise InvalidValueError(
                        name, f"`{name}` has {item!r}; each of its values must be {what}{_hint(bounds)}."
                    )
            continue
        if not _has_type(value, scalar):
            what = _TYPE_NAMES[scalar] + _of(bounds)
            if scalar is bool:
                what += " (a JSON boolean, without quotes)"
            raise InvalidValueError(name, f"`{name}` is {value!r}; it must be {what}{empty}{_hint(bounds)}.")
        if bounds is not None and value not in bounds:
            raise InvalidValueError(
                name, f"`{name}` is {value!r}; it must be {bounds.describe()}{empty}{_hint(bounds)}."
            )


def _hint(bounds: Bounds | None) -> str:
    return f" ({bounds.hint})" if bounds is not None and bounds.hint else ""


def _of(bounds: Bounds | None) -> str:
    """`a whole number` + ` of at least 1` / ` above 1` / ` in (0, 1]`."""
    if bounds is None:
        return ""
    described = bounds.describe()
    return f" of {described}" if described.startswith(("at least", "at most")) else f" {described}"


@dataclass
class ModelArguments:
    """Which model to train, and how to change it before training.

    The family follows the model's config: `CLIPModel`, `MetaClip2Model`, `ChineseCLIPModel`, `AltCLIPModel`,
    `SiglipModel`, `Siglip2Model`, or a `VisionTextDualEncoderModel` (saved, or built from
    `vision_model_name_or_path` + `text_model_name_or_path`).
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a pretrained CLIP, MetaCLIP 2, Chinese-CLIP, AltCLIP, SigLIP, SigLIP 2 "
            "or vision-text dual encoder model (e.g. openai/clip-vit-base-patch32, google/siglip-base-patch16-224, "
            "OFA-Sys/chinese-clip-vit-base-patch16). Leave empty to build a new model "
            "from `config_name`, or a dual encoder from `vision_model_name_or_path` and `text_model_name_or_path`."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "A model config (CLIPConfig, MetaClip2Config, ChineseCLIPConfig, AltCLIPConfig, SiglipConfig, "
            "Siglip2Config; Hub id, folder or config.json path). "
            "With `model_name_or_path` it replaces the model's config; without it a model is built from scratch "
            "with random weights."
        },
    )
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "With `text_model_name_or_path`: build a VisionTextDualEncoderModel from this image encoder (any "
            "vision model transformers loads: a CLIP checkpoint's vision tower, ViT, DINOv2, ...) and that text "
            "encoder, joined by new projections."
        },
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The text encoder of a new dual encoder (BERT, RoBERTa, a CLIP text tower, ...)."},
    )
    projection_dim: int = field(
        default=512,
        metadata={
            "help": "For a new dual encoder: the size of the shared embedding space its projections map to.",
            "bounds": Bounds(1),
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer to use (Hub id or folder). Defaults to the model's. A model built from scratch "
            "with no tokenizer gets one trained on the training captions."
        },
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": "Image processor to use (Hub id or folder). Defaults to the model's, or one sized for the config."
        },
    )
    tokenizer_vocab_size: int = field(
        default=4096,
        metadata={
            "help": "Vocabulary size of the tokenizer trained on the captions when none is given.",
            "bounds": Bounds(
                MIN_TOKENIZER_VOCAB_SIZE,
                hint="a byte-level tokenizer needs 256 bytes and 3 special tokens; use 1024 or more for real captions",
            ),
        },
    )
    dropout: float | None = field(
        default=None,
        metadata={
            "help": "Dropout probability set on both towers' configs (CLIP applies it to attention weights, its only "
            "dropout site). Empty: keep the model's.",
            "bounds": Bounds(0, 1, high_open=True),
        },
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Attention kernel.", "choices": ATTENTION_IMPLEMENTATIONS},
    )
    better_transformer: bool = field(
        default=False,
        metadata={
            "help": "Deprecated: optimum's BetterTransformer no longer exists. True maps to attn_implementation=sdpa "
            "with a warning."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are cached."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow code from the model's or dataset's Hub repository to run. Off unless you trust it."},
    )

    def __post_init__(self) -> None:
        check_field_values(self)
        # An empty value on the command line (--model_name_or_path "") unsets what a config file set.
        keys = ("model_name_or_path", "config_name", "tokenizer_name", "image_processor_name")
        for key in (*keys, "vision_model_name_or_path", "text_model_name_or_path"):
            if getattr(self, key) is not None and not str(getattr(self, key)).strip():
                setattr(self, key, None)
        if self.better_transformer:
            warnings.warn(
                "`better_transformer` is deprecated: optimum's BetterTransformer was removed and refused training "
                "anyway. Using attn_implementation='sdpa', which gives the same fused attention.",
                FutureWarning,
                stacklevel=2,
            )
            self.attn_implementation = "sdpa"
        towers = (self.vision_model_name_or_path, self.text_model_name_or_path)
        if any(towers) and not all(towers):
            missing = "text_model_name_or_path" if self.vision_model_name_or_path else "vision_model_name_or_path"
            raise ConfigError(f"A dual encoder needs both towers: set `{missing}` too.")
        if all(towers) and (self.model_name_or_path or self.config_name):
            raise ConfigError(
                "Both a model (`model_name_or_path` / `config_name`) and two towers (`vision_model_name_or_path`, "
                "`text_model_name_or_path`) are given; keep one."
            )
        _check_attention_available(self.attn_implementation)

    @property
    def has_model(self) -> bool:
        """Whether a model is named: pretrained, a config to build one from, or two towers. (A `prepare_only` run
        needs none; every other run does, which [`check_arguments`] checks.)"""
        towers = (self.vision_model_name_or_path, self.text_model_name_or_path)
        return self.model_name_or_path is not None or self.config_name is not None or all(towers)


def _check_attention_available(implementation: str) -> None:
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    available = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
    if implementation in available and not available[implementation]():
        raise ConfigError(
            f"`attn_implementation` is {implementation!r}, but the flash-attn package for it is not installed (or "
            "no CUDA device supports it here); install it, or use `sdpa` (the default, fused attention in PyTorch)."
        )


def _warn_ignored(options: list[str], needs: str, because: str) -> None:
    """One warning that `options` act only with `needs`, which this run does not give (`because`)."""
    one = len(options) == 1
    warnings.warn(
        f"{' and '.join(options)} {'acts' if one else 'act'} only with {needs}, {because}, so "
        f"{'it is' if one else 'they are'} ignored; set {needs}, or drop {'it' if one else 'them'}.",
        UserWarning,
        stacklevel=4,
    )


# Data options that act only when another is set (option -> the one it needs): set alone they are warned of.
OPTIONS_THAT_NEED_ANOTHER = {
    "augment_scale_min": "augment",
    "color_jitter": "augment",
    "grayscale_probability": "augment",
    "shuffle_buffer_size": "streaming",
    "mixture_stopping_strategy": "train_mixture",
    "clip_benchmark_split": "clip_benchmark_dataset",
    "clip_benchmark_task": "clip_benchmark_dataset",
    "clip_benchmark_recall_k": "clip_benchmark_dataset",
    "clip_benchmark_output": "clip_benchmark_dataset",
}


@dataclass
class DataArguments:
    """Where the image-caption pairs come from and how they are split and cut."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hub dataset id, a folder written by a `--prepare_only` run (or `save_to_disk`), or `emoji` "
            "for the bundled demo data."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration name."})
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "csv (or tab-separated tsv), json/jsonl or parquet file of training pairs, or a glob of such shards "
            "(data/train-*.parquet); image paths are relative to the file's folder."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "csv, json/jsonl or parquet file of validation pairs (same format)."}
    )
    image_column: str = field(
        default="image", metadata={"help": "Column holding the image: a file path, or a `datasets` Image column."}
    )
    caption_column: str = field(default="caption", metadata={"help": "Column holding the caption text."})
    label_column: str | None = field(
        default=None,
        metadata={"help": "Optional class-label column of the validation data; turns on zero-shot classification."},
    )
    image_id_column: str | None = field(
        default=None,
        metadata={
            "help": "Optional column naming each row's image, for data with several captions per image. Empty: "
            "rows with the same image file (or the same image bytes) are the same image."
        },
    )
    caption_sampling: dict[str, float] | str | None = field(
        default="uniform",
        metadata={
            "help": "What training makes of several captions per image (a caption column of lists, e.g. JSON text "
            '\'["a cat", "a cat on a mat"]\' in a CSV cell, or several rows of one image): `uniform` merges the '
            "rows of an image and draws one of its captions per epoch, uniformly, seeded by the run's seed, the "
            "epoch and the image's row (an epoch is then one pass over the images); `all` trains on every caption "
            "every "
            'epoch; a JSON object of caption columns -> weights, e.g. \'{"caption": 3, "keywords": 1}\' (it must '
            "name `caption_column`), draws a column per image and epoch by weight, then one of its captions. Rows of "
            "one image in a batch are never each other's negatives, whichever you choose; evaluation scores every "
            "caption (of every column named)."
        },
    )
    hard_negative_column: str | None = field(
        default=None,
        metadata={
            "help": "Optional column of hard negatives: per row, one caption or a list of captions (JSON text in a "
            "CSV cell) that are wrong for the row's image. The softmax loss adds them to that image's candidate "
            "texts, the sigmoid loss adds them as negative pairs; evaluation data with the column reports "
            "`eval_hard_negative_accuracy`."
        },
    )
    validation_split_percentage: float = field(
        default=15,
        metadata={
            "help": "Percent of the training data held out for validation when there is no validation split. 0: train "
            "on everything (no evaluation unless `validation_file` is given). Nothing is held out when the run does "
            "not evaluate.",
            "bounds": Bounds(0, 100, high_open=True, hint="0: train on everything"),
        },
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest caption in tokens; longer ones are truncated. Default: the text model's positions. Above "
            "them, the positions are extended when the model is loaded (a pretrained tower's learned table by "
            "Long-CLIP's stretching: the first 20 kept, the rest interpolated), and the saved config and tokenizer "
            "say the new length.",
            "bounds": Bounds(2, hint="a start and an end token"),
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use only the first this many rows of the training data (a row whose caption column holds a "
            "list is one image with all its captions; one row per caption counts each).",
            "bounds": Bounds(1),
        },
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use only this many rows of the validation data, drawn at random with the run's seed (not the "
            "first rows of the file, which may be one class or source; a row whose caption column holds a list is "
            "one image, evaluated with all its captions); a stream holds out its first rows.",
            "bounds": Bounds(1),
        },
    )
    on_bad_rows: str = field(
        default="skip",
        metadata={
            "help": "What to do with rows whose image is missing/empty or whose caption is empty: skip them with a "
            "logged summary (each one named in `dropped_rows.jsonl` in the output folder), or stop before training "
            "with a report naming every one (up to 100).",
            "choices": ["skip", "error"],
        },
    )
    jpeg_draft: bool = field(
        default=False,
        metadata={
            "help": "Decode JPEGs at 1/2, 1/4 or 1/8 scale when they are at least twice the model's input size: about "
            "2x faster loading of large photos (the usual data-loading bottleneck), with pixels slightly different "
            "from CLIPImageProcessor's (mean difference about 1 level of 255). Off: pixel-exact preprocessing."
        },
    )
    max_image_pixels: int = field(
        default=89_478_485,
        metadata={
            "help": "Images with more pixels than this are skipped as likely decompression bombs.",
            "bounds": Bounds(1),
        },
    )
    prepare_only: bool = field(
        default=False,
        metadata={
            "help": "Only prepare the data: write the train/validation splits, images as encoded bytes, to "
            "`output_dir`, then stop. Train from it later with `--dataset_name <that folder>`."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the training data instead of loading it (needs `max_steps`)."},
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={
            "help": "With `streaming`: each DataLoader worker shuffles its stream in consecutive blocks of this many "
            "rows (within one pass over its shards; the shard order is shuffled too). Rows are kept encoded, so a "
            "block takes about this many times the average image file size of memory per worker; a resumed run "
            "re-reads at most one block to continue exactly where it stopped.",
            "bounds": Bounds(1),
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used by `datasets` to prepare the data.", "bounds": Bounds(1)}
    )
    train_mixture: dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": "Train on a weighted mixture of sources instead of one: a JSON object of source -> weight, e.g. "
            '\'{"data/laion/{00000..00099}.tar": 3, "data/coco.csv": 1}\'. A source is anything `train_file` or '
            "`dataset_name` takes (a file, glob or brace range of shards, a folder, a Hub id); each needs the run's "
            "image and caption columns. Weights are relative and positive; pairs are drawn from source i with "
            "probability w_i / sum(w) (datasets.interleave_datasets, with the run's seed)."
        },
    )
    mixture_stopping_strategy: str = field(
        default="all_exhausted",
        metadata={
            "help": "When an epoch of a loaded `train_mixture` ends: all_exhausted (default) once every source has "
            "been read through, repeating the sources that are drawn faster than their size, so no pair is left out "
            "and the weights hold throughout; first_exhausted when the first source runs out (the others are cut "
            "there). A streamed mixture is repeated without end either way.",
            "choices": ["all_exhausted", "first_exhausted"],
        },
    )
    # --- Evaluation sets beside the validation split, and augmentation --------------------------------------------
    extra_eval_sets: dict | str | None = field(
        default=None,
        metadata={
            "help": "More evaluation sets, reported next to the validation split at every evaluation as "
            "`eval_{name}_{metric}`: a JSON object of name -> a path (data file, folder or Hub id) or name -> "
            '{"path" (or "dataset_name" / "validation_file"), "dataset_config_name", "split", "image_column", '
            '"caption_column", "label_column", "image_id_column", "max_eval_samples"}. Columns default to image and '
            "caption (not to this run's), no label; `on_bad_rows`, `max_image_pixels` and "
            "`validation_split_percentage` are this run's. On the command line a JSON string: "
            '--extra_eval_sets \'{"reference": "data/reference.csv"}\'.'
        },
    )
    validation_split_name: str | None = field(
        default=None,
        metadata={
            "help": "The split of `dataset_name` to evaluate on. Empty: the first of validation, valid, val (and test "
            "for an evaluation-only run), else `validation_split_percentage` of the training split."
        },
    )
    augment: bool = field(
        default=False,
        metadata={
            "help": "Augment training images (never evaluation images): a random resized crop to the model's input "
            "size (area `augment_scale_min`-1 of the image, aspect ratio 3/4-4/3, as open_clip) in place of the "
            "resize and center crop, then `color_jitter` and `grayscale_probability`."
        },
    )
    augment_scale_min: float = field(
        default=0.9,
        metadata={
            "help": "With `augment`: the smallest share of the image's area a random crop keeps (open_clip: 0.9).",
            "bounds": Bounds(0, 1, low_open=True, hint="open_clip uses 0.9"),
        },
    )
    color_jitter: float = field(
        default=0.0,
        metadata={
            "help": "With `augment`: brightness, contrast and saturation each multiplied by a random factor in "
            "[1 - x, 1 + x] (torchvision's ColorJitter(x, x, x)). 0: off.",
            "bounds": Bounds(0, 1, hint="0 turns it off"),
        },
    )
    grayscale_probability: float = field(
        default=0.0,
        metadata={"help": "With `augment`: the probability of turning a training image gray.", "bounds": Bounds(0, 1)},
    )
    # --- CLIP_benchmark datasets ----------------------------------------------------------------------------------
    clip_benchmark_dataset: str | None = field(
        default=None,
        metadata={
            "help": "A dataset in CLIP_benchmark's WebDataset layout to evaluate the final model on, as CLIP_benchmark "
            "scores it: a folder with `{split}/0.tar ...` (and `nshards.txt`), `classnames.txt` and "
            "`zeroshot_classification_templates.txt` (or `dataset_type.txt` saying retrieval). Its metrics go to "
            "eval_results.json as `eval_clip_benchmark_{metric}` and to `clip_benchmark_output` in CLIP_benchmark's "
            "results JSON. `clip-trainer eval` needs no other data with it."
        },
    )
    clip_benchmark_split: str = field(
        default="test", metadata={"help": "The split folder of `clip_benchmark_dataset` (CLIP_benchmark's --split)."}
    )
    clip_benchmark_task: str = field(
        default="auto",
        metadata={
            "help": "The task of `clip_benchmark_dataset`; auto: zeroshot_retrieval when its dataset_type.txt says "
            "retrieval, else zeroshot_classification (CLIP_benchmark's rule).",
            "choices": ["auto", "zeroshot_classification", "zeroshot_retrieval"],
        },
    )
    clip_benchmark_recall_k: list[int] = field(
        default_factory=lambda: [5],
        metadata={
            "help": "The k of a retrieval set's `image_retrieval_recall@k` and `text_retrieval_recall@k` in the "
            "results JSON (CLIP_benchmark's --recall_k; its default and published tables: 5). eval_results.json "
            "has recall@1, 5 and 10 as well.",
            "bounds": Bounds(1),
        },
    )
    clip_benchmark_output: str | None = field(
        default=None,
        metadata={
            "help": "Where to write CLIP_benchmark's results JSON (dataset, model, pretrained, task, metrics, "
            "language). Empty: clip_benchmark_results.json in `output_dir`."
        },
    )

    def __post_init__(self) -> None:
        unset_empty_text_options(self)
        check_field_values(self)
        if not self.clip_benchmark_recall_k:
            raise ConfigError(
                "`clip_benchmark_recall_k` is empty; give at least one k, e.g. --clip_benchmark_recall_k 5."
            )
        self._warn_of_options_without_effect()
        self.extra_eval_sets = _parse_extra_eval_sets(self.extra_eval_sets)
        if self.validation_split_name is not None and not self.validation_split_name.strip():
            self.validation_split_name = None
        self.caption_sampling = _parse_caption_sampling(self.caption_sampling, self.caption_column)
        if self.hard_negative_column is not None and not self.hard_negative_column.strip():
            self.hard_negative_column = None
        if self.hard_negative_column is not None:
            captions = [
                self.caption_column,
                *(self.caption_sampling if isinstance(self.caption_sampling, dict) else ()),
            ]
            if self.hard_negative_column in (self.image_column, *captions):
                raise ConfigError(
                    f"`hard_negative_column` is {self.hard_negative_column!r}, which is also the image or a caption "
                    "column; name the column that holds the captions that are wrong for each image."
                )
        # An empty value on the command line (--dataset_name "") unsets what a config file set.
        for key in ("dataset_name", "train_file", "validation_file"):
            if getattr(self, key) == "":
                setattr(self, key, None)
        if self.dataset_name is not None and self.train_file is not None:
            raise ConfigError(
                f"Both `dataset_name` ({self.dataset_name!r}) and `train_file` ({self.train_file!r}) are set; keep one "
                '(on the command line, --dataset_name "" unsets a config file\'s dataset).'
            )
        from .sources import DATA_FILE_SUFFIXES, check_data_file_pattern, parse_mixture, pattern_suffix

        for key in ("train_file", "validation_file"):
            path = getattr(self, key)
            if path is not None:  # a file, or shards: data/train-*.parquet, shards/{00000..00099}.tar
                check_data_file_pattern(key, path)
        if self.train_mixture in ("", {}):
            self.train_mixture = None
        if isinstance(self.train_mixture, str):
            try:  # the command line's JSON text; `parse_mixture` reads it too, but would keep a repeated source's last
                self.train_mixture = json.loads(
                    self.train_mixture, object_pairs_hook=refuse_repeated_keys("train_mixture")
                )
            except json.JSONDecodeError:
                pass  # reported by `parse_mixture`, with an example
        if self.train_mixture is not None:
            self.train_mixture = parse_mixture(self.train_mixture)
            for source in self.train_mixture:  # files are checked now; folders and Hub ids when they are loaded
                if pattern_suffix(source) in DATA_FILE_SUFFIXES:
                    check_data_file_pattern("train_mixture", source)
            for key in ("dataset_name", "train_file"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"Both `train_mixture` and `{key}` ({getattr(self, key)!r}) are set; put that source into the "
                        f'mixture or drop one (on the command line, --{key} "" unsets a config file\'s).'
                    )
        self.extra_eval_data_arguments()  # each entry checked as a validation split's arguments are

    def _warn_of_options_without_effect(self) -> None:
        """Options that act only with another one, set without it, would be ignored without a word: one warning per
        option they need, naming them."""
        defaults = {item.name: field_default(item) for item in fields(self)}
        ignored: dict[str, list[str]] = {}
        for option, needs in OPTIONS_THAT_NEED_ANOTHER.items():
            if getattr(self, option) != defaults[option] and not getattr(self, needs):
                ignored.setdefault(needs, []).append(f"`{option}`")
        for needs, options in ignored.items():
            _warn_ignored(options, f"`{needs}`", "which is not set")

    def extra_eval_data_arguments(self) -> dict[str, DataArguments]:
        """One `DataArguments` per entry of `extra_eval_sets`, for [`load_image_text_data`] with `train=False`, so
        that every check of a validation split applies to it. Errors name the entry."""
        built = {}
        for name, entry in (self.extra_eval_sets or {}).items():
            options = dict(entry)
            path = options.pop("path", None)
            split = options.pop("split", None)
            if path is not None:
                is_file = Path(str(path)).suffix.lower() in {".csv", ".tsv", ".json", ".jsonl", ".parquet"}
                options["validation_file" if is_file else "dataset_name"] = path
            try:
                built[name] = DataArguments(
                    **options,
                    validation_split_name=split,
                    on_bad_rows=self.on_bad_rows,
                    max_image_pixels=self.max_image_pixels,
                    validation_split_percentage=self.validation_split_percentage,
                    preprocessing_num_workers=self.preprocessing_num_workers,
                )
            except (ConfigError, TypeError) as error:
                raise ConfigError(f"`extra_eval_sets` entry {name!r}: {error}") from None
        return built


# Keys an entry of `extra_eval_sets` may set (besides the run-wide ones it takes from the run's DataArguments).
EXTRA_EVAL_SET_KEYS = (
    "path",
    "dataset_name",
    "dataset_config_name",
    "validation_file",
    "split",
    "image_column",
    "caption_column",
    "label_column",
    "image_id_column",
    "max_eval_samples",
)
# Path-valued keys of an entry, read beside the config file that names them (see `CONFIG_RELATIVE_PATH_KEYS`).
EXTRA_EVAL_SET_PATH_KEYS = ("path", "dataset_name", "validation_file")
EXTRA_EVAL_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# The first words of the validation split's metric families: a set named `t2i...` would make `eval_t2i_..._recall@1`;
# `ema` begins the keys of the validation split's EMA evaluation (`eval_ema_t2i_recall@1`).
RESERVED_SET_NAME_WORDS = ("t2i", "i2t", "zeroshot", "ema")
# What follows `eval_` or `eval_{name}_` in an evaluation's keys, besides the retrieval and zero-shot metrics.
_EVALUATION_KEYS = (
    "loss",
    "inverse_temperature",
    "runtime",
    "samples_per_second",
    "steps_per_second",
    "samples",
    "model_preparation_time",
)


def _evaluation_key_suffixes() -> tuple[str, ...]:
    from .metrics import HARD_NEGATIVE_METRIC_NAMES, RETRIEVAL_METRIC_NAMES, ZEROSHOT_METRIC_NAMES

    return (*_EVALUATION_KEYS, *RETRIEVAL_METRIC_NAMES, *ZEROSHOT_METRIC_NAMES, *HARD_NEGATIVE_METRIC_NAMES)


CAPTION_SAMPLING_MODES = ("uniform", "all")


def _parse_caption_sampling(value: Any, caption_column: str) -> str | dict[str, float]:
    """`caption_sampling` as given (a mode, a dict, or a dict's JSON text) -> `uniform`, `all` or column -> weight."""
    example = f'\'{{"{caption_column}": 3, "keywords": 1}}\''
    if value is None or (isinstance(value, str) and not value.strip()):
        return "uniform"
    if isinstance(value, str):
        text = value.strip()
        if text in CAPTION_SAMPLING_MODES:
            return text
        if not text.startswith("{"):
            raise ConfigError(
                f"`caption_sampling` is {value!r}; set it to uniform, all, or a JSON object of caption columns -> "
                f"weights such as {example}.{did_you_mean(text, CAPTION_SAMPLING_MODES)}"
            )
        try:
            value = json.loads(text, object_pairs_hook=refuse_repeated_keys("caption_sampling"))
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"`caption_sampling` is not valid JSON ({error}); give uniform, all, or an object such as {example}."
            ) from None
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            f"`caption_sampling` is {value!r}; set it to uniform, all, or a JSON object of caption columns -> weights "
            f"such as {example}."
        )
    for column, weight in value.items():
        positive = isinstance(weight, int | float) and not isinstance(weight, bool) and 0 < weight < math.inf
        if not isinstance(column, str) or not column or not positive:
            raise ConfigError(
                f"`caption_sampling` gives column {column!r} the weight {weight!r}; each key must be a caption column "
                f"and each weight a positive number, as in {example}."
            )
    if caption_column not in value:
        raise ConfigError(
            f"`caption_sampling` names {', '.join(map(repr, value))} but not `caption_column` ({caption_column!r}), "
            f"which every row needs a caption in; add it with a weight, or set `caption_column` to one of them."
        )
    return {column: float(weight) for column, weight in value.items()}


def _parse_extra_eval_sets(value: Any) -> dict[str, dict[str, Any]] | None:
    """`extra_eval_sets` as given (a dict, or a JSON string from the command line) -> name -> entry options."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    example = '{"reference": "data/reference.csv"}'
    if isinstance(value, str):
        try:
            value = json.loads(value, object_pairs_hook=refuse_repeated_keys("extra_eval_sets"))
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"`extra_eval_sets` is not valid JSON ({error}); give a JSON object such as '{example}'."
            ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"`extra_eval_sets` must be a JSON object of name -> path or options, such as '{example}'.")
    sets: dict[str, dict[str, Any]] = {}
    for name, entry in value.items():
        if not isinstance(name, str) or not EXTRA_EVAL_SET_NAME.match(name):
            raise ConfigError(
                f"`extra_eval_sets` has a set named {name!r}; a name must be non-empty and made of letters, digits, "
                "`_` and `-` (it becomes part of the metric names, `eval_{name}_t2i_recall@10`)."
            )
        if name.split("_")[0] in RESERVED_SET_NAME_WORDS or name in _EVALUATION_KEYS or name == "mean_recall":
            raise ConfigError(
                f"`extra_eval_sets` name {name!r} collides with the validation split's metric names "
                f"(`eval_{name}_...` would read as one of them); rename the set (e.g. `ref_{name}`)."
            )
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ConfigError(
                f"`extra_eval_sets` entry {name!r} is {entry!r}; give a path or an object of options "
                f"({', '.join(EXTRA_EVAL_SET_KEYS)})."
            )
        for key in entry:
            if key not in EXTRA_EVAL_SET_KEYS:
                raise ConfigError(
                    f"`extra_eval_sets` entry {name!r} has an unknown key `{key}`."
                    f"{did_you_mean(key, EXTRA_EVAL_SET_KEYS)} Its keys can be: {', '.join(EXTRA_EVAL_SET_KEYS)}."
                )
        sources = [key for key in ("path", "dataset_name", "validation_file") if entry.get(key)]
        if len(sources) != 1:
            raise ConfigError(
                f"`extra_eval_sets` entry {name!r} must name its data with exactly one of `path`, `dataset_name` or "
                f"`validation_file`{f' (it has {len(sources)})' if sources else ''}."
            )
        sets[name] = dict(entry)
    _check_metric_keys_are_distinct(list(sets))
    return sets or None


# `json.loads` keeps the last of two equal keys of an object without a word: two sets of one name would report one
# set, two weights of one source would drop one, and a key given twice at the top of a config file would keep its
# second value whatever the reader expects. These say what to do instead.
def _check_metric_keys_are_distinct(names: list[str]) -> None:
    """No two evaluation sets (the validation split included) may report a metric under the same key."""
    owner: dict[str, str] = {}
    for name in [None, *names]:
        for suffix in _evaluation_key_suffixes():
            key = f"eval_{suffix}" if name is None else f"eval_{name}_{suffix}"
            if key in owner:
                first = "the validation split" if owner[key] is None else f"set {owner[key]!r}"
                raise ConfigError(
                    f"`extra_eval_sets` name {name!r} collides with {first}: both would report `{key}`. Rename the "
                    "set."
                )
            owner[key] = name


def _launched_without_an_accelerator() -> bool:
    """Whether this process is one of several a launcher started (`torchrun` sets `LOCAL_RANK`) on a machine with no
    accelerator torch can use."""
    if int(os.environ.get("LOCAL_RANK", -1)) == -1:
        return False
    import torch

    return not torch.accelerator.is_available()


@dataclass
class CLIPTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with CLIP's defaults and clip-trainer's own options."""

    # --- Parent defaults changed for CLIP -------------------------------------------------------------------------
    # The collator needs the raw image and caption columns; the Trainer must not drop them.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator reads raw columns."}
    )
    # CLIP's own AdamW settings (Radford et al. 2021; open_clip): beta2 0.98, eps 1e-6, weight decay 0.2.
    adam_beta2: float = field(
        default=0.98, metadata={"help": "Adam beta2 (CLIP: 0.98).", "bounds": Bounds(0, 1, high_open=True)}
    )
    adam_epsilon: float = field(default=1e-6, metadata={"help": "Adam epsilon (CLIP: 1e-6).", "bounds": Bounds(0)})
    weight_decay: float = field(
        default=0.2,
        metadata={
            "help": "Weight decay; never applied to biases, norms, embeddings or logit_scale.",
            "bounds": Bounds(0),
        },
    )
    optim: str = field(
        default=TrainingArguments.optim,
        metadata={
            "help": "Optimizer: any of transformers' `OptimizerNames` (adamw_torch, adamw_torch_fused, ...), or "
            "`adam` (torch.optim.Adam with L2 weight decay, as the seed project used).",
            "choices": [name.value for name in OptimizerNames] + EXTRA_OPTIMIZERS,
        },
    )
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={
            "help": "Learning-rate schedule after warmup: transformers' names (constant, cosine, linear, ...) or `step` "
            "(multiply by `lr_step_gamma` every `lr_step_size` steps).",
            "choices": [name.value for name in SchedulerType] + EXTRA_SCHEDULERS,
        },
    )
    # Evaluate, log and keep the best and the last checkpoint every epoch, as the seed project did.
    eval_strategy: IntervalStrategy | str = field(
        default="epoch", metadata={"help": "When to evaluate: no, steps or epoch."}
    )
    save_strategy: SaveStrategy | str = field(
        default="epoch", metadata={"help": "When to save a checkpoint: no, steps, epoch or best."}
    )
    save_total_limit: int | None = field(
        default=2,
        metadata={"help": "Checkpoints kept; with load_best_model_at_end the best one is always among them."},
    )
    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log every N optimizer steps (or a fraction of the run).",
            "bounds": Bounds(0, low_open=True, hint="below 1: a fraction of the steps"),
        },
    )
    report_to: None | str | list[str] = field(
        default="tensorboard",
        metadata={"help": "Where to log: tensorboard, wandb, all, none, or a comma-separated list of them."},
    )
    dataloader_num_workers: int = field(
        default=2,
        metadata={
            "help": "Worker processes that decode and resize images. 0 decodes in the main process.",
            "bounds": Bounds(0, hint="0: decode in the main process"),
        },
    )
    dataloader_persistent_workers: bool = field(
        default=True, metadata={"help": "Keep data workers alive between epochs and evaluations."}
    )
    decoded_image_cache_mb: float = field(
        default=1024,
        metadata={
            "help": "Decode a loaded (not streamed) training set's images once, before the first step, and keep "
            "their pixels in memory when they take at most this many MiB per process and the run reads each image at "
            "least twice per process without augmentation or a teacher's own image input (the demo's 3,641 training "
            "images at 64 px take 43 MiB; 10,000 at 224 px, 1.4 GiB). 0 decodes every image at every epoch.",
            "bounds": Bounds(0, hint="0: decode at every epoch"),
        },
    )
    # transformers' filter reads every step's loss on the host (`torch.isnan(loss)`), a device synchronisation per
    # step. The trainer does the same on the device (a non-finite step's loss is logged as the mean of the finite ones
    # since the last log), and the non-finite guard (`max_nonfinite_steps`) skips such a step's update and counts it.
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "transformers' host-side filter of NaN/inf training losses (a device sync per step). Off: "
            "clip-trainer filters the logged loss on the device instead; non-finite steps are skipped either way."
        },
    )

    # --- clip-trainer's own options -------------------------------------------------------------------------------
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an `output_dir` that holds another run's checkpoints (they are deleted first) or a "
            "saved model (replaced by this run's; what the earlier run wrote that this one may not, such as onnx/, "
            "adapter/, dropped_rows.jsonl, wise_ft_results.json, is removed; other files stay); evaluate into a "
            "folder that holds a saved model (its tokenizer, processor and results are replaced). Without it such a "
            "run stops and says how to resume or where else to write."
        },
    )
    freeze_vision_model: bool = field(
        default=False, metadata={"help": "Keep the image tower's weights fixed (the seed's freeze_image_encoder)."}
    )
    freeze_text_model: bool = field(default=False, metadata={"help": "Keep the text tower's weights fixed."})
    unfreeze_after_steps: int | None = field(
        default=None,
        metadata={
            "help": "Unfreeze the frozen tower(s) after this many optimizer steps. Empty: frozen for the whole run.",
            "bounds": Bounds(0),
        },
    )
    zeroshot_templates: list[str] | None = field(
        default=None,
        metadata={"help": "Prompt templates for zero-shot classification, each with one `{}`. Empty: a default list."},
    )
    lr_step_size: int = field(
        default=1000, metadata={"help": "For lr_scheduler_type=step: steps between decays.", "bounds": Bounds(1)}
    )
    lr_step_gamma: float = field(
        default=0.1,
        metadata={"help": "For lr_scheduler_type=step: decay factor.", "bounds": Bounds(0, 1, low_open=True)},
    )
    max_logit_scale: float = field(
        default=100.0,
        metadata={
            "help": "Upper bound of exp(logit_scale) (the inverse temperature) with the softmax loss; CLIP clamps it "
            "at 100. The sigmoid loss is not clamped (SigLIP is not: its checkpoints sit above 100).",
            "bounds": Bounds(1, low_open=True, hint="CLIP uses 100"),
        },
    )
    gather_negatives: bool = field(
        default=True,
        metadata={
            "help": "Under distributed training, contrast each process's pairs against every process's batch "
            "(exact global-batch loss and gradients). False: negatives from the local batch only."
        },
    )
    loss_type: str = field(
        default="auto",
        metadata={
            "help": "The contrastive loss: `auto` (the family's own: softmax for CLIP and dual encoders, sigmoid for "
            "SigLIP), `softmax` (CLIP's symmetric cross-entropy), or `sigmoid` (SigLIP's, with the model's learned "
            "`logit_bias`; needs a model that has one).",
            "choices": ["auto", "softmax", "sigmoid"],
        },
    )
    sigmoid_ring_exchange: bool = field(
        default=False,
        metadata={
            "help": "With the sigmoid loss under DDP: pass the text embeddings round a ring of the processes instead "
            "of all-gathering them (memory of local x local logits; same loss and gradients)."
        },
    )
    accumulation_mode: str = field(
        default="cached",
        metadata={
            "help": "With gradient_accumulation_steps > 1: `cached` contrasts every pair of the whole accumulated "
            "batch (per_device_train_batch_size x steps negatives, memory of one micro-batch: the GradCache "
            "method); `independent` sums the micro-batches' own losses (fewer negatives, as plain accumulation).",
            "choices": ["cached", "independent"],
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations without improvement of `metric_for_best_model`.",
            "bounds": Bounds(1),
        },
    )
    early_stopping_threshold: float = field(
        default=0.0,
        metadata={
            "help": "Smallest change of `metric_for_best_model` that counts as an improvement (the seed's min_delta).",
            "bounds": Bounds(0),
        },
    )
    retrieval_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Queries ranked at once during retrieval evaluation (bounds its memory).",
            "bounds": Bounds(1),
        },
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={
            "help": "Peak TFLOP/s of one device in the training precision (e.g. 989 for an H100's dense bf16); when "
            "set, training logs report `mfu`, model FLOPs utilisation, next to `samples_per_second`.",
            "bounds": Bounds(0, low_open=True, hint="e.g. 989 for an H100's dense bf16"),
        },
    )
    export_onnx: bool = field(
        default=False,
        metadata={
            "help": "At the end of a training run, export the model to output_dir/onnx (vision_model.onnx and "
            "text_model.onnx, checked with ONNX Runtime against PyTorch). Needs the `onnx` extra."
        },
    )
    save_open_clip: bool = field(
        default=False,
        metadata={
            "help": "At the end of a training run, also write open_clip_config.json and open_clip_model.safetensors "
            'into output_dir, so that open_clip.create_model_and_transforms("local-dir:OUTPUT_DIR") loads the model '
            "with its tokenizer and preprocessing. CLIP models only; writing needs no open_clip."
        },
    )
    max_nonfinite_steps: int = field(
        default=5,
        metadata={
            "help": "Optimizer steps whose loss or gradients are NaN/inf are skipped (weights untouched) and counted "
            "(`nonfinite_steps_skipped`); after this many in a row the run saves a checkpoint and stops with an "
            "error. 0: never stop.",
            "bounds": Bounds(0, hint="0: never stop"),
        },
    )
    # --- Distillation from a teacher ---------------------------------------------------------------------------------
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Distil from this model (Hub id or folder; any family clip-trainer loads, any size, with its own "
            "image processor and tokenizer): the loss adds `distillation_weight` x the KL divergence from the "
            "teacher's image-to-text and text-to-image similarity distributions over each batch to the student's. "
            "The teacher runs frozen, in eval mode, in the training precision, on each training device."
        },
    )
    distill_from_pretrained: bool = field(
        default=False,
        metadata={
            "help": "Distil from the starting model itself (a frozen copy of the pretrained weights, reading the same "
            "inputs), so that a fine-tune is pulled towards what it knew. Needs `model_name_or_path`."
        },
    )
    teacher_embeddings: str | None = field(
        default=None,
        metadata={
            "help": "Distil from a teacher's embeddings stored by a preparation run (`--prepare_only true "
            "--teacher_model_name_or_path TEACHER` writes teacher_embeddings.safetensors beside the prepared data): "
            "the folder or the file. No teacher model is loaded or run; each image is the teacher's view of it "
            "unaugmented. Train from that run's folder (`dataset_name`), with the same `image_id_column`."
        },
    )
    distillation_weight: float | None = field(
        default=None,
        metadata={
            "help": "What the distillation KL divergence is multiplied by before it is added to the contrastive loss. "
            "Empty: 1 with a teacher. Needs `teacher_model_name_or_path`, `teacher_embeddings` or "
            "`distill_from_pretrained`.",
            "bounds": Bounds(0, low_open=True, hint="empty: 1 with a teacher"),
        },
    )
    distillation_temperature: float | None = field(
        default=None,
        metadata={
            "help": "Softmax temperature of both similarity distributions in the distillation term, softmax(cosine / "
            "temperature); the student's learned temperature then takes no part in it. Empty: each model's own "
            "learned temperature, 1 / exp(logit_scale), so that the student also learns the teacher's sharpness.",
            "bounds": Bounds(
                0, low_open=True, hint="e.g. 0.05 (an inverse temperature of 20); empty: each model's own"
            ),
        },
    )
    distillation_intra_modal_weight: float | None = field(
        default=None,
        metadata={
            "help": "Adds to the distillation term this weight x the KL divergence from the teacher's image-to-image "
            "and text-to-text similarity distributions over each batch (each row over the other rows) to the "
            "student's: which images and captions the teacher finds alike. Most useful when the teacher learned from "
            "more data than the student trains on. Empty: 0 (the image-to-text and text-to-image term alone).",
            "bounds": Bounds(0, hint="e.g. 1; empty: 0"),
        },
    )
    # --- Fine-tuning without forgetting: partial locking, layer-wise rates, WiSE-FT, LoRA ---------------------------
    vision_trainable_layers: int | None = field(
        default=None,
        metadata={
            "help": "Train only the top N encoder layers of the image tower, with its final norm and projection; its "
            "embeddings and lower layers stay fixed. 0: only the final norm and projection train (LiT-style lock with "
            "a trainable head; `freeze_vision_model` fixes them too). Empty: every layer trains.",
            "bounds": Bounds(0, hint="0: only the final norm and projection train"),
        },
    )
    text_trainable_layers: int | None = field(
        default=None,
        metadata={
            "help": "The same for the text tower: its top N layers, final norm and projection train.",
            "bounds": Bounds(0, hint="0: only the final norm and projection train"),
        },
    )
    layerwise_lr_decay: float | None = field(
        default=None,
        metadata={
            "help": "Layer-wise learning-rate decay d in (0, 1]: in each tower the final norm and projection (and "
            "logit_scale) train at `learning_rate`, the k-th encoder layer from the top at learning_rate x d^k, the "
            "embeddings at learning_rate x d^(layers + 1). Empty: one rate for all.",
            "bounds": Bounds(0, 1, low_open=True, hint="e.g. 0.75"),
        },
    )
    wise_ft_alphas: list[float] | None = field(
        default=None,
        metadata={
            "help": "WiSE-FT: after training, evaluate the weights (1 - a) x pretrained + a x fine-tuned for each a "
            "(0 and 1 are always added) on every evaluation set; the table goes to wise_ft_results.json, the "
            "in-domain vs reference curve to wise_ft.png, and the model saved is the a chosen by "
            "`wise_ft_min_retention` (or `wise_ft_alpha`). Needs `model_name_or_path`.",
            "bounds": Bounds(0, 1, hint=f"{WISE_FT_MIX}; e.g. [0.25, 0.5, 0.75]"),
        },
    )
    wise_ft_alpha: float | None = field(
        default=None,
        metadata={
            "help": "Save the WiSE-FT interpolation at this a in [0, 1] (with or without `wise_ft_alphas`). Empty: "
            "chosen by the rule of `wise_ft_min_retention`.",
            "bounds": Bounds(0, 1, hint=WISE_FT_MIX),
        },
    )
    wise_ft_min_retention: float = field(
        default=0.9,
        metadata={
            "help": "WiSE-FT's rule: among the evaluated a, save the one with the best in-domain (validation) metric "
            "whose metric on every `extra_eval_sets` set stays at least this share of the pretrained model's (a=0). "
            "The metric is `metric_for_best_model` without its set prefix when greater is better, else mean_recall. "
            "Needs `wise_ft_alphas` (or `wise_ft_alpha`).",
            "bounds": Bounds(0, 1, hint="e.g. 0.9"),
        },
    )
    lora_rank: int | None = field(
        default=None,
        metadata={
            "help": "Train LoRA adapters of this rank (through peft; `pip install 'clip-trainer[lora]'`) instead of "
            "the model's weights; the saved model is the plain CLIPModel with the adapters merged, and the adapter "
            "is saved beside it in `output_dir/adapter`. Empty: no LoRA.",
            "bounds": Bounds(1),
        },
    )
    lora_alpha: float | None = field(
        default=None,
        metadata={
            "help": "LoRA's scale numerator: the update is (lora_alpha / lora_rank) x B A. Empty: lora_rank. Needs "
            "`lora_rank`.",
            "bounds": Bounds(0, low_open=True, hint="empty: `lora_rank`"),
        },
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout on the LoRA adapters' input. Needs `lora_rank`.",
            "bounds": Bounds(0, 1, high_open=True),
        },
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGET_MODULES),
        metadata={
            "help": "Modules that get adapters, matched by the end of their name (peft's rule); default: the "
            "attention projections of both towers (and, for BERT-style towers such as Chinese-CLIP's, AltCLIP's "
            "and a dual encoder's ViT or BERT, their `query`, `key`, `value` and `attention.output.dense`), not "
            "the modules inside a "
            "torch MultiheadAttention (SigLIP's pooling head), which never calls them. Needs `lora_rank`."
        },
    )

    # --- An exponential moving average of the weights ---------------------------------------------------------------
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "Keep an exponential moving average (EMA) of the trainable weights, ema = d x ema + (1 - d) x "
            "weights after every optimizer step (in float32, starting from the weights training starts from). It is "
            "saved in every checkpoint (`ema.safetensors`) and evaluated beside the weights at every evaluation "
            "(`eval_ema_*`, validation split). The model saved is the EMA when `metric_for_best_model` is an "
            "`eval_ema_*` metric, else the weights themselves. It averages over about 1 / (1 - d) steps: choose d so "
            "that this is well below the run's steps (0.99 for ~1,000 steps, 0.999 for 10,000 and more). Empty: no "
            "EMA.",
            "bounds": Bounds(0, 1, low_open=True, high_open=True, hint="e.g. 0.999"),
        },
    )

    # --- Patch dropout (FLIP) ----------------------------------------------------------------------------------------
    patch_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Patch dropout (FLIP): while training, each image keeps a random max(1, int(patches x (1 - p))) "
            "of its patch tokens (and its class token), so the image tower runs on fewer tokens; evaluation and "
            "export see every patch. Drawn per image from the run's seed, other patches on every step and process. "
            "CLIP and SigLIP models and dual encoders with a CLIP, SigLIP or ViT image tower. 0: off.",
            "bounds": Bounds(0, 1, high_open=True, hint="FLIP trains with 0.5"),
        },
    )
    patch_dropout_off_after_steps: int | None = field(
        default=None,
        metadata={
            "help": "With `patch_dropout`: from this optimizer step on, train with every patch (FLIP's last, unmasked "
            "phase). Empty: patch dropout for the whole run.",
            "bounds": Bounds(0),
        },
    )

    def __post_init__(self) -> None:
        # Every field's type, choices and bounds, the parent's too, before transformers reads any of them.
        check_field_values(self)
        if self.teacher_model_name_or_path is not None and not self.teacher_model_name_or_path.strip():
            self.teacher_model_name_or_path = None
        if self.teacher_embeddings is not None and not self.teacher_embeddings.strip():
            self.teacher_embeddings = None  # an empty value on the command line unsets a config file's
        self._check_steps()
        self._check_fine_tuning_options()
        # `TrainingArguments` accepts only its own optimizer and scheduler names; ours are swapped out for a
        # stand-in while it validates, then put back for the trainer to build.
        extra_optim = self.optim if self.optim in EXTRA_OPTIMIZERS else None
        extra_scheduler = self.lr_scheduler_type if self.lr_scheduler_type in EXTRA_SCHEDULERS else None
        if extra_optim:
            self.optim = "adamw_torch"
        if extra_scheduler:
            self.lr_scheduler_type = "constant"
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if self.early_stopping_patience is not None and self.metric_for_best_model is None:
            self.metric_for_best_model = "eval_loss"
        if self.early_stopping_patience is not None:
            self.load_best_model_at_end = True
            save, evaluate = (
                str(getattr(self.save_strategy, "value", self.save_strategy)),
                str(getattr(self.eval_strategy, "value", self.eval_strategy)),
            )
            if save not in (evaluate, "best") and evaluate != "no":
                # transformers would stop on `load_best_model_at_end`, an option the user never set.
                raise ConfigError(
                    f"`early_stopping_patience` keeps the best checkpoint (it turns on `load_best_model_at_end`), "
                    f"which needs a checkpoint at every evaluation: `save_strategy` is {save} and `eval_strategy` "
                    f"{evaluate}; set --save_strategy {evaluate} (or best)."
                )
        if self.dataloader_num_workers == 0:
            # Our default of persistent workers means nothing without workers, and torch refuses the pair.
            self.dataloader_persistent_workers = False
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            # transformers assumes "greater is better" for anything not ending in "loss"; a rank is lower-better.
            metric = self.metric_for_best_model
            self.greater_is_better = not (metric.endswith("loss") or metric.endswith("median_rank"))
        if self.deepspeed and importlib.util.find_spec("deepspeed") is None:
            # transformers would stop in its own checks with a traceback of a missing distribution.
            raise ConfigError(
                f"`deepspeed` is set ({self.deepspeed}), but DeepSpeed is not installed in this environment; install "
                'it with clip-trainer\'s extra (`pip install torch==2.13.0 -e ".[deepspeed]"`, or your CUDA torch '
                "first), or drop `deepspeed`."
            )
        if not self.use_cpu and not self.deepspeed and _launched_without_an_accelerator():
            # `torchrun` on a machine without an accelerator: accelerate counts the processes (and picks gloo) only
            # for a CPU run. Without `use_cpu` each process would take itself for the only one: both would claim the
            # output folder, save, and stop at the first gather.
            self.use_cpu = True
        default_accelerator_config = self.accelerator_config is None
        super().__post_init__()
        if default_accelerator_config and self.dataloader_pin_memory:
            # Batches reach the device by non-blocking copies from pinned memory. accelerate's default, a blocking
            # copy, waits at every step for the device to finish the previous step before the host can go on.
            self.accelerator_config.non_blocking = True
        if extra_optim:
            self.optim = extra_optim
        if extra_scheduler:
            self.lr_scheduler_type = extra_scheduler
        self._warn_of_options_without_effect()
        if self.patch_dropout_off_after_steps is not None and not self.patch_dropout:
            raise ConfigError(
                "`patch_dropout_off_after_steps` is set but `patch_dropout` is 0; set `patch_dropout` (e.g. 0.5), or "
                "remove `patch_dropout_off_after_steps`."
            )
        if self.unfreeze_after_steps is not None and not (self.freeze_vision_model or self.freeze_text_model):
            raise ConfigError(
                "`unfreeze_after_steps` is set but no tower is frozen; set `freeze_vision_model` or "
                "`freeze_text_model`, or remove `unfreeze_after_steps`."
            )
        if self.freeze_vision_model and self.freeze_text_model and self.unfreeze_after_steps is None:
            raise ConfigError(
                "Both towers are frozen (`freeze_vision_model` and `freeze_text_model`), so nothing but the "
                "temperature would train; unset one of them or set `unfreeze_after_steps`."
            )
        for template in self.zeroshot_templates or []:
            if template.count("{}") != 1:
                raise ConfigError(
                    f"zero-shot template {template!r} must contain exactly one `{{}}` for the class name."
                )

    def _warn_of_options_without_effect(self) -> None:
        """Tuning values of a feature that is off would be ignored without a word (a feature's options that would
        change what trains are refused instead, in `_check_fine_tuning_options` and above)."""
        defaults = {item.name: field_default(item) for item in fields(self)}
        threshold = self.early_stopping_threshold != defaults["early_stopping_threshold"]
        if self.early_stopping_patience is None and threshold:
            _warn_ignored(["`early_stopping_threshold`"], "`early_stopping_patience`", "which is not set")
        scheduler = getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)
        step_options = [f"`{key}`" for key in ("lr_step_size", "lr_step_gamma") if getattr(self, key) != defaults[key]]
        if step_options and scheduler != "step":
            _warn_ignored(step_options, "`lr_scheduler_type step`", f"but the scheduler is {scheduler}")

    def _check_fine_tuning_options(self) -> None:
        """LoRA against partial locking, and its package: what can be checked without the model (the values'
        types and ranges are checked by `check_field_values`)."""
        defaults = {item.name: field_default(item) for item in fields(self)}
        if self.wise_ft_alphas is None and self.wise_ft_alpha is None:
            if self.wise_ft_min_retention != defaults["wise_ft_min_retention"]:
                raise ConfigError(
                    f"`wise_ft_min_retention` is {self.wise_ft_min_retention:g}, but nothing is interpolated: it "
                    "chooses among `wise_ft_alphas`; add them (e.g. --wise_ft_alphas 0.25 0.5 0.75), or drop it."
                )
        if self.lora_rank is None:
            # A LoRA setting without `lora_rank` would be ignored, and the run would fine-tune every weight.
            given = [
                f"`{key}`"
                for key in ("lora_alpha", "lora_dropout", "lora_target_modules")
                if (list(value) if isinstance(value := getattr(self, key), tuple) else value) != defaults[key]
            ]
            if given:
                raise ConfigError(
                    f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} set, but `lora_rank` is not, so "
                    "there would be no adapters and every weight would train; add --lora_rank (e.g. 8), or drop "
                    f"{'it' if len(given) == 1 else 'them'}."
                )
            return
        if not is_peft_installed():
            raise ConfigError(
                "`lora_rank` is set but peft, which trains the adapters, is not installed: "
                "pip install 'clip-trainer[lora]' (or unset `lora_rank`)."
            )
        if not self.lora_target_modules:
            raise ConfigError(
                "`lora_target_modules` is empty; name the modules that get adapters (e.g. q_proj v_proj)."
            )
        locks = [
            key
            for key in ("freeze_vision_model", "freeze_text_model", "vision_trainable_layers", "text_trainable_layers")
            if getattr(self, key) not in (None, False)
        ]
        if locks:
            raise ConfigError(
                f"`lora_rank` trains adapters only, so {', '.join(f'`{key}`' for key in locks)} has nothing to lock; "
                "choose where adapters go with `lora_target_modules`, or drop `lora_rank`."
            )

    def _check_steps(self) -> None:
        """A run that would train nothing: each value is in range, but together they make no step."""
        if self.max_steps == 0:
            raise ConfigError("`max_steps` is 0, so nothing would train; set a positive number, or -1 to use epochs.")
        if self.max_steps < 0 and self.num_train_epochs <= 0:
            raise ConfigError(
                f"`num_train_epochs` is {self.num_train_epochs}, so nothing would train; set a positive number of "
                "epochs or `max_steps`."
            )

    def __getstate__(self) -> dict[str, Any]:
        # The Trainer pickles these arguments into every `training_args.bin` (`torch.save(self.args, ...)` in
        # `_save` and `_push_from_checkpoint`), and pushes that file to the Hub; `to_dict` redacts `*_token` fields
        # but pickling does not. Every pickled copy therefore leaves the tokens out, as `to_dict` does.
        state = self.__dict__.copy()
        for name in state:
            if name.endswith("_token"):
                state[name] = None
        return state

    # Copies in memory keep the tokens (only pickles drop them): `copy` would otherwise go through `__getstate__`.
    def __copy__(self) -> CLIPTrainingArguments:
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: dict[int, Any]) -> CLIPTrainingArguments:
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    @property
    def log_max_logit_scale(self) -> float:
        return math.log(self.max_logit_scale)


ARGUMENT_CLASSES = (ModelArguments, DataArguments, CLIPTrainingArguments)
