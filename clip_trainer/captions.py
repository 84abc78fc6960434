"""Several captions per image, and hard negatives: what the data holds, and which caption a training step sees.

**Several captions per image.** A caption column may hold a list of captions (COCO and Flickr have five per image; a
CSV cell may hold them as JSON text, `["a cat", "a cat on a mat"]`), and several rows may show one image (the same
`image_id_column` value, else the same picture: the same bytes, under one file name or two; see
[`image_identities`]). `caption_sampling` says what training makes of them:

- `uniform` (the default): the rows of one image become one training row holding all its captions, and each epoch
  draws one of them, uniformly, with a seed made of the run's seed, the epoch and the image's row, so that a run repeats
  exactly, a resumed run included, and each epoch sees another caption. An epoch is one pass over the *images*.
- `all`: every caption is a training pair in every epoch (a list is spread over one row per caption).
- a JSON object of caption columns and weights, `{"title": 3, "description": 1}`: each epoch draws a column for each
  image with probability proportional to its weight (among the columns that hold a caption of that image), then one
  of that column's captions uniformly, as open_clip's `--json-text-key` with probabilities.

A streamed training set is read row by row, so rows of one image are not merged: a list of captions is drawn from at
each pass (seeded by the row's position in the stream, which differs from pass to pass and resumes exactly). Either
way, rows of one image that meet in a batch are never each other's negatives (see `loss.py`): the collator gives
every training row an image id (the `image_id_column` value, else its file path or a digest of its bytes).

Evaluation keeps every caption: each becomes a validation row, and the rows of one image share its id.

**Hard negatives.** `hard_negative_column` holds, per row, captions that are wrong for its image (a string, a list,
or a JSON list in a CSV cell); the collator tokenizes them with the captions and the loss adds them to the image's
candidates.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import stat
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers.utils import logging

from .augmentation import AUGMENTATION_SEED_KEY, augmentation_seed
from .images import decode_base64_image
from .rows import caption_list, check_caption, check_caption_list  # noqa: F401 - read here too

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

    from .arguments import DataArguments

logger = logging.get_logger(__name__)

# Seeds of numpy's SeedSequence are non-negative; ids of torch's int64 tensors are below 2**63.
_ID_MASK = (1 << 63) - 1


# --------------------------------------------------------------------------------------------------------------
# Reading captions and image identities
# --------------------------------------------------------------------------------------------------------------


def image_key(row: dict[str, Any], image_column: str, image_id_column: str | None = None) -> str:
    """The image of one training row as the collator, a stream and the stored teacher embeddings see it, without
    reading a file: the `image_id_column` value when there is one, else a digest of the image's bytes, else its file
    path.

    A loaded training set is split and merged by [`image_identities`] instead, which also finds one picture stored
    under two file names (it compares the bytes of files of equal size); with `caption_sampling` `uniform` or a
    mapping, the rows it finds to be one image become one training row. A stream's held-out rows are recognised in
    the same way by [`HeldOutImages`].
    """
    if image_id_column is not None and row.get(image_id_column) is not None:
        return "id:" + str(row[image_id_column])
    value = _stored_image(row.get(image_column))
    if isinstance(value, bytes | bytearray | memoryview):
        return _content_key(value)
    if hasattr(value, "tobytes"):  # a decoded PIL image
        return "pixels:" + _picture_digest(value)
    return "path:" + str(value)


def _picture_digest(image: Any) -> str:
    """A digest of a decoded PIL image as the picture it shows: its raw bytes with its mode, size, palette and
    transparency (the same bytes are another picture in another mode or shape, or under another palette)."""
    digest = hashlib.blake2b(digest_size=16)
    palette = image.getpalette() if image.mode in ("P", "PA") else None
    header = (image.mode, image.size, palette, image.info.get("transparency"))
    digest.update(repr(header).encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _stored_image(value: Any) -> Any:
    """An image value as stored: `datasets`' `{"bytes", "path"}` form reduced to its bytes, else to its path."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


def _content_key(data: bytes | bytearray | memoryview) -> str:
    """The key of an image's encoded bytes (the same for the same bytes, wherever they are stored)."""
    return "bytes:" + hashlib.blake2b(bytes(data), digest_size=16).hexdigest()


def _file_content_key(path: str) -> str | None:
    """[`_content_key`] of a file's bytes, read in blocks; `None` when the file cannot be read.

    A run asks for the same files up to three times (the held-out split, the merging of captions, the validation's
    image ids): a file is read once for as long as its size and modification time stay the same."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return _file_digest(path, info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 20)
def _file_digest(path: str, size: int, mtime_ns: int) -> str | None:
    try:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16))
    except OSError:
        return None
    return "bytes:" + digest.hexdigest()


class HeldOutImages:
    """The images of a stream's held-out rows, and a filter predicate that keeps the training rows showing none of them
    (a picklable class, for DataLoader workers).

    A row is recognised by its image, as [`image_identities`] recognises it: its `image_id_column` value when it has
    one, else its picture, whatever its file name or whether it is a file or embedded bytes. A stream is read row by
    row, so each training row is compared as it comes: a file is read and hashed only when its size is one of the
    held-out pictures' (a `stat`, where a digest reads the whole file); a file of another size is none of them.
    """

    def __init__(self, rows: list[dict[str, Any]], image_column: str, image_id_column: str | None) -> None:
        self.image_column = image_column
        self.image_id_column = image_id_column
        self.keys = {image_key(row, image_column, image_id_column) for row in rows}
        self.sizes: set[int] = set()
        for row in rows:
            if image_id_column is not None and row.get(image_id_column) is not None:
                continue  # an id is the image, whatever picture it shows
            value = _stored_image(row.get(image_column))
            if isinstance(value, bytes | bytearray | memoryview):
                self.sizes.add(len(value))
            elif isinstance(value, str) and (content := _file_content_key(value)) is not None:
                self.keys.add(content)
                self.sizes.add(os.stat(value).st_size)

    def __call__(self, row: dict[str, Any]) -> bool:
        """`True` for a row whose image is none of the held-out ones."""
        key = image_key(row, self.image_column, self.image_id_column)
        if key in self.keys:
            return False
        if key.startswith("path:"):
            try:
                size = os.stat(key[len("path:") :]).st_size
            except (OSError, ValueError):  # no such file (the collator names it), or base64 text
                return True
            if size in self.sizes:
                return _file_content_key(key[len("path:") :]) not in self.keys
        return True


# (image id column, id, first file, other file): what a warning has named already, so that it is said once a run.
_WARNED_SHARED_IDS: set[tuple[str | None, str, str, str]] = set()


def image_identities(
    dataset: Dataset, image_column: str, image_id_column: str | None = None, batch_size: int = 10_000
) -> list[str]:
    """Each row's image, the one notion of "the same image" of the held-out split, the merging of an image's captions
    in training and the image ids of retrieval: its `image_id_column` value when it has one, else its picture, so
    that the same bytes are the same image whatever their file name (or whether they are a file, `datasets` image
    bytes or base64 text).

    Images stay encoded: a column of `datasets.Image` is read as its stored bytes or path, in batches (a column of
    image bytes is never held whole). A file that cannot be read keeps its path as identity (the collator reports it
    unusable later).

    Args:
        dataset (`datasets.Dataset`): the rows.
        image_column (`str`): the column of images (paths, bytes, `{"bytes", "path"}` dicts or base64 text).
        image_id_column (`str`, *optional*): a column naming each row's image; its value wins where it is not None.
        batch_size (`int`): rows read at a time.

    Returns:
        `list[str]`: one key per row, equal for rows of one image.
    """
    keys: list[str] = []
    file_sizes: dict[str, int] = {}  # each readable file named, once however many rows name it
    content_sizes: dict[str, int] = {}  # each distinct content held in the data (bytes, base64), by its key
    named: dict[str, str] = {}  # a string that is no file: its content key (base64) or its path key
    id_files: dict[str, str] = {}  # each image id's first file, to find ids that name several files
    shared_ids: list[tuple[str, str, str]] = []
    for value, image_id in _encoded_images(dataset, image_column, image_id_column, batch_size):
        if image_id is not None:
            keys.append("id:" + str(image_id))
            stored = _stored_image(value)
            if isinstance(stored, str):  # files by name only: comparing stored bytes would read every image
                first = id_files.setdefault(str(image_id), stored)
                if first != stored and len(shared_ids) < 1_000:
                    shared_ids.append((str(image_id), first, stored))
            continue
        value = _stored_image(value)
        if isinstance(value, bytes | bytearray | memoryview):
            key = _content_key(value)
            content_sizes[key] = len(value)
        elif isinstance(value, str) and value in file_sizes:
            key = "file:" + value  # decided below, once every file's size is known
        elif isinstance(value, str) and value in named:
            key = named[value]
        elif isinstance(value, str):
            key = _name_key(value, file_sizes, content_sizes)
            if not key.startswith("file:"):
                named[value] = key
        else:
            key = image_key({image_column: value}, image_column)  # a decoded image, or None
        keys.append(key)
    # Two files can only be the same picture if they have the same size, and a size is one `stat` (which the row
    # check has done already) where a digest reads the whole file: only files whose size another file (or stored
    # image) also has are read and hashed. A file of a size no other image has is a copy of none: its path will do.
    new_ids = [shared for shared in shared_ids if (image_id_column, *shared) not in _WARNED_SHARED_IDS]
    _WARNED_SHARED_IDS.update((image_id_column, *shared) for shared in shared_ids)
    if new_ids:  # once: the held-out split and each split ask again, about parts of the same rows
        ids = {image_id for image_id, _, _ in shared_ids}
        image_id, first, other = shared_ids[0]
        logger.warning(
            f"{len(ids):,}{'+' if len(shared_ids) == 1_000 else ''} image id(s) of `image_id_column` "
            f"{image_id_column!r} name more than one file (first: id {image_id!r} names {first} and {other}); the rows "
            "of one id are trained and scored as one image, the first row's picture with every row's caption. Give "
            'each picture an id of its own (ids are compared as text: 10 and "10" are one id).'
        )
    sizes = Counter([*file_sizes.values(), *content_sizes.values()])
    files = {}
    for path, size in file_sizes.items():
        files["file:" + path] = (_file_content_key(path) if sizes[size] > 1 else None) or "path:" + path
    return [files.get(key, key) for key in keys]


def _name_key(value: str, file_sizes: dict[str, int], content_sizes: dict[str, int]) -> str:
    """For [`image_identities`]: a string naming a regular file is recorded with its size (its key, `file:` and the
    path, is replaced once every size is known); base64 text is keyed by its bytes; anything else (a missing file, a
    URL) keeps its name."""
    try:
        info = os.stat(value)
    except (OSError, ValueError):  # no such file, or base64 text too long (or odd) for a file name
        info = None
    if info is not None and stat.S_ISREG(info.st_mode):
        file_sizes[value] = info.st_size
        return "file:" + value
    data = decode_base64_image(value) if info is None else None
    if data:
        key = _content_key(data)
        content_sizes[key] = len(data)
        return key
    return "path:" + value


def key_to_id(key: str) -> int:
    """A 63-bit integer for an image key (the loss compares image ids as int64 tensors; two different images share one
    with probability about 1e-19)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & _ID_MASK


def training_image_id(row: dict[str, Any], image_column: str, image_id_column: str | None = None) -> int:
    """The image id the collator gives a training row: [`key_to_id`] of its [`image_key`]."""
    return key_to_id(image_key(row, image_column, image_id_column))


# --------------------------------------------------------------------------------------------------------------
# Drawing one caption
# --------------------------------------------------------------------------------------------------------------


def caption_fields(data_args: DataArguments) -> list[str]:
    """The caption columns a run reads: the keys of a `caption_sampling` mapping (the caption column first), else the
    caption column alone."""
    sampling = data_args.caption_sampling
    if isinstance(sampling, dict):
        return [data_args.caption_column] + [column for column in sampling if column != data_args.caption_column]
    return [data_args.caption_column]


def field_weights(data_args: DataArguments) -> list[float] | None:
    """The weight of each of [`caption_fields`], or `None` when one column is drawn from uniformly."""
    sampling = data_args.caption_sampling
    if not isinstance(sampling, dict):
        return None
    return [float(sampling[column]) for column in caption_fields(data_args)]


def choose_caption(
    captions: list[list[str]], weights: list[float] | None, seed: int, draw: int, image: int
) -> str | None:
    """One caption of an image, drawn with a generator seeded by `(seed, draw, image)`: the same arguments give the
    same caption in every process and every run, and another `draw` (the epoch) another draw.

    Args:
        captions: the image's captions, one list per caption column.
        weights: each column's weight (columns without a caption are not drawn); `None`: one column.
        seed: the run's seed.
        draw: the epoch (a stream: the row's position in the stream).
        image: the image: its row in a loaded training set, its id ([`key_to_id`]) in a stream.

    Returns:
        `str | None`: the caption, or `None` when the image has none (the collator then leaves the row out).
    """
    present = [index for index, column in enumerate(captions) if column]
    if not present:
        return None
    rng = np.random.default_rng([seed & _ID_MASK, draw & _ID_MASK, image & _ID_MASK])
    column = present[0]
    if len(present) > 1:
        chances = np.array([weights[index] if weights is not None else 1.0 for index in present], dtype=np.float64)
        column = present[int(rng.choice(len(present), p=chances / chances.sum()))]
    options = captions[column]
    return options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]


class AugmentationSeededRows(torch.utils.data.Dataset):
    """A loaded training set whose rows carry the seed of their augmentation ([`AUGMENTATION_SEED_KEY`]): the run's
    seed, the epoch and the row's index, through [`augmentation_seed`].

    The epoch reaches the DataLoader's worker processes through the indices, as for `CaptionSampledDataset`: the
    sampler ([`sampler`]) yields `epoch * len(dataset) + row`, and `__getitem__` takes the epoch back from the index,
    so the seed is part of the index stream the main process sends (the same with any number of workers, and after a
    resume, which replays the epoch's indices and skips the batches already trained on).

    Args:
        dataset (`datasets.Dataset`): the training rows.
        seed (`int`): the run's seed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def column_names(self) -> list[str]:
        return self.dataset.column_names

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, position = divmod(int(index), len(self.dataset))
        row = dict(self.dataset[position])
        row[AUGMENTATION_SEED_KEY] = augmentation_seed(self.seed, epoch, position)
        return row

    def sampler(self, rows: torch.utils.data.Sampler | None = None) -> torch.utils.data.Sampler:
        """The training sampler that tells `__getitem__` the epoch: with `rows` (the order of another
        `train_sampling_strategy`), that order with each index offset by its epoch, else a random order drawn anew
        each epoch from `seed + epoch` (the order accelerate's seedable sampler gives `train_sampling_strategy`
        random)."""
        if rows is None:
            return EpochSampler(len(self.dataset), self.seed)
        return EpochOffsetSampler(rows, len(self.dataset))


class CaptionSampledDataset(AugmentationSeededRows):
    """A training set of one row per image, each with several captions, that gives each image one caption per epoch.

    The epoch reaches the DataLoader's worker processes (which live across epochs) through the indices:
    [`EpochSampler`] yields `epoch * len(dataset) + row`, and `__getitem__` takes the epoch back from the index. So the
    draw is part of the index stream that the main process sends, and is the same with any number of workers, after a
    resume, and on every process of a distributed run (each draws the caption of an image from the same seed: the run's,
    the epoch and the image's row). Its
    rows carry the seed of their augmentation too, as [`AugmentationSeededRows`]' do.

    Args:
        dataset (`datasets.Dataset`): rows whose caption columns hold lists of captions (or single captions).
        caption_column (`str`): the column the collator reads the drawn caption from.
        fields (`list[str]`): the caption columns drawn from (see [`caption_fields`]).
        weights (`list[float]`, *optional*): their weights (see [`field_weights`]).
        seed (`int`): the run's seed.
    """

    def __init__(
        self,
        dataset: Dataset,
        caption_column: str,
        fields: list[str],
        weights: list[float] | None,
        seed: int,
    ) -> None:
        super().__init__(dataset, seed)
        self.caption_column = caption_column
        self.fields = fields
        self.weights = weights

    @classmethod
    def from_arguments(cls, dataset: Dataset, data_args: DataArguments, seed: int) -> CaptionSampledDataset:
        fields = [column for column in caption_fields(data_args) if column in dataset.column_names]
        weights = field_weights(data_args)
        weights = None if weights is None else dict(zip(caption_fields(data_args), weights))
        return cls(
            dataset,
            data_args.caption_column,
            fields,
            None if weights is None else [weights[column] for column in fields],
            seed,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = super().__getitem__(index)  # with the seed of its augmentation, by epoch too
        epoch, position = divmod(int(index), len(self.dataset))
        captions = [caption_list(row.get(column)) for column in self.fields]
        # The image by its row (one per image), not by its file or bytes: the same from the files and from the folder
        # a preparation run wrote of them (which holds the images' bytes in place of their paths).
        row[self.caption_column] = choose_caption(captions, self.weights, self.seed, epoch, position)
        return row


class EpochSampler(torch.utils.data.Sampler[int]):
    """A random order of `num_rows` rows, drawn anew each epoch from `seed + epoch` (as accelerate's seedable sampler
    does, so every process of a distributed run has the same order and takes its own share of it), with each index
    offset by `epoch * num_rows` (see [`CaptionSampledDataset`]). The Trainer calls `set_epoch` before each epoch."""

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        offset = self.epoch * self.num_rows
        for row in torch.randperm(self.num_rows, generator=generator).tolist():
            yield offset + row


def needs_caption_sampling(dataset: Any, data_args: DataArguments) -> bool:
    """Whether a loaded training set has images with several captions to draw from: a caption column (of
    [`caption_fields`]) whose values are lists, or several weighted caption columns."""
    import datasets

    if not isinstance(dataset, datasets.Dataset) or data_args.caption_sampling == "all":
        return False
    if sum(column in dataset.column_names for column in caption_fields(data_args)) > 1:
        return True
    for column in caption_fields(data_args):
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.List | datasets.LargeList | datasets.Sequence):
            return True
    return False


# --------------------------------------------------------------------------------------------------------------
# Each training row's augmentation seed (see augmentation.py)
# --------------------------------------------------------------------------------------------------------------


class EpochOffsetSampler(torch.utils.data.Sampler[int]):
    """Another sampler's indices, each offset by `epoch * num_rows` (see [`AugmentationSeededRows`]); `set_epoch`
    (which the Trainer calls before each epoch) is passed on to it."""

    def __init__(self, rows: torch.utils.data.Sampler, num_rows: int) -> None:
        self.rows = rows
        self.num_rows = num_rows
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.rows, "set_epoch"):
            self.rows.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.num_rows
        for row in self.rows:
            yield offset + int(row)


class _StreamAugmentationSeeds:
    """Map with indices over a training stream: each row's [`AUGMENTATION_SEED_KEY`], from the run's seed, the row's
    position in its reader's stream (which runs on across passes, and which a resumed stream restores) and its image
    (each DataLoader worker of each process reads its own stream, whose positions start at 0 too). A class, not a
    closure, so that DataLoader workers can pickle the stream."""

    def __init__(self, seed: int, image_column: str, image_id_column: str | None) -> None:
        self.seed = seed
        self.image_column = image_column
        self.image_id_column = image_id_column

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        image = training_image_id(row, self.image_column, self.image_id_column)
        return {AUGMENTATION_SEED_KEY: augmentation_seed(self.seed, index, image)}


def seed_stream_augmentation(
    stream: IterableDataset, seed: int, image_column: str = "image", image_id_column: str | None = None
) -> IterableDataset:
    """The training stream with each row's augmentation seed (see [`_StreamAugmentationSeeds`])."""
    import datasets

    features = stream.features
    if features is not None:
        features = features.copy()
        features[AUGMENTATION_SEED_KEY] = datasets.Value("int64")
    return stream.map(
        _StreamAugmentationSeeds(seed, image_column, image_id_column), with_indices=True, features=features
    )


# --------------------------------------------------------------------------------------------------------------
# Preparing the splits
# --------------------------------------------------------------------------------------------------------------


def _column_lists(dataset: Dataset, columns: list[str]) -> dict[str, list[list[str]]]:
    table = dataset.select_columns([c for c in columns if c in dataset.column_names]).with_format(None)
    return {column: [caption_list(value) for value in table[column]] for column in table.column_names}


def _encoded_images(
    dataset: Dataset, image_column: str, image_id_column: str | None, batch_size: int
) -> Iterator[tuple[Any, Any]]:
    """Each row's image as stored (a path, bytes, a `{"bytes", "path"}` dict; never decoded: decoding every image
    only to tell them apart would read the whole set) and its `image_id_column` value (`None` without one), read in
    batches so that a column of image bytes is never held whole."""
    import datasets

    columns = [image_column] + ([image_id_column] if image_id_column else [])
    table = dataset.select_columns(columns)
    feature = table.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        table = table.cast_column(image_column, datasets.Image(decode=False))
    for batch in table.with_format(None).iter(batch_size=batch_size):
        ids = batch[image_id_column] if image_id_column else [None] * len(batch[image_column])
        yield from zip(batch[image_column], ids)


def _image_keys(dataset: Dataset, data_args: DataArguments, batch_size: int = 10_000) -> list[str]:
    """Each row's [`image_key`] (the training image id's key, as the stored teacher embeddings are keyed)."""
    image_column, id_column = data_args.image_column, data_args.image_id_column
    rows = _encoded_images(dataset, image_column, id_column, batch_size)
    return [image_key({image_column: image, id_column: image_id}, image_column, id_column) for image, image_id in rows]


def _holds_single_captions(dataset: Dataset, column: str) -> bool:
    """Whether a caption column holds one caption per row as plain text (no lists, no JSON text of a list)."""
    import datasets

    if not isinstance(dataset.features.get(column), datasets.Value):
        return False
    return not any(len(caption_list(value)) > 1 or _is_json_list(value) for value in dataset.with_format(None)[column])


def _is_json_list(value: Any) -> bool:
    if not isinstance(value, str) or not value.strip().startswith("["):
        return False
    try:
        return isinstance(json.loads(value), list)
    except json.JSONDecodeError:
        return False


def _list_feature():
    import datasets

    return datasets.List(datasets.Value("string"))


def _replace_column(dataset: Dataset, column: str, values: list, feature) -> Dataset:
    position = dataset.column_names.index(column)
    dataset = dataset.remove_columns(column).add_column(column, values, feature=feature)
    order = dataset.column_names[:-1]
    order.insert(position, column)
    return dataset.select_columns(order)


def prepare_training_captions(dataset: Dataset, data_args: DataArguments, merge_rows: bool = True) -> Dataset:
    """A loaded training split as `caption_sampling` trains on it (see the module docstring).

    With `uniform` or a mapping, rows of one image are merged into one row (the first row's other columns, each
    caption column and `hard_negative_column` a list of all the rows' values), when there is any choice to make;
    data with one caption per image is returned as it is. With `all`, a list of captions is spread over one row per
    caption.

    `merge_rows=False` keeps every row a row (a loaded `train_mixture` repeats a source's rows on purpose: that is its
    weighting), drawing only from the lists rows hold.
    """
    import datasets

    string = datasets.Value("string")
    fields = caption_fields(data_args)
    lists = _column_lists(dataset, fields)
    caption_column = data_args.caption_column
    plain = _holds_single_captions(dataset, caption_column)
    if data_args.caption_sampling == "all":
        captions = lists[caption_column]
        if plain and all(len(values) == 1 for values in captions):
            return dataset
        rows = [index for index, values in enumerate(captions) for _ in values]
        spread = dataset.select(rows)
        flat = [caption for values in captions for caption in values]
        logger.info(
            f"caption_sampling all: {len(dataset):,} training rows hold {len(flat):,} captions, each a training pair "
            "every epoch."
        )
        return _replace_column(spread, caption_column, flat, string)

    if merge_rows:  # the same picture under two file names is one image (see `image_identities`)
        keys = image_identities(dataset, data_args.image_column, data_args.image_id_column)
    else:
        keys = [str(index) for index in range(len(dataset))]
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    counts = [sum(len(lists[column][index]) for column in lists for index in rows) for rows in groups.values()]
    if plain and len(lists) == 1 and all(count <= 1 for count in counts):
        return dataset  # one caption per image: nothing to draw
    merged_columns = [column for column in fields if column in dataset.column_names]
    if data_args.hard_negative_column and data_args.hard_negative_column in dataset.column_names:
        merged_columns.append(data_args.hard_negative_column)
        lists.update(_column_lists(dataset, [data_args.hard_negative_column]))
    firsts = [rows[0] for rows in groups.values()]
    merged = dataset.select(firsts) if len(firsts) < len(dataset) else dataset
    for column in merged_columns:
        values = []
        for rows in groups.values():
            combined = [caption for index in rows for caption in lists[column][index]]
            # A hard negative repeated by every caption row of its image is one negative, not five.
            values.append(list(dict.fromkeys(combined)) if column == data_args.hard_negative_column else combined)
        merged = _replace_column(merged, column, values, _list_feature())
    total = sum(counts)
    how = "uniformly" if not isinstance(data_args.caption_sampling, dict) else "by column weight"
    logger.info(
        f"{len(dataset):,} training rows show {len(groups):,} images with {total:,} captions: each epoch draws one "
        f"caption per image ({how}, seeded by the run's seed, the epoch and the image's row; `caption_sampling`)."
    )
    return merged


def expand_evaluation_captions(dataset: Dataset, data_args: DataArguments) -> Dataset:
    """A loaded validation split with every caption a row: a list of captions (and, with a `caption_sampling` mapping,
    the captions of its other columns) spread over one row per caption, in the caption column. The rows of one image
    then get one image id, as rows of one image always do."""
    import datasets

    caption_column = data_args.caption_column
    lists = _column_lists(dataset, caption_fields(data_args))
    captions = [[caption for column in lists for caption in lists[column][index]] for index in range(len(dataset))]
    if _holds_single_captions(dataset, caption_column) and len(lists) == 1:
        return dataset
    rows = [index for index, values in enumerate(captions) for _ in values]
    spread = dataset.select(rows) if rows != list(range(len(dataset))) else dataset
    flat = [caption for values in captions for caption in values]
    return _replace_column(spread, caption_column, flat, datasets.Value("string"))


class _StreamCaptions:
    """Map over a training stream: each row's caption columns become one drawn caption (seeded by the run's seed, the
    row's position in the stream and its image), or with `all` one row per caption. A class, not a closure, so that
    DataLoader workers can pickle the stream."""

    def __init__(self, data_args: DataArguments, seed: int) -> None:
        self.caption_column = data_args.caption_column
        self.fields = caption_fields(data_args)
        self.weights = field_weights(data_args)
        self.spread = data_args.caption_sampling == "all"
        self.image_column = data_args.image_column
        self.image_id_column = data_args.image_id_column
        self.seed = seed

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        size = len(indices)
        if self.spread:
            out: dict[str, list] = {column: [] for column in batch}
            for position in range(size):
                value = batch[self.caption_column][position]
                captions = caption_list(value) or [_no_caption({self.caption_column: value}, [self.caption_column])]
                for caption in captions:
                    for column in batch:
                        value = batch[column][position]
                        out[column].append(caption if column == self.caption_column else value)
            return out
        chosen = []
        for position in range(size):
            row = {column: batch[column][position] for column in batch}
            captions = [caption_list(row.get(column)) for column in self.fields]
            image = training_image_id(row, self.image_column, self.image_id_column)
            caption = choose_caption(captions, self.weights, self.seed, indices[position], image)
            chosen.append(_no_caption(row, self.fields) if caption is None else caption)
        return {**batch, self.caption_column: chosen}


def _no_caption(row: dict[str, Any], fields: list[str]) -> str | None:
    """What a stream row without a usable caption keeps for the collator to report: its blank text as it is (an
    empty caption), else `None` (missing); a list of blanks (or its JSON text) is an empty caption."""
    value = row.get(fields[0])
    if isinstance(value, str):
        return "" if value.strip().startswith("[") else value
    return "" if isinstance(value, list | tuple) and value else None


def sample_stream_captions(stream: IterableDataset, data_args: DataArguments, seed: int) -> IterableDataset:
    """The training stream with one caption per row (see [`_StreamCaptions`])."""
    import datasets

    features = stream.features
    if features is not None and data_args.caption_column in features:
        features = features.copy()
        features[data_args.caption_column] = datasets.Value("string")
    return stream.map(_StreamCaptions(data_args, seed), batched=True, with_indices=True, features=features)


def finite_weight(value: Any) -> bool:
    """Whether `value` is a usable `caption_sampling` weight: a positive, finite number (not a boolean)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
