"""The image-text collator: decodes, resizes and tokenizes one batch of rows.

It runs in the DataLoader's worker processes. Images leave it as `uint8` tensors of the model's input size (a
quarter of the bytes of float pixels); the trainer normalises them on the device with the same
[`ImagePreprocessor`].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from .augmentation import AUGMENTATION_SEED_KEY, ImageAugmentation
from .captions import caption_list, image_key, key_to_id, training_image_id
from .data import IMAGE_ID_COLUMN, LABEL_COLUMN, SOURCE_ROW_COLUMN, is_unreadable_row
from .images import BadSampleError, load_image, looks_like_base64_image
from .preprocessing import ImagePreprocessor
from .rows import check_caption, no_sample_caption

logger = logging.get_logger(__name__)

# Batch entries that describe the rows and are not model inputs.
ROW_INFO_KEYS = ("image_ids", "class_labels", "valid", "hard_negative_index", "hard_negative_is_caption")
# The batch entries that are a teacher's inputs (`teacher_pixel_values`, `teacher_input_ids`, ...), for distillation.
TEACHER_PREFIX = "teacher_"


@dataclass(frozen=True)
class TeacherProcessing:
    """How [`ImageTextCollator`] makes a distillation teacher's inputs beside the student's: the same rows through the
    teacher's own image preprocessor and tokenizer.

    Attributes:
        tokenizer: the teacher's tokenizer.
        image_preprocessor: the teacher's resize and crop (its own size; its normalisation is applied on the device).
        max_seq_length: the teacher's longest caption in tokens.
        padding: the teacher family's caption padding (`"max_length"` for SigLIP, else `"longest"`).
    """

    tokenizer: PreTrainedTokenizerBase
    image_preprocessor: ImagePreprocessor
    max_seq_length: int
    padding: str = "longest"


def _sample_name(row: dict[str, Any]) -> str:
    """A row, as a message names it: a tar sample by its key and shard, a row whose image is embedded bytes by its
    row in its file (see `SOURCE_ROW_COLUMN`); any other is named by its image file, in the reason."""
    if row.get("__key__"):
        return f"a sample {row['__key__']} of {row.get('__url__')}"
    if row.get(SOURCE_ROW_COLUMN):
        return str(row[SOURCE_ROW_COLUMN])
    return "a sample"


def _image_file(value: Any) -> str:
    """` (image /data/cat.jpg)` for a row whose image is a file; empty for embedded bytes (named otherwise)."""
    if isinstance(value, dict) and not value.get("bytes"):
        value = value.get("path")
    if isinstance(value, str) and value and len(value) <= 1024 and not looks_like_base64_image(value):
        return f" (image {value})"
    return ""


def _augmentation_seed(row: dict[str, Any]) -> int:
    """The seed of a row's augmentation: the one the trainer's data gives it (see `augmentation.py`), else, for a row
    without one (a collator used on rows of the caller's), one drawn from torch's global generator."""
    seed = row.get(AUGMENTATION_SEED_KEY)
    if seed is None:
        return int(torch.randint(0, 2**63 - 1, ()))
    return int(seed)


def _same_tokens_as_caption(text: Any, hard_negative_index: torch.Tensor) -> torch.Tensor:
    """`(B, K)`: whether each hard-negative slot holds the tokens of its row's caption (the batch's captions are the
    first `B` rows of `text`, its hard negatives the rest, padded alike)."""
    rows = hard_negative_index.shape[0]
    tokens = text["input_ids"]
    if "attention_mask" in text:  # padding positions are not the text, whatever token fills them
        tokens = tokens.masked_fill(text["attention_mask"] == 0, -1)
    negatives = tokens[rows:][hard_negative_index.clamp(min=0)]  # (B, K, L); empty slots read row 0 and are cleared
    same = (negatives == tokens[:rows].unsqueeze(1)).all(dim=-1)
    return same & (hard_negative_index >= 0)


@dataclass
class ImageTextCollator:
    """Turns rows `{image_column: path | bytes | dict | PIL image, caption_column: str}` into model inputs.

    Returns `pixel_values` (`uint8`, `(B, 3, H, W)`), `input_ids` and `attention_mask` (padded to the longest caption
    of the batch, or to `max_seq_length` with `padding="max_length"`, truncated at `max_seq_length`), `valid` (one
    flag per row), `image_ids` (validation rows: their `_image_id`; other rows, with `row_image_ids`: an id of their
    `image_id_column` value, file path or image bytes, so that the loss never takes two rows of one image for
    negatives), and for validation rows `class_labels`.

    With `hard_negative_column`, each row's hard negatives (a caption or a list of captions) are tokenized after the
    batch's captions: `input_ids` then has `B + H` rows, and `hard_negative_index` (`(B, K)`, `K` the most hard
    negatives of a row) gives the row of `input_ids[B:]` of each row's hard negatives, -1 for an empty slot. It is
    there (possibly with `K = 0`) for every batch of data that has the column, so that every process of a
    distributed run passes the same inputs to the loss. `hard_negative_is_caption` (`(B, K)`) flags the hard
    negatives whose tokens are the row's caption's: the model cannot tell them apart, and `hard_negative_accuracy`
    scores them as the tie they are, whatever the float noise of the batches they were embedded in.

    A row whose image cannot be decoded or whose caption is empty never stops the run: it stays in the batch as a
    blank placeholder flagged `valid=False`, which the loss and the metrics leave out. Keeping it (rather than dropping
    it) gives every batch the size its sampler asked for, which a distributed evaluation's gather relies on, and keeps
    a batch of only unusable samples a batch rather than an empty tensor the model cannot take.

    Args:
        tokenizer: the caption tokenizer.
        image_preprocessor: resize and crop, read from the model's image processor.
        max_seq_length: longest caption in tokens.
        image_column / caption_column: the dataset's column names.
        max_image_pixels: larger images are refused as likely decompression bombs.
        jpeg_draft: decode JPEGs at a reduced scale (1/2, 1/4, 1/8) when they are at least twice the model's input
            size: about 2x faster on large photos, with pixels slightly different from the image processor's.
        padding: `"longest"` (the batch's longest caption) or `"max_length"` (always `max_seq_length`: one shape for
            compiled models, and what SigLIP was trained with).
        augmentation: a random [`ImageAugmentation`] used in place of the preprocessor's resize and crop, for
            training batches only; the trainer evaluates with a copy of the collator that has none. Each row is
            drawn from a generator seeded by its `AUGMENTATION_SEED_KEY` entry (see `augmentation.py`; a row
            without one draws its seed from torch's global generator).
        image_id_column: the column naming each row's image, for the ids of rows without `_image_id`.
        hard_negative_column: the column of hard negatives (see above).
        row_image_ids: give rows without `_image_id` an image id (training); the evaluation collators turn it off,
            so that a set without image ids is scored with every row its own image, as before.
        teacher: a [`TeacherProcessing`] for distillation: the batch also holds the teacher's inputs of the same rows,
            under `teacher_`-prefixed keys (`teacher_pixel_values` uint8 at the teacher's size, `teacher_input_ids`,
            `teacher_attention_mask`). An augmented image reaches the teacher with the same crop and colours.
        teacher_embeddings: a [`StoredTeacherEmbeddings`] of the training data (written by a preparation run): the
            batch holds each row's stored teacher embeddings, `teacher_image_embeds` and `teacher_text_embeds`.
        decoded_images: a [`DecodedImages`] of the training set (see `image_cache.py`, set by the trainer): rows
            whose image it holds take their pixels from it instead of decoding the image (not with augmentation or
            `teacher`).
    """

    tokenizer: PreTrainedTokenizerBase
    image_preprocessor: ImagePreprocessor
    max_seq_length: int
    image_column: str = "image"
    caption_column: str = "caption"
    max_image_pixels: int | None = 89_478_485
    jpeg_draft: bool = False
    padding: str = "longest"
    augmentation: ImageAugmentation | None = None
    image_id_column: str | None = None
    hard_negative_column: str | None = None
    row_image_ids: bool = True
    teacher: TeacherProcessing | None = None
    teacher_embeddings: Any = None
    decoded_images: Any = None

    @classmethod
    def from_processor(cls, processor: Any, **kwargs: Any) -> ImageTextCollator:
        """The collator for a `CLIPProcessor`-like processor (a `tokenizer` and an `image_processor`).

        `max_seq_length` defaults to the tokenizer's `model_max_length` (capped at 512 for tokenizers that set no
        real limit); other keyword arguments are the fields above.
        """
        kwargs.setdefault("max_seq_length", min(processor.tokenizer.model_max_length, 512))
        return cls(
            tokenizer=processor.tokenizer,
            image_preprocessor=ImagePreprocessor.from_image_processor(processor.image_processor),
            **kwargs,
        )

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels, captions, valid = [], [], []
        teacher_pixels = []
        # Each row's picture key when the kept pixels are looked up, reused for its image id (one digest of its bytes).
        pictures: dict[int, str] = {}
        draft = self._draft_size() if self.jpeg_draft else None
        for position, row in enumerate(rows):
            caption_read = False
            try:
                if is_unreadable_row(row):
                    raise BadSampleError("no image and no caption: its record could not be read")
                caption = check_caption(row.get(self.caption_column))
                caption_read = True
                image_pixels = None
                if self._reads_decoded_images:
                    pictures[position] = image_key(row, self.image_column)
                    image_pixels = self.decoded_images.lookup(pictures[position])
                if image_pixels is None:
                    image = load_image(row.get(self.image_column), max_pixels=self.max_image_pixels, draft_size=draft)
                    seed = None
                    if self.augmentation is not None:
                        seed = _augmentation_seed(row)
                        generator = torch.Generator().manual_seed(seed)
                        image_pixels = self.augmentation(image, self.image_preprocessor, generator)
                    else:
                        image_pixels = self.image_preprocessor(image)
                    if self.teacher is not None:
                        teacher_pixels.append(self._teacher_pixels(image, seed))
                pixels.append(image_pixels)
            except BadSampleError as error:
                # Rows are checked for cheap faults before training; what is left (a corrupt file, a stream's row,
                # which no up-front check sees) is rare. A caption's fault names the row's image file, as the
                # up-front check does; an image's fault names its file already.
                reason = error.reason if caption_read else error.reason + _image_file(row.get(self.image_column))
                if not caption_read and row.get(self.caption_column) is None and row.get("__key__"):
                    image = row.get(self.image_column)
                    reason = no_sample_caption(row["__key__"], image.get("path") if isinstance(image, dict) else None)
                logger.warning(f"Leaving out {_sample_name(row)} that cannot be used ({reason}).")
                pixels.append(self.image_preprocessor.placeholder())
                if self.teacher is not None:  # both views are appended only once both are made
                    teacher_pixels.append(self.teacher.image_preprocessor.placeholder())
                caption = ""
                valid.append(False)
            else:
                valid.append(True)
            captions.append(caption)

        hard_negatives, hard_negative_index = self._hard_negatives(rows, valid)
        text = self.tokenizer(
            captions + hard_negatives,
            padding=self.padding,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="pt",
        )
        batch = {
            **self.image_preprocessor.collate(pixels),
            "input_ids": text["input_ids"],
            "valid": torch.tensor(valid, dtype=torch.bool),
        }
        if "attention_mask" in text:
            batch["attention_mask"] = text["attention_mask"]
        if hard_negative_index is not None:
            batch["hard_negative_index"] = hard_negative_index
            batch["hard_negative_is_caption"] = _same_tokens_as_caption(text, hard_negative_index)
        if rows and IMAGE_ID_COLUMN in rows[0]:
            batch["image_ids"] = torch.tensor([row[IMAGE_ID_COLUMN] for row in rows], dtype=torch.long)
        elif rows and (self.row_image_ids or self.teacher_embeddings is not None):
            ids = [
                key_to_id(pictures[position])
                if position in pictures and self.image_id_column is None
                else training_image_id(row, self.image_column, self.image_id_column)
                for position, row in enumerate(rows)
            ]
            if self.row_image_ids:
                batch["image_ids"] = torch.tensor(ids, dtype=torch.long)
            if self.teacher_embeddings is not None:
                batch.update(self.teacher_embeddings.lookup(ids, captions, valid))
        if rows and LABEL_COLUMN in rows[0]:
            batch["class_labels"] = torch.tensor([row[LABEL_COLUMN] for row in rows], dtype=torch.long)
        if self.teacher is not None:
            batch.update(self._teacher_inputs(teacher_pixels, captions))
        return batch

    def _hard_negatives(self, rows: list[dict[str, Any]], valid: list[bool]) -> tuple[list[str], torch.Tensor | None]:
        """The batch's hard negatives, in row order, and each row's slots in them (`None`: the data has no column)."""
        if self.hard_negative_column is None or not rows or self.hard_negative_column not in rows[0]:
            return [], None
        per_row = [caption_list(row.get(self.hard_negative_column)) if ok else [] for row, ok in zip(rows, valid)]
        index = torch.full((len(rows), max(map(len, per_row), default=0)), -1, dtype=torch.long)
        flat: list[str] = []
        for position, negatives in enumerate(per_row):
            index[position, : len(negatives)] = torch.arange(len(flat), len(flat) + len(negatives))
            flat.extend(negatives)
        return flat, index

    def decode_image(self, image: Any) -> Any:
        """One image value (path, bytes, `datasets` dict or PIL image) decoded and preprocessed as a row without
        augmentation is: the model's uint8 pixels.

        Raises:
            [`BadSampleError`]: the image cannot be used.
        """
        draft = self._draft_size() if self.jpeg_draft else None
        return self.image_preprocessor(load_image(image, max_pixels=self.max_image_pixels, draft_size=draft))

    @property
    def _reads_decoded_images(self) -> bool:
        """Whether rows take their pixels from `decoded_images` (see `image_cache.py`): not with augmentation or a
        teacher's own view of the image, which start from the decoded image."""
        return self.decoded_images is not None and self.augmentation is None and self.teacher is None

    def _draft_size(self) -> tuple[int, int] | None:
        """The JPEG draft size that loses no pixel the student or the teacher keeps: the larger of the two."""
        size = self.image_preprocessor.draft_size
        if self.teacher is None or size is None:
            return size
        teacher_size = self.teacher.image_preprocessor.draft_size
        return None if teacher_size is None else (max(size[0], teacher_size[0]), max(size[1], teacher_size[1]))

    def _teacher_pixels(self, image: Any, seed: int | None) -> Any:
        """The teacher's view of a row's image. With augmentation, the student's random draws are replayed from a
        generator seeded alike (they depend on the image's size only, not the output's), so the teacher sees the same
        crop and colours at its own size."""
        if self.augmentation is None:
            return self.teacher.image_preprocessor(image)
        return self.augmentation(image, self.teacher.image_preprocessor, torch.Generator().manual_seed(seed))

    def _teacher_inputs(self, teacher_pixels: list, captions: list[str]) -> dict[str, torch.Tensor]:
        """The teacher's model inputs of the batch, under `teacher_`-prefixed keys."""
        text = self.teacher.tokenizer(
            captions,
            padding=self.teacher.padding,
            truncation=True,
            max_length=self.teacher.max_seq_length,
            return_tensors="pt",
        )
        inputs = {**self.teacher.image_preprocessor.collate(teacher_pixels), "input_ids": text["input_ids"]}
        if "attention_mask" in text:
            inputs["attention_mask"] = text["attention_mask"]
        return {f"{TEACHER_PREFIX}{key}": value for key, value in inputs.items()}
