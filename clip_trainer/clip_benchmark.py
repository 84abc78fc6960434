"""CLIP_benchmark datasets: evaluate a model on a dataset in CLIP_benchmark's WebDataset layout, the way CLIP_benchmark
scores it, and write CLIP_benchmark's results JSON, so that the numbers stand beside its published tables.

The layout is the one CLIP_benchmark reads for `--dataset wds/<name>` (`build_wds_dataset` in
`clip_benchmark/datasets/builder.py`) and writes with `clip_benchmark_export_wds`:

```
root/
    test/                                   one folder per split
        nshards.txt                         the number n of shards: 0.tar ... {n-1}.tar
        0.tar  1.tar  ...
    classnames.txt                          classification: line i names class index i
    zeroshot_classification_templates.txt   classification: one prompt per line, `{c}` where the class name goes
    dataset_type.txt                        `retrieval` for a retrieval set (absent: classification)
```

Each sample of a shard is an image (the first of its `webp`, `png`, `jpg`, `jpeg` members, in that order) with `cls`,
its class index as a decimal integer (classification), or `txt`, its captions one per line (retrieval). The class
names and templates are read as CLIP_benchmark reads them (each line stripped), and templates are filled with
`template.format(c=class_name)`.

The metrics and where they come from in CLIP_benchmark (`clip_benchmark/metrics/zeroshot_classification.py` and
`zeroshot_retrieval.py`):

- `acc1`, `acc5`: top-k accuracy of the images against the zero-shot classifier, each class the renormalised mean of
  its normalised template embeddings ([`build_zeroshot_classifier`]); with fewer than 5 classes `acc5` is NaN, as
  there. `mean_per_class_recall`: `sklearn.metrics.balanced_accuracy_score`, the mean over the classes that have
  images of the share of their images classified correctly ([`zeroshot_accuracy`]'s balanced accuracy).
- `image_retrieval_recall@k`: the share of captions whose image is among the k best-scoring images (text to image);
  `text_retrieval_recall@k`: the share of images with at least one of their captions among the k best-scoring
  captions (image to text). [`retrieval_metrics`] computes both so, with each sample its own image.

Where this module differs from CLIP_benchmark, on purpose:

- Ties count against the true class or image, as everywhere in clip-trainer (CLIP_benchmark's `topk`/`argmax` break
  them by index); with float embeddings of a real model there are none, so the numbers are the same.
- Embeddings are computed in the run's precision (float32 on the CPU) where CLIP_benchmark uses autocast by default.
- A sample whose image cannot be decoded is left out and counted (CLIP_benchmark stops); in a retrieval set, blank
  caption lines are left out, and a sample without any caption is left out and counted.
- Without `nshards.txt` (CLIP_benchmark needs it) every `.tar` of the split folder is read, in numeric order.
- A recall@k with k above the number of images is 1 (CLIP_benchmark's `topk` fails); multi-label sets
  (`dataset_type.txt` `multilabel`) are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .errors import BadSampleError, ConfigError
from .metrics import RECALL_KS

logger = logging.get_logger(__name__)

__all__ = [
    "CLIP_BENCHMARK_TASKS",
    "ClipBenchmarkResult",
    "ClipBenchmarkSet",
    "clip_benchmark_record",
    "evaluate_clip_benchmark",
    "read_clip_benchmark_set",
]

CLIP_BENCHMARK_TASKS = ("zeroshot_classification", "zeroshot_retrieval")
# CLIP_benchmark's `to_tuple(["webp", "png", "jpg", "jpeg"], ...)`: the first of these a sample has is its image.
IMAGE_MEMBERS = ("webp", "png", "jpg", "jpeg")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
SHARD_COUNT_FILE = "nshards.txt"
# The key prefix of the benchmark's metrics in eval_results.json (`eval_clip_benchmark_zeroshot_top1`).
METRIC_SET_NAME = "clip_benchmark"
DEFAULT_OUTPUT_FILENAME = "clip_benchmark_results.json"
_KEY = "clip_benchmark_dataset"


@dataclasses.dataclass
class ClipBenchmarkSet:
    """
    One split of a dataset in CLIP_benchmark's layout, checked ([`read_clip_benchmark_set`]); nothing read from its
    shards yet.

    Attributes:
        root (`str`): the dataset's folder.
        split (`str`): the split folder's name (`test`).
        task (`str`): `zeroshot_classification` or `zeroshot_retrieval`.
        shards (`list[str]`): the split's tar shards, in order.
        class_names (`list[str]`, *optional*): classification: the name of each class index.
        templates (`list[str]`, *optional*): classification: the prompts, with `{c}` for the class name.
    """

    root: str
    split: str
    task: str
    shards: list[str]
    class_names: list[str] | None = None
    templates: list[str] | None = None

    @property
    def name(self) -> str:
        """The dataset's name as CLIP_benchmark's JSON gives it, `wds/<name>`: the folder's name, without the `wds_`
        of CLIP_benchmark's Hub copies (`wds_imagenet1k` -> `wds/imagenet1k`)."""
        return "wds/" + Path(self.root).resolve().name.removeprefix("wds_")


@dataclasses.dataclass
class ClipBenchmarkResult:
    """
    What [`evaluate_clip_benchmark`] measured.

    Attributes:
        metrics (`dict[str, float]`): clip-trainer's metrics of the set ([`zeroshot_accuracy`] or
            [`retrieval_metrics`] keys, no prefix).
        benchmark_metrics (`dict[str, float]`): the same in CLIP_benchmark's names and conventions (`acc1`, `acc5`,
            `mean_per_class_recall`; `image_retrieval_recall@k`, `text_retrieval_recall@k`).
        samples (`int`): the samples scored.
        skipped_samples (`int`): the samples left out (an image that cannot be decoded, a retrieval sample without a
            caption, a sample lost in a truncated shard).
        captions (`int`): retrieval: the captions scored.
    """

    metrics: dict[str, float]
    benchmark_metrics: dict[str, float]
    samples: int
    skipped_samples: int
    captions: int = 0

    def run_metrics(self, prefix: str = f"eval_{METRIC_SET_NAME}") -> dict[str, float]:
        """The metrics as a run's eval_results.json holds them: `{prefix}_{metric}`, with the sample counts."""
        values = {f"{prefix}_{key}": value for key, value in self.metrics.items()}
        values[f"{prefix}_samples"] = self.samples
        values[f"{prefix}_skipped_samples"] = self.skipped_samples
        if self.captions:
            values[f"{prefix}_captions"] = self.captions
        return values


# --------------------------------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------------------------------


def read_clip_benchmark_set(root: str, split: str = "test", task: str = "auto") -> ClipBenchmarkSet:
    """
    Checks a dataset folder in CLIP_benchmark's WebDataset layout and reads its small files (see the module
    docstring): the split's shards, the task, and for classification the class names and templates. No shard is
    opened, so a mistake stops the run in seconds.

    Args:
        root (`str`): the dataset's folder.
        split (`str`, *optional*, defaults to `"test"`): the split folder.
        task (`str`, *optional*, defaults to `"auto"`): `zeroshot_classification`, `zeroshot_retrieval`, or `auto`:
            retrieval when `dataset_type.txt` says `retrieval`, else classification (CLIP_benchmark's rule).

    Raises:
        [`ConfigError`]: naming the file or line and the fix.
    """
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"`{_KEY}` {root!r} is not a folder; it needs CLIP_benchmark's layout: {split}/0.tar, 1.tar, ... with "
            f"{CLASSNAMES_FILE} and {TEMPLATES_FILE} beside them (or {DATASET_TYPE_FILE} saying retrieval)."
        )
    dataset_type = _read_dataset_type(folder)
    if dataset_type == "multilabel":
        raise ConfigError(
            f"{folder / DATASET_TYPE_FILE} says multilabel: multi-label classification (.npy targets, mean average "
            "precision) is not supported; evaluate a single-label classification or a retrieval set."
        )
    found = "zeroshot_retrieval" if dataset_type == "retrieval" else "zeroshot_classification"
    if task == "auto":
        task = found
    elif task not in CLIP_BENCHMARK_TASKS:
        raise ConfigError(f"`clip_benchmark_task` is {task!r}; choose auto, {', '.join(CLIP_BENCHMARK_TASKS)}.")
    elif dataset_type is not None and task != found:
        raise ConfigError(
            f"`clip_benchmark_task` is {task}, but {folder / DATASET_TYPE_FILE} says {dataset_type!r} (a "
            f"{found.removeprefix('zeroshot_')} set); set `clip_benchmark_task` to auto or {found}."
        )
    shards = _split_shards(folder, split)
    if task == "zeroshot_retrieval":
        return ClipBenchmarkSet(str(folder), split, task, shards)
    class_names = _read_class_names(folder / CLASSNAMES_FILE)
    templates = _read_templates(folder / TEMPLATES_FILE)
    return ClipBenchmarkSet(str(folder), split, task, shards, class_names, templates)


def _read_lines(path: Path) -> list[str]:
    """The file's lines as CLIP_benchmark reads them (`str.splitlines`, each stripped), without trailing blank lines
    (a file ending in an empty line would otherwise gain a class named "")."""
    try:
        # utf-8-sig: a byte order mark (some editors write one) is not part of the first class name.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8."
        ) from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _read_dataset_type(folder: Path) -> str | None:
    path = folder / DATASET_TYPE_FILE
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8-sig").strip().lower()


def _natural_key(path: Path) -> tuple:
    # 2.tar before 10.tar, as the shard numbers run.
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def _split_shards(folder: Path, split: str) -> list[str]:
    split_folder = folder / split
    if not split_folder.is_dir():
        found = sorted(path.name for path in folder.iterdir() if path.is_dir())
        raise ConfigError(
            f"`{_KEY}` {str(folder)!r} has no {split!r} split folder (its folders: {', '.join(found) or 'none'}); "
            "set `clip_benchmark_split` to the folder of the tar shards."
        )
    count_file = split_folder / SHARD_COUNT_FILE
    if count_file.is_file():
        text = count_file.read_text(encoding="utf-8-sig").strip()
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(
                f"{count_file} holds {text!r}, not a number of shards; write the number n of shards 0.tar ... "
                f"{{n-1}}.tar (or delete it to read every .tar of {split_folder})."
            )
        shards = [split_folder / f"{index}.tar" for index in range(int(text))]
        missing = [path.name for path in shards if not path.is_file()]
        if missing:
            raise ConfigError(
                f"{count_file} says {text} shard(s), but {split_folder} lacks {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; copy the missing shards or correct {SHARD_COUNT_FILE}."
            )
        return [str(path) for path in shards]
    shards = sorted((path for path in split_folder.glob("*.tar") if path.is_file()), key=_natural_key)
    if not shards:
        raise ConfigError(
            f"The {split!r} split folder {split_folder} holds no .tar shard and no {SHARD_COUNT_FILE}; it needs "
            "shards 0.tar, 1.tar, ... of samples (an image with a .cls class index, or a .txt of captions)."
        )
    logger.info(f"{split_folder} has no {SHARD_COUNT_FILE}: reading its {len(shards)} .tar shard(s).")
    return [str(path) for path in shards]


def _blank_line_error(path: Path, lines: list[str], what: str) -> None:
    blank = next((number for number, line in enumerate(lines, 1) if not line), None)
    if blank is not None:
        raise ConfigError(f"{path} line {blank} is blank; {what}")


def _read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(
            f"`{_KEY}` has no {CLASSNAMES_FILE} ({path}); zero-shot classification needs one class name per line, "
            f"line 1 naming class index 0. For a retrieval set, write `retrieval` into {DATASET_TYPE_FILE} (or set "
            "`clip_benchmark_task` to zeroshot_retrieval)."
        )
    names = _read_lines(path)
    if not names:
        raise ConfigError(f"{path} is empty; write one class name per line, line 1 naming class index 0.")
    _blank_line_error(path, names, "line n names class index n-1, so a class cannot go unnamed: write its name.")
    return names


def _read_templates(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(
            f"`{_KEY}` has no {TEMPLATES_FILE} ({path}); zero-shot classification needs one prompt per line, with "
            "{c} where the class name goes, e.g. `a photo of a {c}.`"
        )
    templates = _read_lines(path)
    if not templates:
        raise ConfigError(f"{path} is empty; write one prompt per line, e.g. `a photo of a {{c}}.`")
    _blank_line_error(path, templates, "write a prompt with {c} on it, or remove the line.")
    for number, template in enumerate(templates, 1):
        try:
            filled = template.format(c="")
        except (KeyError, IndexError, ValueError):
            filled = None
        if "{c}" not in template or filled is None:
            raise ConfigError(
                f"{path} line {number} ({template!r}) needs exactly the placeholder {{c}} where the class name goes "
                "(filled with Python's str.format, as CLIP_benchmark fills it; write a literal brace as {{ or }})."
            )
    return templates


# --------------------------------------------------------------------------------------------------------------
# The samples
# --------------------------------------------------------------------------------------------------------------


class _ImageBatches:
    """The DataLoader's collate function (run in its workers): each sample's image decoded and resized by the model's
    preprocessing; one that cannot be used stays as a blank placeholder flagged invalid, with the reason."""

    def __init__(self, preprocessor: Any, max_image_pixels: int | None) -> None:
        self.preprocessor = preprocessor
        self.max_image_pixels = max_image_pixels

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from .images import load_image

        pixels, reasons = [], []
        for row in rows:
            try:
                if row["image"] is None:
                    raise BadSampleError(f"no image member ({', '.join(IMAGE_MEMBERS)})")
                pixels.append(self.preprocessor(load_image(row["image"], max_pixels=self.max_image_pixels)))
                reasons.append(None)
            except BadSampleError as error:
                pixels.append(self.preprocessor.placeholder())
                reasons.append(error.reason)
        return {
            "inputs": self.preprocessor.collate(pixels),
            "valid": torch.tensor([reason is None for reason in reasons], dtype=torch.bool),
            "reasons": reasons,
            "targets": [row["target"] for row in rows],
            "keys": [row["__key__"] for row in rows],
            "shards": [row["__url__"] for row in rows],
        }


def _sample_stream(benchmark: ClipBenchmarkSet, on_bad_rows: str):
    """The split's samples as `{"image", "target", "__key__", "__url__"}` rows, read by the project's shard reader
    (a truncated or unreadable shard is named, left out in part or whole, and counted), as a `datasets` stream that
    deals the shards to the DataLoader's workers. `target` is the decoded `.cls` (an int, `None` when missing or not
    a number) or the `.txt` text."""
    import datasets

    from .sources import _SampleColumns, _ShardReader, check_shards

    readable, report, _ = check_shards(benchmark.shards, _KEY, on_bad_rows)
    if not readable:
        raise ConfigError(f"None of the shards of `{_KEY}` {benchmark.root!r} can be read: {report.summary()}.")
    classification = benchmark.task == "zeroshot_classification"
    member = "cls" if classification else "txt"
    columns = _SampleColumns("image", list(IMAGE_MEMBERS), any_image=False, lookups={"target": (member, None)})
    features = datasets.Features(
        {
            "image": datasets.Image(decode=False),
            # A class index too large for int64 would stop Arrow; as text it reaches the range check below.
            "target": datasets.Value("string"),
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
        }
    )
    reader = _ShardReader(columns, _KEY, on_bad_rows)
    stream = datasets.IterableDataset.from_generator(
        _TargetsAsText(reader), features=features, gen_kwargs={"shards": readable}
    )
    return stream, report


class _TargetsAsText:
    """The shard reader's rows with the target as text (`None` stays `None`); a class, so that workers pickle it."""

    def __init__(self, reader: Callable) -> None:
        self.reader = reader

    def __call__(self, shards: list[str]):
        for row in self.reader(shards):
            if row["target"] is not None:
                row["target"] = str(row["target"])
            yield row


def _class_index(value: str | None, num_classes: int, where: str) -> int:
    """A sample's `.cls` as a class index, or a one-line error naming the sample and the fix."""
    index = int(value) if value is not None and re.fullmatch(r"-?\d+", value) else None
    if index is None:
        raise ConfigError(
            f"{where} has no readable .cls member (a class index, e.g. `3`); every sample of a classification set "
            f"needs one. Re-create the shard, or for a retrieval set write `retrieval` into {DATASET_TYPE_FILE}."
        )
    if not 0 <= index < num_classes:
        raise ConfigError(
            f"{where} has class index {index}, but {CLASSNAMES_FILE} names {num_classes} classes (0 to "
            f"{num_classes - 1}); correct its .cls, or add the missing class names to {CLASSNAMES_FILE}."
        )
    return index


# --------------------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------------------


def evaluate_clip_benchmark(
    model: Any,
    processor: Any,
    benchmark: ClipBenchmarkSet,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    max_seq_length: int | None = None,
    text_padding: str | None = None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    max_image_pixels: int | None = 89_478_485,
    on_bad_rows: str = "skip",
    recall_ks: Sequence[int] = (5,),
    chunk_size: int = 1024,
) -> ClipBenchmarkResult:
    """
    Scores `model` on one split of a CLIP_benchmark dataset: zero-shot classification or image-text retrieval, as
    the set's task says (see the module docstring for the metrics and how they match CLIP_benchmark's).

    Images are decoded and resized by the model's own image processor settings (as a run evaluates), captions and
    prompts tokenized as the run tokenizes captions (the family's padding, truncated at `max_seq_length`).

    Args:
        model: a CLIP, SigLIP, SigLIP 2 or vision-text dual encoder model, on any device.
        processor: its processor (a `tokenizer` and an `image_processor`).
        benchmark ([`ClipBenchmarkSet`]): the split, from [`read_clip_benchmark_set`].
        batch_size (`int`, *optional*, defaults to 64): images embedded at once.
        num_workers (`int`, *optional*, defaults to 0): DataLoader worker processes decoding the images.
        max_seq_length (`int`, *optional*): longest caption or prompt in tokens; defaults to the text tower's
            positions (capped at the tokenizer's `model_max_length`).
        text_padding (`str`, *optional*): the family's caption padding by default.
        context (*optional*): a context manager factory around each forward (a run's autocast).
        max_image_pixels (`int`, *optional*): larger images are refused as likely decompression bombs.
        on_bad_rows (`str`, *optional*, defaults to `"skip"`): `error` stops at the first shard that cannot be read.
        recall_ks (`Sequence[int]`, *optional*, defaults to `(5,)`, CLIP_benchmark's default): the k of the
            retrieval recalls in CLIP_benchmark's names (clip-trainer's keys have 1, 5 and 10 as well).
        chunk_size (`int`, *optional*, defaults to 1024): queries ranked at once.

    Raises:
        [`ConfigError`]: a sample without a class index or with one out of range (naming its shard and key), or a
            split without a usable sample.
    """
    import torch
    from torch.utils.data import DataLoader

    from .evaluation import (
        build_zeroshot_classifier,
        normalized_features,
        retrieval_metrics,
        share_embeddings,
        text_encoder,
        zeroshot_accuracy,
    )
    from .modeling import max_text_positions, model_family
    from .preprocessing import ImagePreprocessor

    tokenizer = processor.tokenizer
    padding = text_padding or model_family(model.config).text_padding
    max_length = max_seq_length or min(max_text_positions(model.config), tokenizer.model_max_length)
    preprocessor = ImagePreprocessor.from_image_processor(processor.image_processor)
    stream, report = _sample_stream(benchmark, on_bad_rows)
    loader = DataLoader(
        stream,
        batch_size=batch_size,
        collate_fn=_ImageBatches(preprocessor, max_image_pixels),
        num_workers=num_workers,
    )
    classification = benchmark.task == "zeroshot_classification"
    device = next(model.parameters()).device
    image_chunks, labels, captions, caption_images = [], [], [], []
    skipped: list[str] = []
    blank_captions = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                keep = []
                for row, (key, shard, target, reason) in enumerate(
                    zip(batch["keys"], batch["shards"], batch["targets"], batch["reasons"])
                ):
                    where = f"Sample {key!r} of shard {shard!r}"
                    if classification:  # checked whatever the image: a wrong label is a wrong dataset
                        label = _class_index(target, len(benchmark.class_names), where)
                    if reason is not None:
                        skipped.append(f"{where}: {reason}")
                        continue
                    if classification:
                        labels.append(label)
                    else:
                        lines = (target or "").splitlines()  # CLIP_benchmark: `str.splitlines`
                        kept = [line for line in lines if line.strip()]
                        blank_captions += len(lines) - len(kept)
                        if not kept:
                            skipped.append(f"{where}: no caption (its .txt is missing or blank)")
                            continue
                        image_index = sum(len(chunk) for chunk in image_chunks) + len(keep)
                        captions.extend(kept)
                        caption_images.extend([image_index] * len(kept))
                    keep.append(row)
                if not keep:
                    continue
                index = torch.tensor(keep)
                inputs = {name: value[index].to(device) for name, value in batch["inputs"].items()}
                inputs["pixel_values"] = preprocessor.normalize(
                    inputs["pixel_values"], inputs.get("pixel_attention_mask")
                )
                with context():
                    image_chunks.append(normalized_features(model.get_image_features(**inputs)).cpu())
    finally:
        model.train(was_training)

    skipped_count = len(skipped) + report.skipped_samples
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5:,} more" if len(skipped) > 5 else "")
        logger.warning(f"`{_KEY}`: left out {len(skipped):,} sample(s) that cannot be used ({shown}).")
    if blank_captions:
        logger.warning(f"`{_KEY}`: left out {blank_captions:,} blank caption line(s).")
    samples = sum(len(chunk) for chunk in image_chunks)
    if samples == 0:
        raise ConfigError(
            f"`{_KEY}` {benchmark.root!r} split {benchmark.split!r} has no usable sample "
            f"({skipped_count:,} left out; the warnings above name them): fix or replace its shards."
        )
    images = torch.cat(image_chunks)
    encode = text_encoder(model, tokenizer, padding=padding, max_length=max_length, device=device, context=context)
    if classification:
        classifier = build_zeroshot_classifier(encode, benchmark.class_names, benchmark.templates, placeholder="{c}")
        metrics = zeroshot_accuracy(images, labels, classifier, ks=(1, 5), chunk_size=chunk_size)
        benchmark_metrics = {
            "acc1": metrics["zeroshot_top1"],
            # CLIP_benchmark reports no top-5 below 5 classes (NaN), where clip-trainer's top-5 is 1.
            "acc5": metrics["zeroshot_top5"] if len(benchmark.class_names) >= 5 else math.nan,
            "mean_per_class_recall": metrics["zeroshot_balanced_accuracy"],
        }
        return ClipBenchmarkResult(metrics, benchmark_metrics, samples, skipped_count)
    # Captions are encoded in chunks padded to their longest, so equal captions of two samples can differ by a float
    # rounding and the tie rule would decide between them at random: equal captions get one embedding.
    texts = share_embeddings(encode(captions), captions)
    rows = torch.tensor(caption_images)
    ks = sorted({*RECALL_KS, *recall_ks})
    # One row per caption with its image; each sample is its own image (`image_ids`), even two of the same bytes.
    metrics = retrieval_metrics(images[rows], texts, image_ids=rows, ks=ks, chunk_size=chunk_size)
    benchmark_metrics = {}
    for k in recall_ks:  # CLIP_benchmark's order: for each k, image retrieval then text retrieval
        benchmark_metrics[f"image_retrieval_recall@{k}"] = metrics[f"t2i_recall@{k}"]
        benchmark_metrics[f"text_retrieval_recall@{k}"] = metrics[f"i2t_recall@{k}"]
    return ClipBenchmarkResult(metrics, benchmark_metrics, samples, skipped_count, captions=len(captions))


def clip_benchmark_record(
    result: ClipBenchmarkResult, benchmark: ClipBenchmarkSet, model: str, pretrained: str
) -> dict[str, Any]:
    """
    CLIP_benchmark's results JSON (what `clip_benchmark eval` dumps, and `clip_benchmark build` reads into its CSV):
    `dataset`, `model`, `pretrained`, `task`, `metrics`, `language`.

    Args:
        model (`str`): the model, e.g. its architecture (`CLIPModel`); CLIP_benchmark's is an open_clip name.
        pretrained (`str`): where its weights come from (a Hub id or folder); CLIP_benchmark's is a checkpoint tag.
    """
    return {
        "dataset": benchmark.name,
        "model": model,
        "pretrained": pretrained,
        "task": benchmark.task,
        "metrics": result.benchmark_metrics,
        # The class names and prompts come from the dataset's files, in whatever language they are written;
        # CLIP_benchmark's WebDataset sets record its default, en, too.
        "language": "en",
    }


def write_clip_benchmark_record(record: dict[str, Any], path: str) -> None:
    """Writes the record as CLIP_benchmark does (`json.dump`, NaN for a missing `acc5`), creating its folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
