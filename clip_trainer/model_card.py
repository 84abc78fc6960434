"""The model card (`README.md`) pushed with a trained CLIP model.

`transformers.Trainer.create_model_card` writes a generic card: the metrics of the last log and every hyperparameter.
A CLIP model needs a card that says what it is for and how well it does it: retrieval recall both ways and zero-shot
accuracy, before and after training, the hyperparameters that were changed, the training curves, and code that runs
zero-shot classification and retrieval. The metadata goes through `huggingface_hub.ModelCardData`, so the Hub indexes
the model under its task, library, datasets and base model.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from accelerate import PartialState
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["MODEL_CARD_FILENAME", "CLIPModelCardData", "non_default_training_arguments", "write_model_card"]

MODEL_CARD_FILENAME = "README.md"

_DEFAULT_TAGS = ("clip", "clip-trainer", "contrastive-learning", "zero-shot-image-classification")

# Arguments that locate or publish the run rather than shape it: they say nothing about how the model was trained,
# and the hub ones name the repository the card is already in.
_NOT_HYPERPARAMETERS = frozenset(
    {"output_dir", "logging_dir", "overwrite_output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id"}
)
_NOT_HYPERPARAMETER_PREFIXES = ("hub_",)

# Strings shaped like Hugging Face user or organization tokens. Keys holding tokens are dropped by name; this is the
# second line of defence, for a token that arrives under a name we could not foresee.
_TOKEN_PATTERN = re.compile(r"\b(?:hf|api_org)_[A-Za-z0-9]{20,}\b")


# --- Hyperparameters -------------------------------------------------------------------------------------------------


def _is_secret(key: str) -> bool:
    return "token" in key.lower()


def _render(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A config object (accelerate's `AcceleratorConfig`): what differs from its defaults, not its repr.
        changed = non_default_training_arguments(value)
        return ", ".join(f"{key}={item}" for key, item in changed.items()) or "defaults"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, list | tuple | set | frozenset):
        # An empty list is how `TrainingArguments` stores "none" (`report_to="none"` becomes `[]`).
        return ", ".join(_render(item) for item in value) if value else "none"
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


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
        kwargs = {"output_dir": args.output_dir} if hasattr(args, "output_dir") else {}
        if isinstance(args, TrainingArguments) and PartialState._shared_state:
            # Keep the run's accelerate state: a fresh TrainingArguments would reset it to its own defaults (no
            # `use_cpu`, no DeepSpeed) on the main process only, which then disagrees with the others about the
            # world size (a `torchrun ... --use_cpu true` run hangs in its first barrier).
            kwargs["accelerator_config"] = {"use_configured_state": True}
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
        publish.
    """
    if not dataclasses.is_dataclass(args) or isinstance(args, type):
        raise TypeError(f"Expected a dataclass instance such as `TrainingArguments`, got {type(args).__name__}.")
    reference = _reference_values(args)
    changed: dict[str, str] = {}
    for field in dataclasses.fields(args):
        if not field.init or not _is_hyperparameter(field.name):
            continue
        value = getattr(args, field.name, None)
        default = reference.get(field.name, dataclasses.MISSING)
        try:
            same = default is not dataclasses.MISSING and bool(value == default)
        except Exception:
            # An incomparable value (an array) is listed rather than guessed equal to its default.
            same = False
        if not same:
            changed[field.name] = _render(value)
    return changed


# --- Metrics -----------------------------------------------------------------------------------------------------------


_METRIC_NAME = re.compile(r"^(?:(?:t2i|i2t)_(?:recall@\d+|median_rank)|mean_recall|zeroshot_top\d+|loss)$")


def _strip_prefix(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """`{"eval_t2i_recall@1": 0.5, ...}` -> `{"t2i_recall@1": 0.5, ...}`: the metrics only, numbers only.

    Bookkeeping the Trainer and the run report beside them (`eval_runtime`, `eval_samples`, ...) is no metric."""
    cleaned: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        name = key.removeprefix("eval_")
        if _is_secret(name) or not _METRIC_NAME.match(name):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        cleaned[name] = float(value)
    return cleaned


def _cutoff(name: str) -> int:
    digits = re.search(r"(\d+)$", name)
    return int(digits.group(1)) if digits else 0


def _metric_order(name: str) -> tuple[int, int, str]:
    groups = (
        name.startswith("t2i_recall@"),
        name.startswith("i2t_recall@"),
        name == "mean_recall",
        name == "t2i_median_rank",
        name == "i2t_median_rank",
        name.startswith("zeroshot_top"),
        name == "loss",
    )
    group = groups.index(True) if True in groups else len(groups)
    return (group, _cutoff(name) if group in (0, 1, 5) else 0, name)


def _metric_label(name: str) -> str:
    direction = {"t2i": "Text-to-image", "i2t": "Image-to-text"}
    if match := re.fullmatch(r"(t2i|i2t)_recall@(\d+)", name):
        return f"{direction[match.group(1)]} recall@{match.group(2)}"
    if match := re.fullmatch(r"(t2i|i2t)_median_rank", name):
        return f"{direction[match.group(1)]} median rank"
    if match := re.fullmatch(r"zeroshot_top(\d+)", name):
        return f"Zero-shot top-{match.group(1)} accuracy"
    return {"mean_recall": "Mean recall", "loss": "Contrastive loss"}.get(name, name)


def _is_fraction(name: str) -> bool:
    # Recalls and accuracies come from the evaluation as fractions in [0, 1]; the card shows percentages.
    return "recall" in name or name.startswith("zeroshot_top") or "accuracy" in name


def _format_metric(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return "n/a"
    if _is_fraction(name):
        return f"{100 * value:.1f}%"
    if name.endswith("median_rank"):
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
    """What the model card says about a run beyond what the trainer knows (its metrics, curves and arguments).

    Args:
        model_name: the card's title; defaults to the output folder's name.
        repo_id: the Hub id used in the usage code; defaults to `model_name`.
        base_model: the checkpoint training started from (`None`: trained from scratch). It becomes `base_model`
            metadata only when it is a Hub id; a local path is shown by its folder name.
        dataset_id: the training data's Hub dataset id, set as `datasets` metadata; `None` for local or bundled data.
        dataset_description: the training data in words, for data that is not on the Hub (or a link that is).
        num_train_pairs, num_eval_pairs: image-caption pairs trained and evaluated on.
        license: a Hub license id (`apache-2.0`, `mit`, ...); omitted from the metadata when unknown.
        tags: extra Hub tags, after `clip`, `clip-trainer`, `contrastive-learning` and
            `zero-shot-image-classification`.
        family, family_docs: the model family as the card names it (`CLIP`, `SigLIP`, ...) and its transformers
            documentation page; the trainer fills them from the model.
        loss: `softmax` or `sigmoid`; the trainer fills it.
    """

    model_name: str | None = None
    repo_id: str | None = None
    base_model: str | None = None
    dataset_id: str | None = None
    dataset_description: str | None = None
    num_train_pairs: int | None = None
    num_eval_pairs: int | None = None
    license: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    family: str | None = None
    family_docs: str | None = None
    loss: str | None = None


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
    versions = []
    for package in ("clip-trainer", "transformers", "torch", "datasets", "huggingface_hub"):
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            if package != "clip-trainer":
                continue
            from .version import __version__ as version  # run from a checkout that is not pip-installed
        versions.append((package, version))
    return versions


def _model_index(dataset_id: str | None, after: dict[str, float]) -> list[EvalResult] | None:
    # The Hub's model-index needs a dataset id; without one (local data) the results stay in the table only.
    if dataset_id is None:
        return None
    results = []
    for name in sorted(after, key=_metric_order):
        value = after[name]
        if name == "loss" or not math.isfinite(value):
            continue
        zeroshot = name.startswith("zeroshot_top")
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
) -> str:
    """
    Writes `README.md` in `output_dir` from the Markdown template `templates/model_card.md`: Hub metadata, what was
    trained, the evaluation, the curves and usage code.

    Args:
        output_dir (`str`):
            The folder that is pushed to the Hub; created if missing.
        card_data ([`CLIPModelCardData`]):
            What the run was trained from and on.
        eval_before (`dict`, *optional*), eval_after (`dict`, *optional*):
            `trainer.evaluate()` results before and after training, keys with their `eval_` prefix (`eval_loss`,
            `eval_t2i_recall@1`, `eval_i2t_median_rank`, `eval_zeroshot_top1`, ...). Recalls and accuracies are
            fractions in `[0, 1]`, shown as percentages. Keys that are no metric (runtime, throughput, sample
            counts) are left out.
        hyperparameters (`dict`):
            The arguments to list, usually `non_default_training_arguments(training_args)`. Keys containing "token" are
            dropped whatever the caller passes.
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
    safe = [
        (_escape_cell(key), _escape_cell(_render(value)))
        for key, value in hyperparameters.items()
        if not _is_secret(key)
    ]
    card = ModelCard.from_template(
        metadata_card,
        template_path=TEMPLATE_PATH,
        model_name=model_name,
        family=card_data.family or "CLIP",
        family_docs=card_data.family_docs or "clip",
        loss=_LOSS_DESCRIPTIONS.get(card_data.loss or "softmax", card_data.loss),
        origin=_origin(card_data.base_model),
        dataset=dataset,
        num_train_pairs=card_data.num_train_pairs,
        num_eval_pairs=card_data.num_eval_pairs,
        evaluation_columns=columns,
        evaluation_rows=rows,
        eval_set_tables=set_tables,
        wise_ft=wise_ft_section,
        plots=_plot_links(output_dir, plots),
        examples=_plot_links(output_dir, examples or []),
        hyperparameters=safe,
        repo_id=card_data.repo_id or model_name,
        # SigLIP's text tower pools the last position: captions are padded to the length it was trained with.
        text_padding='"max_length"' if (card_data.family or "").startswith("SigLIP") else "True",
        versions=_versions(),
    )
    content = _TOKEN_PATTERN.sub("<redacted>", str(card))
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, MODEL_CARD_FILENAME)
    ModelCard(content).save(path)
    return path
