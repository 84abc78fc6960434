"""Checking dataset rows before training: captions, and images as cheaply as possible (no decoding).

[`find_bad_rows`] is the up-front pass over a dataset (captions, file existence, empty files, URLs) that catches most
broken rows before training starts; [`check_caption`] is also what the collator applies to every sample. Images that
exist but do not decode are only found by the collator, which leaves them out of their batch.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .images import BadSampleError, decode_base64_image, image_not_found, is_url, resolve_image_path, url_reason

if TYPE_CHECKING:
    import datasets

# --------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------


# Why a tar sample has no caption: its caption member is missing, or is there but does not decode (text that is not
# UTF-8, bad JSON); the shard's reader said which when it met the first one (see `sources._ShardReader`).
NO_SAMPLE_CAPTION = "no caption: its caption member is missing or not UTF-8 text (see the shard's warning)"


def dotted_names_cause(key: str, member: str) -> str:
    """Why a tar sample's members are not what its files were called: `IMG_2021.05.01.jpg` is sample `IMG_2021`'s
    member `05.01.jpg` (WebDataset's key is the name up to the first dot), so it has no `jpg` or `txt` member, and
    samples named alike in a row become one. Said with an example name and the fix, for messages."""
    name = f"{key}.{member}"
    stem, extension = name.rsplit(".", 1)
    return (
        f"file names with dots before the extension ({name}): WebDataset's sample key is the name up to the first "
        f"dot ({key}); rename the files so that the only dots are before the extension(s), e.g. "
        f"{stem.replace('.', '_')}.{extension}"
    )


def no_sample_caption(key: str | None, image_path: str | None) -> str:
    """Why the tar sample `key` has no caption, for its bad row: [`NO_SAMPLE_CAPTION`], or, when its image member
    (`image_path` is `key.member`) has dots in its name, those dots (see [`dotted_names_cause`])."""
    if key and image_path and image_path.startswith(f"{key}."):
        member = image_path[len(key) + 1 :]
        if "." in member:
            return "no caption: " + dotted_names_cause(key, member)
    return NO_SAMPLE_CAPTION


def check_caption(caption: Any) -> str:
    """
    Validate one caption and return it as text, stripped of surrounding whitespace.

    Args:
        caption (`Any`):
            The caption value from the dataset. CSV and pandas sources give `None` or `float("nan")` for empty cells,
            so both are reported as missing rather than as a type error. A number is text to whoever wrote the file
            (a column of product codes, years): it becomes its decimal string, `12` and not `12.0`.

    Returns:
        `str`: The stripped caption.

    Raises:
        [`BadSampleError`]: If the caption is `None`, NaN, not a string or number, or empty after stripping.
    """
    if isinstance(caption, int | float) and not isinstance(caption, bool):
        if isinstance(caption, float) and math.isnan(caption):
            raise BadSampleError("missing caption (NaN)")
        caption = str(int(caption)) if float(caption).is_integer() and math.isfinite(caption) else str(caption)
    if isinstance(caption, str):
        stripped = caption.strip()
        if not stripped:
            raise BadSampleError("empty caption")
        return stripped
    if caption is None:
        raise BadSampleError("missing caption (None)")
    if isinstance(caption, float) and math.isnan(caption):
        raise BadSampleError("missing caption (NaN)")
    raise BadSampleError(f"caption is not a string ({type(caption).__name__})")


# --------------------------------------------------------------------------------------------------------------
# Up-front row check
# --------------------------------------------------------------------------------------------------------------


def _reason_kind(reason: str) -> str:
    """The reason without its details: `"image file not found: /x.jpg"` -> `"image file not found"`."""
    return re.split(r" \(|: ", reason, maxsplit=1)[0]


@dataclass
class BadRowReport:
    """
    Result of [`find_bad_rows`]: which rows to drop, and why.

    Args:
        num_rows (`int`):
            Number of rows checked.
        bad_indices (`list[int]`):
            Positions (in the dataset as passed) of every bad row, ascending.
        reasons (`dict[int, str]`):
            Reason for each of the first `max_reports` bad rows, keyed by row position. Later rows are counted in
            `reason_counts` but their individual reasons are not kept, so a badly broken dataset cannot fill memory.
        reason_counts (`dict[str, int]`):
            Number of bad rows per kind of reason (the reason without file names or details), over all bad rows.
    """

    num_rows: int
    bad_indices: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)
    reason_counts: dict[str, int] = field(default_factory=dict)

    @property
    def num_bad(self) -> int:
        """Number of bad rows."""
        return len(self.bad_indices)

    def good_indices(self) -> list[int]:
        """Positions of the rows that passed, for `dataset.select(report.good_indices())`."""
        keep = np.ones(self.num_rows, dtype=bool)
        keep[self.bad_indices] = False
        return np.flatnonzero(keep).tolist()

    def summary(
        self, total: int | None = None, max_listed: int = 3, left_out: bool = True, more_in: str | None = None
    ) -> str:
        """
        One line for the log, for example
        `"skipped 7 of 1,000 rows (5 image file not found, 2 empty caption): row 3: empty caption; row 17: image
        file not found: /data/17.jpg; row 20: ... (and 4 more)"`.

        Args:
            total (`int`, *optional*):
                Row count to report against; defaults to `num_rows`.
            max_listed (`int`, *optional*, defaults to 3):
                How many rows to name with their reasons.
            left_out (`bool`, *optional*, defaults to `True`):
                Whether the rows were left out ("skipped 7 of 1,000 rows"); else they stopped the run ("7 of 1,000
                rows cannot be used").
            more_in (`str`, *optional*):
                The file that names the rows not listed here, said after their count.
        """
        total = self.num_rows if total is None else total
        if not self.bad_indices:
            return f"skipped 0 of {total:,} rows"
        counts = ", ".join(
            f"{count:,} {kind}" for kind, count in sorted(self.reason_counts.items(), key=lambda item: -item[1])
        )
        # Only rows whose reason was kept (the first `max_reports`) can be named.
        listed = [f"row {i}: {self.reasons[i]}" for i in self.bad_indices[:max_listed] if i in self.reasons]
        head = f"skipped {self.num_bad:,} of {total:,} rows" if left_out else (
            f"{self.num_bad:,} of {total:,} rows cannot be used"
        )  # fmt: skip
        text = f"{head} ({counts}): " + "; ".join(listed)
        if self.num_bad > len(listed):
            text += f" (and {self.num_bad - len(listed):,} more" + (f", each named in {more_in})" if more_in else ")")
        return text


# How `datasets`' `Dataset.to_csv` writes an `Image` value: the text of its dict, bytes and all (found anywhere in
# the path: a relative one has its file's folder put before it).
_IMAGE_DICT_AS_TEXT = ("{'bytes':", '{"bytes":', "{'path':", '{"path":')


def _check_path_cheaply(path: str, base_dir: str | None, cache: dict[str, str | None]) -> str | None:
    if any(text in path for text in _IMAGE_DICT_AS_TEXT):
        return (
            "the image is the text of a {'bytes': ..., 'path': ...} dict, as `datasets`' `to_csv` writes an Image "
            "column: export the dataset with `to_parquet` or `save_to_disk` instead"
        )
    if is_url(path):
        return url_reason(path)
    resolved = resolve_image_path(path, base_dir)
    if resolved in cache:
        # Datasets like COCO repeat each image once per caption; stat it once.
        return cache[resolved]
    try:
        info = os.stat(resolved)
    except FileNotFoundError:
        reason = None if decode_base64_image(path) else image_not_found(resolved)
    except OSError as error:
        # A base64 image long enough is no file name ("File name too long"): decoded, as the image loader does.
        if decode_base64_image(path):
            reason = None
        else:
            reason = f"cannot access image file ({error.strerror or type(error).__name__}): {resolved}"
    else:
        if stat.S_ISDIR(info.st_mode):
            reason = f"image path is a directory: {resolved}"
        elif info.st_size == 0:
            reason = f"empty image file: {resolved}"
        else:
            reason = None
    cache[resolved] = reason
    return reason


def _check_path_value(path: str | None, base_dir: str | None, cache: dict[str, str | None]) -> str | None:
    if path is None:
        return "image is missing (None)"
    if not path:
        return "image path is empty"
    return _check_path_cheaply(path, base_dir, cache)


def _check_image_cheaply(
    num_bytes: int | None, path: str | None, base_dir: str | None, cache: dict[str, str | None]
) -> str | None:
    """Mirror of [`load_image`]'s source selection, without decoding: bytes win when non-empty, then the path."""
    if num_bytes:
        return None
    if path:
        reason = _check_path_cheaply(path, base_dir, cache)
        if num_bytes == 0 and reason is not None and reason.startswith("image file not found"):
            # Empty bytes whose name is no file here (a tar member's name): the bytes are what is wrong.
            return f"empty image (0 bytes): {path}"
        return reason
    if num_bytes is not None:
        return "empty image bytes"
    return "image is missing (no bytes and no path)"


def _image_column_checks(
    column: pa.ChunkedArray, base_dir: str | None, cache: dict[str, str | None]
) -> list[str | None]:
    """Reason (or `None`) for each value of one batch of the image column, using Arrow to avoid copying bytes."""
    reasons: list[str | None] = []
    # Chunk by chunk: `combine_chunks` on a binary column fails once the batch holds more than 2 GiB of images.
    for array in column.chunks:
        kind = array.type
        if pa.types.is_struct(kind):
            # `flatten` merges the struct's null mask into the children, so a null struct reads as no bytes, no path.
            children = dict(zip([kind.field(i).name for i in range(kind.num_fields)], array.flatten()))
            missing = [None] * len(array)
            lengths = pc.binary_length(children["bytes"]).to_pylist() if "bytes" in children else missing
            paths = children["path"].to_pylist() if "path" in children else missing
            reasons.extend(_check_image_cheaply(n, p, base_dir, cache) for n, p in zip(lengths, paths))
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            reasons.extend(_check_path_value(path, base_dir, cache) for path in array.to_pylist())
        elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            reasons.extend(
                "image is missing (None)" if n is None else _check_image_cheaply(n, None, base_dir, cache)
                for n in pc.binary_length(array).to_pylist()
            )
        elif getattr(kind, "extension_name", None) == "arrow.json":
            # A column of mixed kinds (JSON Lines with a dict on one row and a string on the next) is stored as
            # JSON text; decoded, each value is checked as the collator will read it.
            values = [None if text is None else json.loads(text) for text in array.storage.to_pylist()]
            reasons.extend(_check_python_value(value, base_dir, cache) for value in values)
        else:
            reasons.extend([f"unsupported image column type ({kind})"] * len(array))
    return reasons


def _image_paths(column: pa.ChunkedArray) -> list[str | None]:
    """Each row's image file path (`None` for embedded bytes), for naming a row in a report."""
    paths: list[str | None] = []
    for array in column.chunks:
        kind = array.type
        if pa.types.is_struct(kind) and kind.get_field_index("path") >= 0:
            has_bytes = kind.get_field_index("bytes") >= 0
            lengths = pc.binary_length(array.field("bytes")).to_pylist() if has_bytes else [None] * len(array)
            paths.extend(None if length else path for path, length in zip(array.field("path").to_pylist(), lengths))
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            paths.extend(None if value is None or len(value) > 1024 else value for value in array.to_pylist())
        else:
            paths.extend([None] * len(array))
    return paths


def _check_python_value(value: Any, base_dir: str | None, cache: dict[str, str | None]) -> str | None:
    if isinstance(value, dict):
        data = value.get("bytes")
        return _check_image_cheaply(len(data) if data is not None else None, value.get("path"), base_dir, cache)
    if value is None or isinstance(value, str):
        return _check_path_value(value, base_dir, cache)
    return f"unsupported image value ({type(value).__name__})"


def find_bad_rows(
    dataset: datasets.Dataset,
    image_column: str,
    caption_column: str,
    base_dir: str | None = None,
    max_reports: int = 100,
    batch_size: int = 10_000,
) -> BadRowReport:
    """
    Cheaply find rows that cannot be trained on, before training, without decoding any image.

    Checks each caption with [`check_caption`] (a list of captions needs one usable caption), and each image as [`load_image`] would pick it: embedded bytes must
    be non-empty; a path (relative ones resolved against `base_dir`) must exist, be a file and be non-empty. Files
    that exist but are corrupt are only found when decoded, so the collator still has to handle [`BadSampleError`].
    Reads the two columns in Arrow batches: a 100k-row dataset of paths takes well under a second on a local disk.

    Args:
        dataset (`datasets.Dataset`):
            The dataset. The image column may hold path strings, raw bytes, or a `datasets.Image` feature (decoded or
            not: its stored `{"bytes", "path"}` form is read directly).
        image_column (`str`):
            Name of the image column.
        caption_column (`str`):
            Name of the caption column.
        base_dir (`str`, *optional*):
            Directory that relative image paths are resolved against.
        max_reports (`int`, *optional*, defaults to 100):
            How many individual reasons to keep in the report. All bad rows are always listed in `bad_indices`.
        batch_size (`int`, *optional*, defaults to 10000):
            Rows read from Arrow at a time.

    Returns:
        [`BadRowReport`]: Bad row positions, the first reasons, and counts per kind of reason.

    Raises:
        `KeyError`: If a column is not in the dataset.
    """
    for name in (image_column, caption_column):
        if name not in dataset.column_names:
            raise KeyError(f"Column {name!r} is not in the dataset; available columns: {dataset.column_names}.")
    report = BadRowReport(num_rows=len(dataset))
    stat_cache: dict[str, str | None] = {}
    # WebDataset samples are named by their key and shard (`datasets`' `__key__` / `__url__`): a row number alone
    # does not find a sample among many shards.
    sample_columns = [name for name in ("__key__", "__url__") if name in dataset.column_names]
    columns = list(dict.fromkeys([image_column, caption_column, *sample_columns]))
    # The "arrow" format skips feature decoding (no PIL images are built) and respects any `select`/`shuffle`
    # indices mapping, which reading `dataset.data` directly would not.
    batches = dataset.select_columns(columns).with_format("arrow").iter(batch_size=batch_size)
    offset = 0
    for batch in batches:
        image_reasons = _image_column_checks(batch.column(image_column), base_dir, stat_cache)
        caption_column_values = batch.column(caption_column)
        captions = caption_column_values.to_pylist()
        if getattr(caption_column_values.type, "extension_name", None) == "arrow.json":
            # A column of mixed types (a JSON file with a number where a caption should be) is stored as JSON text,
            # `"a cat"` with its quotes and `5` as "5"; decoded, the number is seen as the non-string it is.
            captions = [None if caption is None else json.loads(caption) for caption in captions]
        paths: list[str | None] | None = None
        for position, (caption, image_reason) in enumerate(zip(captions, image_reasons)):
            reason = image_reason
            if reason is None:
                try:
                    # One caption, or several (a list, or its JSON text): see `clip_trainer.captions`.
                    check_caption_list(caption)
                except BadSampleError as error:
                    # The row's image file names the pair (and, in a folder of .txt captions, its caption file).
                    paths = _image_paths(batch.column(image_column)) if paths is None else paths
                    image = paths[position]
                    reason = error.reason + (f" (image {resolve_image_path(image, base_dir)})" if image else "")
                    if caption is None and sample_columns:
                        key = batch.column("__key__")[position].as_py() if "__key__" in sample_columns else None
                        value = batch.column(image_column)[position].as_py()  # `{"bytes", "path": "key.jpg"}`
                        reason = no_sample_caption(key, value.get("path") if isinstance(value, dict) else None)
            if reason is None:
                continue
            index = offset + position
            report.bad_indices.append(index)
            if len(report.reasons) < max_reports:
                if sample_columns:
                    key, url = (batch.column(n)[position].as_py() if n in sample_columns else None for n in
                                ("__key__", "__url__"))  # fmt: skip
                    reason += f" (sample {key}" + (f" of {url})" if url else ")")
                report.reasons[index] = reason
            kind = _reason_kind(reason)
            report.reason_counts[kind] = report.reason_counts.get(kind, 0) + 1
        offset += batch.num_rows
    return report


def caption_list(value: Any) -> list[str]:
    """The usable captions a value holds, stripped, in order: a list (or tuple) of captions, JSON text of one
    (`'["a cat", "a cat on a mat"]'`, as a CSV cell holds it), or one caption. Empty and missing ones are left out.

    Example:

    ```python
    >>> caption_list('["a cat", " ", "a cat on a mat"]')
    ['a cat', 'a cat on a mat']
    >>> caption_list("[draft] a cat")
    ['[draft] a cat']
    ```
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None  # a caption that only looks like a list: "[draft] a cat [v2]"
            if isinstance(parsed, list):
                value = parsed
    if isinstance(value, list | tuple):
        captions = []
        for item in value:
            try:
                captions.append(check_caption(item))
            except BadSampleError:
                continue
        return captions
    try:
        return [check_caption(value)]
    except BadSampleError:
        return []


def check_caption_list(value: Any) -> list[str]:
    """[`caption_list`], raising [`BadSampleError`] when it holds no usable caption (with the reason a single
    caption would give)."""
    captions = caption_list(value)
    if captions:
        return captions
    if isinstance(value, list | tuple) or (isinstance(value, str) and value.strip().startswith("[")):
        raise BadSampleError("no usable caption in the list")
    check_caption(value)  # raises with the reason: missing, empty, not a string
    raise BadSampleError("empty caption")
