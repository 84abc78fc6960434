"""A loaded training set's images, decoded once.

Without augmentation, a training image is decoded, resized and cropped to the same uint8 pixels at every epoch. On a
machine with few cores that work competes with the training step itself: on the bundled demo (2-core CPU), decoding
took about 11 ms of each 80 ms step, in the DataLoader worker beside the step's two threads. When a run reads its
training set at least twice per process and the pixels fit in `decoded_image_cache_mb`, the trainer decodes every
training image once before the first step (in the run's DataLoader workers) and keeps the pixels in memory; the
collator then takes a row's pixels from there instead of decoding its image.

torch's DataLoader and `datasets` have no such cache: `persistent_workers` keeps the worker processes, which decode
every image again, and `datasets.Dataset.map` would write the decoded pixels of the whole set to disk as Arrow.

What a row shows is found by [`captions.image_key`] without its `image_id_column` (the same bytes or file path, the
same picture): two rows of one image share one entry. An image that cannot be decoded is not kept: the collator
meets it at each epoch as before (left out of its batch, with its warning). The pixels are the collator's own
(`ImageTextCollator.decode_image`), so a run with the cache trains on exactly the inputs of a run without it. The
worker processes inherit the pixels when they start (after the cache is built) and only read them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .captions import image_key
from .images import BadSampleError

logger = logging.get_logger(__name__)

__all__ = ["DecodedImages", "decode_training_images", "most_bytes"]


@dataclass
class DecodedImages:
    """Preprocessed training images (`pixels`, `(images, 3, height, width)` uint8) and the entry of each picture
    (`slots`: [`captions.image_key`] without the image id column, to its index in `pixels`)."""

    pixels: np.ndarray
    slots: dict[str, int]

    def lookup(self, picture: str) -> np.ndarray | None:
        """The preprocessed pixels of a row's picture ([`captions.image_key`] without the image id column), or `None`
        when its image was not kept (it failed to decode)."""
        slot = self.slots.get(picture)
        return None if slot is None else self.pixels[slot]

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)


class _RowImages(torch.utils.data.Dataset):
    """Each training row's image key and preprocessed pixels (`None`: the image cannot be used), for the DataLoader
    workers that build the cache."""

    def __init__(self, dataset: Any, collator: Any) -> None:
        self.dataset, self.collator = dataset, collator

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str, np.ndarray | None]:
        row = self.dataset[index]
        image = row.get(self.collator.image_column)
        key = image_key(row, self.collator.image_column)
        if image is None:
            return key, None
        try:
            return key, self.collator.decode_image(image)
        except BadSampleError:
            return key, None  # the collator leaves the row out, with its warning, at each epoch


def _as_list(items: list) -> list:
    return items


def most_bytes(dataset: Any, collator: Any) -> int:
    """The most memory the decoded images of `dataset` can take: one image per row. (Rows of one picture share an
    entry, but which rows show one picture is known only once they are read; the budget is checked before.)"""
    height, width = collator.image_preprocessor.output_size
    return len(dataset) * 3 * height * width


def decode_training_images(dataset: Any, collator: Any, workers: int) -> DecodedImages:
    """Decodes every row's image of a map-style training set with `collator` (an `ImageTextCollator` that does not
    augment), in `workers` DataLoader workers."""
    height, width = collator.image_preprocessor.output_size
    rows = len(dataset)
    start = time.perf_counter()
    pixels = np.empty((rows, 3, height, width), dtype=np.uint8)
    slots: dict[str, int] = {}
    # A generator of its own: a DataLoader draws its workers' base seed when it starts, which from torch's global
    # generator would move every later draw of the run (dropout), and the run would no longer be the one without.
    loader = torch.utils.data.DataLoader(
        _RowImages(dataset, collator),
        batch_size=64,
        num_workers=workers,
        collate_fn=_as_list,
        generator=torch.Generator(),
    )
    failed = 0
    for batch in loader:
        for key, image in batch:
            if image is None:
                failed += 1
            elif key not in slots:
                pixels[len(slots)] = image
                slots[key] = len(slots)
    cache = DecodedImages(pixels[: len(slots)], slots)
    left_out = f"; {failed:,} row(s) whose image cannot be used are met at each epoch as before" if failed else ""
    logger.info(
        f"Decoded the training set's {len(slots):,} images once in {time.perf_counter() - start:.1f} s and kept "
        f"their pixels in memory ({cache.nbytes / 2**20:,.1f} MiB, `decoded_image_cache_mb`){left_out}."
    )
    return cache
