"""The image-text collator: decodes, resizes and tokenizes one batch of rows.

It runs in the DataLoader's worker processes. Images leave it as `uint8` tensors of the model's input size (a
quarter of the bytes of float pixels); the trainer normalises them on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from .data import IMAGE_ID_COLUMN, LABEL_COLUMN
from .images import BadSampleError, check_caption, load_image, resize_center_crop

logger = logging.get_logger(__name__)


@dataclass
class ImageTextCollator:
    """Turns rows `{image_column: path | bytes | dict | PIL image, caption_column: str}` into model inputs.

    Returns `pixel_values` (`uint8`, `(B, 3, H, W)`), `input_ids` and `attention_mask` (padded to the longest caption
    of the batch, truncated at `max_seq_length`), for validation rows `image_ids` and `class_labels`, and `skipped_samples`. A row whose
    image cannot be decoded or whose caption is empty is left out of the batch and counted in `skipped_samples`; it never
    stops the run.

    Args:
        tokenizer: the caption tokenizer.
        shortest_edge: images are resized so that their shorter side has this length...
        crop_size: ...then center-cropped to this `(height, width)`.
        max_seq_length: longest caption in tokens.
        image_column / caption_column: the dataset's column names.
        max_image_pixels: larger images are skipped as likely decompression bombs.
        keep_invalid_rows: for evaluation: keep an unusable row as a blank placeholder flagged in `valid` instead
            of dropping it, so that every process returns as many rows as its sampler gave it (which gathering
            the embeddings of a distributed evaluation relies on); the placeholders are left out of the metrics.
        jpeg_draft: decode JPEGs at a reduced scale (1/2, 1/4, 1/8) when they are at least twice `shortest_edge`:
            about 2x faster on large photos, with pixels slightly different from `CLIPImageProcessor`'s.
    """

    tokenizer: PreTrainedTokenizerBase
    shortest_edge: int
    crop_size: tuple[int, int]
    max_seq_length: int
    image_column: str = "image"
    caption_column: str = "caption"
    max_image_pixels: int | None = 89_478_485
    keep_invalid_rows: bool = False
    jpeg_draft: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels, captions, kept, valid = [], [], [], []
        # Counted per batch: workers are separate processes, so a running total here would never reach the trainer.
        skipped = 0
        for row in rows:
            try:
                caption = check_caption(row.get(self.caption_column))
                image = load_image(
                    row.get(self.image_column),
                    max_pixels=self.max_image_pixels,
                    draft_size=(self.shortest_edge, self.shortest_edge) if self.jpeg_draft else None,
                )
                pixels.append(resize_center_crop(image, self.shortest_edge, self.crop_size))
            except BadSampleError as error:
                skipped += 1
                # Rows are checked for cheap faults before training; what is left (a corrupt file) is rare.
                logger.warning(f"Skipping a sample that cannot be used ({error.reason}); {skipped} in this batch.")
                if not self.keep_invalid_rows:
                    continue
                pixels.append(np.zeros((3, *self.crop_size), dtype=np.uint8))
                caption = ""
                valid.append(False)
            else:
                valid.append(True)
            captions.append(caption)
            kept.append(row)

        if not kept:
            logger.warning("Every sample of a batch was unusable; the batch is empty.")
            height, width = self.crop_size
            return {
                "pixel_values": torch.zeros((0, 3, height, width), dtype=torch.uint8),
                "input_ids": torch.zeros((0, 2), dtype=torch.long),
                "attention_mask": torch.zeros((0, 2), dtype=torch.long),
                "skipped_samples": torch.tensor(len(rows)),
            }
        text = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )
        batch = {
            "pixel_values": torch.from_numpy(np.stack(pixels)),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "skipped_samples": torch.tensor(skipped),
        }
        if self.keep_invalid_rows:
            batch["valid"] = torch.tensor(valid, dtype=torch.bool)
        if IMAGE_ID_COLUMN in kept[0]:
            batch["image_ids"] = torch.tensor([row[IMAGE_ID_COLUMN] for row in kept], dtype=torch.long)
        if LABEL_COLUMN in kept[0]:
            batch["class_labels"] = torch.tensor([row[LABEL_COLUMN] for row in kept], dtype=torch.long)
        return batch
