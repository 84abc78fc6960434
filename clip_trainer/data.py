"""Loading image-caption pairs: from the Hub, local files, a prepared folder or the bundled demo data, loaded or
streamed.

One path for both modes. Every source is opened with `datasets` (`load_dataset(..., streaming=...)`,
`load_from_disk` + `to_iterable_dataset`, the emoji loader's `streaming` flag); image paths are resolved against the
folder of the file that names them; then the validation split is finished the same way whatever the mode (a finite,
checked `Dataset` with image ids and class labels), and the training split is either checked up front (loaded) or
shuffled in a buffer and repeated (streamed, [`_finish_training_stream`]).

Images are never decoded here: they stay file paths or encoded bytes, and the collator decodes each batch.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, IterableDataset
from transformers.utils import logging

from .arguments import ConfigError, DataArguments
from .captions import (
    HeldOutImages,
    caption_list,
    expand_evaluation_captions,
    image_identities,
    prepare_training_captions,
    sample_stream_captions,
)
from .hub import NETWORK_ERRORS
from .images import (
    BadSampleError,
    decode_base64_image,
    is_url,
    load_image,
    looks_like_base64_image,
    resolve_image_path,
)
from .rows import find_bad_rows
from .sources import (
    SOURCE_ROW_COLUMN,
    ShardReport,
    check_mixture_size,
    expand_pattern,
    folder_splits,
    interleave,
    is_webdataset,
    load_image_folder,
    load_webdataset,
    log_mixture,
    mixed_columns,
    mixture_source_arguments,
    mixture_source_key,
    pattern_suffix,
    resolve_data_path,
    webdataset_columns,
)
from .stream import StreamSource, record_source, shuffled_passes, source_of

logger = logging.get_logger(__name__)

IMAGE_ID_COLUMN = "_image_id"
LABEL_COLUMN = "_label"
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# The field separator of each kind of delimited text file (pandas' `sep`, Python's `csv` `delimiter`).
SEPARATORS = {".csv": ",", ".tsv": "\t"}
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val")
# Pairs held out of a stream for validation when the source has no validation split and `max_eval_samples` is unset.
DEFAULT_STREAMING_EVAL_SAMPLES = 1000
# Captions a tokenizer for a model built from scratch is trained on, at most (a stream is read this far).
TOKENIZER_TRAINING_CAPTIONS = 100_000
# Shards a loaded dataset is cut into when streamed, so that processes and DataLoader workers split it by shards
# rather than each reading every example.
STREAM_SHARDS = 64


@dataclass
class DataSource:
    """What the data is, for the model card.

    Attributes:
        kind: `hub` (a Hub dataset id), `bundled` (clip-trainer's demo data) or `local` (files or folders).
        name: the Hub id, `emoji`, or the file or folder name (not its full path, which is the author's business).
        description: one line for a reader of the model card.
    """

    kind: str
    name: str
    description: str

    @property
    def hub_id(self) -> str | None:
        return self.name if self.kind == "hub" else None


DROPPED_ROWS_FILE = "dropped_rows.jsonl"


@dataclass
class DroppedRows:
    """The rows left out before training because they cannot be used (a missing or empty image file, an empty
    caption, ...), over every split and source: the log names the first few of each, and a run writes every one to
    `dropped_rows.jsonl` in its output folder (`where`: the data or source, `row`: as the log numbers it, `reason`),
    so that nothing is left out without a trace.

    Attributes:
        count: rows left out.
        named: one `{"where", "row", "reason"}` per row whose reason was kept (the first `NAMED_LIMIT` of each
            check; a badly broken dataset cannot fill memory), in the order found.
    """

    NAMED_LIMIT = 10_000

    count: int = 0
    named: list[dict[str, Any]] = field(default_factory=list)

    def add(self, where: str, report: Any) -> None:
        """Adds the rows of a [`BadRowReport`] found in `where` ("train data", a mixture's source)."""
        self.count += report.num_bad
        self.named.extend({"where": where, "row": row, "reason": reason} for row, reason in report.reasons.items())

    def merge(self, other: DroppedRows) -> None:
        self.count += other.count
        self.named.extend(other.named)

    def write(self, output_dir: str) -> str | None:
        """Writes `dropped_rows.jsonl` into `output_dir` when a row was left out; returns its path."""
        if not self.count:
            return None
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, DROPPED_ROWS_FILE)
        with open(path, "w", encoding="utf-8") as handle:
            for entry in self.named:
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            if self.count > len(self.named):
                unnamed = {"where": None, "row": None, "reason": f"{self.count - len(self.named):,} more, not named"}
                handle.write(json.dumps(unnamed) + "\n")
        return path


@dataclass
class ImageTextData:
    """The splits a run trains and evaluates on.

    Attributes:
        train: training pairs (`None` for an evaluation-only run); a `datasets.IterableDataset` when streamed.
        validation: validation pairs with an integer image id per row (`_image_id`), so that several captions of one
            image are scored as one image, and a `ClassLabel` column `_label` (-1: no label) when zero-shot is on.
        source: what the data is, for the model card.
    """

    train: Dataset | IterableDataset | None
    validation: Dataset | None
    source: DataSource
    # The tar shards that could not be read (whole or in part): `shard_report.skipped_shards`,
    # `shard_report.skipped_samples`, `shard_report.summary()`.
    shard_report: ShardReport = field(default_factory=ShardReport)
    # One pass over the training pairs (a stream before it is repeated and shuffled), for `training_captions`.
    one_pass: Dataset | IterableDataset | None = field(default=None, repr=False)
    # The rows left out before training as unusable, for the run's results and `dropped_rows.jsonl`.
    dropped_rows: DroppedRows = field(default_factory=DroppedRows)

    def training_captions(self, caption_column: str, limit: int = TOKENIZER_TRAINING_CAPTIONS) -> list[str]:
        """The first `limit` training captions (all of a loaded split), e.g. to train a tokenizer on."""
        source = self.one_pass if self.one_pass is not None else self.train
        if isinstance(source, Dataset):
            values = source.select(range(min(limit, len(source))))[caption_column]
        else:
            values = [row[caption_column] for row in source.take(limit)]
        # A row may hold several captions (a list, or its JSON text): each is a caption to learn tokens from.
        return [caption for value in values for caption in caption_list(value)]

    @property
    def class_names(self) -> list[str] | None:
        """The zero-shot class names, indexed by `_label`; `None` without a label column."""
        return class_names_of(self.validation)


def class_names_of(dataset: Dataset | None) -> list[str] | None:
    """The class names of a validation split's `_label` column, or `None` when it has none."""
    if dataset is None or LABEL_COLUMN not in (dataset.column_names or []):
        return None
    return list(dataset.features[LABEL_COLUMN].names)


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------


def _stream(dataset: Dataset, streaming: bool) -> Dataset | IterableDataset:
    if not streaming:
        return dataset
    return dataset.to_iterable_dataset(num_shards=max(1, min(STREAM_SHARDS, len(dataset))))


def _load_source(
    data_args: DataArguments,
    cache_dir: str | None,
    streaming: bool,
    need_train: bool,
    report: ShardReport,
    key: str | None = None,
) -> tuple[dict[str, Dataset | IterableDataset], DataSource]:
    """The source's splits, with images kept encoded and relative paths resolved, and what the source is. `key`
    names the training source in messages (a mixture's source, see [`mixture_source_key`]), else its option."""
    if data_args.dataset_name is not None:
        return _load_named_source(data_args, cache_dir, streaming, report, key or "dataset_name")
    splits = {}
    if data_args.train_file is not None and (need_train or data_args.validation_file is None):
        train_key = key or "train_file"
        splits["train"] = _load_files(data_args.train_file, train_key, data_args, cache_dir, streaming, report)
    if data_args.validation_file is not None:
        # Loaded whole even when training streams: evaluation sees the same finite set every time.
        splits["validation"] = _load_files(
            data_args.validation_file, "validation_file", data_args, cache_dir, False, report
        )
    return splits, _local_source(data_args.train_file or data_args.validation_file, splits)


def _load_named_source(
    data_args: DataArguments, cache_dir: str | None, streaming: bool, report: ShardReport, key: str = "dataset_name"
) -> tuple[dict[str, Dataset | IterableDataset], DataSource]:
    """`dataset_name`, whatever [`resolve_data_path`] finds it is."""
    found = resolve_data_path("dataset_name", data_args.dataset_name)
    name = os.path.expanduser(found.path)
    if found.kind == "bundled":
        from .demo_data import load_emoji_dataset

        # Loaded, not streamed, even with `streaming`: it is held out by percentage as in a loaded run, and the
        # training split is streamed after that (see `load_image_text_data`).
        train = load_emoji_dataset()
        description = "the emoji demo data bundled with clip-trainer (3,655 Noto Color Emoji with their CLDR names)"
        return {"train": _with_lazy_images(train, data_args.image_column, None)}, DataSource(
            "bundled", name, description
        )
    if found.kind == "prepared":
        loaded = datasets.load_from_disk(name)
        splits = {"train": loaded} if isinstance(loaded, Dataset) else dict(loaded)
        splits = {split: _with_lazy_images(dataset, data_args.image_column, None) for split, dataset in splits.items()}
        return splits, _local_source(name, splits)
    if found.kind == "image_folder":
        # Images with a metadata file (datasets' imagefolder convention) or with a .txt caption beside each.
        splits = load_image_folder(name, found.folder_kind, data_args, cache_dir, streaming)
        return splits, _local_source(name, splits)
    if found.is_files:  # a data file, or shards, named as the dataset: its pairs are the training split
        splits = {"train": _load_files(name, key, data_args, cache_dir, streaming, report)}
        return splits, _local_source(name, splits)
    if found.kind == "data_folder":
        by_split = folder_splits(name)
        if by_split and all(file.lower().endswith(".tar") for files in by_split.values() for file in files):
            # WebDataset shards, split by datasets' file-name rules, each split read by clip-trainer's reader.
            splits = {
                split: load_webdataset(files, key, data_args, cache_dir, streaming, report)
                for split, files in by_split.items()
            }
            return splits, _local_source(name, splits)
    # A Hub id or a local folder of data files. Opening every split as a stream reads no data yet.
    local = found.kind == "data_folder"
    try:
        loaded = datasets.load_dataset(name, data_args.dataset_config_name, cache_dir=cache_dir, streaming=streaming)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError, *NETWORK_ERRORS) as error:
        raise _hub_error(name, error) from None
    base = str(Path(name).resolve()) if local else None
    # A Hub WebDataset repository is read by datasets' webdataset builder: its members become the run's columns.
    loaded = {
        split: webdataset_columns(dataset, data_args, f"`dataset_name` {name!r}")
        if is_webdataset(dataset)
        else dataset
        for split, dataset in loaded.items()
    }
    splits = {split: _with_lazy_images(dataset, data_args.image_column, base) for split, dataset in loaded.items()}
    if local:
        return splits, _local_source(name, splits)
    return splits, DataSource("hub", name, f"[{name}](https://huggingface.co/datasets/{name})")


def _hub_error(name: str, error: Exception) -> ConfigError:
    """`dataset_name` that is no local data and that the Hub did not give, in one line with the fix."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    offline = " (HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else ""
    return ConfigError(
        f"`dataset_name` {name!r} is not on this machine (no {os.path.abspath(name)}) and cannot be loaded from "
        f"the Hub{offline}: {reason}. Give the path of a local folder or file (e.g. ./{name}), or a Hub dataset id "
        "with the network on."
    )


def _load_mixture(
    data_args: DataArguments,
    cache_dir: str | None,
    streaming: bool,
    seed: int,
    hold_out: bool,
    report: ShardReport,
    dropped: DroppedRows,
) -> tuple[dict[str, Dataset | IterableDataset], DataSource]:
    """`train_mixture`: each source loaded as if it were the run's only one, then drawn by weight with
    `datasets.interleave_datasets`.

    Validation is the `validation_file`, else the sources' own validation splits; a loaded source without one gives
    `validation_split_percentage` of its pairs before mixing (held out of the mixture, which repeats pairs, a pair
    could land on both sides). A stream without either holds out the head of the mixed stream, as a single stream
    does.
    """
    mixture = data_args.train_mixture
    trains, validations, sizes = [], [], []
    for source in mixture:
        source_args = mixture_source_arguments(source, data_args)
        key = mixture_source_key(source)  # shards it cannot read are named as the mixture's, not as `train_file`
        splits, _ = _load_source(source_args, cache_dir, streaming, need_train=True, report=report, key=key)
        if "train" not in splits:
            raise ConfigError(
                f"`train_mixture` source {source!r} has no `train` split; its splits are: {', '.join(splits)}."
            )
        train = splits["train"]
        pair_columns = {data_args.image_column, data_args.caption_column}
        if isinstance(train, Dataset) and pair_columns <= set(train.column_names):
            # Checked source by source, before the split and the mixing: the report names the source and numbers
            # the rows as its file does (the mixture's order says nothing to whoever fixes the file).
            where = f"`train_mixture` source {source!r}"
            train = _drop_bad_rows(_captions_as_text(train, data_args.caption_column), where, data_args, dropped)
            if len(train) == 0:
                raise ConfigError(f"{where} has no pairs left after removing bad rows; check it (summary above).")
        validation = next((splits[name] for name in VALIDATION_SPLIT_NAMES if name in splits), None)
        if isinstance(train, Dataset) and hold_out and validation is None and data_args.validation_file is None:
            train, validation = _held_out_split(train, data_args, seed)
        if streaming and isinstance(train, Dataset):
            train = _stream(train, streaming=True)
        sizes.append(len(train) if isinstance(train, Dataset) else None)
        trains.append(mixed_columns(train, data_args, source))
        if validation is not None and data_args.validation_file is None:
            validations.append(mixed_columns(validation, data_args, source))
    log_mixture(mixture, sizes, data_args.mixture_stopping_strategy, streaming)
    if not streaming:
        check_mixture_size(mixture, sizes, data_args.mixture_stopping_strategy)
    mixed = {"train": interleave(trains, mixture, seed, data_args.mixture_stopping_strategy)}
    if data_args.validation_file is not None:
        mixed["validation"] = _load_files(
            data_args.validation_file, "validation_file", data_args, cache_dir, False, report
        )
    elif validations:
        limit = data_args.max_eval_samples or DEFAULT_STREAMING_EVAL_SAMPLES
        for index, validation in enumerate(validations):
            if isinstance(validation, IterableDataset):  # a streamed source's own validation split, read once
                validations[index] = Dataset.from_list(list(validation.take(limit)), features=validation.features)
        mixed["validation"] = datasets.concatenate_datasets(validations)
    names = ", ".join(_data_name(source) for source in mixture)
    return mixed, DataSource("local", names, f"a weighted mixture of {len(mixture)} sources ({names})")


def _data_name(path: str) -> str:
    """How the card and the log name local data: its file or folder, with the folder above a glob or brace range
    (`shards/{00000..00009}.tar`: the pattern alone says nothing of which shards)."""
    folder, name = os.path.split(os.path.normpath(path))
    if any(character in name for character in "*?[{") and os.path.basename(folder):
        return f"{os.path.basename(folder)}/{name}"
    return name


def _local_source(path: str, splits: dict) -> DataSource:
    name = _data_name(path)
    sizes = [f"{len(dataset):,} {split}" for split, dataset in splits.items() if isinstance(dataset, Dataset)]
    return DataSource("local", name, f"local data `{name}`" + (f" ({', '.join(sizes)} pairs)" if sizes else ""))


def _expand(pattern: str) -> list[str]:
    files, missing = expand_pattern(pattern)  # globs and brace ranges
    return files if files or not missing else [pattern]


def _load_files(
    pattern: str,
    key: str,
    data_args: DataArguments,
    cache_dir: str | None,
    streaming: bool,
    report: ShardReport | None = None,
) -> Dataset | IterableDataset:
    """`train_file` / `validation_file`: WebDataset tar shards, or csv/json/parquet data files."""
    if pattern_suffix(pattern) == ".tar":
        return load_webdataset(_expand(pattern), key, data_args, cache_dir, streaming, report)
    return _load_data_files(pattern, key, data_args, cache_dir, streaming)


def _load_data_files(
    pattern: str, key: str, data_args: DataArguments, cache_dir: str | None, streaming: bool
) -> Dataset | IterableDataset:
    """One data file or a glob of shards, each file's relative image paths resolved against its own folder.

    Files are grouped by folder and each group is loaded as one dataset (`datasets` does not record which file a
    row came from), so shards in one folder stay one dataset that processes and workers split by file.
    """
    by_folder: dict[str, list[str]] = defaultdict(list)
    for path in _expand(pattern):
        by_folder[str(Path(path).resolve().parent)].append(path)
    parts = []
    for folder, files in by_folder.items():
        builder = FILE_BUILDERS[Path(files[0]).suffix.lower()]
        kwargs: dict[str, Any] = {}
        if builder == "csv":
            headers = [check_csv_header(key, file) for file in files]
            kwargs["sep"] = SEPARATORS[Path(files[0]).suffix.lower()]
            # Text columns stay text: pandas would read a column of numbers ("12", "007") as integers.
            text_columns = [data_args.image_column, data_args.caption_column, data_args.label_column]
            kwargs["converters"] = {column: str for column in text_columns + [data_args.image_id_column] if column}
            # pandas reads "NA", "None", "null", "nan" (and more) as missing values in every column. A caption or an
            # image path is text as written: only an empty field is missing. An image id, a class label or a hard
            # negative written "NA" is what R and spreadsheets write for a missing value: missing, as pandas reads it.
            kwargs["keep_default_na"] = False
            missing_words = {column: PANDAS_NA_WORDS for column in _columns_with_missing_words(data_args)}
            _check_same_columns(key, files, headers)
            all_columns = dict.fromkeys(column for header in headers for column in header)  # their union, in order
            kwargs["na_values"] = {column: [""] for column in all_columns} | missing_words
        if builder == "parquet":
            _check_parquet_columns(key, files)
        try:
            dataset = datasets.load_dataset(
                builder, data_files={"data": files}, split="data", cache_dir=cache_dir, streaming=streaming, **kwargs
            )
        except Exception as error:
            raise _file_error(key, files, error) from None
        # A streamed local Parquet or JSON Lines file is read by clip-trainer's readers: its rows named by file and
        # row, and a part that cannot be read left out with a warning instead of stopping the run. (Without the
        # columns, which `datasets` learns from the first file, its stream stays: reading it reports the first
        # file's fault in one line.)
        if streaming and dataset.features is not None:
            if builder == "parquet" and _local_files_ending(files, ".parquet"):
                dataset = _named_file_stream(dataset.features, files, _ParquetRows())
            elif _local_files_ending(files, ".jsonl"):
                dataset = _named_file_stream(dataset.features, files, _JsonLinesRows())

        if streaming and builder == "csv" and all(os.path.isfile(file) for file in files):
            # Every column as text (see `_CsvRows`), known before a row is read.
            columns = datasets.Features({column: datasets.Value("string") for column in headers[0]})
            dataset = _named_file_stream(columns, files, _CsvRows(kwargs))
        parts.append(_with_lazy_images(dataset, data_args.image_column, folder))
    loaded = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if isinstance(loaded, Dataset) and _holds_image_bytes(loaded, data_args.image_column):
        loaded = loaded.add_column(SOURCE_ROW_COLUMN, _source_rows(key, [f for files in by_folder.values() for f in files],
                                                                   len(loaded)))  # fmt: skip
    return loaded


_WARNED: set[str] = set()


def unreadable_row(name: str) -> dict[str, Any]:
    """The row a streamed file's record that cannot be read becomes: its name (`SOURCE_ROW_COLUMN`) and no other
    value (the reader has said why in a warning). The collator leaves it out and the trainer counts it among the
    skipped samples, as a corrupt image: what a stream leaves out is counted in `train_results.json` and the card."""
    return {SOURCE_ROW_COLUMN: name}


def is_unreadable_row(row: dict[str, Any]) -> bool:
    """Whether `row` is an [`unreadable_row`]: a name and nothing else (clip-trainer's own `_` columns aside)."""
    return bool(row.get(SOURCE_ROW_COLUMN)) and all(
        value is None for key, value in row.items() if key != SOURCE_ROW_COLUMN and not key.startswith("_")
    )


def _warn_once(message: str) -> None:
    """Warns that a streamed file's line is left out, once per process (and DataLoader worker): a stream is read on
    every pass, and a small one many times over. Training goes on with the other rows."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(f"{message} Training goes on with the other rows.")


class _ParquetRows:
    """The rows of Parquet files, each with its name for messages (`row 15 of /data/b.parquet`), for
    `IterableDataset.from_generator` (which deals the files out to processes and DataLoader workers, and records the
    stream's position for resuming, as it does for `datasets`' own Parquet stream).

    Written here because a `datasets` stream does not say which file, nor which row of it, a row came from (a
    picture held as bytes has no other name), and stops the whole run at a file it cannot read: here the rest of such
    a file is left out, with a warning naming it and the row it stopped at. Read with pyarrow, batch by batch, as
    `datasets`' Parquet builder reads.
    """

    def __call__(self, files: list[str]) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        for file in files:
            name, row, total = os.path.abspath(file), 0, None
            try:
                parquet = pq.ParquetFile(file)
                total = parquet.metadata.num_rows
                for batch in parquet.iter_batches(batch_size=1000):
                    for values in batch.to_pylist():
                        yield {**values, SOURCE_ROW_COLUMN: f"row {row} of {name}"}
                        row += 1
            except (OSError, pa.ArrowException) as error:
                _warn_once(
                    f"Leaving out {name} from its row {row} on: it cannot be read ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}); a file cut short or overwritten? Replace it and resume to "
                    "train on it."
                )
                # The rows its footer counts, each as an unreadable row: the trainer counts them as skipped samples.
                for lost in range(row, total or row):
                    yield unreadable_row(f"row {lost} of {name}")


class _JsonLinesRows:
    """The rows of JSON Lines files, each with its name for messages (`row 15 of /data/b.jsonl`), as [`_ParquetRows`]
    gives Parquet rows. A line that is not a JSON object (a file cut short mid-line, a line edited by hand) is left
    out with a warning naming its file and line, where `datasets`' JSON builder would stop the whole run there."""

    def __call__(self, files: list[str]) -> Iterator[dict[str, Any]]:
        for file in files:
            name, row = os.path.abspath(file), 0
            with open(file, encoding="utf-8", errors="replace") as lines:
                for number, line in enumerate(lines, start=1):
                    if not line.strip():  # as `datasets`' JSON builder, which skips blank lines
                        continue
                    values, problem = _json_object(line)
                    if problem is not None:
                        _warn_once(
                            f"Leaving out line {number} of {name}: it is {problem}; a file cut short, or a line edited "
                            f"by hand? {_ONE_OBJECT_A_LINE}"
                        )
                        yield unreadable_row(f"line {number} of {name}")
                        continue
                    yield {**values, SOURCE_ROW_COLUMN: f"row {row} of {name}"}
                    row += 1


class _CsvRows:
    """The rows of CSV (or TSV) files, each with its name for messages (`line 15 of /data/b.csv`), as [`_ParquetRows`]
    gives Parquet rows.

    Written here because `datasets` reads a streamed CSV file with pandas in blocks of 10,000 rows, and one record
    pandas cannot read (a quote left open, bytes that are not UTF-8, more fields than the header) stops the whole
    run when its block comes, hours in. Here Python's `csv` module splits the file into records (quoted commas and
    line breaks in captions read as pandas reads them); a record that cannot be a row is left out with a warning
    naming its file and line (and keeps its place as an [`unreadable_row`], which the trainer counts), and the lines
    a quote left open would have swallowed are read again as rows of their own. The records that remain are read by
    pandas with the options `datasets` was given, a block at a time, every column as text (as the run reads
    captions, paths, ids and labels): pandas would guess each block's types anew.
    """

    BLOCK_ROWS = 1000

    def __init__(self, read_options: dict[str, Any]) -> None:
        self.read_options = read_options
        self.separator = read_options.get("sep", ",")

    def __call__(self, files: list[str]) -> Iterator[dict[str, Any]]:
        for file in files:
            yield from self._rows(os.path.abspath(file))

    def _rows(self, name: str) -> Iterator[dict[str, Any]]:
        records = _csv_record_texts(name, self.separator)
        header = next(records, None)
        if header is None or header[2] is not None:
            _warn_once(f"Leaving out {name}: its header cannot be read ({header[2] if header else 'empty'}).")
            return
        columns = next(csv.reader([header[1]], delimiter=self.separator))
        converters = self.read_options.get("converters") or {}
        options = {**self.read_options, "dtype": {column: str for column in columns if column not in converters}}
        block: list[tuple[int, str]] = []
        for line, text, problem in records:
            if problem is not None:
                _warn_once(f"Leaving out line {line} of {name}: {problem}.")
                yield from _csv_block_rows(name, header[1], block, options)  # the rows before it, in order
                block = []
                yield unreadable_row(f"line {line} of {name}")
                continue
            block.append((line, text))
            if len(block) == self.BLOCK_ROWS:
                yield from _csv_block_rows(name, header[1], block, options)
                block = []
        if block:
            yield from _csv_block_rows(name, header[1], block, options)


def _csv_block_rows(
    name: str, header: str, block: list[tuple[int, str]], options: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """The rows of CSV records `block` ((line, text) each) of file `name`, read by pandas under its `header` with
    `options`, each named by its line; a record pandas refuses all the same is left out with a warning naming it
    (found by halving the block: a few reads of pandas, not one per record)."""
    rows = _read_csv_records(header, [text for _, text in block], options)
    if rows is not None and len(rows) == len(block):
        for (line, _), values in zip(block, rows):
            yield {**values, SOURCE_ROW_COLUMN: f"line {line} of {name}"}
    elif len(block) == 1:
        _warn_once(f"Leaving out line {block[0][0]} of {name}: pandas cannot read it as a row of the file's columns.")
        yield unreadable_row(f"line {block[0][0]} of {name}")
    else:
        middle = len(block) // 2
        yield from _csv_block_rows(name, header, block[:middle], options)
        yield from _csv_block_rows(name, header, block[middle:], options)


def _read_csv_records(header: str, texts: list[str], options: dict[str, Any]) -> list[dict[str, Any]] | None:
    import io

    import pandas as pd

    try:
        frame = pd.read_csv(io.StringIO(header + "".join(texts)), **options)
    except ValueError:  # pandas' ParserError is one
        return None
    return pa.Table.from_pandas(frame, preserve_index=False).to_pylist()  # missing values (NaN) as None


# The longest field the `csv` module reads (its default, 128K characters, is shorter than a long caption or a
# `data:` URI image, which pandas reads whole); a quote left open reads on to this length, or to the file's end.
_CSV_FIELD_LIMIT = 64 << 20


def _csv_record_texts(path: str, separator: str) -> Iterator[tuple[int, str, str | None]]:
    """(first line, text, problem) of each record of a CSV file, the header first; `problem` says why a record cannot
    be a row, as pandas would refuse it (its text is then empty). Lines end at `\n`, `\r\n` or a lone `\r`, as
    pandas reads them; blank lines (or of spaces only) are skipped, as pandas skips them.

    A record that pandas refuses: one with more fields than the header, one that a quote left open runs on to the end
    of the file (or past `_CSV_FIELD_LIMIT`), one with bytes that are not UTF-8. It is reported at its first line,
    and the lines it ran on over are read again, as records of their own."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    pending: list[tuple[int, str]] = []  # lines to read again, the next one last
    fields_expected: int | None = None
    # Undecodable bytes are kept as lone surrogates (`surrogateescape`), so that one bad line is found as such.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        numbered = enumerate(handle, start=1)

        def next_line() -> tuple[int, str] | None:
            return pending.pop() if pending else next(numbered, None)

        while (first := next_line()) is not None:
            record = _CsvRecord(first, next_line)
            problem = None
            try:
                fields = next(csv.reader(record.lines(), delimiter=separator), [])
            except csv.Error as error:  # a field past the limit: a quote left open
                fields, problem = [], f"it cannot be read as CSV ({error}): a quote opened there is never closed?"
            text = "".join(line for _, line in record.consumed)
            if problem is None and len(fields) <= 1 and not "".join(fields).strip():
                continue  # a blank line
            if fields_expected is None:
                fields_expected = len(fields)
            if problem is None and record.undecodable is not None:
                number, reason = record.undecodable
                problem = f"it is not UTF-8 text ({reason}); save the file as UTF-8"
                if number != first[0]:
                    problem = f"its record runs on into line {number}, which is not UTF-8 text ({reason})"
            elif problem is None and (
                record.ran_out or (len(record.consumed) > 1 and not _strict_csv(text, separator))
            ):
                # Left open to the end of the file, or closed by the quote that opens a later line's field (which a
                # quoted field running over lines never is: its closing quote is followed by a separator or the end).
                problem = "a quote opened there is never closed (a caption cut short, or a stray quote?)"
            elif problem is None and len(fields) > fields_expected:
                problem = (
                    f"it has {len(fields)} fields where the header has {fields_expected}; a caption with a comma must "
                    'be quoted ("a red, round sign")'
                )
            if problem is not None:
                pending.extend(reversed(record.consumed[1:]))  # the lines it ran on over are read again
                yield first[0], "", problem
                continue
            yield first[0], text if text.endswith(("\n", "\r")) else text + "\n", None


def _strict_csv(text: str, separator: str) -> bool:
    """Whether `text` is well-formed CSV: every quoted field closed by a quote followed by a separator or a line's end."""
    import io

    try:
        list(csv.reader(io.StringIO(text, newline=""), delimiter=separator, strict=True))
    except csv.Error:
        return False
    return True


class _CsvRecord:
    """The lines of one CSV record as the `csv` module asks for them: its first line, then one more each time a quoted
    field goes on past a line's end. Keeps what it gave (`consumed`), whether the file ended inside the record
    (`ran_out`: a quote left open) and the first line that is not UTF-8 (`undecodable`: line, reason)."""

    def __init__(self, first: tuple[int, str], next_line) -> None:
        self.consumed = [first]
        self.next_line = next_line
        self.ran_out = False
        self.undecodable: tuple[int, str] | None = None

    def lines(self) -> Iterator[str]:
        yield self._checked(self.consumed[0])
        while (line := self.next_line()) is not None:
            self.consumed.append(line)
            yield self._checked(line)
        self.ran_out = True

    def _checked(self, line: tuple[int, str]) -> str:
        if self.undecodable is None:
            try:
                line[1].encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: a byte that was not UTF-8
                raw = line[1].encode("utf-8", errors="surrogateescape")
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    self.undecodable = (line[0], error.reason)
        return line[1]


_ONE_OBJECT_A_LINE = (
    'Every line of a JSON Lines file must be one JSON object, e.g. {"image": "1.jpg", "caption": "a cat"}.'
)


def _json_object(line: str) -> tuple[dict | None, str | None]:
    """A JSON Lines line as its object, or `None` and what it is instead (`not JSON (...)`, `a JSON list, ...`)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not JSON ({error.msg.removesuffix(' at')} at column {error.colno})"
    if not isinstance(value, dict):
        return None, f"a JSON {type(value).__name__}, not an object"
    return value, None


def _local_files_ending(files: list[str], suffix: str) -> bool:
    return bool(files) and all(file.lower().endswith(suffix) and os.path.isfile(file) for file in files)


def _named_file_stream(features: datasets.Features, files: list[str], rows: Any) -> IterableDataset:
    """A stream of data `files` read by `rows` ([`_ParquetRows`], [`_JsonLinesRows`], [`_CsvRows`]) instead of
    `datasets`' readers: the same rows, shards and `features` (those `datasets` found), each row named by its file and
    row."""
    features = features.copy()
    features[SOURCE_ROW_COLUMN] = datasets.Value("string")
    return IterableDataset.from_generator(rows, features=features, gen_kwargs={"files": list(files)})


def _holds_image_bytes(dataset: Dataset, image_column: str, sample: int = 100) -> bool:
    """Whether a loaded data file's images are embedded (Parquet image bytes, base64 or `data:` URIs in JSON Lines)
    rather than paths, judged from the first `sample` rows without decoding any."""
    if image_column not in dataset.column_names or len(dataset) == 0:
        return False
    feature = dataset.features[image_column]
    if not isinstance(feature, datasets.Value) or feature.dtype not in ("string", "large_string"):
        return True  # image structs ({"bytes", "path"}), binary columns, JSON of mixed kinds
    head = dataset.select_columns([image_column]).select(range(min(sample, len(dataset)))).with_format(None)
    return any(isinstance(value, str) and looks_like_base64_image(value) for value in head[image_column])


def _source_rows(key: str, files: list[str], num_rows: int) -> pa.Array:
    """Each row's name for messages: `row 42 of /data/train.parquet` (the row numbers of the bad-row report, which
    count from 0 at the first data row read); of several files, the file and its own row when the Parquet metadata
    says how many rows each holds (`datasets` does not record which file a row came from). Built in Arrow: a Python
    list of millions of names would cost far more memory than the column."""
    if len(files) == 1:
        return _numbered("row ", 0, num_rows, f" of {os.path.abspath(files[0])}")
    counts = _parquet_row_counts(files)
    if counts is None or sum(counts) != num_rows:
        return _numbered("row ", 0, num_rows, f" of `{key}`")
    parts, offset = [], 0
    for file, count in zip(files, counts):
        head = _numbered("row ", offset, count, f" ({os.path.abspath(file)}, its row ")
        parts.append(pc.binary_join_element_wise(head, _numbered("", 0, count, ")"), ""))
        offset += count
    return pa.concat_arrays(parts)


def _numbered(prefix: str, start: int, count: int, suffix: str) -> pa.Array:
    """`prefix` + each number from `start` (`count` of them) + `suffix`, as an Arrow string array."""
    numbers = pa.array(np.arange(start, start + count, dtype=np.int64)).cast(pa.string())
    return pc.binary_join_element_wise(prefix, numbers, suffix, "")


def _check_same_columns(key: str, files: list[str], headers: list[list[str]]) -> None:
    """[`ConfigError`] naming the first CSV file of a glob whose columns are not the first file's (in any order).
    Loaded, `datasets` fails on it with an error headed by the first file; streamed, a column would be missing from
    that file's rows."""
    for file, header in zip(files, headers):
        if set(header) != set(headers[0]):
            raise ConfigError(
                f"`{key}`: {os.path.abspath(file)} has the columns {header}, but {os.path.abspath(files[0])} has "
                f"{headers[0]}; the files of one source need the same columns: rename them, or give the files as "
                "separate `train_mixture` sources."
            )


def _check_parquet_columns(key: str, files: list[str]) -> None:
    """[`ConfigError`] naming the first Parquet file whose columns differ from the first file's. Loaded, `datasets`
    fails on it with an error that names the first file and no cause; streamed, every row of that file would be left
    out one by one, each a "missing caption". Reads each file's footer (a few KB), not its rows."""
    if len(files) < 2:
        return
    footers = _parquet_footers(files)
    if footers is None:
        return  # not readable as Parquet: `datasets` says so, naming the file
    columns = [footer.schema.to_arrow_schema().names for footer in footers]
    for file, names in zip(files, columns):
        if names != columns[0]:
            raise ConfigError(
                f"`{key}`: {os.path.abspath(file)} has the columns {names}, but {os.path.abspath(files[0])} has "
                f"{columns[0]}; the files of one source need the same columns: rename them, or give the files as "
                "separate `train_mixture` sources."
            )


def _parquet_row_counts(files: list[str]) -> list[int] | None:
    """Each Parquet file's row count, from its footer; `None` when any file is not Parquet or cannot be read."""
    footers = _parquet_footers(files)
    return None if footers is None else [footer.num_rows for footer in footers]


def _parquet_footers(files: list[str]) -> list[Any] | None:
    """Each Parquet file's footer (`pyarrow.parquet.FileMetaData`), read once for both of the checks above; `None`
    when any file is not Parquet or cannot be read."""
    if not all(file.lower().endswith(".parquet") for file in files):
        return None
    footers = []
    try:
        for file in files:
            info = os.stat(file)
            footers.append(_parquet_footer(file, info.st_size, info.st_mtime_ns))
    except (OSError, ValueError, pa.ArrowException):
        return None
    return footers


@functools.lru_cache(maxsize=4096)
def _parquet_footer(file: str, size: int, mtime_ns: int) -> Any:
    """A file's footer, read once for as long as its size and modification time stay the same."""
    import pyarrow.parquet as pq

    return pq.read_metadata(file)


def _first_non_utf8(path: str, block_size: int = 1 << 20) -> tuple[str, int, int] | None:
    """The first byte of a local file that is not UTF-8: (the decoder's reason, its offset from the start of the
    file, its line, counted from 1), or `None` when the whole file decodes (or cannot be opened)."""
    offset, line, carried = 0, 1, b""
    try:
        with open(path, "rb") as file:
            while True:
                block = file.read(block_size)
                data = carried + block
                if not data:
                    return None
                try:
                    data.decode("utf-8")
                    decoded, carried = len(data), b""
                except UnicodeDecodeError as error:
                    if not (block and error.reason == "unexpected end of data"):
                        return error.reason, offset + error.start, line + data.count(b"\n", 0, error.start)
                    decoded, carried = error.start, data[error.start :]  # a character cut by the block's end
                line += data.count(b"\n", 0, decoded)
                offset += decoded
    except OSError:
        return None


# pandas' default missing-value words (`read_csv`'s `na_values` documentation).
PANDAS_NA_WORDS = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
                   "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]  # fmt: skip


def _columns_with_missing_words(data_args: DataArguments) -> list[str]:
    """The CSV columns whose "NA", "None", ... are missing values: image ids, class labels, hard negatives."""
    columns = [data_args.image_id_column, data_args.label_column, data_args.hard_negative_column]
    return [column for column in columns if column]


def _csv_records(path: str) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of each record of a CSV file (a `.tsv` one split at tabs), read with Python's `csv` module;
    nothing more from a file that cannot be read as UTF-8 CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # a byte-order mark is no text
            reader = csv.reader(handle, delimiter=SEPARATORS.get(Path(path).suffix.lower(), ","))
            for fields in reader:
                yield reader.line_num, fields
    except (OSError, UnicodeDecodeError, csv.Error):
        return


# Other separators a delimited text file may have been written with, and how a message calls the file then.
_SEPARATOR_NAMES = {"\t": "tab", ";": "semicolon", ",": "comma", "|": "pipe"}


_SAVE_AS_UTF8 = (
    "save it as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 in.csv > out.csv` for a Windows export, `-f latin1` for others)"
)


def _check_csv_encoding(key: str, path: str, head_bytes: int = 256 << 10) -> None:
    """One line for a CSV file that is not UTF-8 from its start (Excel's "Unicode Text" is UTF-16; a Windows export
    often cp1252): a whole-file fix, where a stream would otherwise leave out every row with an accent, one by one.
    Reads the file's first `head_bytes` only, so that a stream of large files starts at once; a later bad line is
    left out of a stream with a warning, and is one line in a loaded file."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(head_bytes)
    except OSError:
        return
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(
            f'`{key}` {path!r} is UTF-16 text (Excel\'s "Unicode Text"); save it as UTF-8 ("CSV UTF-8"), e.g. '
            "`iconv -f UTF-16 -t UTF-8 in.csv > out.csv`."
        )
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.reason == "unexpected end of data" and len(head) == head_bytes:
            return  # a character cut by the head's end
        line = head.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"`{key}` {path!r} is not UTF-8 text ({error.reason} at byte {error.start:,}, line {line:,}); "
            f"{_SAVE_AS_UTF8}."
        ) from None


def check_csv_header(key: str, path: str) -> list[str]:
    """A CSV (or TSV) file's header fields (none for a file that cannot be read as UTF-8 CSV), or a one-line
    [`ConfigError`] for a header that pandas would read wrongly without a word: one column whose name holds another
    separator (a tab-separated file named `.csv`: its columns would be `image\tcaption`), or two columns of one name
    (pandas renames the second `caption.1`, and the run would train on the first without saying so)."""
    _check_csv_encoding(key, path)
    records = _csv_records(path)
    _, header = next(records, (0, []))
    suffix = Path(path).suffix.lower()
    separator = SEPARATORS.get(suffix, ",")
    excel_hint = re.fullmatch(r"sep=(.)", separator.join(header).strip(), flags=re.IGNORECASE)
    if excel_hint:
        also = "" if excel_hint.group(1) == separator else f", and save it with {_SEPARATOR_NAMES[separator]}s"
        raise ConfigError(
            f"`{key}` {path!r} starts with Excel's separator line {separator.join(header)!r}, which pandas would read "
            f"as the header: delete that first line (e.g. `sed -i 1d {path}`){also}."
        )
    line, first_row = next(records, (0, []))
    if len(first_row) == len(header) + 1 and first_row[-1] == "" and header[-1] != "":
        raise ConfigError(
            f"`{key}` {path!r}: its rows end with a separator (line {line} has {len(first_row)} fields, the last one "
            f"empty, where the header has {len(header)}), and pandas would read the first column as the rows' index "
            "and shift the others. Remove the separator at the end of each line (e.g. `sed -i 's/,$//' FILE`), or "
            "end the header with one too."
        )
    if len(header) == 1:
        found = [other for other in _SEPARATOR_NAMES if other != separator and other in header[0]]
        if found:
            name = _SEPARATOR_NAMES[found[0]]
            read_it = {"semicolon": "sep=';'", "pipe": r"sep=r'\s*\|\s*', engine='python'"}.get(name, "sep=';'")
            fix = {
                "tab": "name it .tsv (read as tab-separated) or save it with commas",
                "comma": "name it .csv or save it with tabs",
            }.get(name, f"save it with commas (e.g. pandas: `pd.read_csv(path, {read_it}).to_csv(out, index=False)`)")
            raise ConfigError(
                f"`{key}` {path!r} looks {name}-separated: its header {header[0]!r} is one column with {name}s in it, "
                f"where a {suffix} file separates its fields with {_SEPARATOR_NAMES[separator]}s; {fix}."
            )
    seen: dict[str, int] = {}
    for position, column in enumerate(header, start=1):
        if column in seen:
            raise ConfigError(
                f"`{key}` {path!r} has two columns named {column!r} (columns {seen[column]} and {position} of its "
                f"header; pandas would read the second as '{column}.1'); rename or remove one."
            )
        seen[column] = position
    return header


def _file_error(key: str, files: list[str], error: Exception) -> ConfigError:
    """A data file `datasets` could not read, said in one line with the fix."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, UnicodeDecodeError):
            # The decoder's offset counts from the start of the block pandas or pyarrow was decoding, not of the
            # file (nor does it say which of several files): find the first bad byte by reading the files ourselves.
            for name in files:
                position = _first_non_utf8(name)
                if position is not None:
                    reason, byte, line = position
                    return ConfigError(
                        f"`{key}` {name!r} is not UTF-8 text ({reason} at byte {byte:,}, line {line:,}); {_SAVE_AS_UTF8}."
                    )
            return ConfigError(f"`{key}` {files[0]!r} is not UTF-8 text ({cause.reason}); {_SAVE_AS_UTF8}.")
        unreadable = _first_unreadable_csv_record(files) if type(cause).__name__ == "ParserError" else None
        if unreadable is not None:
            # pandas says "Expected 2 fields in line 3, saw 3" or "EOF inside string starting at row 5", of a file it
            # does not name (of several): the record is found again as the stream's reader finds it.
            file, line, problem = unreadable
            return ConfigError(f"`{key}` {file!r}: line {line} cannot be read: {problem}.")
        if type(cause).__name__ == "EmptyDataError" or "corresponds to no data" in str(cause):
            return ConfigError(
                f"`{key}` {files[0]!r} has no rows (empty, or a header only); it needs a header row and one row per "
                "image-caption pair."
            )
        cause = cause.__cause__ or cause.__context__
    bad_line = _first_line_not_a_json_object(files)
    if bad_line is not None:  # pyarrow's words ("Column() changed from object to string in row 0") do not say it
        file, number, reason = bad_line
        return ConfigError(
            f"`{key}` {file!r}: line {number} is {reason} (a file cut short mid-line, or a line edited by hand?). "
            f"{_ONE_OBJECT_A_LINE}"
        )
    return ConfigError(f"Cannot read `{key}` {files[0]!r}: {type(error).__name__}: {error}")


def _first_unreadable_csv_record(files: list[str]) -> tuple[str, int, str] | None:
    """The first record of local CSV (or TSV) `files` that pandas refuses (see [`_csv_record_texts`]): (file, line,
    why); `None` when there is none."""
    for file in files:
        separator = SEPARATORS.get(Path(file).suffix.lower())
        if separator is None or not os.path.isfile(file):
            continue
        for line, _, problem in _csv_record_texts(file, separator):
            if problem is not None:
                return file, line, problem
    return None


def _first_line_not_a_json_object(files: list[str]) -> tuple[str, int, str] | None:
    """The first line of local JSON Lines `files` that is not a JSON object: (file, line counted from 1, what it is
    instead); `None` when every line is one (or no file is JSON Lines)."""
    for file in files:
        if not file.lower().endswith(".jsonl") or not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                problem = _json_object(line)[1] if line.strip() else None
                if problem is not None:
                    return file, number, problem
    return None


def _is_url_or_bytes(value: str) -> bool:
    return is_url(value) or looks_like_base64_image(value)


def _resolve_image_value(value: Any, base_dir: str) -> Any:
    if isinstance(value, str) and value and not _is_url_or_bytes(value):
        return resolve_image_path(value, base_dir)
    if isinstance(value, dict) and not value.get("bytes") and isinstance(value.get("path"), str):
        return {**value, "path": _resolve_image_value(value["path"], base_dir)}
    return value


class _ResolveImagePaths:
    """Batched map: relative image paths (plain, or inside `{"bytes", "path"}` dicts) made absolute. A class, not a
    closure, so that DataLoader workers can pickle the streams it is mapped over."""

    def __init__(self, image_column: str, base_dir: str) -> None:
        self.image_column = image_column
        self.base_dir = base_dir

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {self.image_column: [_resolve_image_value(v, self.base_dir) for v in batch[self.image_column]]}


def _with_lazy_images(
    dataset: Dataset | IterableDataset, image_column: str, base_dir: str | None
) -> Dataset | IterableDataset:
    """Keeps images encoded (bytes or absolute paths) so that only the collator decodes them."""
    features = dataset.features
    feature = features.get(image_column) if features is not None else None
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if base_dir is None or (features is not None and image_column not in features):
        return dataset
    resolve = _ResolveImagePaths(image_column, base_dir)
    if isinstance(dataset, Dataset):
        return dataset.map(resolve, batched=True, desc="Resolving image paths")
    return dataset.map(resolve, batched=True, features=dataset.features)


# --------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------


def _columns_named(split: str, data_args: DataArguments) -> list[tuple[str, str | None]]:
    """The options that name a column of the `split` data, with their values."""
    named = [
        ("image_column", data_args.image_column),
        ("caption_column", data_args.caption_column),
        ("image_id_column", data_args.image_id_column),
    ]
    if split != "train":
        return [*named, ("label_column", data_args.label_column)]
    return [*named, ("hard_negative_column", data_args.hard_negative_column), *_sampled_columns(data_args)]


def _sampled_columns(data_args: DataArguments) -> list[tuple[str, str]]:
    if not isinstance(data_args.caption_sampling, dict):
        return []
    return [("caption_sampling", column) for column in data_args.caption_sampling]


def _check_columns(
    columns: list[str],
    split: str,
    data_args: DataArguments,
    named: list[tuple[str, str | None]] | None = None,
    how_to_set: str = "Set `{key}` to one of them.",
) -> None:
    """Every column an option names (`named`, default: all of them for `split`) is one of `columns`; else one error
    that names the option, the data's columns and `how_to_set` the option right."""
    shown = [column for column in columns if column != SOURCE_ROW_COLUMN]
    for key, column in _columns_named(split, data_args) if named is None else named:
        if column is not None and column not in columns and {"images", "annotations"} <= set(columns):
            raise ConfigError(
                f"The {split} data is COCO's captions file (one JSON object with `images` and `annotations`), not one "
                "pair per row: convert it to JSON Lines, one line per image with its file and its captions (see "
                '"COCO and Flickr30k" in docs/data-formats.md).'
            )
        if column is not None and column not in columns:
            spaced = [name for name in shown if name.strip() == column.strip() and name != column]
            if spaced:
                # A header written `image, caption` (a space after the comma) names the column " caption".
                raise ConfigError(
                    f"`{key}` is {column!r}, but the {split} data has no such column: its column {spaced[0]!r} has "
                    "spaces around its name (a header written `image, caption`, with a space after the comma?). "
                    f"Remove the spaces from the header, or set `{key}` to {spaced[0]!r}."
                )
            if key == "caption_sampling":  # a key of the mapping, not the option's whole value
                raise ConfigError(
                    f"`caption_sampling` weighs a column {column!r}, but the {split} data has no such column. Its "
                    f"columns are: {', '.join(shown)}. Use them as the mapping's keys, e.g. "
                    f'{{"{data_args.caption_column}": 1}}.'
                )
            raise ConfigError(
                f"`{key}` is {column!r}, but the {split} data has no such column. Its columns are: "
                f"{', '.join(shown)}. {how_to_set.format(key=key)}"
            )


def check_given_columns(dataset: Any, split: str, data_args: DataArguments) -> None:
    """The image and caption columns of a dataset given to the trainer (by a script, not loaded by the command) are
    there: without them every row would be a bad sample and nothing would train, with a warning per row. A dataset
    without column names (a torch one) is not checked."""
    columns = getattr(dataset, "column_names", None)
    if columns:
        named = [("image_column", data_args.image_column), ("caption_column", data_args.caption_column)]
        _check_columns(
            columns,
            split,
            data_args,
            named=[*named, *_sampled_columns(data_args)],
            how_to_set="Name its columns in `DataArguments({key}=...)`, passed to the trainer as `data_args`.",
        )


def prepared_for_evaluation(dataset: Any, data_args: DataArguments, check: bool = True) -> Any:
    """An evaluation set given to the trainer, made what the command makes of its validation split: a row per caption
    (a row of several captions spread out), image ids (`image_id_column`, else the same file or bytes: one image) and,
    when it has `label_column`, class labels for zero-shot accuracy. A set that has its image ids already (the
    command's, or one prepared before) and a stream are returned as they are; so is one without the image column
    when not `check` (a caller's own collator reads columns of its own). A dict of sets is prepared set by set."""
    if isinstance(dataset, dict):
        return {name: prepared_for_evaluation(each, data_args, check) for name, each in dataset.items()}
    if not isinstance(dataset, Dataset) or IMAGE_ID_COLUMN in dataset.column_names:
        return dataset
    if not check and data_args.image_column not in dataset.column_names:
        return dataset
    check_given_columns(dataset, "evaluation", data_args)
    if data_args.caption_column in dataset.column_names:
        dataset = _captions_as_text(dataset, data_args.caption_column)
    ready = expand_evaluation_captions(dataset, data_args)
    id_column = data_args.image_id_column if data_args.image_id_column in ready.column_names else None
    ready = add_image_ids(ready, data_args.image_column, id_column)
    if data_args.label_column is not None and data_args.label_column in ready.column_names:
        ready = add_class_labels(ready, data_args.label_column)
    return ready


def _captions_as_text(dataset: Dataset, caption_column: str) -> Dataset:
    # A JSON or parquet column of numbers is text to whoever wrote it (product codes, years).
    feature = dataset.features[caption_column]
    if isinstance(feature, datasets.ClassLabel):
        # A classification dataset's label (an imagefolder's class folders) as its class name, as zero-shot reads it:
        # `datasets` stores the class number, and a cast to text would train on "5", not on "red".
        features = dataset.features.copy()
        features[caption_column] = datasets.Value("string")
        return dataset.map(
            _ClassNames(caption_column, feature), batched=True, features=features, desc="Class names as captions"
        )
    if isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string"):
        return dataset.cast_column(caption_column, datasets.Value("string"))
    return dataset


class _ClassNames:
    """Batched map: a `ClassLabel` column's numbers as their class names (a missing label stays missing)."""

    def __init__(self, column: str, feature: datasets.ClassLabel) -> None:
        self.column, self.feature = column, feature

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {self.column: [None if n is None or n < 0 else self.feature.int2str(n) for n in batch[self.column]]}


def _drop_bad_rows(dataset: Dataset, heading: str, data_args: DataArguments, dropped: DroppedRows) -> Dataset:
    """`dataset` without its bad rows, reported in one line that starts with `heading` ("train data", a source) and
    added to `dropped`. With `on_bad_rows error` the error names every bad row whose reason was kept (up to 100), so
    that one run finds what to fix."""
    report = find_bad_rows(
        dataset, data_args.image_column, data_args.caption_column, base_dir=None, max_reports=DroppedRows.NAMED_LIMIT
    )
    if not report.bad_indices:
        return dataset
    if data_args.on_bad_rows == "error":
        raise ConfigError(
            f"{heading}: " + report.summary(len(dataset), max_listed=100, left_out=False)
            + ". Fix or remove these rows, or set `on_bad_rows` to `skip`."
        )  # fmt: skip
    logger.warning(
        f"{heading}: " + report.summary(len(dataset), more_in=f"`{DROPPED_ROWS_FILE}` in the output folder")
    )
    dropped.add(heading, report)
    return dataset.select(report.good_indices())


def _usable_training_rows(train: Dataset, data_args: DataArguments, dropped: DroppedRows) -> Dataset:
    """The training rows with their columns checked, captions as text and bad rows dropped (and reported)."""
    _check_columns(train.column_names, "train", data_args)
    if len(train) == 0:
        raise ConfigError("The training data has no rows (a header only?); it needs one row per image-caption pair.")
    train = _drop_bad_rows(_captions_as_text(train, data_args.caption_column), "train data", data_args, dropped)
    if len(train) == 0:
        raise ConfigError("No training pairs are left after removing bad rows; check the data (summary above).")
    _report_hard_negatives(train, data_args.hard_negative_column, "train")
    return train


def _report_hard_negatives(dataset: Dataset, column: str | None, split: str) -> None:
    """Says what of `hard_negative_column` cannot be used: a negative that is no text (an object, a nested list, a
    boolean) is left out, and a split without any usable negative trains (or scores) without them; both used to
    happen without a word. Empty and missing negatives are a row without hard negatives, as documented."""
    if column is None or column not in dataset.column_names:
        return
    values = dataset.select_columns([column]).with_format(None)[column]
    rows_with_negatives, not_text, first = 0, 0, None
    for row, value in enumerate(values):
        items = value if isinstance(value, list | tuple) else [value]
        usable = caption_list(value)
        rows_with_negatives += bool(usable)
        odd = [item for item in items if not (item is None or isinstance(item, str | int | float))]
        odd += [item for item in items if isinstance(item, bool)]
        if odd:
            not_text += len(odd)
            first = first or f"row {row}: {odd[0]!r}"
    if not_text:
        logger.warning(
            f"{not_text:,} hard negative(s) of `hard_negative_column` {column!r} in the {split} data are not text "
            f"and were left out (first: {first}); give each row a caption or a list of captions."
        )
    if rows_with_negatives == 0:
        logger.warning(
            f"`hard_negative_column` {column!r} holds no usable hard negative in the {split} data ({len(values):,} "
            "rows: empty, missing or not text): the run goes on without hard negatives there."
        )


def _finish_training_split(
    train: Dataset, data_args: DataArguments, dropped: DroppedRows, checked: bool = False
) -> Dataset:
    """The training split: its usable rows (found already when `checked`), cut to `max_train_samples`."""
    if not checked:
        train = _usable_training_rows(train, data_args, dropped)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    return train


def add_image_ids(dataset: Dataset, image_column: str, image_id_column: str | None) -> Dataset:
    """Adds `_image_id`: rows showing the same image ([`image_identities`]: the same `image_id_column` value, else the
    same picture whatever its file name) get the same integer, so retrieval scores them as one image."""
    keys = image_identities(dataset, image_column, image_id_column)
    ids: dict[str, int] = {}
    return dataset.add_column(IMAGE_ID_COLUMN, [ids.setdefault(key, len(ids)) for key in keys])


def _is_blank(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and value != value)
        or (isinstance(value, str) and not value.strip())
    )


def add_class_labels(dataset: Dataset, label_column: str) -> Dataset:
    """Adds `_label`, a `ClassLabel` whose names are the zero-shot classes; a blank label becomes -1 (no class), so
    that its row counts for retrieval and not for zero-shot accuracy."""
    feature = dataset.features[label_column]
    values = dataset.with_format(None)[label_column]
    if isinstance(feature, ClassLabel):
        names = [name.replace("_", " ") for name in feature.names]
        labels = [-1 if value is None else value for value in values]
    else:
        names = sorted({str(v).strip() for v in values if not _is_blank(v)})
        index = {name: i for i, name in enumerate(names)}
        labels = [-1 if _is_blank(v) else index[str(v).strip()] for v in values]
    if not names:
        raise ConfigError(f"`label_column` {label_column!r} is blank in every validation row; no class to score.")
    return dataset.add_column(LABEL_COLUMN, labels, feature=ClassLabel(names=names))


def _finish_validation(
    validation: Dataset | IterableDataset,
    data_args: DataArguments,
    split: str,
    dropped: DroppedRows,
    checked: bool = False,
    seed: int = 0,
) -> Dataset:
    """The one validation finisher: materialised, checked (unless `checked`), cut, with image ids and class labels."""
    if isinstance(validation, IterableDataset):
        rows = list(validation.take(data_args.max_eval_samples) if data_args.max_eval_samples else validation)
        validation = Dataset.from_list(rows, features=validation.features)
    _check_columns(validation.column_names, split, data_args)
    if not checked:
        validation = _drop_bad_rows(
            _captions_as_text(validation, data_args.caption_column), f"{split} data", data_args, dropped
        )
    if data_args.max_eval_samples is not None and data_args.max_eval_samples < len(validation):
        # Drawn with the run's seed, in the file's order: the first rows of a file sorted by class or source would
        # score one corner of the data (`datasets`' `select(range(n))`, what the stock recipe does).
        drawn = np.random.default_rng(seed).choice(len(validation), data_args.max_eval_samples, replace=False)
        validation = validation.select(np.sort(drawn))
    # Every caption of an image is scored: a row of several captions becomes one row per caption (one image id).
    validation = expand_evaluation_captions(validation, data_args)
    if len(validation) < 2:
        raise ConfigError(
            f"The {split} data has {len(validation)} usable pair(s); retrieval needs at least 2 (one to find, one to "
            "rank it against). Give more validation pairs (`validation_file`, `validation_split_percentage`)."
        )
    _check_two_images_decode(validation, data_args, split)
    _report_hard_negatives(validation, data_args.hard_negative_column, split)
    validation = add_image_ids(validation, data_args.image_column, data_args.image_id_column)
    if data_args.label_column is not None:
        validation = add_class_labels(validation, data_args.label_column)
    return validation


def _check_two_images_decode(validation: Dataset, data_args: DataArguments, split: str) -> None:
    """Decodes validation images until two do: a set whose files are all corrupt (or not images) is refused before
    training, not found at the first evaluation, an epoch later (or never, when the run selects by `eval_loss`,
    which is then NaN). The up-front row checks see missing and empty files only; usually two images are decoded."""
    table = validation.select_columns([data_args.image_column]).with_format(None)
    # Read a few rows at a time: reading the column whole would hold every image's bytes of an embedded-image set.
    values = (value for batch in table.iter(batch_size=16) for value in batch[data_args.image_column])
    decoded, first_fault = 0, None
    for row, value in enumerate(values):
        try:
            load_image(value, max_pixels=data_args.max_image_pixels)
        except BadSampleError as error:
            first_fault = first_fault or f"row {row}: {error.reason}"
            continue
        decoded += 1
        if decoded == 2:
            return
    raise ConfigError(
        f"The {split} data has {len(validation)} pair(s), and {decoded} of their images decode (first fault: "
        f"{first_fault}); retrieval needs at least 2: fix or replace those files."
    )


def _held_out_split(train: Dataset, data_args: DataArguments, seed: int) -> tuple[Dataset, Dataset]:
    """`validation_split_percentage` of the training data held out, by image: rows of one image (several captions,
    the same `image_id_column` value, the same picture under one file name or two: [`image_identities`], as retrieval
    counts images) all land on one side, or the model would be scored on images it trained on. Data with one row per
    image is split by `datasets` exactly as before."""
    fraction = data_args.validation_split_percentage / 100
    keys = image_identities(train, data_args.image_column, data_args.image_id_column)
    distinct = list(dict.fromkeys(keys))
    if len(distinct) == len(keys):
        try:
            split = train.train_test_split(test_size=fraction, seed=seed)
        except ValueError as error:
            raise ConfigError(
                f"Cannot hold out {data_args.validation_split_percentage:g}% of {len(train):,} training pair(s) for "
                f"validation ({error}). Give a `validation_file`, or set `validation_split_percentage` to 0 to train "
                "on everything without evaluation."
            ) from None
        return split["train"], split["test"]
    # `train_test_split` splits rows and has no grouping (`datasets` lacks one): whole images are drawn here.
    held_out_images = math.ceil(fraction * len(distinct))
    if not 0 < held_out_images < len(distinct):
        raise ConfigError(
            f"Cannot hold out {data_args.validation_split_percentage:g}% of {len(distinct):,} training image(s) for "
            "validation (rows of one image stay together, so each side needs at least one image). Give a "
            "`validation_file`, or set `validation_split_percentage` to 0 to train on everything without evaluation."
        )
    order = np.random.default_rng(seed).permutation(len(distinct))
    held_out = {distinct[index] for index in order[:held_out_images].tolist()}
    test_rows = [row for row, key in enumerate(keys) if key in held_out]
    train_rows = [row for row, key in enumerate(keys) if key not in held_out]
    logger.info(
        f"Held out {held_out_images:,} of {len(distinct):,} images ({len(test_rows):,} of {len(keys):,} rows) for "
        "validation; every row of an image is on one side."
    )
    return train.select(train_rows), train.select(test_rows)


# --------------------------------------------------------------------------------------------------------------
# What only a stream needs
# --------------------------------------------------------------------------------------------------------------


def _source_files(data_args: DataArguments) -> list[str]:
    """The files (or the names) a training source reads, in order: the shards of `train_file`, every file under a
    local `dataset_name` folder, each source of a mixture; a Hub id or `emoji` stands for itself."""
    names = list(data_args.train_mixture or []) or [data_args.train_file or data_args.dataset_name or ""]
    files: list[str] = []
    for name in names:
        if os.path.isdir(name):
            files.extend(sorted(str(path) for path in Path(name).rglob("*") if path.is_file()))
        else:
            found, _ = expand_pattern(name)
            files.extend(found or [name])
    return files


def _held_out_per_shard(head: list[dict[str, Any]], read: StreamSource) -> list[int] | None:
    """How many of the held-out `head` rows each shard of `read` gave, for the uneven-shards warning (see
    `stream.check_shard_split`): by each tar row's shard (`__url__`), else by the shards' order and sample counts
    (the head of the unshuffled stream is the first shards' first rows); `None` when the counts are unknown."""
    if read.samples is None or len(read.samples) != len(read.shards):
        return None
    index = {shard: position for position, shard in enumerate(read.shards)}
    counts = [0] * len(read.shards)
    if head and all(row.get("__url__") in index for row in head):
        for row in head:
            counts[index[row["__url__"]]] += 1
        return counts
    left = len(head)
    for position, size in enumerate(read.samples):
        counts[position] = min(size, left)
        left -= counts[position]
    return counts


def _column_names(stream: IterableDataset) -> list[str]:
    """The stream's columns (some streams know them only once a row is read), once its first row is read: a stream
    without a row would train no step and save the untrained model as if it had."""
    first = next(iter(stream.take(1)), None)
    if first is None:
        raise ConfigError(
            "The training stream has no rows (a header only, or every row left out: see the warnings above); check "
            "`dataset_name` / `train_file`."
        )
    return list(stream.column_names) if stream.column_names is not None else list(first)


def _finish_training_stream(
    train: IterableDataset, hold_out: bool, data_args: DataArguments, seed: int
) -> tuple[IterableDataset, Dataset | None]:
    """Holds out the head of the stream for validation (when `hold_out`), then repeats and shuffles the rest.

    Training rows are not checked up front (that would read the whole stream): the collator flags unusable samples
    as it meets them and the trainer counts them.
    """
    try:
        columns = _column_names(train)
    except ConfigError:
        raise
    except Exception as error:  # a stream reads its first file only now
        key, source = (
            ("train_file", data_args.train_file) if data_args.train_file else ("dataset_name", data_args.dataset_name)
        )
        raise _file_error(key, _expand(str(source)), error) from None  # each file of a glob, to find the bad one
    _check_columns(columns, "train", data_args)
    read = source_of(train)
    if read is None:
        files = _source_files(data_args)
        # Parquet files say their rows in their footers (tar shards are counted where they are read); a mixture's
        # shards are not its files.
        read = StreamSource(files, None if data_args.train_mixture else _parquet_row_counts(files))
    if hold_out:
        # The head of the unshuffled stream, so that every process and every restart holds out the same pairs.
        held_out = data_args.max_eval_samples or DEFAULT_STREAMING_EVAL_SAMPLES
        head = list(train.take(held_out))
        if len(head) < held_out:
            raise ConfigError(
                f"The training stream has only {len(head)} pairs, all of them held out for validation; give a "
                "`validation_file` or a smaller `max_eval_samples`, or train without `streaming`."
            )
        validation: Dataset | None = Dataset.from_list(head, features=train.features)
        # Every row of a held-out image is left out of training: another caption of it, or a copy of its picture.
        train = train.filter(HeldOutImages(head, data_args.image_column, data_args.image_id_column))
        logger.info(f"Held out the first {len(head):,} pairs of the stream for validation.")
        held_per_shard = _held_out_per_shard(head, read)
    else:
        validation = None
        held_per_shard = None
        held_out = 0
    if data_args.max_train_samples is not None:
        train = train.take(data_args.max_train_samples)
    # Repeated without end: `max_steps` alone ends the run, and no process runs out of data before the others (which
    # would leave them waiting in a collective) when `accelerate` deals out shards of unequal sizes. Each pass is
    # shuffled on its own, in a way that resumes exactly (see stream.py).
    train = shuffled_passes(train, seed=seed, block_size=data_args.shuffle_buffer_size)
    # Rows with several captions: one drawn per row and pass (or, with `caption_sampling` all, one row per caption).
    train = sample_stream_captions(train, data_args, seed)
    # What the stream reads, for the warning on uneven shards and for the position saved with checkpoints.
    samples = read.samples if data_args.max_train_samples is None else None
    record_source(
        train,
        StreamSource(
            read.shards,
            samples,
            data_args.shuffle_buffer_size,
            held_per_shard,
            held_out_head=held_out,
            max_train_samples=data_args.max_train_samples,
        ),
    )
    logger.info(
        f"Streaming the training pairs ({train.num_shards} shard(s), shuffle buffer {data_args.shuffle_buffer_size:,})."
    )
    return train, validation


# --------------------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------------------


def load_image_text_data(
    data_args: DataArguments,
    seed: int,
    cache_dir: str | None = None,
    *,
    train: bool = True,
    evaluate: bool = True,
) -> ImageTextData:
    """Loads, splits and checks the training and validation pairs described by `data_args`.

    Args:
        data_args: where the pairs come from: `dataset_name` (a Hub id, a local folder of data files, a prepared
            folder, or `emoji`) or `train_file` (a csv/json/parquet file, or a glob of shards such as
            `data/*/train-*.parquet`), with an optional `validation_file`; `streaming` reads the training pairs as
            a stream.
        seed: the seed of the held-out split and of the stream's shuffle (the same on every process, so that they
            agree on the order of the shards `accelerate` deals out to them).
        cache_dir: the `datasets` cache.
        train: whether the run trains; an evaluation-only run loads no more training data than it needs to find
            its validation pairs.
        evaluate: whether the run evaluates; without evaluation nothing is held out.

    The validation split is the source's own (`validation`, `valid`, `val`; `test` too for an evaluation-only run),
    a `validation_file`, or else `validation_split_percentage` percent of the training data drawn with `seed` (the
    seed project's 85/15); a stream holds out its first `max_eval_samples` pairs (default 1,000) instead.
    """
    streaming = data_args.streaming and train
    report = ShardReport()
    dropped = DroppedRows()
    if data_args.train_mixture and train:
        hold_out_each = evaluate and data_args.validation_split_percentage > 0
        splits, source = _load_mixture(
            data_args, cache_dir, streaming, seed, hold_out=hold_out_each, report=report, dropped=dropped
        )
    else:
        splits, source = _load_source(data_args, cache_dir, streaming, need_train=train, report=report)
    names = VALIDATION_SPLIT_NAMES if train else (*VALIDATION_SPLIT_NAMES, "test")
    if data_args.validation_split_name is not None:
        if data_args.validation_split_name not in splits:
            raise ConfigError(
                f"`validation_split_name` is {data_args.validation_split_name!r}, but the data's splits are: "
                f"{', '.join(splits) or 'none'}."
            )
        names = (data_args.validation_split_name,)
    validation = next((splits[name] for name in names if name in splits), None) if evaluate else None
    train_split = splits.get("train")
    if (train or (evaluate and validation is None)) and train_split is None:
        raise ConfigError(f"The data has no `train` split; its splits are: {', '.join(splits) or 'none'}.")

    hold_out = evaluate and validation is None and data_args.validation_split_percentage > 0
    if evaluate and validation is None and not hold_out:
        if not train:
            raise ConfigError(
                "`validation_split_percentage` is 0 and the data has no validation split, so there is nothing to "
                "evaluate; give a `validation_file`, or a percentage of the data to hold out."
            )
        logger.warning("No validation data (`validation_split_percentage` is 0): the run trains on every pair.")
    checked = False
    if hold_out and isinstance(train_split, Dataset):
        # Bad rows are found before the split, so that the report numbers them as the data does (row 0: the first
        # data row read), not by their place in one side of a shuffled split.
        rows = len(train_split)
        train_split = _usable_training_rows(train_split, data_args, dropped)
        train_split, validation = _held_out_split(train_split, data_args, seed)
        hold_out = False
        checked = True
        if not train:
            # An evaluation alone scores the held-out share only: said, or a user takes it for the whole data.
            logger.warning(
                f"Evaluating {len(validation):,} of the data's {rows:,} rows: the held-out "
                f"{data_args.validation_split_percentage:g}% (`validation_split_percentage`), the split a training run "
                "with the same seed holds out. Give the data as `validation_file` to score all of it."
            )

    if not train:
        train_split = None
    elif isinstance(train_split, Dataset):
        # A mixture's sources were checked one by one before they were mixed.
        train_split = _finish_training_split(
            train_split, data_args, dropped, checked=checked or bool(data_args.train_mixture)
        )
        if not data_args.prepare_only:
            # Several captions per image: rows of one image merged, one caption drawn per epoch (`caption_sampling`).
            # A prepared folder keeps the rows as they are; the run that trains from it merges them.
            train_split = prepare_training_captions(train_split, data_args, merge_rows=not data_args.train_mixture)
        if streaming:  # checked like a loaded split, then read as a stream
            train_split = _stream(train_split, streaming=True)
    one_pass = train_split
    if isinstance(train_split, IterableDataset):
        train_split, held_out = _finish_training_stream(train_split, hold_out, data_args, seed)
        validation = held_out if hold_out else validation
    if validation is not None:
        validation = _finish_validation(validation, data_args, "validation", dropped, checked=checked, seed=seed)
    # A preparation run keeps an image's rows apart (the run that trains from its folder merges them): rows, not pairs.
    what = "training rows" if data_args.prepare_only else "training pairs"
    sizes = [f"{what}: {len(train_split):,}"] if isinstance(train_split, Dataset) else []
    sizes.append(f"validation pairs: {len(validation):,}" if validation is not None else "no validation pairs")
    logger.info("; ".join(sizes))
    return ImageTextData(
        train=train_split,
        validation=validation,
        source=source,
        one_pass=one_pass,
        shard_report=report,
        dropped_rows=dropped,
    )


def load_extra_eval_sets(
    data_args: DataArguments,
    seed: int,
    cache_dir: str | None = None,
    report: ShardReport | None = None,
    dropped: DroppedRows | None = None,
) -> dict[str, Dataset]:
    """The `extra_eval_sets` of `data_args`, each loaded as the validation split of an evaluation-only run (so every
    check of a validation split applies, and class names come from the set's own label column).

    Each set keeps only what evaluation reads, under the run's column names (`image_column`, `caption_column`, the
    image ids and class labels), so that the run's collator reads every set.

    A set given as data files (a .csv/.json/.jsonl/.parquet file or .tar shards, one or a glob or brace range; see
    [`resolve_data_path`]) is evaluated whole; shards it cannot read are added to `report`, rows it leaves out as
    unusable to `dropped`.

    Raises:
        [`ConfigError`]: naming the set and the problem.
    """
    sets = {}
    for name, set_args in data_args.extra_eval_data_arguments().items():
        try:
            if set_args.dataset_name is not None and resolve_data_path("path", set_args.dataset_name).is_files:
                set_args = dataclasses.replace(set_args, dataset_name=None, validation_file=set_args.dataset_name)
            data = load_image_text_data(set_args, seed=seed, cache_dir=cache_dir, train=False)
        except ConfigError as error:
            raise ConfigError(f"`extra_eval_sets` entry {name!r}: {error}") from None
        if report is not None:
            report.merge(data.shard_report)
        if dropped is not None:
            for entry in data.dropped_rows.named:
                entry["where"] = f"`extra_eval_sets` entry {name!r}"
            dropped.merge(data.dropped_rows)
        dataset = data.validation
        kept = [set_args.image_column, set_args.caption_column, IMAGE_ID_COLUMN]
        if data_args.hard_negative_column in dataset.column_names:  # scored for hard-negative accuracy too
            kept.append(data_args.hard_negative_column)
        if SOURCE_ROW_COLUMN in dataset.column_names:  # names a row whose image bytes do not decode
            kept.append(SOURCE_ROW_COLUMN)
        dataset = dataset.select_columns(kept + [LABEL_COLUMN] * (LABEL_COLUMN in dataset.column_names))
        renames = {set_args.image_column: data_args.image_column, set_args.caption_column: data_args.caption_column}
        sets[name] = dataset.rename_columns({old: new for old, new in renames.items() if old != new})
        logger.info(f"Evaluation set {name!r}: {len(sets[name]):,} pairs.")
    return sets


# --------------------------------------------------------------------------------------------------------------
# Preparing once, training many times
# --------------------------------------------------------------------------------------------------------------


class _EmbedImageBytes:
    """Batched map: each image replaced by its file's encoded bytes, and why not (`_problem`) when it does not
    decode."""

    def __init__(self, image_column: str, max_pixels: int | None) -> None:
        self.image_column = image_column
        self.max_pixels = max_pixels

    def __call__(self, batch: dict) -> dict:
        images, problems = [], []
        for value in batch[self.image_column]:
            try:
                load_image(value, max_pixels=self.max_pixels)  # only what decodes as an image is copied
            except BadSampleError as error:
                images.append({"bytes": None, "path": None})
                problems.append(str(error))  # names the file where there is one
                continue
            if isinstance(value, dict) and value.get("bytes"):
                data = value["bytes"]
            else:
                path = value["path"] if isinstance(value, dict) else value
                data = decode_base64_image(path) if not os.path.exists(path) else Path(path).read_bytes()
            images.append({"bytes": data, "path": None})
            problems.append("")
        return {self.image_column: images, "_problem": problems}


def save_prepared_data(data: ImageTextData, data_args: DataArguments, output_dir: str) -> DroppedRows:
    """Writes the checked train/validation splits to `output_dir` with images as their encoded bytes.

    This is the seed project's preparation step without its 600 KB float arrays: a later run trains from the folder
    with `--dataset_name output_dir`, with no network and no re-checking of files. Every image is decoded once on
    the way, and only files that decode as images are copied (a path to any other file, however it got into the
    data, is left out and reported, so the prepared folder can be shared). Returns the rows left out that way.
    """
    splits = {}
    undecodable = DroppedRows()
    for name, dataset in (("train", data.train), ("validation", data.validation)):
        if dataset is None:
            continue
        # The row names of the source files go too, once they have named the rows left out: the prepared folder is a
        # source of its own.
        dropped = (IMAGE_ID_COLUMN, LABEL_COLUMN)
        dataset = dataset.remove_columns([c for c in dropped if c in dataset.column_names])
        features = dataset.features.copy()
        features[data_args.image_column] = datasets.Image(decode=False)
        features["_problem"] = datasets.Value("string")
        embedded = dataset.map(
            _EmbedImageBytes(data_args.image_column, data_args.max_image_pixels),
            batched=True,
            features=features,
            num_proc=data_args.preprocessing_num_workers,
            desc=f"Embedding {name} image bytes",
        )
        # A row is named as its source names it (a file's row, a shard's sample), else by its image, which the
        # problem names: its position in the split, shuffled and held out, is no row of any file.
        names = embedded[SOURCE_ROW_COLUMN] if SOURCE_ROW_COLUMN in embedded.column_names else None
        problems = [
            (f"{names[position]}: {problem}" if names and names[position] else problem)
            for position, problem in enumerate(embedded["_problem"])
            if problem
        ]
        undecodable.count += len(problems)
        undecodable.named.extend({"where": f"{name} data", "row": None, "reason": p} for p in problems)
        if problems:
            more = f"; and {len(problems) - 5:,} more" if len(problems) > 5 else ""
            logger.warning(
                f"{name} data: left out {len(problems):,} row(s) whose image does not decode "
                f"({'; '.join(problems[:5])}{more})."
            )
        kept = embedded.filter(lambda problem: not problem, input_columns="_problem")
        splits[name] = kept.remove_columns([c for c in ("_problem", SOURCE_ROW_COLUMN) if c in kept.column_names])
    DatasetDict(splits).save_to_disk(output_dir)
    # Rows, not pairs: a prepared folder keeps one row per caption, and the run that trains from it merges an
    # image's rows (`caption_sampling`), so its count of training pairs can be smaller.
    logger.info("Prepared rows written: " + "; ".join(f"{name} {len(split):,}" for name, split in splits.items()))
    return undecodable
