"""The model card (`README.md`) pushed with a trained CLIP model.

`transformers.Trainer.create_model_card` writes a generic card: the metrics of the last log and every hyperparameter.
A CLIP model needs a card that says what it is for and how well it does it: what it was trained and evaluated on,
counted; retrieval recall both ways and zero-shot accuracy (with the prompts used, the balanced accuracy and the
majority-class baseline), before and after training; the model's size and the settings the user gave; the training
curves; and code that runs zero-shot classification and retrieval from where the model is (its Hub id, or the output
folder as the user named it), truncating texts to the model's positions. The metadata goes through `huggingface_hub.ModelCardData`, so the Hub indexes
the model under its task, library, datasets and base model.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from accelerate import PartialState
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import TrainingArguments
from transformers.utils import logging

from .metrics import METRICS, METRICS_BY_NAME, MetricInfo

if TYPE_CHECKING:
    from .trainer import CLIPContrastiveTrainer

logger = logging.get_logger(__name__)

__all__ = [
    "MODEL_CARD_FILENAME",
    "CLIPModelCardData",
    "complete_card_data",
    "data_description",
    "evaluation_origin",
    "given_settings",
    "model_architecture",
    "non_default_training_arguments",
    "write_model_card",
]

MODEL_CARD_FILENAME = "README.md"

_DEFAULT_TAGS = ("clip", "clip-trainer", "contrastive-learning", "zero-shot-image-classification")

# Arguments that locate or publish the run rather than shape it: they say nothing about how the model was trained,
# and the hub ones name the repository the card is already in.
_NOT_HYPERPARAMETERS = frozenset(
    {"output_dir", "logging_dir", "overwrite_output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id"}
)
_NOT_HYPERPARAMETER_PREFIXES = ("hub_",)
# Settings a user gives that say nothing about the model either: where downloads are cached, and which stages ran.
_NOT_SETTINGS = frozenset({"cache_dir", "do_train", "do_eval", "do_predict", "prepare_only"})
# Fields of accelerate's `AcceleratorConfig` that only decide how batches reach the device (clip-trainer sets them
# itself: non-blocking copies from pinned memory, each process reading its own shards of a stream); the batches and
# the maths are the same either way, so they are no hyperparameter.
_TRANSPORT_SETTINGS = frozenset({"non_blocking", "dispatch_batches", "use_configured_state"})

# Strings shaped like Hugging Face user or organization tokens. Keys holding tokens are dropped by name; this is the
# second line of defence, for a token that arrives under a name we could not foresee.
_TOKEN_PATTERN = re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{20,}\b")


# --- Hyperparameters -------------------------------------------------------------------------------------------------


def _is_secret(key: str) -> bool:
    return "token" in key.lower()


def _render(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A config object (accelerate's `AcceleratorConfig`): what differs from its defaults, not its repr.
        changed = _changed_config_fields(value)
        return ", ".join(f"{key}={item}" for key, item in changed.items()) or "defaults"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, list | tuple | set | frozenset):
        # An empty list is how `TrainingArguments` stores "none" (`report_to="none"` becomes `[]`).
        return ", ".join(_render(item) for item in value) if value else "none"
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        # `TrainingArguments` stores some counts as floats (`logging_steps`, which may be a fraction): 25, not 25.0.
        return str(int(value))
    return str(value)


def _changed_config_fields(config: Any) -> dict[str, str]:
    """The fields of a config dataclass (`AcceleratorConfig`) that differ from its defaults, transport aside."""
    changed = non_default_training_arguments(config)
    return {key: value for key, value in changed.items() if key not in _TRANSPORT_SETTINGS}


def _same(value: Any, default: Any) -> bool:
    if default is dataclasses.MISSING:
        return False
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and type(value) is type(default):
        return not _changed_config_fields(value)
    try:
        return bool(value == default)
    except Exception:
        # An incomparable value (an array) is listed rather than guessed equal to its default.
        return False


def _fresh_kwargs(args: Any) -> dict[str, Any]:
    """The arguments a fresh instance of `type(args)` is built with (see `_reference_values`)."""
    kwargs = {"output_dir": args.output_dir} if hasattr(args, "output_dir") else {}
    if isinstance(args, TrainingArguments) and PartialState._shared_state:
        # Keep the run's accelerate state: a fresh TrainingArguments would reset it to its own defaults (no
        # `use_cpu`, no DeepSpeed) on the main process only, which then disagrees with the others about the
        # world size (a `torchrun ... --use_cpu true` run hangs in its first barrier).
        kwargs["accelerator_config"] = {"use_configured_state": True}
    return kwargs


def _reference_values(args: Any) -> dict[str, Any]:
    """The values a fresh instance of `type(args)` has, after its `__post_init__` normalised them.

    Comparing against a fresh instance rather than the declared field defaults matters: `__post_init__` turns
    `"epoch"` into `IntervalStrategy.EPOCH`, `report_to="none"` into `[]`, and so on, and a subclass changes parent
    defaults. A class that cannot be built without arguments falls back to its declared defaults.

    Building a `TrainingArguments` resets accelerate's global state, so call this before the trainer exists (run.py
    does, right after parsing), never while it trains.
    """
    cls = type(args)
    try:
        kwargs = _fresh_kwargs(args)
        fresh = cls(**kwargs)
        reference = {f.name: getattr(fresh, f.name, dataclasses.MISSING) for f in dataclasses.fields(fresh)}
        if "accelerator_config" in kwargs:
            reference["accelerator_config"] = type(fresh.accelerator_config)()
        return reference
    except Exception as error:
        logger.debug(f"Could not build a default {cls.__name__} ({error!r}); comparing with declared defaults.")
    reference: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            reference[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            reference[field.name] = field.default_factory()
    return reference


def _is_hyperparameter(name: str) -> bool:
    return not (_is_secret(name) or name in _NOT_HYPERPARAMETERS or name.startswith(_NOT_HYPERPARAMETER_PREFIXES))


def non_default_training_arguments(args: Any) -> dict[str, str]:
    """
    The training arguments that differ from their defaults, rendered as strings for the model card.

    Args:
        args (`transformers.TrainingArguments` or any dataclass instance):
            The arguments of the run. Defaults are those of a fresh instance of the same class, so a subclass's own
            defaults (say `weight_decay=0.2`) count as defaults and are not listed.

    Returns:
        `dict[str, str]`: field name to value, in field order. Paths and Hub settings (`output_dir`, `logging_dir`,
        `hub_*`, `push_to_hub`, ...) and every field whose name contains "token" are left out, so the dict is safe to
        publish. So are the fields that `__post_init__` derives from the others that changed (`do_eval` from
        `eval_strategy`, `greater_is_better` from `metric_for_best_model`, ...) and the transport settings of
        `accelerator_config` (how batches reach the device): the user did not set them.
    """
    if not dataclasses.is_dataclass(args) or isinstance(args, type):
        raise TypeError(f"Expected a dataclass instance such as `TrainingArguments`, got {type(args).__name__}.")
    reference = _reference_values(args)
    changed = {
        field.name: getattr(args, field.name, None)
        for field in dataclasses.fields(args)
        if field.init
        and _is_hyperparameter(field.name)
        and not _same(getattr(args, field.name, None), reference.get(field.name, dataclasses.MISSING))
    }
    derived = _derived_fields(args, changed)
    return {name: _render(value) for name, value in changed.items() if name not in derived}


def _derived_fields(args: Any, changed: dict[str, Any]) -> set[str]:
    """The fields of `changed` that a fresh instance given all the *other* changed values sets to the same value by
    itself (in `__post_init__`): consequences of the user's settings, not settings.

    Only for classes that build from their fields (`TrainingArguments`); an instance that refuses a combination
    keeps the field (listed rather than hidden)."""
    if not isinstance(args, TrainingArguments):
        return set()
    kwargs = _fresh_kwargs(args)
    derived = set()
    for name in changed:
        if name == "accelerator_config":
            continue  # built from `kwargs` in every instance; compared transport aside
        others = {other: value for other, value in changed.items() if other not in (name, "accelerator_config")}
        try:
            rebuilt = type(args)(**kwargs, **others)
        except Exception:
            continue
        if _same(changed[name], getattr(rebuilt, name, dataclasses.MISSING)):
            derived.add(name)
    return derived


def _argument_names(argv: Sequence[str], valid: set[str]) -> set[str]:
    """The argument names `argv` sets: the keys of its leading JSON config files and its `--flags`, as
    [`clip_trainer.command_line.parse_arguments`] reads them (`--no_x` for a boolean `x`, `-` for `_`)."""
    argv = list(argv)
    names: set[str] = set()
    while argv and argv[0].endswith(".json") and not argv[0].startswith("-"):
        try:
            with open(argv.pop(0), encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            continue  # the parser refused such a file already; nothing to document
        if isinstance(config, dict):
            names.update(key for key in config if key in valid)
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name in valid:
            names.add(name)
        elif name.startswith("no_") and name[3:] in valid:
            names.add(name[3:])
    return names


def _public(value: Any) -> Any:
    """`value` with local paths reduced to their last component (a published card does not show the author's file
    system); Hub ids, numbers and words stay as they are."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "{[":
            try:
                return _public(json.loads(text))
            except ValueError:
                pass
        local = os.path.isabs(text) or text.startswith(("./", "../", "~")) or os.path.exists(text)
        if local or ("/" in text and _hub_id(text) is None):
            return os.path.basename(os.path.normpath(text)) or text
        return value
    if isinstance(value, Mapping):
        return {_public(key): _public(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_public(item) for item in value]
    return value


def given_settings(argv: Sequence[str], *arguments: Any) -> dict[str, str]:
    """
    The settings the user gave a run (in its config files and on its command line), with their final values, for
    the model card's hyperparameter table.

    Unlike [`non_default_training_arguments`] this covers the data and model arguments too (augmentation, tokenizer
    size, model config, ...), and lists exactly what was given, nothing that the arguments' `__post_init__` or
    clip-trainer derived from it.

    Args:
        argv (`Sequence[str]`): the run's command line without the program name, config files first.
        *arguments: the parsed argument dataclasses, in the order the table lists them (data, model, training).

    Returns:
        `dict[str, str]`: name to rendered value, in field order of each dataclass. Settings given as `null` where that
        is the default, paths, Hub settings, tokens,
        `cache_dir` and the stage flags (`do_train`, ...) are left out; local paths of the settings that remain
        (`config_name`, `train_file`, ...) are shown by their last component.
    """
    valid = {field.name for args in arguments for field in dataclasses.fields(args) if field.init}
    given = _argument_names(argv, valid)
    settings: dict[str, str] = {}
    for args in arguments:
        for field in dataclasses.fields(args):
            name = field.name
            value = getattr(args, name)
            if value is None and field.default is None:
                continue  # given as `null` (a config's value unset): the default, nothing to list
            if name in given and _is_hyperparameter(name) and name not in _NOT_SETTINGS:
                settings[name] = _render(_public(value))
    return settings


# --- Metrics -----------------------------------------------------------------------------------------------------------


def _card_metric(name: str) -> MetricInfo | None:
    """The registry's entry of a metric the card shows: what the evaluation measures, and the loss. The readings of the
    model's own parameters (the temperature, the bias) describe the weights, not the evaluation data."""
    info = METRICS_BY_NAME.get(name)
    return info if info is not None and not info.parameter else None


def _strip_prefix(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """`{"eval_t2i_recall@1": 0.5, ...}` -> `{"t2i_recall@1": 0.5, ...}`: the metrics only, numbers only.

    Bookkeeping the Trainer and the run report beside them (`eval_runtime`, `eval_samples`, ...) is no metric."""
    cleaned: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        name = key.removeprefix("eval_")
        if _is_secret(name) or _card_metric(name) is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        cleaned[name] = float(value)
    return cleaned


def _metric_order(name: str) -> tuple[int, str]:
    # The registry's order (directions together, cut-offs in numeric order); anything else after it.
    info = METRICS_BY_NAME.get(name)
    return (METRICS.index(info) if info is not None else len(METRICS), name)


def _metric_label(name: str) -> str:
    info = METRICS_BY_NAME.get(name)
    return info.label if info is not None else name


def _is_fraction(name: str) -> bool:
    # Recalls and accuracies come from the evaluation as fractions in [0, 1]; the card shows percentages.
    info = METRICS_BY_NAME.get(name)
    return info is not None and info.is_fraction


def _format_metric(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return "n/a"
    if _is_fraction(name):
        return f"{100 * value:.1f}%"
    if (info := METRICS_BY_NAME.get(name)) is not None and info.kind == "rank":
        return f"{value:g}"
    return f"{value:.4f}"


# --- Card --------------------------------------------------------------------------------------------------------------

_LOSS_DESCRIPTIONS = {
    "softmax": "CLIP's contrastive (softmax) loss",
    "sigmoid": "SigLIP's sigmoid loss, with its learned bias",
}
TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "model_card.md")


@dataclasses.dataclass
class CLIPModelCardData:
    """What the model card says about a run beyond its metrics and curves. The trainer fills every field left `None`
    that it knows itself ([`complete_card_data`]), so a library user who builds the trainer without card data still
    gets a complete card.

    Args:
        model_name: the card's title; defaults to the output folder's name.
        repo_id: the Hub id of the model, named in the usage code; the trainer sets it when it pushes (or has a
            `hub_model_id`).
        output_dir: the output folder as the user gave it (`output_dir`), named in the usage code when there is no
            `repo_id`; the trainer fills it from its arguments.
        base_model: the checkpoint training started from (`None`: trained from scratch). It becomes `base_model`
            metadata only when it is a Hub id; a local path is shown by its folder name.
        dataset_id: the training data's Hub dataset id, set as `datasets` metadata; `None` for local or bundled data.
        dataset_description: the training data in words, for data that is not on the Hub (or a link that is).
        num_train_pairs, num_eval_pairs: image-caption pairs trained and evaluated on (the trainer counts its
            datasets when they are not given).
        num_train_images, num_eval_images: the images among them, when images have several captions (a training
            set that draws one caption per image and epoch has `num_train_images` rows).
        num_train_rows: for a `train_mixture` whose rows have several captions: the rows of an epoch, drawn from
            the sources by weight (a row repeated to fill the epoch counts each time), each drawing one caption per
            epoch; a mixture keeps its rows as rows, so they are not images.
        num_train_skipped: training samples left out as unusable (an image that did not decode, counted each time
            it was drawn); the trainer fills it from the run's count.
        num_dropped_rows: rows of the data left out before training as unusable (a missing or empty image file,
            an empty caption), which `dropped_rows.jsonl` in the output folder names.
        num_eval_unusable_pairs: evaluation pairs that could not be used (an image that did not decode), which the
            metrics leave out; the trainer reads it from its last evaluation.
        eval_origin: where the evaluation pairs came from: `held_out` (split off the training data before training,
            never trained on), `validation_file` (a separate file) or `validation_split` (the data's own split);
            `None` (unknown) claims neither. [`evaluation_origin`] finds it for a run.
        eval_source: the validation file's name or the split's name.
        held_out_percentage: the share of the training data held out (`validation_split_percentage`), when every
            held-out pair was evaluated.
        hyperparameters: the settings to list (see [`given_settings`]); `None`: the training arguments that differ
            from their defaults.
        license: a Hub license id (`apache-2.0`, `mit`, ...); omitted from the metadata when unknown.
        tags: extra Hub tags, after `clip`, `clip-trainer`, `contrastive-learning` and
            `zero-shot-image-classification`.
        family, family_docs: the model family as the card names it (`CLIP`, `SigLIP`, ...) and its transformers
            documentation page; the trainer fills them from the model.
        loss: `softmax` or `sigmoid`; the trainer fills it.
        zeroshot_templates: the prompt templates of the zero-shot evaluation; num_classes: its classes;
            num_classes_present: the classes that have an image among the labelled images it scored,
            num_zeroshot_images; majority_class: the most frequent class among them.
        text_positions: the text tower's positions; max_text_length: the caption length trained with (at most
            `text_positions`), which the usage code truncates to.
        architecture: `(part, description)` rows of the model's size ([`model_architecture`]).
        training_steps, epochs, batch_size: optimizer steps taken, epochs they make, pairs per step.
        lora: `{"r", "lora_alpha", "target_modules"}` of a LoRA run, whose adapter is in `adapter/`.
    """

    model_name: str | None = None
    repo_id: str | None = None
    output_dir: str | None = None
    base_model: str | None = None
    dataset_id: str | None = None
    dataset_description: str | None = None
    num_train_pairs: int | None = None
    num_eval_pairs: int | None = None
    num_train_images: int | None = None
    num_train_rows: int | None = None
    num_eval_images: int | None = None
    num_eval_unusable_pairs: int | None = None
    num_train_skipped: int | None = None
    num_dropped_rows: int | None = None
    eval_origin: str | None = None
    eval_source: str | None = None
    held_out_percentage: float | None = None
    hyperparameters: dict[str, str] | None = None
    license: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    family: str | None = None
    family_docs: str | None = None
    loss: str | None = None
    zeroshot_templates: list[str] | None = None
    num_classes: int | None = None
    num_classes_present: int | None = None
    num_zeroshot_images: int | None = None
    majority_class: str | None = None
    text_positions: int | None = None
    max_text_length: int | None = None
    architecture: list[tuple[str, str]] | None = None
    training_steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    lora: dict[str, Any] | None = None


# --- What a run knows about its data and model -------------------------------------------------------------------------


def data_description(source: Any) -> str:
    """The training data in words for the card, from a [`clip_trainer.data.DataSource`].

    A local source's description counts its files' rows by split (`local data `pairs.csv` (72 train pairs)`): rows
    before the held-out split and before unusable rows are dropped, which would disagree with the pairs the card says
    were trained and evaluated on. The card states those counts itself, so the file counts are left out here."""
    description = source.description
    if source.kind == "local":
        description = re.sub(r" \([^()]*\bpairs\)$", "", description)
    return description


def evaluation_origin(data_args: Any, validation: Any, *, training: bool = True) -> dict[str, Any]:
    """
    Where a run's evaluation pairs came from, as the fields `eval_origin`, `eval_source` and `held_out_percentage`
    of [`CLIPModelCardData`].

    Args:
        data_args ([`DataArguments`]): the run's data arguments.
        validation (`datasets.Dataset` or `None`): the validation split [`load_image_text_data`] returned.
        training (`bool`): whether the run trains (an evaluation-only run may evaluate a `test` split).

    Returns:
        `dict`: empty without validation data. "Held out" is claimed only when it is certain: a separate
        `validation_file` or a split the data has (`validation`, `valid`, `val`, or `validation_split_name`) is not
        held out, whatever its content; pairs that `datasets` records as coming from the training split, or from
        the head of a training stream of files without splits, are.
    """
    from .data import VALIDATION_SPLIT_NAMES

    if validation is None:
        return {}
    if data_args.validation_file is not None:
        return {"eval_origin": "validation_file", "eval_source": _public(str(data_args.validation_file))}
    # `datasets` records the split a table was loaded as; a split off the training data keeps the training split's.
    split = getattr(validation, "split", None)
    split = str(split) if split is not None else None
    own_names = VALIDATION_SPLIT_NAMES if training else (*VALIDATION_SPLIT_NAMES, "test")
    if data_args.validation_split_name is not None or split in own_names:
        return {"eval_origin": "validation_split", "eval_source": data_args.validation_split_name or split}
    if split is None and data_args.dataset_name is not None:
        # A stream's validation pairs are rebuilt row by row, without a split: its head held out, or the source's
        # own split read as a stream. Unknown, so neither is claimed.
        return {}
    percentage = None
    if not data_args.streaming and data_args.max_eval_samples is None and not data_args.train_mixture:
        percentage = data_args.validation_split_percentage
    return {"eval_origin": "held_out", "held_out_percentage": percentage}


def _number(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _tower(config: Any, first: list[str]) -> str:
    parts = list(first)
    for label, names in (
        ("layers", ("num_hidden_layers",)),
        ("width", ("hidden_size",)),
        ("heads", ("num_attention_heads",)),
        ("MLP", ("intermediate_size",)),
    ):
        value = _number(config, *names)
        if value is not None:
            parts.append(f"{value:,} {label}" if label in ("layers", "heads") else f"{label} {value:,}")
    return ", ".join(parts)


def model_architecture(model: Any, tokenizer: Any = None) -> list[tuple[str, str]]:
    """
    The size of a two-tower model in words, one `(part, description)` row per part, from its config.

    Args:
        model: a `CLIPModel`, `SiglipModel`, `Siglip2Model` or `VisionTextDualEncoderModel`.
        tokenizer (*optional*): its tokenizer, whose size is listed beside the text tower's table.

    Returns:
        `list[tuple[str, str]]`: parameters, embedding dimension, image tower, text tower and tokenizer, each row
        only when the config says it.
    """
    config = model.config
    vision = getattr(config, "vision_config", None)
    text = getattr(config, "text_config", None)
    rows = [("Parameters", f"{sum(p.numel() for p in model.parameters()):,}")]
    embed_dim = _number(config, "projection_dim") or _number(text, "projection_size") or _number(vision, "hidden_size")
    if embed_dim is not None:
        rows.append(("Embedding dimension", f"{embed_dim:,}"))
    if vision is not None:
        first = []
        size = _number(vision, "image_size")
        if size is not None:
            first.append(f"{size}x{size} px images" if isinstance(size, int) else f"{size} px images")
        elif _number(vision, "num_patches") is not None:
            first.append(f"up to {vision.num_patches:,} patches per image")
        if _number(vision, "patch_size") is not None:
            first.append(f"{vision.patch_size} px patches")
        rows.append(("Image tower", _tower(vision, first)))
    if text is not None:
        first = []
        if _number(text, "max_position_embeddings") is not None:
            first.append(f"{text.max_position_embeddings:,} positions")
        if _number(text, "vocab_size") is not None:
            first.append(f"vocabulary {text.vocab_size:,}")
        rows.append(("Text tower", _tower(text, first)))
    if tokenizer is not None:
        rows.append(("Tokenizer", f"{len(tokenizer):,} tokens"))
    return rows


def _loss_text(trainer: CLIPContrastiveTrainer) -> str:
    """The loss trained, in words: the contrastive loss, and the distillation term with its teacher and weights."""
    text = trainer.contrastive_loss.card_text
    distillation = getattr(trainer, "distillation", None)
    if distillation is None:
        return text
    args = trainer.args
    if args.teacher_model_name_or_path is not None:
        teacher = f"the teacher `{_public(args.teacher_model_name_or_path)}`"
    elif args.teacher_embeddings is not None:
        teacher = "a teacher's stored embeddings"
    else:
        teacher = "a frozen copy of the starting model"
    text += (
        f", plus {distillation.weight:g} x the KL divergence from the image-to-text and text-to-image similarity "
        f"distributions of {teacher} to the model's"
    )
    if distillation.intra_modal_weight:
        text += f" and {distillation.intra_modal_weight:g} x that of the image-to-image and text-to-text ones"
    return text + " (distillation)"


def complete_card_data(card_data: CLIPModelCardData, trainer: CLIPContrastiveTrainer) -> CLIPModelCardData:
    """`card_data` with every field it leaves `None` that the trainer knows filled in: family and loss, where the
    model is (Hub id or output folder), pair counts, the zero-shot evaluation's templates and classes, text length,
    architecture, steps and batch size, and the LoRA adapter's settings."""
    from .lora import ADAPTER_DIRNAME, adapter_settings
    from .modeling import max_text_positions

    args = trainer.args
    filled: dict[str, Any] = {
        "family": trainer.family.name,
        "family_docs": trainer.family.docs,
        "loss": _loss_text(trainer),
        # `Trainer.init_hf_repo` resolves the full id (`user/name`) when it pushes.
        "repo_id": getattr(trainer, "hub_model_id", None) or args.hub_model_id,
        "output_dir": args.output_dir,
        "text_positions": max_text_positions(trainer.model.config),
        "max_text_length": trainer.max_seq_length,
        "architecture": model_architecture(trainer.model, getattr(trainer.processing_class, "tokenizer", None)),
        "training_steps": trainer.state.global_step or None,
        "epochs": trainer.state.epoch,
        "batch_size": args.train_batch_size * args.world_size * args.gradient_accumulation_steps,
        "lora": adapter_settings(os.path.join(args.output_dir, ADAPTER_DIRNAME)),
    }
    wise_ft = getattr(trainer, "wise_ft_result", None)
    if filled["lora"] is not None and wise_ft is not None and wise_ft.alpha != 1:
        filled["lora"]["wise_ft_alpha"] = wise_ft.alpha  # the saved adapter is scaled to the model saved
    from .data import IMAGE_ID_COLUMN

    filled.update(_training_counts(trainer))
    if trainer.eval_dataset is not None and not isinstance(trainer.eval_dataset, dict):
        filled["num_eval_pairs"] = len(trainer.eval_dataset)
        if IMAGE_ID_COLUMN in (trainer.eval_dataset.column_names or []):
            filled["num_eval_images"] = len(set(trainer.eval_dataset[IMAGE_ID_COLUMN]))
        evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
        if evaluations and evaluations[-1].get("eval_unusable_pairs"):
            filled["num_eval_unusable_pairs"] = int(evaluations[-1]["eval_unusable_pairs"])
    if getattr(trainer, "skipped_samples_total", None):
        filled["num_train_skipped"] = trainer.skipped_samples_total
    last = getattr(trainer, "_last_evaluation", None) or {}
    labels = last.get("class_labels")
    if last.get("classifier") is not None and labels is not None:
        from .evaluation import zeroshot_rows

        # One label per image, as zero-shot accuracy counts them (an image with five captions is one image).
        _, labels = zeroshot_rows(labels, last.get("image_ids"))
        counts = labels.bincount(minlength=len(last["class_names"]))
        filled["zeroshot_templates"] = list(trainer.zeroshot_templates)
        filled["num_classes"] = len(last["class_names"])
        filled["num_classes_present"] = int((counts > 0).sum())
        filled["num_zeroshot_images"] = int(labels.numel())
        filled["majority_class"] = str(last["class_names"][int(counts.argmax())])
    given = {field.name: getattr(card_data, field.name) for field in dataclasses.fields(card_data)}
    return dataclasses.replace(card_data, **{name: value for name, value in filled.items() if given.get(name) is None})


def _training_counts(trainer: Any) -> dict[str, int]:
    """The training set's pairs, and its images when it draws one of several captions per image and epoch."""
    from .captions import CaptionSampledDataset, caption_list

    dataset = trainer.train_dataset
    if not hasattr(dataset, "__len__"):
        return {}
    if not isinstance(dataset, CaptionSampledDataset):
        return {"num_train_pairs": len(dataset)}
    table = dataset.dataset.select_columns(dataset.fields).with_format(None)
    pairs = sum(len(caption_list(value)) for column in dataset.fields for value in table[column])
    if trainer.data_args.train_mixture:  # a mixture's rows stay rows (see `prepare_training_captions`)
        return {"num_train_pairs": pairs, "num_train_rows": len(dataset)}
    return {"num_train_pairs": pairs, "num_train_images": len(dataset)}


def _hub_id(name: str | None) -> str | None:
    """`name` if it can be a Hub repository id, `None` for a local path or anything the Hub would reject."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(item for item in items if item))


def _origin(base_model: str | None) -> str:
    base_id = _hub_id(base_model)
    if base_model is None:
        return "trained from scratch"
    if base_id:
        return f"fine-tuned from [{base_id}](https://huggingface.co/{base_id})"
    return f"fine-tuned from `{os.path.basename(os.path.normpath(base_model))}`"


def _evaluation_table(before: dict[str, float], after: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    names = sorted(set(before) | set(after), key=_metric_order)
    columns = [(title, values) for title, values in (("Before training", before), ("After training", after)) if values]
    rows = [
        [_escape_cell(_metric_label(name)), *(_format_metric(name, values.get(name)) for _, values in columns)]
        for name in names
    ]
    return [title for title, _ in columns], rows


def _set_metrics(metrics: Mapping[str, Any] | None, name: str) -> dict[str, float]:
    """The metrics of extra evaluation set `name` (`eval_{name}_t2i_recall@1`, ...), without their prefix."""
    prefix = f"eval_{name}_"
    return _strip_prefix(
        {key.removeprefix(prefix): value for key, value in (metrics or {}).items() if key.startswith(prefix)}
    )


def _wise_ft_table(wise_ft: Any) -> tuple[list[str], list[list[str]]]:
    """The WiSE-FT table: one row per `a`, the in-domain metric, then each reference set's and its retention."""
    metric = wise_ft.metric
    columns = ["a", f"validation {_metric_label(metric)}"]
    for name in wise_ft.reference_sets:
        columns += [f"{name} {_metric_label(metric)}", f"{name} kept"]
    rows = []
    for row in wise_ft.rows:
        chosen = row["alpha"] == wise_ft.alpha
        cells = [f"**{row['alpha']:g}** (saved)" if chosen else f"{row['alpha']:g}"]
        cells.append(_format_metric(metric, row.get(f"eval_{metric}")))
        for name in wise_ft.reference_sets:
            kept = wise_ft.retention(row, name)
            cells += [_format_metric(metric, row.get(f"eval_{name}_{metric}")), "–" if kept is None else f"{kept:.0%}"]
        rows.append([_escape_cell(cell) for cell in cells])
    return [_escape_cell(column) for column in columns], rows


def _plot_links(output_dir: str, plots: list[str]) -> list[str]:
    """Links relative to the card, which lies in `output_dir`; plots outside it would not be uploaded with it."""
    links = []
    root = os.path.abspath(output_dir)
    for plot in plots:
        relative = os.path.relpath(os.path.abspath(plot), root)
        if relative.startswith(os.pardir):
            logger.warning(f"Plot {plot} is outside {output_dir}; it is not linked from the model card.")
            continue
        links.append(relative.replace(os.sep, "/"))
    return links


def _versions() -> list[tuple[str, str]]:
    from .version import __version__

    # clip-trainer's own version is the running code's: an editable install's metadata keeps the version it was
    # installed at, and a checkout may run without any install.
    versions = [("clip-trainer", __version__)]
    for package in ("transformers", "torch", "datasets", "huggingface_hub"):
        try:
            versions.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            continue
    return versions


def _model_index(dataset_id: str | None, after: dict[str, float]) -> list[EvalResult] | None:
    # The Hub's model-index needs a dataset id; without one (local data) the results stay in the table only.
    if dataset_id is None:
        return None
    results = []
    for name in sorted(after, key=_metric_order):
        value = after[name]
        # Task results only: not the loss, nor the majority baseline (a property of the labels, not of the model).
        info = METRICS_BY_NAME[name]
        if info.kind == "scalar" or info.greater_is_better is None or not math.isfinite(value):
            continue
        zeroshot = METRICS_BY_NAME[name].needs_labels
        results.append(
            EvalResult(
                task_type="zero-shot-image-classification" if zeroshot else "image-text-retrieval",
                task_name="Zero-shot image classification" if zeroshot else "Image-text retrieval",
                dataset_type=dataset_id,
                dataset_name=dataset_id,
                metric_type=name,
                metric_name=_metric_label(name),
                metric_value=round(value, 4),
            )
        )
    return results or None


def _count(value: float) -> str:
    return f"{value:,}"


def _epochs(value: float) -> str:
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{text} epoch" + ("" if text == "1" else "s")


def _data_sentences(card: CLIPModelCardData) -> str:
    """What the model trained and was evaluated on, counted: one sentence each."""
    sentences = []
    if card.num_train_images is not None and card.num_train_images != card.num_train_pairs:
        trained = (
            f"It was trained on {_count(card.num_train_images)} images with {_count(card.num_train_pairs)} captions"
        )
    elif card.num_train_rows is not None:
        trained = (
            f"It was trained on a mixture of sources, {_count(card.num_train_rows)} rows an epoch drawn by weight "
            f"with {_count(card.num_train_pairs)} captions among them"
        )
    elif card.num_train_pairs is not None:
        trained = f"It was trained on {_count(card.num_train_pairs)} image-caption pairs"
    else:
        trained = "It was trained on a stream of image-caption pairs"
    if card.training_steps and card.batch_size:
        trained += f" for {_count(card.training_steps)} optimizer steps of {_count(card.batch_size)} pairs"
        if card.epochs and card.num_train_pairs is not None:
            trained += f" ({_epochs(card.epochs)})"
    if card.num_train_images is not None and card.num_train_images != card.num_train_pairs:
        trained += ", one caption drawn per image each epoch"
    elif card.num_train_rows is not None:
        trained += ", one caption drawn per row each epoch"
    if card.num_train_skipped:
        trained += (
            f"; {_count(card.num_train_skipped)} of the samples drawn were left out as unusable (an image that did "
            "not decode, counted each time it was drawn)"
        )
    if card.num_dropped_rows:
        trained += (
            f"; {_count(card.num_dropped_rows)} rows of the data were left out before training as unusable (each "
            "named in `dropped_rows.jsonl`)"
        )
    sentences.append(trained + ".")
    if card.num_eval_pairs:
        evaluated = f"It was evaluated on {_count(card.num_eval_pairs)} pairs"
        if card.num_eval_images is not None and card.num_eval_images != card.num_eval_pairs:
            evaluated += f" of {_count(card.num_eval_images)} images"
        if card.eval_origin == "held_out":
            share = f" ({card.held_out_percentage:g}% of it)" if card.held_out_percentage else ""
            evaluated += f" held out of the training data{share} before training: it never trained on them"
        elif card.eval_origin == "validation_file":
            evaluated += " from a separate validation file" + (f", `{card.eval_source}`" if card.eval_source else "")
        elif card.eval_origin == "validation_split":
            name = f"`{card.eval_source}` " if card.eval_source else ""
            evaluated += f" of the data's own {name}validation split"
        if card.num_eval_unusable_pairs:
            usable = card.num_eval_pairs - card.num_eval_unusable_pairs
            evaluated += (
                f"; {_count(card.num_eval_unusable_pairs)} of them could not be used (their images did not decode), "
                f"and the metrics are over the other {_count(usable)}"
            )
        sentences.append(evaluated + ".")
    return " ".join(sentences)


def _zeroshot_sentences(card: CLIPModelCardData, after: dict[str, float]) -> str | None:
    """How zero-shot accuracy was measured (prompts, classes, images) and what it has to beat."""
    if not any(METRICS_BY_NAME[name].needs_labels for name in after) and not card.zeroshot_templates:
        return None
    templates = card.zeroshot_templates
    if card.num_zeroshot_images and card.num_classes:
        text = (
            f"Zero-shot accuracy classifies each of the {_count(card.num_zeroshot_images)} labelled evaluation images "
            f"into one of {_count(card.num_classes)} classes"
        )
    else:
        text = "Zero-shot accuracy classifies each labelled evaluation image into one of its classes"
    if templates:
        listed = ", ".join(f"`{_escape_cell(template)}`" for template in templates)
        if len(templates) == 1:
            text += f": a class is the embedding of its name put into the prompt template {listed}."
        else:
            text += (
                f": a class is the mean embedding of its name put into each of the {len(templates)} prompt templates "
                f"{listed}."
            )
    else:
        text += "."
    text += (
        " Top-k counts an image as right when its class is among the k best scores; balanced accuracy is the mean "
        "over the classes present of each class's top-1 recall, so favouring a large class does not pay; the "
        "majority-class baseline is the top-1 of always answering the most frequent class"
    )
    text += f" (`{_escape_cell(card.majority_class)}`)." if card.majority_class else "."
    top1, baseline = after.get("zeroshot_top1"), after.get("zeroshot_majority_baseline")
    if top1 is not None and baseline is not None and math.isfinite(top1) and top1 <= baseline:
        balanced = after.get("zeroshot_balanced_accuracy")
        text += (
            f" **The trained model's top-1 ({_format_metric('zeroshot_top1', top1)}) does not beat the "
            f"{_format_metric('zeroshot_majority_baseline', baseline)} of always answering the most frequent class**"
        )
        present = card.num_classes_present or card.num_classes
        if balanced is not None and present:
            text += (
                f"; compare its balanced accuracy ({_format_metric('zeroshot_balanced_accuracy', balanced)}) with the "
                f"{100 / present:.1f}% (1/{present}) that a constant answer scores"
            )
        text += "."
    return text


def _location(card: CLIPModelCardData, model_name: str) -> tuple[str, str]:
    """The name the usage code loads the model by, and a sentence saying what it is.

    The Hub id when the model is pushed there (or has a `hub_model_id`); otherwise the output folder exactly as the
    user gave it, which works from where the run was started (relative) or anywhere on that machine (absolute). The
    folder's bare name, which is what `Trainer` would use, works nowhere but inside its parent folder."""
    if card.repo_id:
        return card.repo_id, f"The code loads the model from the Hugging Face Hub, as `{card.repo_id}`."
    if card.output_dir:
        where = card.output_dir
        if os.path.isabs(where):
            note = f"`{where}` is the folder this card was written into (the run's `output_dir`)."
        else:
            note = (
                f"`{where}` is the folder this card was written into (the run's `output_dir`), relative to the folder "
                "the run was started from: run the code from there, or give the folder's full path"
            )
            note += ' (`"."` from inside it).'
        return where, (
            f"{note} Once the folder is uploaded (`hf upload USER/NAME {where}`), load it by that Hub id instead."
        )
    return model_name, f"`{model_name}` stands for the folder this card is in, or its Hub id once uploaded."


def write_model_card(
    output_dir: str,
    card_data: CLIPModelCardData,
    *,
    eval_before: Mapping[str, Any] | None,
    eval_after: Mapping[str, Any] | None,
    hyperparameters: Mapping[str, Any],
    plots: list[str],
    examples: list[str] | None = None,
    eval_sets: list[str] | None = None,
    wise_ft: Any = None,
    saved_weights: str | None = None,
) -> str:
    """
    Writes `README.md` in `output_dir` from the Markdown template `templates/model_card.md`: Hub metadata, what was
    trained on what, the evaluation, the curves, the model's size, the settings and usage code.

    Args:
        output_dir (`str`):
            The folder that is pushed to the Hub; created if missing.
        card_data ([`CLIPModelCardData`]):
            What the run was trained from and on; a trainer fills in what it knows with [`complete_card_data`].
        eval_before (`dict`, *optional*), eval_after (`dict`, *optional*):
            `trainer.evaluate()` results before and after training, keys with their `eval_` prefix (`eval_loss`,
            `eval_t2i_recall@1`, `eval_i2t_median_rank`, `eval_zeroshot_top1`, ...). Recalls and accuracies are
            fractions in `[0, 1]`, shown as percentages. Keys that are no metric (runtime, throughput, sample
            counts) are left out.
        hyperparameters (`dict`):
            The settings to list when `card_data.hyperparameters` is `None`, usually
            `non_default_training_arguments(training_args)`. Keys containing "token" are dropped whatever the caller
            passes.
        plots (`list[str]`):
            PNGs to show, such as the paths `save_training_plots` returns; linked relative to the card, and skipped
            when they lie outside `output_dir` (they would not be uploaded).
        examples (`list[str]`, *optional*):
            Retrieval galleries (`retrieval_examples.png`), linked like the plots.
        eval_sets (`list[str]`, *optional*):
            The names of the extra evaluation sets (`extra_eval_sets`); each gets its own table, from the
            `eval_{name}_*` keys of `eval_before` and `eval_after`.
        wise_ft ([`clip_trainer.wise_ft.WiseFTResult`], *optional*):
            The WiSE-FT table and the interpolation saved, with the reason; shown in a section of its own.
        saved_weights (`str`, *optional*):
            Which weights were saved: the step of the best checkpoint `load_best_model_at_end` kept, and for a run
            with `ema_decay` the moving average or the weights themselves, and why ([`EMACallback.saved_weights`]);
            shown under the first paragraph.

    Returns:
        `str`: the path of the card written.
    """
    before = _strip_prefix(eval_before)
    after = _strip_prefix(eval_after)
    model_name = card_data.model_name or os.path.basename(os.path.abspath(output_dir))
    base_id = _hub_id(card_data.base_model)
    dataset_id = _hub_id(card_data.dataset_id)
    eval_results = _model_index(dataset_id, after)
    family_tag = (card_data.family or "").lower().replace(" ", "")
    metadata_card = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=_unique([*_DEFAULT_TAGS, family_tag, *card_data.tags]),
        base_model=base_id,
        datasets=[dataset_id] if dataset_id else None,
        license=card_data.license or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )
    if dataset_id:
        dataset = f"[{dataset_id}](https://huggingface.co/datasets/{dataset_id})"
    else:
        dataset = card_data.dataset_description
    columns, rows = _evaluation_table(before, after)
    set_tables = []
    for name in eval_sets or []:
        set_columns, set_rows = _evaluation_table(_set_metrics(eval_before, name), _set_metrics(eval_after, name))
        if set_rows:
            set_tables.append({"name": _escape_cell(name), "columns": set_columns, "rows": set_rows})
    wise_ft_section = None
    if wise_ft is not None:
        wise_columns, wise_rows = _wise_ft_table(wise_ft)
        wise_ft_section = {"reason": wise_ft.reason, "columns": wise_columns, "rows": wise_rows}
    settings = card_data.hyperparameters if card_data.hyperparameters is not None else hyperparameters
    safe = [
        (_escape_cell(key), _escape_cell(_render(value))) for key, value in settings.items() if not _is_secret(key)
    ]
    location, location_note = _location(card_data, model_name)
    family = card_data.family or "CLIP"
    sigmoid = (card_data.loss or "softmax") == "sigmoid" or family.startswith("SigLIP")
    max_length = card_data.max_text_length or card_data.text_positions
    templates = card_data.zeroshot_templates or ["a photo of a {}."]
    # transformers' zero-shot pipeline pads SigLIP prompts to 64 tokens and cuts them there, and does neither for
    # other models (its `tokenizer_kwargs` do not reach the tokenizer): say where it differs from the code.
    if family.startswith("SigLIP"):
        pipeline_note = " with its prompts padded and cut to 64 tokens"
        if max_length and max_length != 64:
            pipeline_note += f", not the {max_length} this model was trained with: prefer the code above"
    else:
        pipeline_note = ", but does not truncate: only for labels that fit"
        pipeline_note += f" {max_length} tokens" if max_length else " the text tower"
    lora = None
    if card_data.lora:
        lora = {
            "r": card_data.lora.get("r"),
            "alpha": f"{card_data.lora['lora_alpha']:g}" if card_data.lora.get("lora_alpha") is not None else "–",
            "targets": ", ".join(f"`{target}`" for target in card_data.lora.get("target_modules") or []),
            "wise_ft_alpha": _plain_number(card_data.lora["wise_ft_alpha"])
            if card_data.lora.get("wise_ft_alpha") is not None
            else None,
        }
    card = ModelCard.from_template(
        metadata_card,
        template_path=TEMPLATE_PATH,
        model_name=model_name,
        family=family,
        family_docs=card_data.family_docs or "clip",
        loss=_LOSS_DESCRIPTIONS.get(card_data.loss or "softmax", card_data.loss),
        origin=_origin(card_data.base_model),
        dataset=dataset,
        data_sentences=_data_sentences(card_data),
        zeroshot_sentences=_zeroshot_sentences(card_data, after),
        num_eval_pairs=card_data.num_eval_pairs,
        num_eval_unusable_pairs=card_data.num_eval_unusable_pairs,
        held_out=card_data.eval_origin == "held_out",
        evaluation_columns=columns,
        evaluation_rows=rows,
        eval_set_tables=set_tables,
        wise_ft=wise_ft_section,
        saved_weights=saved_weights,
        plots=_plot_links(output_dir, plots),
        examples=_plot_links(output_dir, examples or []),
        architecture=[(_escape_cell(part), _escape_cell(text)) for part, text in card_data.architecture or []],
        hyperparameters=safe,
        lora=lora,
        location=json.dumps(location),
        location_note=location_note,
        text_positions=card_data.text_positions,
        max_length=max_length,
        truncation=f", truncation=True, max_length={max_length}" if max_length else ", truncation=True",
        # SigLIP's text tower pools the last position: captions are padded to the length it was trained with.
        text_padding='"max_length"' if family.startswith("SigLIP") else "True",
        template=json.dumps(templates[0]),
        template_count=len(card_data.zeroshot_templates or []),
        scores="logits.sigmoid()" if sigmoid else "logits.softmax(dim=-1)",
        pipeline_note=pipeline_note,
        versions=_versions(),
    )
    content = _TOKEN_PATTERN.sub("<redacted>", str(card))
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, MODEL_CARD_FILENAME)
    ModelCard(content).save(path)
    return path


def write_adapter_card(adapter_dir: str, card_data: Any) -> str:
    """
    Writes the adapter's own `README.md` in `adapter_dir`, in place of peft's template.

    peft's card is an empty template whose `base_model` metadata is the base model's path on the author's machine
    (`_name_or_path`), which the Hub rejects and which publishes that path. This one says what the adapter is, its
    settings, how to load it on its base model with peft, and that the merged model is the parent folder's.

    Args:
        adapter_dir (`str`): the adapter's folder (`output_dir/adapter`).
        card_data ([`CLIPModelCardData`]): the run's card data, completed by the trainer (`lora` set).

    Returns:
        `str`: the path of the card written.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .lora import ADAPTER_DIRNAME, adapter_settings

    lora = card_data.lora or adapter_settings(adapter_dir) or {}
    output_name = card_data.model_name or os.path.basename(os.path.abspath(os.path.dirname(adapter_dir)))
    location, _ = _location(card_data, output_name)
    base_id = _hub_id(card_data.base_model)
    family = card_data.family or "CLIP"
    metadata = ModelCardData(
        library_name="peft",
        pipeline_tag="zero-shot-image-classification",
        base_model=base_id,
        tags=[*_DEFAULT_TAGS, "lora", "peft"],
        license=card_data.license or None,
    )
    if base_id:
        base_line = f'base = AutoModel.from_pretrained("{base_id}")'
    elif card_data.base_model:
        name = os.path.basename(os.path.normpath(card_data.base_model))
        base_line = f'base = AutoModel.from_pretrained("path/to/{name}")  # the local model `{name}` it was trained on'
    else:
        base_line = 'base = AutoModel.from_pretrained("path/to/base-model")  # the model it was trained on'
    if card_data.repo_id:
        adapter_line = f'model = PeftModel.from_pretrained(base, "{location}", subfolder="{ADAPTER_DIRNAME}")'
    else:
        adapter_line = f'model = PeftModel.from_pretrained(base, "{location}/{ADAPTER_DIRNAME}")'
    targets = ", ".join(f"`{target}`" for target in lora.get("target_modules") or []) or "the configured modules"
    size = f" ({lora['num_parameters']:,} parameters)" if lora.get("num_parameters") else ""
    dropout = f", dropout {lora['lora_dropout']:g}" if lora.get("lora_dropout") else ""
    parent = f"the Hub repository `{location}`" if card_data.repo_id else f"the parent folder, `{location}`"
    wise_ft = ""
    if lora.get("wise_ft_alpha") is not None:
        alpha = _plain_number(lora["wise_ft_alpha"])
        wise_ft = (
            f" Its update is scaled by WiSE-FT's a = {alpha} (each `lora_B` x {alpha}): the model saved is "
            f"(1 - a) x the base model + a x the fine-tuned one, which for a LoRA fine-tune is the base model with "
            "the adapter's update times a."
        )
    text = f"""
# LoRA adapter of {output_name}

A [LoRA](https://arxiv.org/abs/2106.09685) adapter{size} for a {family} model, {_origin(card_data.base_model)}, \
trained with clip-trainer: rank {lora.get("r")}, alpha {_plain_number(lora.get("lora_alpha"))}{dropout}, on the modules \
{targets}. Only the adapter was trained; every weight of the base model, the temperature included, stayed as it \
was.{wise_ft}

The model with this adapter merged into its weights is {parent}: it loads without peft \
(`AutoModel.from_pretrained("{location}")`), and its card has the evaluation and usage code.

## Loading the adapter with peft

```python
from peft import PeftModel
from transformers import AutoModel, AutoProcessor

{base_line}
{adapter_line}
processor = AutoProcessor.from_pretrained("{location}")
# model.merge_and_unload() gives the merged model of the parent folder.
```
"""
    path = os.path.join(adapter_dir, MODEL_CARD_FILENAME)
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n{text}").save(path)
    return path


def _plain_number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)
