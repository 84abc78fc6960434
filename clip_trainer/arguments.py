"""Argument dataclasses and the config-file-plus-overrides command line.

`python run_clip.py a.json b.json --learning_rate 1e-4` applies the JSON files left to right, then the flags.
Every field of [`ModelArguments`], [`DataArguments`] and [`CLIPTrainingArguments`] (which is a
`transformers.TrainingArguments`) can be set either way.
"""

from __future__ import annotations

import copy
import difflib
import glob
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
from transformers.training_args import OptimizerNames


class ConfigError(ValueError):
    """A mistake in the run's configuration. The command line prints its message alone, with no traceback."""


ATTENTION_IMPLEMENTATIONS = ["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"]
# Optimizers and schedules the seed project offered that `TrainingArguments` lacks; the trainer builds them.
EXTRA_OPTIMIZERS = ["adam"]
EXTRA_SCHEDULERS = ["step"]


@dataclass
class ModelArguments:
    """Which CLIP model to train, and how to change it before training."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local folder of a pretrained CLIP model (e.g. openai/clip-vit-base-patch32). Leave "
            "empty to build a new model from `config_name`."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "A CLIPConfig (Hub id, folder or config.json path). With `model_name_or_path` it replaces the "
            "model's config; without it a model is built from scratch with random weights."
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
        metadata={"help": "Vocabulary size of the tokenizer trained on the captions when none is given."},
    )
    freeze_vision_model: bool = field(
        default=False, metadata={"help": "Keep the image tower's weights fixed (the seed's freeze_image_encoder)."}
    )
    freeze_text_model: bool = field(default=False, metadata={"help": "Keep the text tower's weights fixed."})
    unfreeze_after_steps: int | None = field(
        default=None,
        metadata={
            "help": "Unfreeze the frozen tower(s) after this many optimizer steps. Empty: frozen for the whole run."
        },
    )
    dropout: float | None = field(
        default=None,
        metadata={
            "help": "Dropout probability set on both towers' configs (CLIP applies it to attention weights, its only "
            "dropout site). Empty: keep the model's."
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
        if self.better_transformer:
            warnings.warn(
                "`better_transformer` is deprecated: optimum's BetterTransformer was removed and refused training "
                "anyway. Using attn_implementation='sdpa', which gives the same fused attention.",
                FutureWarning,
                stacklevel=2,
            )
            self.attn_implementation = "sdpa"
        if self.model_name_or_path is None and self.config_name is None:
            raise ConfigError(
                "No model given: set `model_name_or_path` (e.g. openai/clip-vit-base-patch32) to fine-tune, or "
                "`config_name` (a CLIPConfig) to train from scratch."
            )
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"`dropout` is {self.dropout}; it must be in [0, 1).")
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
            "help": "csv, json/jsonl or parquet file of training pairs, or a glob of such shards "
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
    zeroshot_templates: list[str] | None = field(
        default=None,
        metadata={"help": "Prompt templates for zero-shot classification, each with one `{}`. Empty: a default list."},
    )
    validation_split_percentage: float = field(
        default=15,
        metadata={"help": "Percent of the training data held out for validation when there is no validation split."},
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest caption in tokens; longer ones are truncated. Default and upper bound: the text model's positions."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many validation pairs."})
    on_bad_rows: str = field(
        default="skip",
        metadata={
            "help": "What to do with rows whose image is missing/empty or whose caption is empty: skip them with a "
            "logged summary, or stop before training with the same report.",
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
        metadata={"help": "Images with more pixels than this are skipped as likely decompression bombs."},
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
            "help": "With `streaming`: rows held in the shuffle buffer. They are kept encoded, so the buffer takes "
            "about this many times the average image file size of memory."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used by `datasets` to prepare the data."}
    )

    def __post_init__(self) -> None:
        # An empty value on the command line (--dataset_name "") unsets what a config file set.
        for key in ("dataset_name", "train_file", "validation_file"):
            if getattr(self, key) == "":
                setattr(self, key, None)
        if self.dataset_name is not None and self.train_file is not None:
            raise ConfigError(
                f"Both `dataset_name` ({self.dataset_name!r}) and `train_file` ({self.train_file!r}) are set; keep one "
                '(on the command line, --dataset_name "" unsets a config file\'s dataset).'
            )
        if self.dataset_name is None and self.train_file is None:
            raise ConfigError(
                "No training data given: set `dataset_name` (a Hub id, a prepared folder, or `emoji`) or `train_file`."
            )
        for key in ("train_file", "validation_file"):
            path = getattr(self, key)
            if path is None:
                continue
            if Path(path).suffix.lower() not in {".csv", ".json", ".jsonl", ".parquet"}:
                raise ConfigError(f"`{key}` is {path!r}; it must be a .csv, .json, .jsonl or .parquet file.")
            if glob.has_magic(path):  # shards: data/train-*.parquet
                if not glob.glob(path):
                    raise ConfigError(f"`{key}` is {path!r}, a pattern that matches no file.")
            elif not os.path.exists(path):
                raise ConfigError(f"`{key}` is {path!r}, which does not exist.")
        if self.shuffle_buffer_size < 1:
            raise ConfigError(f"`shuffle_buffer_size` is {self.shuffle_buffer_size}; it must be at least 1.")
        if not 0 < self.validation_split_percentage < 100:
            raise ConfigError(
                f"`validation_split_percentage` is {self.validation_split_percentage}; it must be between 0 and 100."
            )
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise ConfigError(
                f"`max_seq_length` is {self.max_seq_length}; it must be at least 2 (start and end token)."
            )
        for template in self.zeroshot_templates or []:
            if template.count("{}") != 1:
                raise ConfigError(
                    f"zero-shot template {template!r} must contain exactly one `{{}}` for the class name."
                )


@dataclass
class CLIPTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with CLIP's defaults and clip-trainer's own options."""

    # --- Parent defaults changed for CLIP -------------------------------------------------------------------------
    # The collator needs the raw image and caption columns; the Trainer must not drop them.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator reads raw columns."}
    )
    # CLIP's own AdamW settings (Radford et al. 2021; open_clip): beta2 0.98, eps 1e-6, weight decay 0.2.
    adam_beta2: float = field(default=0.98, metadata={"help": "Adam beta2 (CLIP: 0.98)."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "Adam epsilon (CLIP: 1e-6)."})
    weight_decay: float = field(
        default=0.2,
        metadata={"help": "Weight decay; never applied to biases, norms, embeddings or logit_scale."},
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
        default=10, metadata={"help": "Log every N optimizer steps (or a fraction of the run)."}
    )
    report_to: None | str | list[str] = field(
        default="tensorboard",
        metadata={"help": "Where to log: tensorboard, wandb, all, none, or a comma-separated list of them."},
    )
    dataloader_num_workers: int = field(
        default=2, metadata={"help": "Worker processes that decode and resize images. 0 decodes in the main process."}
    )
    dataloader_persistent_workers: bool = field(
        default=True, metadata={"help": "Keep data workers alive between epochs and evaluations."}
    )

    # --- clip-trainer's own options -------------------------------------------------------------------------------
    lr_step_size: int = field(default=1000, metadata={"help": "For lr_scheduler_type=step: steps between decays."})
    lr_step_gamma: float = field(default=0.1, metadata={"help": "For lr_scheduler_type=step: decay factor."})
    max_logit_scale: float = field(
        default=100.0,
        metadata={"help": "Upper bound of exp(logit_scale) (the inverse temperature); CLIP clamps it at 100."},
    )
    gather_negatives: bool = field(
        default=True,
        metadata={
            "help": "Under distributed training, contrast each process's pairs against every process's batch "
            "(exact global-batch loss and gradients). False: negatives from the local batch only."
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
        metadata={"help": "Stop after this many evaluations without improvement of `metric_for_best_model`."},
    )
    early_stopping_threshold: float = field(
        default=0.0,
        metadata={
            "help": "Smallest change of `metric_for_best_model` that counts as an improvement (the seed's min_delta)."
        },
    )
    retrieval_chunk_size: int = field(
        default=1024, metadata={"help": "Queries ranked at once during retrieval evaluation (bounds its memory)."}
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={
            "help": "Peak TFLOP/s of one device in the training precision (e.g. 989 for an H100's dense bf16); when "
            "set, training logs report `mfu`, model FLOPs utilisation, next to `samples_per_second`."
        },
    )
    max_nonfinite_steps: int = field(
        default=5,
        metadata={
            "help": "Optimizer steps whose loss or gradients are NaN/inf are skipped (weights untouched) and counted "
            "(`nonfinite_steps_skipped`); after this many in a row the run saves a checkpoint and stops with an "
            "error. 0: never stop."
        },
    )

    def __post_init__(self) -> None:
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
        if self.dataloader_num_workers == 0:
            # Our default of persistent workers means nothing without workers, and torch refuses the pair.
            self.dataloader_persistent_workers = False
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            # transformers assumes "greater is better" for anything not ending in "loss"; a rank is lower-better.
            metric = self.metric_for_best_model
            self.greater_is_better = not (metric.endswith("loss") or metric.endswith("median_rank"))
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
        if self.max_logit_scale <= 1:
            raise ConfigError(f"`max_logit_scale` is {self.max_logit_scale}; it must be above 1 (CLIP uses 100).")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError(f"`early_stopping_patience` is {self.early_stopping_patience}; it must be at least 1.")
        if self.lr_step_size < 1:
            raise ConfigError(f"`lr_step_size` is {self.lr_step_size}; it must be at least 1.")
        if self.max_nonfinite_steps < 0:
            raise ConfigError(
                f"`max_nonfinite_steps` is {self.max_nonfinite_steps}; it must be 0 (never stop) or more."
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


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(ARGUMENT_CLASSES)
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


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" Did you mean `{match[0]}`?" if match else ""


def _read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path!r} does not exist.")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"Config file {path!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path!r} must hold one JSON object of option names and values.")
    return data


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, CLIPTrainingArguments]:
    """Parses `[CONFIG.json ...] [--flag value ...]` into the three argument dataclasses.

    Args:
        argv (`list[str]`, *optional*):
            The command line without the program name; defaults to `sys.argv[1:]`.

    Raises:
        [`ConfigError`]: for an unknown key or flag (naming the closest valid one), a missing or malformed config
            file, or a value that fails validation.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    valid_keys = sorted(f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init)

    config_files = []
    while argv and argv[0].endswith(".json") and not argv[0].startswith("-"):
        config_files.append(argv.pop(0))
    merged: dict[str, Any] = {}
    for path in config_files:
        for key, value in _read_config_file(path).items():
            if key not in valid_keys:
                raise ConfigError(f"Unknown key `{key}` in {path}.{_closest(key, valid_keys)}")
            merged[key] = value
    # Values from files become the parser's defaults, so that flags on the command line win.
    parser.set_defaults(**merged)
    # Required fields (output_dir has a default in transformers 5) need no special handling.
    try:
        namespace, remaining = parser.parse_known_args(argv)
    except SystemExit:
        raise
    if remaining:
        flag = next((arg for arg in remaining if arg.startswith("-")), remaining[0])
        name = flag.lstrip("-").split("=")[0]
        hint = _closest(name, valid_keys)
        raise ConfigError(
            f"Unknown option `{flag}`.{hint}" if flag.startswith("-") else f"Unexpected argument `{flag}`."
        )
    # A run that names none of do_train/do_eval/do_predict trains (and evaluates when eval_strategy asks for it).
    # Decided on the raw options: TrainingArguments turns do_eval on by itself whenever eval_strategy is not "no".
    stages = ("do_train", "do_eval", "do_predict")
    if not any(stage in merged or f"--{stage}" in argv for stage in stages):
        namespace.do_train = True
    outputs = []
    try:
        for cls in ARGUMENT_CLASSES:
            names = {f.name for f in fields(cls) if f.init}
            values = {name: value for name, value in vars(namespace).items() if name in names}
            outputs.append(cls(**values))
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        # TrainingArguments validates with ValueError; its messages name the fields.
        raise ConfigError(str(error)) from None
    return tuple(outputs)  # type: ignore[return-value]
