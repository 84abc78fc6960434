"""Streaming the training pairs (`--streaming true`): data larger than the disk, or not worth preparing first.

The training split is a `datasets.IterableDataset` read shard by shard, shuffled in a buffer and repeated, so that the
run's length is `max_steps` alone. Evaluation needs a finite set that every evaluation sees in full, so the validation
split is materialised: the source's own validation split or file, or else the first `max_eval_samples` pairs of the
stream, which are then filtered out of the training stream.

Several processes: `accelerate` shards the stream when the Trainer prepares its DataLoader (by files when there are
at least as many as processes, otherwise by examples), provided batches are not dispatched from process 0, which
needs equal-shaped batches: a streaming run sets `accelerator_config.dispatch_batches` to false.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, IterableDataset
from transformers.utils import logging

from .arguments import ConfigError, DataArguments
from .data import (
    FILE_BUILDERS,
    ImageTextData,
    _check_columns,
    _drop_bad_rows,
    _image_key,
    _make_image_column_lazy,
    add_class_labels,
    add_image_ids,
    is_prepared_folder,
)

logger = logging.get_logger(__name__)

# Pairs held out of the stream for validation when the source has no validation split and `max_eval_samples` is unset.
DEFAULT_STREAMING_EVAL_SAMPLES = 1000
# Examples in the shuffle buffer: the buffer holds encoded images (tens of KB each), not decoded ones.
DEFAULT_SHUFFLE_BUFFER_SIZE = 10_000
# Shards a prepared (on-disk) dataset is cut into when streamed, so that processes and DataLoader workers split it by
# shards rather than each reading every example.
PREPARED_DATASET_SHARDS = 64
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val")


def _glob_base_dir(pattern: str) -> str:
    """The folder that relative image paths of a (possibly globbed) data file are resolved against: the deepest
    folder of the pattern without wildcards."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if re.search(r"[*?\[]", part):
            break
        fixed.append(part)
    return str(Path(*fixed).resolve()) if fixed else os.getcwd()


def _load_streaming_source(
    data_args: DataArguments, cache_dir: str | None
) -> tuple[IterableDataset, Dataset | IterableDataset | None, str | None, str | None]:
    """The training stream, the validation split if the source has one, and their folders for relative paths."""
    name = data_args.dataset_name
    if name == "emoji":
        from .demo_data import EMOJI_PARQUET

        train = datasets.load_dataset(
            "parquet", data_files={"train": str(EMOJI_PARQUET)}, split="train", streaming=True
        )
        return train, None, None, None
    if name is not None and os.path.isdir(name) and is_prepared_folder(name):
        # Already on disk: streaming only saves the memory map's page cache, but it is what was asked for.
        loaded = datasets.load_from_disk(name)
        splits = {"train": loaded} if isinstance(loaded, Dataset) else dict(loaded)
        if "train" not in splits:
            raise ConfigError(f"The data has no `train` split; its splits are: {', '.join(splits)}.")
        train = splits["train"].to_iterable_dataset(num_shards=min(PREPARED_DATASET_SHARDS, len(splits["train"])))
        validation = next((splits[split] for split in VALIDATION_SPLIT_NAMES if split in splits), None)
        return train, validation, None, None
    if name is not None:
        # Opening every split as a stream reads no data yet; only the splits that are iterated are downloaded.
        streams = datasets.load_dataset(name, data_args.dataset_config_name, cache_dir=cache_dir, streaming=True)
        if "train" not in streams:
            raise ConfigError(f"The data has no `train` split; its splits are: {', '.join(streams)}.")
        validation = next((streams[split] for split in VALIDATION_SPLIT_NAMES if split in streams), None)
        base = name if os.path.isdir(name) else None
        return streams["train"], validation, base, base

    builder = FILE_BUILDERS[Path(data_args.train_file).suffix.lower()]
    train = datasets.load_dataset(
        builder, data_files={"train": data_args.train_file}, split="train", streaming=True, cache_dir=cache_dir
    )
    validation, validation_base = None, None
    if data_args.validation_file:
        # Loaded whole, not streamed: evaluation must see the same finite set every time.
        path = data_args.validation_file
        validation = datasets.load_dataset(
            FILE_BUILDERS[Path(path).suffix.lower()], data_files={"validation": path}, split="validation",
            cache_dir=cache_dir,
        )  # fmt: skip
        validation_base = _glob_base_dir(path)
    return train, validation, _glob_base_dir(data_args.train_file), validation_base


def _column_names(stream: IterableDataset) -> list[str]:
    """The stream's columns; csv streams know them only once a row is read."""
    if stream.column_names is not None:
        return list(stream.column_names)
    first = next(iter(stream.take(1)), None)
    if first is None:
        raise ConfigError("The training stream is empty; check `dataset_name` / `train_file`.")
    return list(first)


def _lazy_image_stream(stream: IterableDataset, image_column: str, base_dir: str | None) -> IterableDataset:
    """Keeps images encoded (bytes or absolute paths), as [`load_image_text_data`] does for a loaded dataset."""
    features = stream.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        return stream.cast_column(image_column, datasets.Image(decode=False))
    if base_dir is None:
        return stream

    def resolve(batch: dict[str, list]) -> dict[str, list]:
        return {
            image_column: [
                p if not isinstance(p, str) or os.path.isabs(p) else os.path.join(base_dir, p)
                for p in batch[image_column]
            ]
        }

    return stream.map(resolve, batched=True, features=features)


def _materialize(stream: IterableDataset, limit: int | None) -> Dataset:
    rows = list(stream.take(limit) if limit is not None else stream)
    return Dataset.from_list(rows, features=stream.features)


class _NotHeldOut:
    """Filter predicate: drops the pairs held out for validation (a picklable class, for DataLoader workers).

    A pair is recognised by its image (path, or digest of its bytes) and caption, not by its position: positions are
    not stable once `accelerate` shards the stream, and a duplicate of a validation pair must not be trained on either.
    """

    def __init__(self, keys: set[tuple[str, str]], image_column: str, caption_column: str) -> None:
        self.keys = keys
        self.image_column = image_column
        self.caption_column = caption_column

    def __call__(self, row: dict[str, Any]) -> bool:
        return (_image_key(row[self.image_column]), str(row[self.caption_column])) not in self.keys


def load_streaming_data(data_args: DataArguments, seed: int, cache_dir: str | None = None) -> ImageTextData:
    """The training pairs as a shuffled, endlessly repeated stream, and a materialised validation split.

    Args:
        data_args: where the pairs come from: `dataset_name` (a Hub id, a local folder of data files, a prepared
            folder, or `emoji`) or `train_file` (a csv/json/parquet file, or a glob of shards such as
            `data/train-*.parquet`), with an optional `validation_file`.
        seed: the shuffle seed; the same on every process, so that they agree on the shuffled order of the shards
            that `accelerate` deals out to them.
        cache_dir: the `datasets` cache.

    Training rows are not checked up front (that would read the whole stream); the collator skips unusable samples
    as it meets them and the Trainer logs how many it skipped. Validation rows are checked like a loaded dataset's.
    """
    train, validation, train_base, validation_base = _load_streaming_source(data_args, cache_dir)
    # `_check_columns` reads a Dataset's column names; an empty one stands in for the stream.
    _check_columns(Dataset.from_dict({column: [] for column in _column_names(train)}), "train", data_args)
    train = _lazy_image_stream(train, data_args.image_column, train_base)

    if validation is None:
        # The head of the unshuffled stream, so that every process and every restart holds out the same pairs.
        held_out = data_args.max_eval_samples or DEFAULT_STREAMING_EVAL_SAMPLES
        validation = _materialize(train, held_out)
        if len(validation) < held_out:
            raise ConfigError(
                f"The training stream has only {len(validation)} pairs, all of them held out for validation; give "
                "a `validation_file` or a smaller `max_eval_samples`, or train without `streaming`."
            )
        keys = {
            (_image_key(image), str(caption))
            for image, caption in zip(validation[data_args.image_column], validation[data_args.caption_column])
        }
        train = train.filter(_NotHeldOut(keys, data_args.image_column, data_args.caption_column))
        logger.info(f"Held out the first {len(validation):,} pairs of the stream for validation.")
    else:
        if isinstance(validation, IterableDataset):
            validation = _lazy_image_stream(validation, data_args.image_column, validation_base)
            validation = _materialize(validation, data_args.max_eval_samples)
        else:
            validation = _make_image_column_lazy(validation, data_args.image_column, validation_base)
    _check_columns(validation, "validation", data_args)
    validation = _drop_bad_rows(validation, "validation", data_args)
    if data_args.max_eval_samples is not None:
        validation = validation.select(range(min(data_args.max_eval_samples, len(validation))))
    validation = add_image_ids(validation, data_args.image_column, data_args.image_id_column)
    class_names = None
    if data_args.label_column is not None:
        validation, class_names = add_class_labels(validation, data_args.label_column)

    if data_args.max_train_samples is not None:
        train = train.take(data_args.max_train_samples)
    # Repeated without end: `max_steps` alone ends the run, and no process runs out of data before the others (which
    # would leave them waiting in a collective) when `accelerate` deals out shards of unequal sizes. Shuffled after
    # repeating, so that the buffer keeps drawing new orders on every pass rather than replaying the first one.
    buffer_size = getattr(data_args, "shuffle_buffer_size", None) or DEFAULT_SHUFFLE_BUFFER_SIZE
    train = train.repeat(None).shuffle(seed=seed, buffer_size=buffer_size)
    logger.info(
        f"Streaming the training pairs ({train.num_shards} shard(s), shuffle buffer {buffer_size:,}); validation "
        f"pairs: {len(validation):,}"
    )
    return ImageTextData(train=train, validation=validation, class_names=class_names)
