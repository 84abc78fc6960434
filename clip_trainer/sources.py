"""Sources at web scale: WebDataset tar shards, image folders, and weighted mixtures of sources.

Every source is opened by `datasets` itself: tar shards by its `webdataset` builder, folders of images by its
`imagefolder` builder (with `metadata.csv` / `metadata.jsonl` / `metadata.parquet`, or with a `.txt` caption beside
each image), mixtures by `interleave_datasets`. What is written here is the mapping of their columns onto the run's
`image_column` and `caption_column`, and what `datasets` lacks: brace ranges in file patterns
(`shards/{00000..00099}.tar`) and captions from same-named `.txt` files.

WebDataset columns. The `webdataset` builder gives one column per member extension of a sample (`jpg`, `txt`,
`json`, ...) plus `__key__` and `__url__`. The image is the sample's `image_column` member if it has one, else the
first of its `jpg`, `jpeg`, `png`, `webp` (then any other image) members that the row has. The caption follows
`caption_column`:

- a member name (`txt`): that member's text;
- `json.<key>` (`json.caption`): that key of the `json` member;
- any other name (the default `caption`): that key of the `json` member when the samples' json has it, else the
  `txt` member.

`label_column` and `image_id_column` are looked up the same way (a member, or a key of the json member). `__key__`
(the sample's name in its tar) and `__url__` (the tar file) are kept.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
from datasets import Dataset, IterableDataset
from transformers.utils import logging

from .errors import ConfigError

if TYPE_CHECKING:
    from .arguments import DataArguments

logger = logging.get_logger(__name__)

# Image members, in the order they are looked for.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
WEBDATASET_KEY_COLUMNS = ("__key__", "__url__")
METADATA_FILENAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
DATA_FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".tar")
MIXTURE_STOPPING_STRATEGIES = ("all_exhausted", "first_exhausted")

# --------------------------------------------------------------------------------------------------------------
# File patterns
# --------------------------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: `a/{00000..00002}.tar` -> `a/00000.tar`, `a/00001.tar`, `a/00002.tar`; `{x,y}`
    lists; several groups multiply. Written here because `datasets`' data-file patterns take globs, not braces (the
    WebDataset convention for naming shards). A zero-padded bound pads every number to the longest bound's width."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.groups()
        start, stop = int(first), int(last)
        step = 1 if stop >= start else -1
        padded = any(len(bound.lstrip("-")) > 1 and bound.lstrip("-").startswith("0") for bound in (first, last))
        width = max(len(first), len(last)) if padded else 0
        choices = [str(number).zfill(width) for number in range(start, stop + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # `{}` or `{x}` is no expansion in bash either: kept as written
        return [pattern[: match.end()] + rest for rest in expand_braces(pattern[match.end() :])]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def has_pattern(path: str) -> bool:
    """Whether `path` is a glob or a brace pattern rather than one file name."""
    return glob.has_magic(path) or _BRACE.search(path) is not None


def expand_pattern(pattern: str) -> tuple[list[str], list[str]]:
    """The files a data-file pattern names (braces expanded, then globs matched, sorted within each glob), and the
    names it gives that do not exist (a brace range naming a missing shard, a glob that matches nothing)."""
    files: list[str] = []
    missing: list[str] = []
    for name in expand_braces(pattern):
        if glob.has_magic(name):
            matches = sorted(glob.glob(name))
            files.extend(matches)
            if not matches:
                missing.append(name)
        elif os.path.exists(name):
            files.append(name)
        else:
            missing.append(name)
    return list(dict.fromkeys(files)), missing


def pattern_suffix(pattern: str) -> str:
    """The file suffix of a data-file pattern (`.tar` for `shards/{0..9}.tar`), lower case."""
    return Path(expand_braces(pattern)[0]).suffix.lower()


def check_data_file_pattern(key: str, pattern: str) -> None:
    """Raises a one-line [`ConfigError`] unless `pattern` (a file, glob or brace range) names existing data files."""
    suffix = pattern_suffix(pattern)
    if suffix not in DATA_FILE_SUFFIXES:
        raise ConfigError(
            f"`{key}` is {pattern!r}; it must be a .csv, .json, .jsonl or .parquet file, or .tar WebDataset shards "
            "(a glob such as data/train-*.parquet or a brace range such as shards/{00000..00099}.tar)."
        )
    files, missing = expand_pattern(pattern)
    if has_pattern(pattern):
        if not files:
            raise ConfigError(f"`{key}` is {pattern!r}, a pattern that matches no file.")
        if missing:
            raise ConfigError(
                f"`{key}` is {pattern!r}: {len(missing):,} of the files it names do not exist (first: {missing[0]}); "
                "fix the range or remove the missing shards from it."
            )
    elif missing:
        raise ConfigError(f"`{key}` is {pattern!r}, which does not exist.")


# --------------------------------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------------------------------


def is_webdataset(dataset: Dataset | IterableDataset) -> bool:
    """Whether `dataset` was read by `datasets`' webdataset builder (a Hub WebDataset repository, local shards)."""
    features = dataset.features
    return features is not None and all(column in features for column in WEBDATASET_KEY_COLUMNS)


def load_webdataset(
    files: list[str], key: str, data_args: DataArguments, cache_dir: str | None, streaming: bool
) -> Dataset | IterableDataset:
    """Tar shards in WebDataset format, read by `datasets`' webdataset builder, as the run's image and caption columns.

    Streamed, every tar is one shard that processes and DataLoader workers are dealt (see `stream.py`).
    """
    try:
        dataset = datasets.load_dataset(
            "webdataset", data_files={"data": files}, split="data", cache_dir=cache_dir, streaming=streaming
        )
    except Exception as error:
        raise _tar_error(key, files, error) from None
    return webdataset_columns(dataset, data_args, f"`{key}` {files[0]!r}")


def _tar_error(key: str, files: list[str], error: Exception) -> ConfigError:
    message = str(error)
    if isinstance(error, IndexError) or "Must pass at least one table" in message:
        return ConfigError(
            f"`{key}` {files[0]!r} holds no sample (an empty tar?); each shard needs image-caption pairs."
        )
    if "don't share the same prefix or the same types" in message:
        return ConfigError(
            f"`{key}` {files[0]!r} is not in WebDataset format: its first samples do not all have the same members. "
            "Every sample needs the same extensions, e.g. 000001.jpg + 000001.txt (+ 000001.json)."
        )
    return ConfigError(f"Cannot read `{key}` {files[0]!r} as WebDataset tar shards: {type(error).__name__}: {error}")


def _member_lookup(column: str, features: datasets.Features, kind: str, where: str) -> tuple[str, str | None]:
    """Where a column's values are in a WebDataset sample: `(member, None)` or `("json", key)` (see module doc)."""
    json_feature = features.get("json")
    json_keys = list(json_feature) if isinstance(json_feature, dict) else []
    members = [name for name in features if name not in WEBDATASET_KEY_COLUMNS]
    if column in features and column != "json":
        return column, None
    if column.startswith("json."):
        if column[5:] in json_keys:
            return "json", column[5:]
        found = f"its json keys are: {', '.join(json_keys)}" if json_keys else "its samples have no json member"
        raise ConfigError(f"`{kind}` is {column!r}, but {where} has no such json key ({found}).")
    if column in json_keys:
        return "json", column
    if kind == "caption_column" and "txt" in features:
        return "txt", None
    raise ConfigError(
        f"`{kind}` is {column!r}, but the samples of {where} have neither a json member with a {column!r} key nor "
        f"{'a txt member' if kind == 'caption_column' else 'such a member'}; their members are: {', '.join(members)}"
        + (f" (json keys: {', '.join(json_keys)})" if json_keys else "")
        + f". Set `{kind}` to a member (e.g. txt) or to json.<key>."
    )


class _WebDatasetRows:
    """Batched map: each sample's image member (the first it has) and looked-up columns under the run's names.
    A class, not a closure, so that DataLoader workers can pickle the streams it is mapped over."""

    def __init__(self, image_column: str, image_members: list[str], lookups: dict[str, tuple[str, str | None]]):
        self.image_column = image_column
        self.image_members = image_members
        self.lookups = lookups

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        size = len(batch[WEBDATASET_KEY_COLUMNS[0]])
        images = [
            next((batch[m][i] for m in self.image_members if batch[m][i] is not None), None) for i in range(size)
        ]
        out: dict[str, list] = {self.image_column: images}
        for column, (member, key) in self.lookups.items():
            values = batch[member]
            out[column] = [(v or {}).get(key) if key is not None else v for v in values]
        return out


def webdataset_columns(
    dataset: Dataset | IterableDataset, data_args: DataArguments, where: str
) -> Dataset | IterableDataset:
    """A webdataset-builder dataset with the run's `image_column` and `caption_column` (and label and image id
    columns, when set) taken from the sample's members by the rules of the module docstring."""
    features = dataset.features
    members = [name for name in features if name not in WEBDATASET_KEY_COLUMNS]
    images = [name for name in features if isinstance(features[name], datasets.Image)]
    images.sort(key=lambda name: IMAGE_MEMBERS.index(name) if name in IMAGE_MEMBERS else len(IMAGE_MEMBERS))
    if data_args.image_column in images:
        images = [data_args.image_column]
    if not images:
        raise ConfigError(
            f"{where}: its samples have no image member (jpg, jpeg, png or webp); their members are: "
            f"{', '.join(members)}. Each sample needs an image file (e.g. 000001.jpg) beside its caption (000001.txt)."
        )
    lookups = {data_args.caption_column: _member_lookup(data_args.caption_column, features, "caption_column", where)}
    for kind in ("label_column", "image_id_column"):
        column = getattr(data_args, kind)
        if column is not None:
            lookups[column] = _member_lookup(column, features, kind, where)
    new_features = datasets.Features({data_args.image_column: datasets.Image(decode=False)})
    for column, (member, key) in lookups.items():
        feature = features[member] if key is None else features[member][key]
        new_features[column] = datasets.Value("string") if column == data_args.caption_column else feature
    for column in WEBDATASET_KEY_COLUMNS:
        new_features[column] = features[column]
    for name in images:
        dataset = dataset.cast_column(name, datasets.Image(decode=False))
    rows = _WebDatasetRows(data_args.image_column, images, lookups)
    kwargs: dict[str, Any] = {"batched": True, "remove_columns": members, "features": new_features}
    if isinstance(dataset, Dataset):
        kwargs["desc"] = "Mapping WebDataset members to columns"
    return dataset.map(rows, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------------------


def _image_extensions() -> set[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return {extension.lower() for extension in ImageFolder.EXTENSIONS}


def image_folder_kind(path: str) -> str | None:
    """What a local folder of images is: `"metadata"` (images and a `metadata.csv`/`.jsonl`/`.parquet` naming them
    in `file_name`, `datasets`' imagefolder convention), `"captions"` (images, each with a same-named `.txt` caption,
    no metadata file), or `None` (anything else: data files, tar shards, ...)."""
    extensions = _image_extensions()
    has_metadata = has_images = has_captions = False
    for _, _, files in os.walk(path):
        names = set(files)
        has_metadata = has_metadata or any(name in names for name in METADATA_FILENAMES)
        for name in files:
            stem, extension = os.path.splitext(name)
            if extension.lower() in extensions:
                has_images = True
                has_captions = has_captions or stem + ".txt" in names
        if has_metadata and has_images:
            return "metadata"
    if has_images and has_captions:
        return "captions"
    return None


class _SidecarCaptions:
    """Batched map: the caption of each image, read from the `.txt` file beside it (`cat.jpg` -> `cat.txt`); `None`
    when there is none, so that the row is reported and skipped like any row without a caption."""

    def __init__(self, image_column: str, caption_column: str) -> None:
        self.image_column = image_column
        self.caption_column = caption_column

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        captions = []
        for image in batch[self.image_column]:
            path = image.get("path") if isinstance(image, dict) else image
            try:
                captions.append(Path(path).with_suffix(".txt").read_text(encoding="utf-8").strip())
            except (OSError, TypeError, UnicodeDecodeError):
                captions.append(None)
        return {self.caption_column: captions}


def load_image_folder(
    path: str, kind: str, data_args: DataArguments, cache_dir: str | None, streaming: bool
) -> dict[str, Dataset | IterableDataset]:
    """A folder of images through `datasets`' imagefolder builder: its splits (`train/`, `validation/`, `test/`
    sub-folders, else one `train` split), images as file paths, the metadata file's columns or the `.txt` captions.

    Captions in same-named `.txt` files are added here: the imagefolder builder reads only a metadata file (any other
    file beside an image is ignored), and turning each `.txt` into a metadata row first would mean writing into the
    user's folder.
    """
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=path, cache_dir=cache_dir, streaming=streaming)
    except Exception as error:
        raise ConfigError(
            f"Cannot read the image folder `dataset_name` {path!r}: {type(error).__name__}: {error}"
        ) from None
    splits = {}
    for split, dataset in loaded.items():
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
        if data_args.image_column != "image":
            dataset = dataset.rename_column("image", data_args.image_column)
        if kind == "captions":
            features = dataset.features.copy()
            features[data_args.caption_column] = datasets.Value("string")
            captions = _SidecarCaptions(data_args.image_column, data_args.caption_column)
            kwargs: dict[str, Any] = {"batched": True, "features": features}
            if isinstance(dataset, Dataset):
                kwargs["desc"] = "Reading the .txt captions"
            dataset = dataset.map(captions, **kwargs)
        splits[split] = dataset
    return splits


# --------------------------------------------------------------------------------------------------------------
# Weighted mixtures
# --------------------------------------------------------------------------------------------------------------


def parse_mixture(value: Any) -> dict[str, float]:
    """`train_mixture` as `{source: weight}`: a JSON object, or its text on the command line. Raises a one-line
    [`ConfigError`] for anything else, an empty mixture or a weight that is not a positive finite number."""
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"`train_mixture` is not valid JSON ({error}); give an object of source -> weight, e.g. "
                '\'{"data/a/{00000..00009}.tar": 3, "data/b.csv": 1}\'.'
            ) from None
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            f"`train_mixture` is {value!r}; it must be a non-empty JSON object of source -> weight, e.g. "
            '{"data/a/{00000..00009}.tar": 3, "data/b.csv": 1}.'
        )
    mixture = {}
    for source, weight in value.items():
        number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not number or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(
                f"`train_mixture` weight of {source!r} is {weight!r}; every weight must be a positive number (weights "
                "are relative: 3 and 1 draw 75% and 25% of the pairs)."
            )
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"`train_mixture` has an empty source name (weight {weight}); name a file or dataset.")
        mixture[source] = float(weight)
    return mixture


def mixture_source_arguments(source: str, data_args: DataArguments) -> DataArguments:
    """The `DataArguments` of one mixture source: a data file, glob or brace range of shards becomes `train_file`,
    anything else (`emoji`, a folder, a Hub id) `dataset_name`; everything else as the run's."""
    as_file = pattern_suffix(source) in DATA_FILE_SUFFIXES
    return dataclasses.replace(
        data_args,
        dataset_name=None if as_file else source,
        train_file=source if as_file else None,
        validation_file=None,
        train_mixture=None,
    )


def mixed_columns(
    dataset: Dataset | IterableDataset, data_args: DataArguments, source: str
) -> Dataset | IterableDataset:
    """A source's image and caption columns only, with the same features in every source, as `interleave_datasets`
    needs: images as undecoded `Image` values (paths or bytes), captions as text."""
    columns = [data_args.image_column, data_args.caption_column]
    known = dataset.column_names
    if known is None and isinstance(dataset, IterableDataset):  # csv streams know their columns once read
        known = list(next(iter(dataset.take(1)), {}))
    for kind, column in (("image_column", columns[0]), ("caption_column", columns[1])):
        if column not in known:
            raise ConfigError(
                f"`train_mixture` source {source!r} has no {column!r} column (`{kind}`); its columns are: "
                f"{', '.join(known)}. Every source needs the run's image and caption columns."
            )
    dataset = dataset.select_columns(columns)
    features = datasets.Features({columns[0]: datasets.Image(decode=False), columns[1]: datasets.Value("string")})
    return dataset.cast(features)


def log_mixture(mixture: dict[str, float], sizes: list[int | None], strategy: str, streaming: bool) -> None:
    total = sum(mixture.values())
    parts = []
    for (source, weight), size in zip(mixture.items(), sizes):
        parts.append(f"{source} {weight / total:.1%}" + (f" ({size:,} pairs)" if size is not None else ""))
    rule = {
        "all_exhausted": "an epoch of the mixture ends once every source has been read through; a source drawn "
        "faster than its size is repeated, so the weights hold throughout and no pair is left out",
        "first_exhausted": "an epoch of the mixture ends when its first source runs out; the others are cut there",
    }[strategy]
    endless = "; streamed, the mixture repeats without end" if streaming else ""
    logger.info(f"Mixing {len(mixture)} training sources: {', '.join(parts)} (`{strategy}`: {rule}{endless}).")


def interleave(
    trains: list[Dataset | IterableDataset], mixture: dict[str, float], seed: int, strategy: str
) -> Dataset | IterableDataset:
    total = sum(mixture.values())
    return datasets.interleave_datasets(
        trains, probabilities=[weight / total for weight in mixture.values()], seed=seed, stopping_strategy=strategy
    )
