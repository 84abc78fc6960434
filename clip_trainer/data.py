"""Loading image-caption pairs: from the Hub, local files, a prepared folder or the bundled demo data.

Images are never decoded here: they stay file paths or encoded bytes, and the collator decodes each batch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, IterableDataset
from transformers.utils import logging

from .arguments import ConfigError, DataArguments
from .images import find_bad_rows

logger = logging.get_logger(__name__)

IMAGE_ID_COLUMN = "_image_id"
LABEL_COLUMN = "_label"
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class ImageTextData:
    """The splits a run trains and evaluates on.

    Attributes:
        train: training pairs (`None` for an evaluation-only run without training data).
        validation: validation pairs with an integer image id per row (`_image_id`) so that several captions of one
            image are scored as one image, and an integer class label (`_label`) when zero-shot is on.
        class_names: names of the zero-shot classes, indexed by `_label`; `None` without a label column.
    """

    train: Dataset | IterableDataset | None
    validation: Dataset | None
    class_names: list[str] | None = None


def is_prepared_folder(path: str) -> bool:
    """Whether `path` is a folder written by `save_to_disk` (a `--prepare_only` run writes one)."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


def _load_source(data_args: DataArguments, cache_dir: str | None) -> tuple[DatasetDict, dict[str, str | None]]:
    """Returns the raw splits and, per split, the folder that relative image paths are resolved against."""
    name = data_args.dataset_name
    if name == "emoji":
        from .demo_data import load_emoji_dataset

        return DatasetDict({"train": load_emoji_dataset()}), {}
    if name is not None and os.path.isdir(name) and is_prepared_folder(name):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, Dataset):
            loaded = DatasetDict({"train": loaded})
        return loaded, {}
    if name is not None:
        loaded = datasets.load_dataset(name, data_args.dataset_config_name, cache_dir=cache_dir)
        base = name if os.path.isdir(name) else None
        return loaded, {split: base for split in loaded}

    files = {"train": data_args.train_file}
    if data_args.validation_file:
        files["validation"] = data_args.validation_file
    splits, base_dirs = {}, {}
    for split, path in files.items():
        builder = FILE_BUILDERS[Path(path).suffix.lower()]
        splits[split] = datasets.load_dataset(builder, data_files={split: path}, cache_dir=cache_dir)[split]
        base_dirs[split] = str(Path(path).resolve().parent)
    return DatasetDict(splits), base_dirs


def _check_columns(dataset: Dataset, split: str, data_args: DataArguments) -> None:
    columns = dataset.column_names
    wanted = {
        "image_column": data_args.image_column,
        "caption_column": data_args.caption_column,
        "image_id_column": data_args.image_id_column,
    }
    if split == "validation":
        wanted["label_column"] = data_args.label_column
    for key, column in wanted.items():
        if column is not None and column not in columns:
            raise ConfigError(
                f"`{key}` is {column!r}, but the {split} data has no such column. Its columns are: "
                f"{', '.join(columns)}. Set `{key}` to one of them."
            )


def _make_image_column_lazy(dataset: Dataset, image_column: str, base_dir: str | None) -> Dataset:
    """Keeps images encoded (bytes or absolute paths) so that only the collator decodes them."""
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    if base_dir is None:
        return dataset

    def resolve(batch: dict) -> dict:
        return {
            image_column: [
                p if not isinstance(p, str) or os.path.isabs(p) else os.path.join(base_dir, p)
                for p in batch[image_column]
            ]
        }

    return dataset.map(resolve, batched=True, desc="Resolving image paths")


def _image_key(value) -> str:
    """What identifies an image across rows: its path, else a digest of its bytes."""
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        value = value.get("bytes")
    if isinstance(value, bytes | bytearray):
        return hashlib.blake2b(value, digest_size=16).hexdigest()
    return str(value)


def add_image_ids(dataset: Dataset, image_column: str, image_id_column: str | None) -> Dataset:
    """Adds `_image_id`: rows showing the same image get the same integer, so retrieval scores them as one image."""
    source = image_id_column or image_column
    keys = [str(v) if image_id_column else _image_key(v) for v in dataset.with_format(None)[source]]
    ids: dict[str, int] = {}
    return dataset.add_column(IMAGE_ID_COLUMN, [ids.setdefault(key, len(ids)) for key in keys])


def add_class_labels(dataset: Dataset, label_column: str) -> tuple[Dataset, list[str]]:
    """Adds `_label` (an integer class) and returns the class names for zero-shot prompts."""
    feature = dataset.features[label_column]
    values = dataset.with_format(None)[label_column]
    if isinstance(feature, ClassLabel):
        names = [name.replace("_", " ") for name in feature.names]
        labels = list(values)
    else:
        names = sorted({str(v) for v in values})
        index = {name: i for i, name in enumerate(names)}
        labels = [index[str(v)] for v in values]
    return dataset.add_column(LABEL_COLUMN, labels), names


def _drop_bad_rows(dataset: Dataset, split: str, data_args: DataArguments) -> Dataset:
    report = find_bad_rows(dataset, data_args.image_column, data_args.caption_column, base_dir=None)
    if not report.bad_indices:
        return dataset
    message = f"{split} data: " + report.summary(len(dataset))
    if data_args.on_bad_rows == "error":
        raise ConfigError(message + " Fix or remove these rows, or set `on_bad_rows` to `skip`.")
    logger.warning(message)
    return dataset.select(report.good_indices())


def load_image_text_data(data_args: DataArguments, seed: int, cache_dir: str | None = None) -> ImageTextData:
    """Loads, splits and checks the training and validation pairs described by `data_args`.

    The validation split is the source's own `validation` split, or `validation_split_percentage` percent of the
    training data drawn with `seed` (the seed project's 85/15).
    """
    if data_args.streaming:
        from .streaming import load_streaming_data

        return load_streaming_data(data_args, seed, cache_dir)

    raw, base_dirs = _load_source(data_args, cache_dir)
    if "train" not in raw:
        raise ConfigError(f"The data has no `train` split; its splits are: {', '.join(raw)}.")
    train = raw["train"]
    validation = raw.get("validation") or raw.get("valid") or raw.get("val")
    base_dirs.setdefault("validation", base_dirs.get("train"))
    if validation is None:
        split = train.train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        train, validation = split["train"], split["test"]
        base_dirs["validation"] = base_dirs.get("train")

    splits = {"train": train, "validation": validation}
    for name, dataset in splits.items():
        _check_columns(dataset, name, data_args)
        dataset = _make_image_column_lazy(dataset, data_args.image_column, base_dirs.get(name))
        splits[name] = _drop_bad_rows(dataset, name, data_args)

    train, validation = splits["train"], splits["validation"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        validation = validation.select(range(min(data_args.max_eval_samples, len(validation))))
    if len(train) == 0:
        raise ConfigError("No training pairs are left after removing bad rows; check the data.")

    validation = add_image_ids(validation, data_args.image_column, data_args.image_id_column)
    class_names = None
    if data_args.label_column is not None:
        validation, class_names = add_class_labels(validation, data_args.label_column)
    logger.info(f"Training pairs: {len(train):,}; validation pairs: {len(validation):,}")
    return ImageTextData(train=train, validation=validation, class_names=class_names)


def _embed_image_bytes(dataset: Dataset, image_column: str, num_proc: int | None) -> Dataset:
    """Replaces image paths by the files' encoded bytes, so the prepared folder is self-contained."""

    def read(batch: dict) -> dict:
        images = []
        for value in batch[image_column]:
            if isinstance(value, dict) and value.get("bytes") is not None:
                images.append({"bytes": value["bytes"], "path": None})
                continue
            path = value["path"] if isinstance(value, dict) else value
            images.append({"bytes": Path(path).read_bytes(), "path": None})
        return {image_column: images}

    features = dataset.features.copy()
    features[image_column] = datasets.Image(decode=False)
    return dataset.map(read, batched=True, features=features, num_proc=num_proc, desc="Embedding image bytes")


def save_prepared_data(data: ImageTextData, data_args: DataArguments, output_dir: str) -> str:
    """Writes the checked train/validation splits to `output_dir` with images as their encoded bytes.

    This is the seed project's preparation step without its 600 KB float arrays: a later run trains from the folder
    with `--dataset_name output_dir`, with no network and no re-checking of files.
    """
    splits = {}
    for name, dataset in (("train", data.train), ("validation", data.validation)):
        dataset = dataset.remove_columns([c for c in (IMAGE_ID_COLUMN, LABEL_COLUMN) if c in dataset.column_names])
        splits[name] = _embed_image_bytes(dataset, data_args.image_column, data_args.preprocessing_num_workers)
    DatasetDict(splits).save_to_disk(output_dir)
    return output_dir
