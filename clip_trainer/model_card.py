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

__all__ = ["MODEL_CARD_FILENAME", "non_default_training_arguments", "write_model_card"]

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

# Trainer bookkeeping that `evaluate()` reports beside the metrics; none of it describes the model.
_BOOKKEEPING_SUFFIXES = ("runtime", "per_second", "_time", "epoch", "step", "flos")


# --- Hyperparameters -------------------------------------------------------------------------------------------------


def _is_secret(key: str) -> bool:
    return "token" in key.lower()


def _render(value: Any) -> str:
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


def _strip_prefix(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """`{"eval_t2i_recall@1": 0.5, ...}` -> `{"t2i_recall@1": 0.5, ...}`, numbers only, no bookkeeping or secrets."""
    cleaned: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        name = key.removeprefix("eval_")
        if _is_secret(name) or name.endswith(_BOOKKEEPING_SUFFIXES):
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


def _intro(
    model_name: str,
    base_model: str | None,
    dataset_name: str | None,
    num_train_pairs: int | None,
    num_eval_pairs: int | None,
) -> str:
    base_id = _hub_id(base_model)
    if base_model is None:
        origin = "trained from scratch"
    elif base_id:
        origin = f"fine-tuned from [{base_id}](https://huggingface.co/{base_id})"
    else:
        origin = f"fine-tuned from `{os.path.basename(os.path.normpath(base_model))}`"
    dataset_id = _hub_id(dataset_name)
    if dataset_id:
        data = f" on [{dataset_id}](https://huggingface.co/datasets/{dataset_id})"
    elif dataset_name:
        # A local folder: its name identifies the data to the author without publishing their file system layout.
        data = f" on `{os.path.basename(os.path.normpath(dataset_name))}`"
    else:
        data = ""
    pairs = f" ({num_train_pairs:,} image-caption pairs)" if num_train_pairs is not None else ""
    held_out = f" It was evaluated on {num_eval_pairs:,} held-out pairs." if num_eval_pairs is not None else ""
    return (
        f"# {model_name}\n\n"
        f"A [CLIP](https://huggingface.co/docs/transformers/model_doc/clip) model {origin}{data}{pairs} with "
        "clip-trainer, a contrastive image-text trainer built on `transformers.Trainer`."
        f"{held_out}\n\n"
        "It embeds images and texts into one space where a matching image and caption lie close together. Use it for "
        "zero-shot image classification (score an image against one caption per class) and for text-to-image or "
        "image-to-text retrieval (rank by cosine similarity of the embeddings).\n"
    )


def _evaluation_section(before: dict[str, float], after: dict[str, float], num_eval_pairs: int | None) -> str:
    names = sorted(set(before) | set(after), key=_metric_order)
    if not names:
        return ""
    columns = [(title, values) for title, values in (("Before training", before), ("After training", after)) if values]
    header = "| Metric | " + " | ".join(title for title, _ in columns) + " |"
    rule = "|:---|" + "---:|" * len(columns)
    rows = [
        f"| {_escape_cell(_metric_label(name))} | "
        + " | ".join(_format_metric(name, values.get(name)) for _, values in columns)
        + " |"
        for name in names
    ]
    on = f"the {num_eval_pairs:,} evaluation pairs" if num_eval_pairs is not None else "the evaluation split"
    return (
        "## Evaluation\n\n"
        f"Measured on {on}. Recall@k is the share of queries whose match is among the k nearest candidates "
        "(text-to-image: a caption queries all images; image-to-text: an image queries all captions); the median rank "
        "is that of the match (1 is best). Zero-shot accuracy classifies each image against one prompt per class.\n\n"
        + "\n".join([header, rule, *rows])
        + "\n"
    )


def _curves_section(output_dir: str, plots: list[str]) -> str:
    links = []
    root = os.path.abspath(output_dir)
    for plot in plots:
        path = os.path.abspath(plot if os.path.isabs(plot) else os.path.join(output_dir, plot))
        relative = os.path.relpath(path, root)
        if relative.startswith(os.pardir):
            # Only files inside the output folder are uploaded with the card; a link elsewhere would be broken.
            logger.warning(f"Plot {plot} is outside {output_dir}; it is not linked from the model card.")
            continue
        links.append(relative.replace(os.sep, "/"))
    if not links:
        return ""
    images = "\n\n".join(f"![Training curves]({link})" for link in links)
    return f"## Training curves\n\n{images}\n"


def _hyperparameters_section(hyperparameters: Mapping[str, Any]) -> str:
    safe = {key: value for key, value in hyperparameters.items() if not _is_secret(key)}
    if not safe:
        return "## Training hyperparameters\n\nAll training arguments were left at their defaults.\n"
    rows = [f"| `{_escape_cell(key)}` | {_escape_cell(_render(value))} |" for key, value in safe.items()]
    return (
        "## Training hyperparameters\n\n"
        "The training arguments that differ from their defaults:\n\n"
        + "\n".join(["| Argument | Value |", "|:---|:---|", *rows])
        + "\n"
    )


def _usage_section(repo_id: str) -> str:
    return f"""## Usage

Zero-shot image classification, one caption per class:

```python
from transformers import pipeline

classifier = pipeline("zero-shot-image-classification", model="{repo_id}")
# Each label is a whole caption, so the prompt template is the label itself.
predictions = classifier(
    "cat.jpg", candidate_labels=["a photo of a cat", "a photo of a dog"], hypothesis_template="{{}}"
)
print(predictions[0]["label"], predictions[0]["score"])
```

Text-image retrieval, by cosine similarity of the embeddings:

```python
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

model = CLIPModel.from_pretrained("{repo_id}")
processor = AutoProcessor.from_pretrained("{repo_id}")

images = [Image.open(path) for path in ["cat.jpg", "dog.jpg"]]
texts = ["a photo of a cat", "a photo of a dog"]
# In transformers 5, get_*_features return an output whose pooler_output is the projected embedding.
with torch.inference_mode():
    image_embeds = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
    text_embeds = model.get_text_features(**processor(text=texts, padding=True, return_tensors="pt")).pooler_output
image_embeds = torch.nn.functional.normalize(image_embeds, dim=-1)
text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)

similarity = text_embeds @ image_embeds.T  # (texts, images) cosine similarities
best_image_per_text = similarity.argmax(dim=1)
```
"""


def _versions_section() -> str:
    lines = []
    for package in ("clip-trainer", "transformers", "torch", "datasets", "huggingface_hub"):
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            if package != "clip-trainer":
                continue
            from clip_trainer import __version__ as version  # run from a checkout that is not pip-installed
        lines.append(f"- {package}: {version}")
    return "## Framework versions\n\n" + "\n".join(lines) + "\n"


def _model_index(dataset_id: str | None, after: dict[str, float]) -> list[EvalResult] | None:
    # The Hub's model-index needs a dataset id; without one (local data) the results stay in the table only.
    if dataset_id is None:
        return None
    results = []
    for name in sorted(after, key=_metric_order):
        value = after[name]
        if name == "loss" or not math.isfinite(value) or _metric_order(name)[0] > 5:
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
    *,
    model_name: str,
    base_model: str | None,
    dataset_name: str | None,
    num_train_pairs: int | None,
    num_eval_pairs: int | None,
    eval_before: Mapping[str, Any] | None,
    eval_after: Mapping[str, Any] | None,
    hyperparameters: Mapping[str, Any],
    license: str | None,
    plots: list[str],
    tags: list[str] | None = None,
    repo_id: str | None = None,
) -> str:
    """
    Writes `README.md` in `output_dir`: Hub metadata, what was trained, the evaluation, the curves and usage code.

    Args:
        output_dir (`str`):
            The folder that is pushed to the Hub; created if missing.
        model_name (`str`):
            Title of the card and `model-index` name.
        base_model (`str`, *optional*):
            The checkpoint training started from, `None` for a model trained from scratch. Set as `base_model` metadata
            only when it is a Hub id (a local path is shown by its folder name).
        dataset_name (`str`, *optional*):
            The training data; set as `datasets` metadata (and `model-index` results) only when it is a Hub id.
        num_train_pairs (`int`, *optional*), num_eval_pairs (`int`, *optional*):
            Number of image-caption pairs trained and evaluated on.
        eval_before (`dict`, *optional*), eval_after (`dict`, *optional*):
            `trainer.evaluate()` results before and after training, keys with their `eval_` prefix (`eval_loss`,
            `eval_t2i_recall@1`, `eval_i2t_median_rank`, `eval_zeroshot_top1`, ...). Recalls and accuracies are
            fractions in `[0, 1]`, shown as percentages. Runtime and throughput keys are left out.
        hyperparameters (`dict`):
            The arguments to list, usually `non_default_training_arguments(training_args)`. Keys containing "token" are
            dropped whatever the caller passes.
        license (`str`, *optional*):
            A Hub license id (`apache-2.0`, `mit`, ...); omitted from the metadata when unknown.
        plots (`list[str]`):
            PNGs to show, such as the paths `save_training_plots` returns; linked relative to `output_dir`, and skipped
            when they lie outside it (they would not be uploaded).
        tags (`list[str]`, *optional*):
            Extra Hub tags, after `clip`, `clip-trainer`, `contrastive-learning` and `zero-shot-image-classification`.
        repo_id (`str`, *optional*):
            The Hub id used in the usage code; defaults to `model_name`.

    Returns:
        `str`: the path of the card written.
    """
    before = _strip_prefix(eval_before)
    after = _strip_prefix(eval_after)
    base_id = _hub_id(base_model)
    dataset_id = _hub_id(dataset_name)
    eval_results = _model_index(dataset_id, after)

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=_unique([*_DEFAULT_TAGS, *(tags or [])]),
        base_model=base_id,
        datasets=[dataset_id] if dataset_id else None,
        license=license or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )
    sections = [
        _intro(model_name, base_model, dataset_name, num_train_pairs, num_eval_pairs),
        _evaluation_section(before, after, num_eval_pairs),
        _curves_section(output_dir, plots),
        _hyperparameters_section(hyperparameters),
        _usage_section(repo_id or model_name),
        _versions_section(),
    ]
    body = "\n".join(section for section in sections if section)
    content = f"---\n{card_data.to_yaml()}\n---\n\n{body}"
    content = _TOKEN_PATTERN.sub("<redacted>", content)

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, MODEL_CARD_FILENAME)
    ModelCard(content).save(path)
    return path
