"""Sources at web scale: WebDataset tar shards, image folders, and weighted mixtures of sources.

Sources are opened by `datasets`: folders of images by its `imagefolder` builder (with `metadata.csv` /
`metadata.jsonl` / `metadata.parquet`, or with a `.txt` caption beside each image), Hub WebDataset repositories by
its `webdataset` builder, mixtures by `interleave_datasets`; local tar shards by `from_generator` over a reader
written here (see [`_ShardReader`] for why). What is written here is the mapping of their columns onto the run's
`image_column` and `caption_column`, and what `datasets` lacks: brace ranges in file patterns
(`shards/{00000..00099}.tar`), captions from same-named `.txt` files, and shards that cannot be read (left out and
named, see [`ShardReport`]).

WebDataset columns. A sample's members are its files with one key (`000001.jpg`, `000001.txt`, `000001.json`); its
row has `__key__` and `__url__` (the tar file). The image is the sample's `image_column` member when that names an
image member of the first samples, else whichever image member the sample has, looked for as `jpg`, `jpeg`, `png`,
`webp`, then any other image extension, in every shard. The caption follows `caption_column`:

- a member name (`txt`): that member's text;
- `json.<key>` (`json.caption`): that key of the `json` member;
- any other name (the default `caption`): that key of the `json` member when the samples' json has it, else the
  `txt` member.

`label_column` and `image_id_column` are looked up the same way (a member, or a key of the json member). `__key__`
(the sample's name in its tar) and `__url__` (the tar file) are kept.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets import Dataset, IterableDataset
from transformers.utils import logging

from .errors import CaptionValueError, ConfigError, ShardCutError
from .rows import dotted_names_cause
from .stream import StreamSource, record_source

# The data settings these readers use (`image_column`, `caption_column`, `label_column`, `image_id_column`,
# `on_bad_rows`, ...) arrive as the run's `DataArguments`; this module sits below the argument classes and does not
# import them.
DataArguments = Any

logger = logging.get_logger(__name__)

# Image members, in the order they are looked for.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
WEBDATASET_KEY_COLUMNS = ("__key__", "__url__")
# Where a row whose image is embedded bytes came from ("row 42 of /data/train.parquet"), or the tar sample of a
# streamed mixture's row ("a sample k0012 of a/00003.tar"): a row of a file of paths is named by its image's path, a
# tar sample by its key and shard, and a picture held as bytes by nothing else.
SOURCE_ROW_COLUMN = "_source_row"
METADATA_FILENAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
# `.tsv` is CSV with tabs between the fields (open_clip's default separator).
DATA_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".tar")
MIXTURE_STOPPING_STRATEGIES = ("all_exhausted", "first_exhausted")
# The heaviest weight of a mixture over its lightest, at most. Beyond it the light source is never drawn in practice,
# and a loaded `all_exhausted` mixture (which draws until every source is read through) grows past memory.
MAX_MIXTURE_WEIGHT_RATIO = 1e6
# A loaded `all_exhausted` mixture may have at most this many times its sources' pairs: reading a source of small
# weight and many pairs through repeats the others that many times over (every row an index in memory).
MAX_MIXTURE_REPEATS = 100

# --------------------------------------------------------------------------------------------------------------
# File patterns
# --------------------------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# A pattern may name at most this many files: a typo in a range (`{000000..99999999}`, 10^8 names) would otherwise
# fill memory with names before a single one is looked up.
MAX_PATTERN_NAMES = 1_000_000


def _brace_choices(body: str) -> tuple[int, Iterable[str]] | None:
    """How many names a brace group's body gives, and (lazily) the names; `None` for a body that is no expansion."""
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.groups()
        start, stop = int(first), int(last)
        step = 1 if stop >= start else -1
        padded = any(len(bound.lstrip("-")) > 1 and bound.lstrip("-").startswith("0") for bound in (first, last))
        width = max(len(first), len(last)) if padded else 0
        numbers = range(start, stop + step, step)
        return len(numbers), (str(number).zfill(width) for number in numbers)
    if "," in body:
        choices = body.split(",")
        return len(choices), choices
    return None  # `{}` or `{x}` is no expansion in bash either: kept as written


def brace_count(pattern: str) -> int:
    """How many names the brace groups of `pattern` expand to, counted without expanding them."""
    count = 1
    for match in _BRACE.finditer(pattern):
        choices = _brace_choices(match.group(1))
        count *= choices[0] if choices is not None else 1
    return count


def expand_braces(pattern: str, key: str | None = None) -> list[str]:
    """Bash-style brace expansion: `a/{00000..00002}.tar` -> `a/00000.tar`, `a/00001.tar`, `a/00002.tar`; `{x,y}`
    lists; several groups multiply. Written here because `datasets`' data-file patterns take globs, not braces (the
    WebDataset convention for naming shards). A zero-padded bound pads every number to the longest bound's width.

    Raises:
        [`ConfigError`]: naming `key` when the pattern gives more than `MAX_PATTERN_NAMES` names.
    """
    count = brace_count(pattern)
    if count > MAX_PATTERN_NAMES:
        where = f"`{key}` is {pattern!r}" if key else f"The file pattern {pattern!r}"
        raise ConfigError(
            f"{where}, a brace range of {count:,} names, more than the {MAX_PATTERN_NAMES:,} one pattern may name (a "
            "typo in a range's bounds?); fix the range to the shards there are, e.g. shards/{000000..000999}.tar."
        )
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    choices = _brace_choices(match.group(1))
    if choices is None:
        return [pattern[: match.end()] + rest for rest in _expand(tail)]
    return [head + choice + rest for choice in choices[1] for rest in _expand(tail)]


def _first_name(pattern: str) -> str:
    """The first name a brace pattern expands to, without expanding the others."""

    def first(match: re.Match) -> str:
        choices = _brace_choices(match.group(1))
        return next(iter(choices[1])) if choices is not None else match.group(0)

    return _BRACE.sub(first, pattern)


def has_pattern(path: str) -> bool:
    """Whether `path` is a glob or a brace pattern rather than one file name."""
    return glob.has_magic(path) or _BRACE.search(path) is not None


def expand_pattern(pattern: str, key: str | None = None) -> tuple[list[str], list[str]]:
    """The files a data-file pattern names (braces expanded, then globs matched, sorted within each glob), and the
    names it gives that do not exist (a brace range naming a missing shard, a glob that matches nothing). A range
    of too many names is a [`ConfigError`] naming `key` (see [`expand_braces`])."""
    files: list[str] = []
    missing: list[str] = []
    for name in expand_braces(pattern, key):
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
    return Path(_first_name(pattern)).suffix.lower()


def check_data_file_pattern(key: str, pattern: str) -> None:
    """Raises a one-line [`ConfigError`] unless `pattern` (a file, glob or brace range) names existing data files."""
    suffix = pattern_suffix(pattern)
    if suffix not in DATA_FILE_SUFFIXES:
        raise ConfigError(
            f"`{key}` is {pattern!r}; it must be a .csv, .json, .jsonl or .parquet file, or .tar WebDataset shards "
            "(a glob such as data/train-*.parquet or a brace range such as shards/{00000..00099}.tar); a .tsv file is "
            "read as tab-separated CSV."
        )
    files, missing = expand_pattern(pattern, key)
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
# What a path names
# --------------------------------------------------------------------------------------------------------------

# A Hub dataset id: `owner/name`, or a bare `name` (the canonical datasets).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
BUNDLED_DATASETS = ("emoji",)


@dataclasses.dataclass(frozen=True)
class DataPath:
    """What a data path names (see [`resolve_data_path`]).

    Attributes:
        key: the option that named it, for messages.
        path: the path as given.
        kind: `bundled` (clip-trainer's demo data), `files` (a .csv/.tsv/.json/.jsonl/.parquet file, glob or brace range),
            `shards` (WebDataset .tar files: one, a glob or a brace range), `prepared` (a folder written by
            `save_to_disk`), `image_folder` (images with a metadata file or `.txt` captions), `data_folder` (a folder
            of data files or shards, split by `datasets`' file-name rules) or `hub` (a Hub dataset id).
        folder_kind: for an image folder, `metadata` or `captions` (see [`image_folder_kind`]).
    """

    key: str
    path: str
    kind: str
    folder_kind: str | None = None

    @property
    def is_files(self) -> bool:
        """Whether it names data files (what `train_file` and `validation_file` take)."""
        return self.kind in ("files", "shards")


def looks_local(path: str) -> bool:
    """Whether `path` can only mean a place on this machine: it starts with `./`, `../`, `/` or `~` (or a drive
    letter), or has a path separator without being of the Hub's `owner/name` form."""
    if path in (".", "..") or path.startswith(("./", "../", "/", "~", ".\\", "..\\", "\\")):
        return True
    if re.match(r"^[A-Za-z]:[\\/]", path):
        return True
    separators = [os.sep] + ([os.altsep] if os.altsep else [])
    return any(separator in path for separator in separators) and not _HUB_ID.match(path)


def resolve_data_path(key: str, path: str) -> DataPath:
    """The one rule for what a data path is, for every option that takes one (`dataset_name`, `train_file`,
    `validation_file`, each `extra_eval_sets` entry and `train_mixture` source).

    In order: `emoji` is the bundled demo; a glob or brace range, or an existing file, is data files (`.tar`:
    WebDataset shards); an existing folder is a prepared folder, an image folder, or a folder of data files; a name
    that is not there is a [`ConfigError`] when it has a data file's suffix or looks local ([`looks_local`]), and a
    Hub dataset id otherwise.

    Raises:
        [`ConfigError`]: one line naming `key`, for a path that cannot name data.
    """
    if path in BUNDLED_DATASETS and not os.path.exists(path):
        return DataPath(key, path, "bundled")
    local = os.path.expanduser(path)
    suffix = pattern_suffix(local)
    if has_pattern(local) or os.path.isfile(local):
        check_data_file_pattern(key, local)
        return DataPath(key, path, "shards" if suffix == ".tar" else "files")
    if os.path.isdir(local):
        if is_prepared_folder(local):
            return DataPath(key, path, "prepared")
        folder_kind = image_folder_kind(local)
        if folder_kind is not None:
            return DataPath(key, path, "image_folder", folder_kind)
        if not any(name.lower().endswith(DATA_FILE_SUFFIXES) for _, _, names in os.walk(local) for name in names):
            raise ConfigError(
                f"`{key}` is {path!r}, a folder without data: no .csv, .tsv, .json, .jsonl, .parquet or .tar file, no "
                "images with a metadata file or .txt captions, and no prepared dataset in it."
            )
        _refuse_img2dataset_folder(key, path, local)
        return DataPath(key, path, "data_folder")
    if suffix in DATA_FILE_SUFFIXES:
        raise ConfigError(f"`{key}` is {path!r}, which does not exist.")
    if looks_local(path):
        raise ConfigError(
            f"`{key}` is {path!r}, a local path that does not exist (looked for {os.path.abspath(local)}); check "
            "the path, or give a Hub dataset id (owner/name)."
        )
    return DataPath(key, path, "hub")


def _refuse_img2dataset_folder(key: str, path: str, folder: str) -> None:
    """One line for img2dataset's output folder given whole: `datasets` would read the `.parquet` file beside each
    shard (`00000.parquet`: its urls, keys and download status), not the pairs in the `.tar` shards."""
    names = os.listdir(folder)
    shards = {name[: -len(".tar")] for name in names if name.endswith(".tar")}
    sidecars = {name[: -len(".parquet")] for name in names if name.endswith(".parquet")}
    if shards and sidecars and sidecars <= shards:
        pattern = os.path.join(path, "*.tar")
        raise ConfigError(
            f"`{key}` is {path!r}, img2dataset's output: its .parquet files are the download's metadata (urls and "
            f"status), not the pairs, which are in the .tar shards; give the shards: `--train_file '{pattern}'`."
        )


def is_prepared_folder(path: str) -> bool:
    """Whether `path` is a folder written by `save_to_disk` (a `--prepare_only` run writes one)."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


def folder_splits(path: str) -> dict[str, list[str]]:
    """The data files of a folder by split, as `datasets` splits a folder (`train-*`, `validation/`, ...)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    files = DataFilesDict.from_patterns(get_data_patterns(path), base_path=path)
    return {str(split): list(names) for split, names in files.items()}


# --------------------------------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------------------------------


def is_webdataset(dataset: Dataset | IterableDataset) -> bool:
    """Whether `dataset` was read by `datasets`' webdataset builder (a Hub WebDataset repository)."""
    features = dataset.features
    return features is not None and all(column in features for column in WEBDATASET_KEY_COLUMNS)


# Tar files are 512-byte blocks ending with two zero blocks (POSIX ustar); a shard cut short lacks that end.
_TAR_BLOCK = 512
# Samples read from the first readable shard to learn the members and json keys (datasets' builder reads 5).
_SAMPLES_FOR_FEATURES = 5
# Local shards of at most this many bytes in all have their samples counted up front (a walk over the tar headers,
# no image data read), to report uneven shards; larger data is not walked before training.
SHARD_COUNT_BYTES = 1 << 30
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


@dataclasses.dataclass
class ShardReport:
    """The tar shards a run could not read, whole or in part, for the log and the run's summary.

    Attributes:
        checked: how many shards were checked.
        unreadable: shard -> why it was left out whole (an empty file, not a tar file: e.g. a saved HTML error page).
        truncated: shard -> what is wrong with it; its samples before the cut are read, the rest is lost.
        skipped_samples: samples left out because a shard was cut inside them, as far as known before training
            (shards are counted up front when small, see `SHARD_COUNT_BYTES`; a cut met later is logged where the
            shard is read).
    """

    checked: int = 0
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)
    truncated: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped_samples: int = 0

    @property
    def skipped_shards(self) -> int:
        """Shards left out whole."""
        return len(self.unreadable)

    def merge(self, other: ShardReport) -> None:
        self.checked += other.checked
        self.unreadable.update(other.unreadable)
        self.truncated.update(other.truncated)
        self.skipped_samples += other.skipped_samples

    def summary(self) -> str:
        """One line, e.g. `"left out 2 of 7 shards that cannot be read (a.tar is an empty file (0 bytes); ...); read
        1 truncated shard up to its cut, leaving out 1 incomplete sample (c.tar is truncated ...)"`; empty when every
        shard was read whole."""
        parts = []
        if self.unreadable:
            named = "; ".join(f"{path} {reason}" for path, reason in self.unreadable.items())
            parts.append(
                f"left out {len(self.unreadable):,} of {self.checked:,} shard(s) that cannot be read ({named})"
            )
        if self.truncated:
            named = "; ".join(f"{path} {reason}" for path, reason in self.truncated.items())
            parts.append(
                f"read {len(self.truncated):,} truncated shard(s) up to the cut, leaving out "
                f"{self.skipped_samples:,} incomplete sample(s) ({named})"
            )
        return "; ".join(parts)


# A whole tar with no member: what img2dataset writes for a shard whose downloads all failed. Left out of a run, never a
# reason to stop one (it holds nothing to lose).
EMPTY_TAR = "holds no sample (an empty tar?)"


def shard_problem(path: str) -> tuple[str, bool] | None:
    """What is wrong with a local tar shard, from its first and last blocks only: `(reason, readable_in_part)`, or
    `None` for a shard that looks whole.

    An empty file, or one that does not start with a tar header (an HTML error page saved as `.tar`), cannot be read
    at all; a shard without the end-of-archive blocks was cut short (an interrupted download or copy) and is readable
    up to the cut. Checked here because `datasets` opens a shard only when it reaches it, mid-run.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(_TAR_BLOCK)
            handle.seek(max(0, size - 2 * _TAR_BLOCK))
            tail = handle.read(2 * _TAR_BLOCK)
    except OSError as error:
        return f"cannot be opened ({error.strerror or type(error).__name__})", False
    if size == 0:
        return "is an empty file (0 bytes)", False
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.EOFHeaderError:
        return EMPTY_TAR, False
    except tarfile.HeaderError:
        html = head.lstrip()[:1] == b"<"
        return "is not a tar file" + (" (it starts like an HTML page: a failed download?)" if html else ""), False
    if size % _TAR_BLOCK or size < 3 * _TAR_BLOCK or tail.count(0) != len(tail):
        return f"is truncated ({size:,} bytes, no end-of-archive blocks: an interrupted download or copy?)", True
    return None


def count_shard_samples(path: str, truncated: bool = False) -> tuple[int, bool]:
    """The whole samples of a tar shard, and whether a sample is cut short at its end, from the tar headers alone
    (the members' data is seeked over, not read).

    A shard cut inside a member loses the sample of that member. One cut between two members (`truncated`: the
    shard has no end-of-archive blocks, see [`shard_problem`]) may leave its last sample without the members after
    the cut, its caption say: that sample counts as cut when it lacks a kind of member that every earlier sample has
    (optional members, a `.json` on some samples only, do not count).
    """
    size = os.path.getsize(path)
    samples, last_key, cut = 0, None, False
    common_members: set[str] | None = None  # the member kinds (extensions) every finished sample has
    members: set[str] = set()  # those of the sample being read
    with tarfile.open(path, mode="r:") as tar:
        while True:
            try:
                member = tar.next()
            except _READ_ERRORS:
                cut = True
                break
            if member is None:
                break
            key, extension = _member_key(member.name) if member.isreg() else (None, "")
            if member.offset_data + member.size > size:
                cut = True
                if key == last_key:  # the sample this member belongs to is incomplete
                    samples, members = samples - 1, set()
                break
            if key is not None and key != last_key:
                if last_key is not None:
                    common_members = members if common_members is None else common_members & members
                samples, last_key, members = samples + 1, key, set()
            if key is not None:
                members.add(extension)
    if (cut or truncated) and common_members is not None and members and not common_members <= members:
        samples, cut = samples - 1, True
    return max(0, samples), cut


def _member_key(name: str) -> tuple[str | None, str]:
    """`dir/000012.seg.jpg` -> (`dir/000012`, `seg.jpg`), the WebDataset convention (datasets' `base_plus_ext`),
    extensions in lower case; hidden files (`.`, `__` prefixes) belong to no sample."""
    from datasets.packaged_modules.webdataset.webdataset import base_plus_ext

    if os.path.basename(name).startswith((".", "__")):
        return None, ""
    key, extension = base_plus_ext(name)
    return key, (extension or "").lower()


@functools.cache
def _decoders() -> tuple[dict[str, Any], frozenset[str]]:
    """datasets' webdataset member decoders (json, txt, cls, npy, ...) and its image extensions."""
    from datasets.packaged_modules.webdataset import webdataset

    return webdataset.DECODERS, frozenset(webdataset.IMAGE_EXTENSIONS)


def _is_image_member(extension: str) -> bool:
    return extension.rsplit(".", 1)[-1] in _decoders()[1]


def _decode_member(extension: str, data: bytes) -> Any:
    """A member's value: image bytes as they are, others decoded by their last extension as `datasets` decodes
    them; `None` when the member does not decode (bad JSON, text that is not UTF-8), so that its sample is reported
    like any with a missing value rather than stopping the run."""
    last = extension.rsplit(".", 1)[-1]
    if _is_image_member(last):
        return data
    if last in ("txt", "text", "transcript"):
        data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is not part of the caption
    decoder = _decoders()[0].get(last)
    if decoder is None:
        return data
    try:
        return decoder(data)
    except Exception:  # any decoder's failure is a bad member, whatever it raises
        return None


def _tar_samples(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """`(key, {extension: bytes})` for each sample of a tar shard, read as a stream (as `datasets` reads it: each
    member once, none kept); raises [`ShardCutError`] where it cannot go on, the sample being read at that point lost."""
    samples, key, members = 0, None, {}
    try:
        with open(shard, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            for member in tar:
                name_key, extension = _member_key(member.name)
                if not member.isreg() or name_key is None:
                    continue
                if name_key != key and members:  # before reading on: the sample before a cut is whole
                    yield key, members
                    samples, members = samples + 1, {}
                key = name_key
                members.setdefault(extension, tar.extractfile(member).read())
                tar.members = []
            # tarfile ends a stream quietly at a header it cannot parse, or at the end of the file: only the
            # end-of-archive blocks mean that the whole shard was read.
            handle.seek(tar.offset)
            end = handle.read(_TAR_BLOCK)
    except _READ_ERRORS as error:
        raise ShardCutError(samples, error) from None
    if members:
        yield key, members
        samples += 1
    if not end or end.count(0) != len(end):
        problem = "an invalid tar header" if end else "the end of the file, without the end-of-archive blocks"
        raise ShardCutError(samples, tarfile.ReadError(f"{problem} at byte {tar.offset:,}"))


@dataclasses.dataclass
class _SampleColumns:
    """How a WebDataset sample becomes a row under the run's column names (see the module docstring)."""

    image_column: str
    # The image members looked for, in order; with `any_image`, else any member with an image extension.
    image_members: list[str]
    any_image: bool
    # Column -> (member, json key or None).
    lookups: dict[str, tuple[str, str | None]]
    # The column whose values are captions (made text, or lists of text: see [`caption_value`]), and whether its
    # rows hold lists (the first samples held one somewhere).
    caption_column: str | None = None
    caption_lists: bool = False

    def row(
        self, key: str, members: dict[str, bytes], shard: str, problems: list[str] | None = None
    ) -> dict[str, Any]:
        """The row of one sample. A caption value that is no caption is `None` in the row, and what it was is
        appended to `problems` (when given) for the reader to report."""
        name = next((name for name in self.image_members if name in members), None)
        if name is None and self.any_image:
            name = next((name for name in members if _is_image_member(name)), None)
        row: dict[str, Any] = {
            self.image_column: {"bytes": members[name], "path": f"{key}.{name}"} if name is not None else None
        }
        decoded: dict[str, Any] = {}
        for column, (member, json_key) in self.lookups.items():
            if member not in decoded:
                decoded[member] = _decode_member(member, members[member]) if member in members else None
            value = decoded[member]
            if json_key is not None:
                value = value.get(json_key) if isinstance(value, dict) else None
            if column == self.caption_column:
                dotted = _dotted_member(members, member) if member not in members else None
                if dotted is not None and problems is not None:
                    problems.append(f"sample {key} has no {member} member: {dotted_names_cause(key, dotted)}")
                if member in members and decoded[member] is None and problems is not None:
                    # The member is there but does not decode: said as such, not as a missing caption.
                    problems.append(f"{_member_name(key, member, None)} {_undecodable(member, members[member])}")
                try:
                    value = caption_value(value, self.caption_lists)
                except CaptionValueError as error:
                    if problems is not None:
                        problems.append(f"{_member_name(key, member, json_key)} {error}")
                    value = None
            row[column] = value
        row["__key__"], row["__url__"] = key, shard
        return row


def _dotted_member(members: Iterable[str], wanted: str) -> str | None:
    """A member that would be `wanted` (`txt`) but for dots before its extension (`05.01.txt`: the file
    `IMG_2021.05.01.txt`), or `None`."""
    last = wanted.rsplit(".", 1)[-1]
    return next((name for name in members if "." in name and name.rsplit(".", 1)[-1] == last), None)


def _undecodable(member: str, data: bytes) -> str:
    """Why a text or json member does not decode, in words with the fix, for messages."""
    try:
        data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as error:
        return (
            f"is not UTF-8 text ({error.reason} at byte {error.start:,}: {data[max(0, error.start - 8) : error.start + 8]!r}); "
            "write the caption as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        )
    return f"does not decode as a .{member.rsplit('.', 1)[-1]} member (malformed); fix or re-create the sample"


def _member_name(key: str, member: str, json_key: str | None) -> str:
    """`k0003.json` key `'captions'`: where a sample's value is, for messages."""
    return f"{key}.{member}" + (f" key {json_key!r}" if json_key is not None else "")


def _number_text(value: int | float) -> str | None:
    # As `check_caption` writes a number: 12, not 12.0 (a float that is a whole number came from JSON's 12.0).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def caption_value(value: Any, as_list: bool) -> str | list[str | None] | None:
    """A WebDataset caption as a row holds it: text (a number is text, as in a JSON Lines file), or with `as_list` a
    list of texts (one caption becomes a list of one), the rows a JSON Lines file of the same captions gives.

    A list met in a column of single captions becomes its JSON text, which every reader of captions takes as the
    list it is (as a CSV cell holds one, see `clip_trainer.captions`).

    Raises:
        [`CaptionValueError`]: for a value that is neither: a JSON object, a boolean, a list holding anything but
            text (a caption key that names the wrong thing).
    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = _number_text(value)
    if isinstance(value, str):
        return [value] if as_list else value
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            if isinstance(item, int | float) and not isinstance(item, bool):
                item = _number_text(item)
            if item is not None and not isinstance(item, str):
                raise CaptionValueError(_not_a_caption(value))
            items.append(item)
        return items if as_list else json.dumps(items, ensure_ascii=False)
    raise CaptionValueError(_not_a_caption(value))


def _not_a_caption(value: Any) -> str:
    kind = {dict: "a JSON object", bool: "a boolean"}.get(type(value), f"a {type(value).__name__}")
    if isinstance(value, list | tuple):
        kind = "a list that holds " + ", ".join(
            sorted({type(item).__name__ for item in value if item is not None and not isinstance(item, str)})
        )
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"holds {kind} ({shown}), not a caption: a caption must be a string or a list of strings"


_REPORTED_CUTS: set[str] = set()
_REPORTED_CAPTIONS: set[tuple[str, str]] = set()


class _ShardReader:
    """The rows of tar shards, for `datasets`' `from_generator` (which deals each DataLoader worker and process its
    own shards, and records a stream's position for resuming).

    Written here because `datasets`' webdataset builder stops the run on a shard it cannot read (a raw
    `tarfile.ReadError` that names no file) and learns the image members from the first shard only (a sample whose
    image is a `png` among `jpg` shards loses it). This reader leaves out what it cannot read, names the shard, and
    goes on; with `on_bad_rows` `error` it stops, naming the shard.
    """

    def __init__(self, columns: _SampleColumns, key: str, on_bad_rows: str) -> None:
        self.columns = columns
        self.key = key
        self.on_bad_rows = on_bad_rows

    def __call__(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            try:
                for key, members in _tar_samples(shard):
                    problems: list[str] = []
                    row = self.columns.row(key, members, shard, problems)
                    if problems:
                        self._report_caption(shard, problems[0])
                    yield row
            except ShardCutError as cut:
                self._report(shard, cut)

    def _report_caption(self, shard: str, problem: str) -> None:
        """A sample whose caption is no caption: its row has none, so it is left out (and counted) like any row
        without a caption; said here, where what the value was is known."""
        message = f"`{self.key}` shard {shard!r}: {problem}"
        if self.on_bad_rows == "error":
            if "WebDataset's sample key" in problem:  # dots in the file names: the problem says the fix
                raise ConfigError(f"{message}; or set `on_bad_rows` to `skip`.")
            fix = (
                "fix the sample"
                if "decode" in problem or "UTF-8" in problem
                else ("Point `caption_column` at the captions (a txt member or json.<key>), fix the sample")
            )
            raise ConfigError(f"{message}. {fix[0].upper()}{fix[1:]}, or set `on_bad_rows` to `skip`.")
        if (os.path.abspath(shard), "caption") not in _REPORTED_CAPTIONS:  # once per shard and process, as a cut is
            _REPORTED_CAPTIONS.add((os.path.abspath(shard), "caption"))
            logger.warning(message + "; its sample is left out (later ones in this shard are counted, not named).")

    def _report(self, shard: str, cut: ShardCutError) -> None:
        message = (
            f"shard {shard!r} of `{self.key}` cannot be read after {cut.samples:,} sample(s) ({cut}); the rest of "
            "it is left out"
        )
        if self.on_bad_rows == "error":
            raise ConfigError(f"{message}. Re-download or re-create it, or set `on_bad_rows` to `skip`.")
        if shard not in _REPORTED_CUTS:  # once per shard and process: a stream reads its shards again every pass
            _REPORTED_CUTS.add(shard)
            logger.warning(message + "; the run goes on.")


def check_shards(files: list[str], key: str, on_bad_rows: str) -> tuple[list[str], ShardReport, list[int] | None]:
    """The shards of `files` that can be read (whole or up to a cut), what is wrong with the others, and every
    readable shard's sample count when the shards are small enough to count up front (`SHARD_COUNT_BYTES`).

    With `on_bad_rows` `error`, the first bad shard is a one-line [`ConfigError`] naming it.
    """
    report = ShardReport(checked=len(files))
    readable = []
    for path in files:
        problem = shard_problem(path)
        if problem is None:
            readable.append(path)
            continue
        reason, in_part = problem
        if on_bad_rows == "error" and reason != EMPTY_TAR:
            raise ConfigError(
                f"`{key}` shard {path!r} {reason}. Re-download or re-create it, or leave it out of `{key}` (or set "
                "`on_bad_rows` to `skip` to go on without what cannot be read)."
            )
        if in_part:
            report.truncated[path] = reason
            readable.append(path)
        else:
            report.unreadable[path] = reason
    sizes = None
    if sum(os.path.getsize(path) for path in readable) <= SHARD_COUNT_BYTES:
        sizes = []
        for path in readable:
            samples, cut = count_shard_samples(path, truncated=path in report.truncated)
            sizes.append(samples)
            report.skipped_samples += cut
    if report.unreadable or report.truncated:
        logger.warning(f"`{key}`: {report.summary()}. The run goes on without them.")
    return readable, report, sizes


def _sample_features(samples: list[dict[str, Any]], where: str) -> datasets.Features:
    """The members' features, inferred from decoded samples as `datasets`' webdataset builder infers them."""
    from datasets.features.features import cast_to_python_objects

    plain = [{name: value for name, value in sample.items() if not _is_image_member(name)} for sample in samples]
    tables = [pa.Table.from_pylist(cast_to_python_objects([row], only_1d_for_numpy=True)) for row in plain]
    try:
        features = datasets.Features.from_arrow_schema(pa.concat_tables(tables, promote_options="default").schema)
    except (pa.ArrowTypeError, pa.ArrowInvalid) as error:
        # Arrow's words: "Unable to merge: Field json has incompatible types: struct<c: int64> vs struct<c: string>".
        reason = str(error).split("\n")[0]
        raise ConfigError(
            f"{where}: its first samples hold values of different kinds in one member ({reason}); every sample needs "
            "the same members, and its json the same keys with the same kind of value."
        ) from None
    for sample in samples:
        for name in sample:
            if _is_image_member(name):
                features[name] = datasets.Image()
    return features


def _is_text_list(feature: Any) -> bool:
    """Whether a feature is a list of captions (text, numbers as text, or nothing yet)."""
    if not isinstance(feature, datasets.List | datasets.LargeList | datasets.Sequence):
        return False
    inner = feature.feature
    return isinstance(inner, datasets.Value) and (inner.dtype in ("string", "large_string", "null") or
                                                  pa.types.is_integer(inner.pa_type) or
                                                  pa.types.is_floating(inner.pa_type))  # fmt: skip


def _caption_feature(feature: Any, column: str, where: str) -> datasets.Value | datasets.List:
    """The row feature of the caption column: a list of texts for a member (or json key) that holds lists, as a
    JSON Lines file of lists gives, else text."""
    if _is_text_list(feature):
        return datasets.List(datasets.Value("string"))
    if isinstance(feature, datasets.Value):
        return datasets.Value("string")
    raise ConfigError(
        f"`caption_column` is {column!r}, but the samples of {where} hold {feature} there, neither text nor a list of "
        "texts; point `caption_column` at the captions (a txt member or json.<key>)."
    )


def _row_columns(
    data_args: DataArguments,
    features: dict[str, Any],
    where: str,
    lookups: dict[str, tuple[str, str | None]] | None = None,
) -> tuple[dict[str, tuple[str, str | None]], datasets.Features]:
    """Where each of the run's columns (caption, and label and image id when named) is found in a sample's members
    (unless given as `lookups`), and the features of the rows made from them (the image kept encoded, the caption as
    text or a list of texts)."""
    if lookups is None:
        lookups = _lookups(data_args, features, where)
    row_features = datasets.Features({data_args.image_column: datasets.Image(decode=False)})
    for column, (member, key) in lookups.items():
        feature = features[member] if key is None else features[member][key]
        if column == data_args.caption_column:
            feature = _caption_feature(feature, column, where)
        row_features[column] = feature
    return lookups, row_features


def _lookups(
    data_args: DataArguments, features: dict[str, Any], where: str, member_keys: dict[str, str] | None = None
) -> dict[str, tuple[str, str | None]]:
    """Column -> (member, json key or None), for the caption column and the label, image id and hard-negative columns
    when named. `member_keys` (member -> a sample key that has it) names a sample in messages."""
    lookups = {
        data_args.caption_column: _member_lookup(
            data_args.caption_column, features, "caption_column", where, member_keys
        )
    }
    for kind in ("label_column", "image_id_column", "hard_negative_column"):
        column = getattr(data_args, kind)
        if column is not None:
            lookups[column] = _member_lookup(column, features, kind, where, member_keys)
    return lookups


def _member_shapes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The members of decoded samples, each json member as its keys (the union over the samples): what
    [`_member_lookup`] reads, before the values' features are known."""
    shapes: dict[str, Any] = {}
    for sample in samples:
        for name, value in sample.items():
            if isinstance(value, dict):
                shapes.setdefault(name, {}).update(dict.fromkeys(value))
            else:
                shapes.setdefault(name, None)
    return shapes


def _captions_of_samples(
    samples: list[tuple[str, dict[str, Any]]], lookup: tuple[str, str | None], shard: str, key: str
) -> tuple[list[dict[str, Any]], bool]:
    """The first samples with their caption made what rows hold ([`caption_value`]), and whether captions come as
    lists. A caption that is no caption is a one-line [`ConfigError`] naming the sample, its shard and its member:
    in the first samples it means that `caption_column` names the wrong thing."""
    member, json_key = lookup

    def where(sample: dict[str, Any]) -> tuple[dict[str, Any] | None, Any]:
        value = sample.get(member)
        if json_key is None:
            return None, value
        return (value, value.get(json_key)) if isinstance(value, dict) else (None, None)

    as_list = any(isinstance(where(sample)[1], list | tuple) for _, sample in samples)
    made = []
    for name, sample in samples:
        holder, value = where(sample)
        try:
            value = caption_value(value, as_list)
        except CaptionValueError as error:
            raise ConfigError(
                f"`{key}` shard {shard!r}: {_member_name(name, member, json_key)} {error}. Point `caption_column` at "
                "the captions (a txt member or json.<key>), or fix the samples."
            ) from None
        if json_key is None:
            made.append({**sample, member: value})
        else:
            made.append({**sample, member: {**holder, json_key: value}} if holder is not None else sample)
    return made, as_list


def _sample_columns(
    samples: list[tuple[str, dict[str, Any]]], data_args: DataArguments, shard: str, key: str
) -> tuple[_SampleColumns, datasets.Features]:
    """The image and lookup rules of the module docstring, from the first samples (`(sample key, members)`, of
    `shard`) and their members, and the row features."""
    where = f"`{key}` {shard!r}"
    shapes = _member_shapes([sample for _, sample in samples])
    members = list(shapes)
    images = [name for name in members if _is_image_member(name)]
    if not images:
        raise ConfigError(
            f"{where}: its samples have no image member (jpg, jpeg, png or webp); their members are: "
            f"{', '.join(members)}. Each sample needs an image file (e.g. 000001.jpg) beside its caption (000001.txt)."
        )
    if data_args.image_column in images:  # an explicit member: that one only
        image_members, any_image = [data_args.image_column], False
    else:  # whichever image the sample has, in this order, in whichever shard
        rest = sorted(name for name in images if name not in IMAGE_MEMBERS)
        image_members, any_image = [*IMAGE_MEMBERS, *rest], True
    member_keys: dict[str, str] = {}
    for name, sample in samples:
        for member in sample:
            member_keys.setdefault(member, name)
    lookups = _lookups(data_args, shapes, where, member_keys)
    caption_column = data_args.caption_column
    made, as_list = _captions_of_samples(samples, lookups[caption_column], shard, key)
    _, row_features = _row_columns(data_args, _sample_features(made, where), where, lookups)
    for column in WEBDATASET_KEY_COLUMNS:
        row_features[column] = datasets.Value("string")
    columns = _SampleColumns(data_args.image_column, image_members, any_image, lookups, caption_column, as_list)
    return columns, row_features


def _first_samples(shards: list[str], limit: int) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """The first `limit` samples (`(sample key, members decoded)`) of the first shard that has any, and that shard."""
    for shard in shards:
        samples = []
        try:
            for name, members in _tar_samples(shard):
                samples.append((name, {member: _decode_member(member, data) for member, data in members.items()}))
                if len(samples) == limit:
                    break
        except ShardCutError:
            pass
        if samples:
            return shard, samples
    return shards[0], []


def load_webdataset(
    files: list[str],
    key: str,
    data_args: DataArguments,
    cache_dir: str | None,
    streaming: bool,
    report: ShardReport | None = None,
) -> Dataset | IterableDataset:
    """Local tar shards in WebDataset format as the run's image and caption columns (and `__key__`, `__url__`).

    Shards that cannot be read are left out, named in the log and added to `report` (with `on_bad_rows` `error`
    the first one stops the run); a shard cut short is read up to the cut. Streamed, every tar is one shard that
    processes and DataLoader workers are dealt (see `stream.py`); loaded, the rows are written to the `datasets`
    cache once (the cache is keyed by the shards' names, sizes and times, so a replaced shard is read again).
    """
    readable, found, sizes = check_shards(files, key, data_args.on_bad_rows)
    if report is not None:
        report.merge(found)
    if not readable:
        if len(files) == 1:
            raise ConfigError(
                f"`{key}` {files[0]!r} {found.unreadable[files[0]]}; it needs image-caption pairs in WebDataset "
                "format (e.g. 000001.jpg + 000001.txt)."
            )
        raise ConfigError(f"None of the {len(files):,} shards of `{key}` can be read: {found.summary()}.")
    first, samples = _first_samples(readable, _SAMPLES_FOR_FEATURES)
    if not samples:
        raise ConfigError(f"`{key}` {readable[0]!r} {EMPTY_TAR}; each shard needs image-caption pairs.")
    others = [{name for name in sample if not _is_image_member(name)} for _, sample in samples]
    odd = next((index for index, members in enumerate(others) if members != others[0]), None)
    if odd is not None:
        # Named with what each has, so that the odd one (often the first: a sample without its caption) is found.
        def shown(index: int) -> str:
            return f"{samples[index][0]} has {', '.join(sorted(others[index])) or 'no member but its image'}"

        fix = "Every sample needs the same extensions, e.g. 000001.jpg + 000001.txt (+ 000001.json)."
        dotted = next(((index, name) for index in (0, odd) for name in others[index] if "." in name), None)
        if dotted is not None:
            index, name = dotted
            cause = dotted_names_cause(samples[index][0], name)
            fix = f"{cause[0].upper()}{cause[1:]}."
        raise ConfigError(
            f"`{key}` {first!r} is not in WebDataset format: its first samples do not all have the same members "
            f"({shown(0)}; {shown(odd)}). {fix}"
        )
    columns, features = _sample_columns(samples, data_args, first, key)
    reader = _ShardReader(columns, key, data_args.on_bad_rows)
    if streaming:
        stream = IterableDataset.from_generator(reader, features=features, gen_kwargs={"shards": readable})
        record_source(stream, StreamSource(readable, sizes))
        return stream
    stamps = [(path, str(Path(path).resolve()), os.path.getsize(path), os.stat(path).st_mtime_ns) for path in readable]
    fingerprint = hashlib.sha256(
        repr(("clip-trainer webdataset 2", stamps, dataclasses.asdict(columns), data_args.on_bad_rows)).encode()
    ).hexdigest()[:32]
    try:
        return Dataset.from_generator(
            reader,
            features=features,
            gen_kwargs={"shards": readable},
            cache_dir=cache_dir,
            fingerprint=fingerprint,
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, ConfigError):  # a shard cut found only now, with `on_bad_rows` `error`
            raise error.__cause__ from None
        raise


def _member_lookup(
    column: str, features: datasets.Features, kind: str, where: str, member_keys: dict[str, str] | None = None
) -> tuple[str, str | None]:
    """Where a column's values are in a WebDataset sample: `(member, None)` or `("json", key)` (see module doc).
    `member_keys` (member -> a sample key that has it) names a sample in messages."""
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
    dotted = _dotted_member(members, column) or (_dotted_member(members, "txt") if kind == "caption_column" else None)
    if dotted is not None:
        # The setting names the member already: the dots in the file names, not the setting, are what is wrong.
        sample_key = (member_keys or {}).get(dotted, "<key>")
        raise ConfigError(
            f"`{kind}` is {column!r}, but the samples of {where} have no {dotted.rsplit('.', 1)[-1]} member: "
            f"{dotted_names_cause(sample_key, dotted)}."
        )
    raise ConfigError(
        f"`{kind}` is {column!r}, but the samples of {where} have neither a json member with a {column!r} key nor "
        f"{'a txt member' if kind == 'caption_column' else 'such a member'}; their members are: {', '.join(members)}"
        + (f" (json keys: {', '.join(json_keys)})" if json_keys else "")
        + f". Set `{kind}` to a member (e.g. txt) or to json.<key>."
    )


class _WebDatasetRows:
    """Batched map: each sample's image member (the first it has) and looked-up columns under the run's names.
    A class, not a closure, so that DataLoader workers can pickle the streams it is mapped over."""

    def __init__(
        self,
        image_column: str,
        image_members: list[str],
        lookups: dict[str, tuple[str, str | None]],
        caption_column: str | None = None,
        caption_lists: bool = False,
    ):
        self.image_column = image_column
        self.image_members = image_members
        self.lookups = lookups
        self.caption_column = caption_column
        self.caption_lists = caption_lists

    def _caption(self, value: Any) -> Any:
        try:
            return caption_value(value, self.caption_lists)
        except CaptionValueError:  # no caption: its row is reported and left out like any without one
            return None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        size = len(batch[WEBDATASET_KEY_COLUMNS[0]])
        images = [
            next((batch[m][i] for m in self.image_members if batch[m][i] is not None), None) for i in range(size)
        ]
        out: dict[str, list] = {self.image_column: images}
        for column, (member, key) in self.lookups.items():
            values = batch[member]
            out[column] = [(v or {}).get(key) if key is not None else v for v in values]
            if column == self.caption_column:
                out[column] = [self._caption(value) for value in out[column]]
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
    lookups, new_features = _row_columns(data_args, features, where)
    for column in WEBDATASET_KEY_COLUMNS:
        new_features[column] = features[column]
    for name in images:
        dataset = dataset.cast_column(name, datasets.Image(decode=False))
    caption_lists = isinstance(new_features[data_args.caption_column], datasets.List)
    rows = _WebDatasetRows(data_args.image_column, images, lookups, data_args.caption_column, caption_lists)
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
        lower_names = {name.lower() for name in files}  # `cat.TXT` is a caption as `cat.txt` is
        for name in files:
            stem, extension = os.path.splitext(name)
            if extension.lower() in extensions:
                has_images = True
                has_captions = has_captions or stem.lower() + ".txt" in lower_names
        if has_metadata and has_images:
            return "metadata"
    if has_images and has_captions:
        return "captions"
    return None


# Caption files named in the log, at most, per source and process: a folder with thousands of bad ones is
# summed up by the rows report.
MAX_CAPTION_FILES_LOGGED = 20
# Images named in the warning about those a metadata file leaves out, at most.
MAX_UNLISTED_IMAGES_NAMED = 3


@dataclasses.dataclass
class _FolderScan:
    """What is under an image folder, as `datasets`' imagefolder would see it (hidden entries, `.x` and `__x`, left
    out): its image files, the entries named like images that are no file (a broken link, a folder called `y.jpg`),
    which imagefolder leaves out without a word, and its metadata files."""

    images: list[str] = dataclasses.field(default_factory=list)
    not_files: list[str] = dataclasses.field(default_factory=list)
    metadata: list[str] = dataclasses.field(default_factory=list)


def _scan_image_folder(path: str) -> _FolderScan:
    """One walk over an image folder (symlinked folders not followed), names sorted within each folder."""
    extensions = _image_extensions()
    scan = _FolderScan()
    folders = [os.path.abspath(path)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in sorted(entries, key=lambda entry: entry.name):
                if entry.name.startswith((".", "__")):
                    continue
                is_image = os.path.splitext(entry.name)[1].lower() in extensions
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                    if is_image:
                        scan.not_files.append(entry.path)
                elif entry.name in METADATA_FILENAMES:
                    scan.metadata.append(entry.path)
                elif is_image:
                    (scan.images if entry.is_file() else scan.not_files).append(entry.path)
    return scan


def _is_file_name_column(name: str) -> bool:
    # The metadata columns that name an image, as imagefolder reads them.
    return name == "file_name" or name.endswith("_file_name")


def _listed_images(metadata_file: str) -> set[str] | None:
    """The image paths a metadata file names (its `file_name` column, relative to its folder), or `None` when it is
    not read here (no such column, or a file imagefolder read but this does not)."""
    folder = os.path.dirname(metadata_file)
    try:
        if metadata_file.endswith(".csv"):
            import pandas as pd

            frame = pd.read_csv(metadata_file, usecols=_is_file_name_column, dtype=str, keep_default_na=False)
            names = [name for column in frame.columns for name in frame[column]]
            found = len(frame.columns) > 0
        elif metadata_file.endswith(".jsonl"):
            names, found = [], False
            with open(metadata_file, encoding="utf-8") as handle:
                for line in handle:
                    row = json.loads(line) if line.strip() else {}
                    columns = [column for column in row if _is_file_name_column(column)]
                    found = found or bool(columns)
                    names += [row[column] for column in columns]
        else:
            import pyarrow.parquet as pq

            columns = [name for name in pq.read_schema(metadata_file).names if _is_file_name_column(name)]
            table = pq.read_table(metadata_file, columns=columns)
            names = [name for column in columns for name in table.column(column).to_pylist()]
            found = bool(columns)
    except Exception:  # whatever it is, imagefolder read it: no check rather than a false report
        return None
    if not found:
        return None
    return {os.path.normpath(os.path.join(folder, name)) for name in names if isinstance(name, str)}


def _warn_unlisted_images(path: str, scan: _FolderScan) -> None:
    """One line for the images that no metadata file names: imagefolder reads only the rows of its metadata files,
    and leaves any other image out without a word."""
    listed: set[str] = set()
    for metadata_file in scan.metadata:
        names = _listed_images(metadata_file)
        if names is None:
            return
        listed |= names
    unlisted = [image for image in scan.images if os.path.normpath(image) not in listed]
    if not unlisted:
        return
    shown = [os.path.relpath(image, path) for image in unlisted[:MAX_UNLISTED_IMAGES_NAMED]]
    more = f" and {len(unlisted) - len(shown):,} more" if len(unlisted) > len(shown) else ""
    metadata_names = ", ".join(sorted({os.path.basename(name) for name in scan.metadata}))
    logger.warning(
        f"Image folder {path!r}: {len(unlisted):,} of its {len(scan.images):,} images are not in its metadata file "
        f"({metadata_names}) and are left out: {', '.join(shown)}{more}. To train on them, list each in the metadata "
        "file (a row with its file_name)."
    )


def _report_entries_that_are_no_file(path: str, not_files: list[str], on_bad_rows: str) -> None:
    """A streamed folder's entries named like images that are no file, in one line (a stream has no rows check):
    left out, or with `on_bad_rows` `error` the run's stop."""
    reasons = [
        f"{entry} is {'a directory' if os.path.isdir(entry) else 'no file (a broken link?)'}" for entry in not_files
    ]
    shown = "; ".join(reasons[:MAX_UNLISTED_IMAGES_NAMED])
    more = (
        f" and {len(reasons) - MAX_UNLISTED_IMAGES_NAMED:,} more" if len(reasons) > MAX_UNLISTED_IMAGES_NAMED else ""
    )
    message = f"Image folder {path!r}: {len(reasons):,} entries named like images are no image file ({shown}{more})"
    if on_bad_rows == "error":
        raise ConfigError(f"{message}. Replace or remove them, or set `on_bad_rows` to `skip`.")
    logger.warning(message + "; they are left out.")


def _split_of(entry: str, split_folders: dict[str, set[str]], default: str) -> str:
    """The split an entry of an image folder belongs to: that of the images nearest to it (imagefolder tells splits
    by folder and file names, `train/`, `validation/`), else `default`."""
    folder = os.path.dirname(entry)
    while True:
        owners = [split for split, folders in split_folders.items() if folder in folders]
        if len(owners) == 1:
            return owners[0]
        parent = os.path.dirname(folder)
        if owners or parent == folder:
            return default
        folder = parent


def _with_entries_that_are_no_file(
    splits: dict[str, Dataset], not_files: list[str], image_column: str
) -> dict[str, Dataset]:
    """The splits with a row for each entry named like an image that is no file (a broken link, a folder called
    `y.jpg`), which imagefolder leaves out without a word: the rows check reports them as a CSV row naming such a
    path is reported (`image file not found`, `image path is a directory`), counted, and left out or stopping the
    run by `on_bad_rows`."""
    split_folders: dict[str, set[str]] = {}
    for split, dataset in splits.items():
        folders: set[str] = set()
        for image in dataset.select_columns([image_column]).with_format("arrow")[image_column].to_pylist():
            folder = os.path.dirname(os.path.abspath(image["path"])) if image and image.get("path") else None
            while folder and folder not in folders:
                folders.add(folder)
                folder = os.path.dirname(folder) if os.path.dirname(folder) != folder else None
        split_folders[split] = folders
    default = "train" if "train" in splits else next(iter(splits))
    added: dict[str, list[str]] = {}
    for entry in not_files:
        added.setdefault(_split_of(entry, split_folders, default), []).append(entry)
    for split, entries in added.items():
        dataset = splits[split]
        rows: dict[str, list] = {column: [None] * len(entries) for column in dataset.column_names}
        rows[image_column] = [{"bytes": None, "path": entry} for entry in entries]
        label = dataset.features.get("label")
        if isinstance(label, datasets.ClassLabel):  # imagefolder's class of a file: its folder's name
            rows["label"] = [
                label.str2int(name) if name in label.names else None
                for name in (os.path.basename(os.path.dirname(entry)) for entry in entries)
            ]
        extra = Dataset.from_dict(rows, features=dataset.features)
        splits[split] = datasets.concatenate_datasets([dataset, extra])
    return splits


class _SidecarCaptions:
    """Batched map: the caption of each image, read from the `.txt` file beside it (`cat.jpg` -> `cat.txt`), a UTF-8
    byte order mark (Windows editors write one) and surrounding whitespace removed; `None` when there is none or it
    cannot be read, so that the row is reported and skipped like any row without a caption, the file named."""

    def __init__(self, image_column: str, caption_column: str) -> None:
        self.image_column = image_column
        self.caption_column = caption_column
        self.logged: set[str] = set()

    def _log(self, text_file: Path, problem: str) -> None:
        """Names a caption file whose image is left out, once (a stream reads the folder again every pass)."""
        name = str(text_file)
        if name in self.logged or len(self.logged) > MAX_CAPTION_FILES_LOGGED:
            return
        self.logged.add(name)
        if len(self.logged) > MAX_CAPTION_FILES_LOGGED:
            logger.warning(f"More than {MAX_CAPTION_FILES_LOGGED} caption files have no usable caption; not named.")
        else:
            logger.warning(f"Caption file {name} {problem}: its image is left out.")

    @staticmethod
    def _other_cases(text_file: Path, listings: dict[Path, dict[str, list[str]]]) -> list[Path]:
        """The caption files of `text_file`'s image whose extension is `.txt` in another case (`cat.TXT`, as
        Windows and camera tools write it); the folder is listed once per batch, and only when a `.txt` is missing."""
        folder = text_file.parent
        if folder not in listings:
            by_stem: dict[str, list[str]] = {}
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            for name in names:
                stem, extension = os.path.splitext(name)
                if extension.lower() == ".txt" and extension != ".txt":
                    by_stem.setdefault(stem, []).append(name)
            listings[folder] = by_stem
        return [folder / name for name in listings[folder].get(text_file.stem, [])]

    def _read(self, text_file: Path) -> str | None:
        """The caption in `text_file`, or `None` with the file named in the log; raises `FileNotFoundError`."""
        try:
            caption = text_file.read_text(encoding="utf-8-sig").strip()
        except FileNotFoundError:
            raise
        except UnicodeDecodeError as error:
            self._log(text_file, f"is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8")
            return None
        except OSError as error:
            self._log(text_file, f"cannot be read ({error.strerror or type(error).__name__})")
            return None
        if not caption:
            self._log(text_file, "is empty")
        return caption

    def _caption(self, path: str, listings: dict[Path, dict[str, list[str]]]) -> str | None:
        text_file = Path(path).with_suffix(".txt")
        try:
            return self._read(text_file)
        except FileNotFoundError:
            others = self._other_cases(text_file, listings)
        if len(others) > 1:
            self._log(others[0], f"and {others[1]} are both the caption of {path}; keep one")
        elif not others:
            self._log(text_file, f"is missing (no caption for {path})")
        else:
            try:
                return self._read(others[0])
            except FileNotFoundError:  # removed since the folder was listed
                self._log(others[0], f"is missing (no caption for {path})")
        return None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        captions = []
        listings: dict[Path, dict[str, list[str]]] = {}
        for image in batch[self.image_column]:
            path = image.get("path") if isinstance(image, dict) else image
            captions.append(self._caption(path, listings) if isinstance(path, str) else None)
        return {self.caption_column: captions}


def load_image_folder(
    path: str, kind: str, data_args: DataArguments, cache_dir: str | None, streaming: bool
) -> dict[str, Dataset | IterableDataset]:
    """A folder of images through `datasets`' imagefolder builder: its splits (`train/`, `validation/`, `test/`
    sub-folders, else one `train` split), images as file paths, the metadata file's columns or the `.txt` captions.

    Captions in same-named `.txt` files are added here: the imagefolder builder reads only a metadata file (any other
    file beside an image is ignored), and turning each `.txt` into a metadata row first would mean writing into the
    user's folder. What imagefolder leaves out without a word is said here: images that no metadata file names (a
    warning), and entries named like images that are no file (a broken link, a folder called `y.jpg`: rows that the
    rows check reports, or, streamed, one line).
    """
    scan = _scan_image_folder(path)
    if kind == "metadata":
        _warn_unlisted_images(path, scan)
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
        splits[split] = dataset
    if kind != "captions":
        return splits
    if scan.not_files and streaming:
        _report_entries_that_are_no_file(path, scan.not_files, data_args.on_bad_rows)
    elif scan.not_files:
        splits = _with_entries_that_are_no_file(splits, scan.not_files, data_args.image_column)
    for split, dataset in splits.items():
        features = dataset.features.copy()
        features[data_args.caption_column] = datasets.Value("string")
        captions = _SidecarCaptions(data_args.image_column, data_args.caption_column)
        kwargs: dict[str, Any] = {"batched": True, "features": features}
        if isinstance(dataset, Dataset):
            kwargs["desc"] = "Reading the .txt captions"
            # Read every run: the imagefolder builder's fingerprint covers the images, not the .txt files, so a
            # cached map would keep a caption after its file was edited (and name no bad file again).
            kwargs["load_from_cache_file"] = False
        splits[split] = dataset.map(captions, **kwargs)
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
    heaviest, lightest = max(mixture, key=mixture.get), min(mixture, key=mixture.get)
    ratio = mixture[heaviest] / mixture[lightest]
    if not math.isfinite(sum(mixture.values())) or not ratio <= MAX_MIXTURE_WEIGHT_RATIO:
        spread = f"{ratio:.3g} to 1" if math.isfinite(ratio) else "too far apart to divide"
        limit = f"{MAX_MIXTURE_WEIGHT_RATIO:,.0f}"
        raise ConfigError(
            f"`train_mixture` weights {heaviest!r}: {mixture[heaviest]:g} and {lightest!r}: {mixture[lightest]:g} "
            f"are {spread}, beyond the {limit} to 1 a mixture may span (a source drawn once in a million pairs is "
            f"as good as left out, and reading it through repeats the others until memory runs out); give weights "
            f"within {limit} to 1 of each other, e.g. 3 and 1, or leave the source out."
        )
    return mixture


def mixture_source_arguments(source: str, data_args: DataArguments) -> DataArguments:
    """The `DataArguments` of one mixture source: data files (a file, glob or brace range of shards, see
    [`resolve_data_path`]) become `train_file`, anything else (`emoji`, a folder, a Hub id) `dataset_name`;
    everything else as the run's."""
    as_file = resolve_data_path("train_mixture", source).is_files
    return dataclasses.replace(
        data_args,
        dataset_name=None if as_file else source,
        train_file=source if as_file else None,
        validation_file=None,
        train_mixture=None,
    )


def mixture_source_key(source: str) -> str:
    """How messages name a `train_mixture` source in place of the option that reads it (`train_file`, ...): they
    quote a key as `{key}`, so this reads "`train_mixture` source `a/*.tar`"."""
    return f"train_mixture` source `{source}"


class _SampleNames:
    """Batched map: each row's name for messages (`SOURCE_ROW_COLUMN`) in a streamed mixture, whose rows keep only
    the columns every source has: a tar sample's key and shard, else the name the source gave it (or none)."""

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if all(column in batch for column in WEBDATASET_KEY_COLUMNS):
            keys, urls = (batch[column] for column in WEBDATASET_KEY_COLUMNS)
            return {SOURCE_ROW_COLUMN: [f"a sample {key} of {url}" for key, url in zip(keys, urls)]}
        size = len(next(iter(batch.values()), []))
        return {SOURCE_ROW_COLUMN: batch.get(SOURCE_ROW_COLUMN, [None] * size)}


def mixed_columns(
    dataset: Dataset | IterableDataset, data_args: DataArguments, source: str
) -> Dataset | IterableDataset:
    """A source's image and caption columns only, with the same features in every source, as `interleave_datasets`
    needs: images as undecoded `Image` values (paths or bytes), captions as text. A streamed source keeps its rows'
    names too (`SOURCE_ROW_COLUMN`), for the collator's message on a sample it cannot use: a loaded source's rows
    were checked (and named) before mixing, a stream's are met only in training."""
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
    features = datasets.Features({columns[0]: datasets.Image(decode=False), columns[1]: datasets.Value("string")})
    if isinstance(dataset, IterableDataset):
        named = None
        if dataset.features is not None:
            named = dataset.features.copy()
            named[SOURCE_ROW_COLUMN] = datasets.Value("string")
        dataset = dataset.map(_SampleNames(), batched=True, features=named)
        columns = [*columns, SOURCE_ROW_COLUMN]
        features[SOURCE_ROW_COLUMN] = datasets.Value("string")
    dataset = dataset.select_columns(columns)
    if dataset.features is not None and _is_text_list(dataset.features[columns[1]]):
        # Arrow casts no list to text, and every source of a mixture needs the same features: a list of captions
        # becomes its JSON text, which the captions' readers take as the list (as a CSV cell holds one).
        kwargs: dict[str, Any] = {"batched": True, "features": dataset.features.copy()}
        kwargs["features"][columns[1]] = datasets.Value("string")
        dataset = dataset.map(_ListsAsJson(columns[1]), **kwargs)
    return dataset.cast(features)


class _ListsAsJson:
    """Batched map: a column of caption lists as their JSON text (picklable, for DataLoader workers)."""

    def __init__(self, column: str) -> None:
        self.column = column

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        values = batch[self.column]
        return {self.column: [None if v is None else json.dumps(list(v), ensure_ascii=False) for v in values]}


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


def check_mixture_size(mixture: dict[str, float], sizes: list[int | None], strategy: str) -> None:
    """Raises a one-line [`ConfigError`] when a loaded `all_exhausted` mixture would hold more than
    `MAX_MIXTURE_REPEATS` times its sources' pairs: it draws until its slowest-read source (the one with most pairs
    per unit of weight) is read through, about `size / probability` draws."""
    if strategy != "all_exhausted" or any(size is None for size in sizes):
        return
    total = sum(mixture.values())
    draws = {source: size / (weight / total) for (source, weight), size in zip(mixture.items(), sizes)}
    slowest = max(draws, key=draws.get)
    pairs = sum(sizes)
    if draws[slowest] > MAX_MIXTURE_REPEATS * max(1, pairs):
        share = mixture[slowest] / total
        raise ConfigError(
            f"`train_mixture`: {slowest!r} has {sizes[list(mixture).index(slowest)]:,} pairs and weight "
            f"{mixture[slowest]:g} ({share:.2g} of the draws), so an `all_exhausted` mixture reads it through only "
            f"after about {draws[slowest]:,.0f} draws, {draws[slowest] / max(1, pairs):,.0f} times its sources' "
            f"{pairs:,} pairs (more than the {MAX_MIXTURE_REPEATS} a loaded mixture may hold in memory). Raise its "
            "weight towards its share of the pairs, set `mixture_stopping_strategy` to first_exhausted, or stream."
        )


def interleave(
    trains: list[Dataset | IterableDataset], mixture: dict[str, float], seed: int, strategy: str
) -> Dataset | IterableDataset:
    total = sum(mixture.values())
    return datasets.interleave_datasets(
        trains, probabilities=[weight / total for weight in mixture.values()], seed=seed, stopping_strategy=strategy
    )
