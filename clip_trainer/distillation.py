"""The teacher of a distilled run: a frozen CLIP-style model whose similarity distributions over each batch the student
is pulled towards (the loss is [`distillation_loss`], the term [`DistillationLoss`]).

A teacher is either another model (`teacher_model_name_or_path`: any family clip-trainer loads, of any size, with its
own image processor and tokenizer; the collator makes its inputs from the same rows) or the starting model itself
(`distill_from_pretrained`: a frozen copy of the weights before training, which reads the student's own inputs).
It runs without gradients, in eval mode, on the training device and under the run's mixed precision.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import logging

from .checkpoints import share_saved_weights
from .collator import ROW_INFO_KEYS, TEACHER_PREFIX, TeacherProcessing
from .errors import ConfigError
from .preprocessing import ImagePreprocessor, UnsupportedImageProcessorError

logger = logging.get_logger(__name__)

__all__ = ["TEACHER_PREFIX", "Teacher", "load_teacher_config"]

TEACHER_KEY = "teacher_model_name_or_path"


def load_teacher_config(name_or_path: str, cache_dir: str | None = None) -> PretrainedConfig:
    """The teacher's config, read cheaply (no weights) so that the run's settings are checked against it first.

    Raises:
        [`ConfigError`]: no config there, a family clip-trainer does not load, or a local folder without safetensors.
    """
    from .arguments import ModelArguments
    from .modeling import _auto_config, _check_weights, model_family

    config = _auto_config(
        name_or_path, TEACHER_KEY, ModelArguments(model_name_or_path=name_or_path, cache_dir=cache_dir)
    )
    try:
        model_family(config)
    except ConfigError as error:
        raise ConfigError(f"`{TEACHER_KEY}` {name_or_path!r}: {error}") from None
    _check_weights(name_or_path, TEACHER_KEY)
    return config


class Teacher:
    """A frozen model that embeds the batches a student trains on.

    Args:
        model: a `CLIPModel`, `SiglipModel`, `Siglip2Model` or `VisionTextDualEncoderModel`; it is set to eval mode
            and takes no gradient.
        image_preprocessor ([`ImagePreprocessor`]): normalises the teacher's uint8 pixels on the device.
        processing ([`TeacherProcessing`], *optional*): how the collator makes the teacher's own inputs (its
            tokenizer, image size and padding); the batches then hold them under `teacher_`-prefixed keys. `None`:
            the teacher reads the student's inputs (the same processor: `distill_from_pretrained`).
    """

    def __init__(
        self, model: nn.Module, image_preprocessor: ImagePreprocessor, processing: TeacherProcessing | None = None
    ) -> None:
        self.model = model.requires_grad_(False).eval()
        self.image_preprocessor = image_preprocessor
        self.processing = processing
        self._inverse_temperature: torch.Tensor | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        cache_dir: str | None = None,
        attn_implementation: str = "sdpa",
        max_seq_length: int | None = None,
    ) -> Teacher:
        """A teacher loaded as clip-trainer loads a model to fine-tune, with its own processor.

        Args:
            name_or_path: a Hub id or a local folder of a model of any family clip-trainer loads.
            max_seq_length: the teacher's longest caption; default: its text positions (or its tokenizer's limit).

        Raises:
            [`ConfigError`]: the folder holds no loadable model, or its image processor is one clip-trainer cannot
                reproduce.
        """
        from .arguments import ModelArguments
        from .modeling import load_model, load_processor, max_text_positions, model_family

        config = load_teacher_config(name_or_path, cache_dir)
        model_args = ModelArguments(
            model_name_or_path=name_or_path, cache_dir=cache_dir, attn_implementation=attn_implementation
        )
        processor = load_processor(model_args, config)
        model = load_model(model_args, config)
        try:
            image_preprocessor = ImagePreprocessor.from_image_processor(processor.image_processor)
        except UnsupportedImageProcessorError as error:
            raise ConfigError(f"`{TEACHER_KEY}` {name_or_path!r}: {error}") from None
        positions = max_text_positions(config)
        processing = TeacherProcessing(
            tokenizer=processor.tokenizer,
            image_preprocessor=image_preprocessor,
            max_seq_length=max_seq_length or min(positions, processor.tokenizer.model_max_length),
            padding=model_family(config).text_padding,
        )
        logger.info(
            f"Teacher {os.path.basename(os.path.normpath(name_or_path))}: {type(model).__name__} with "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, images at "
            f"{image_preprocessor.output_size or 'their own size (NaFlex)'}."
        )
        return cls(model, image_preprocessor, processing)

    @classmethod
    def frozen_copy(cls, model: nn.Module, image_preprocessor: ImagePreprocessor) -> Teacher:
        """The starting model itself as the teacher (`distill_from_pretrained`): a copy of its weights as they are
        now, reading the student's own inputs."""
        return cls(copy.deepcopy(model), image_preprocessor, processing=None)

    def to(self, device: torch.device | str) -> Teacher:
        """Moves the teacher to `device`, in float32 (the run's mixed precision applies to its forward)."""
        self.model.to(device=device, dtype=torch.float32)
        self._inverse_temperature = None
        return self

    def inputs_of(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The teacher's model inputs in a collator's batch: its own `teacher_` entries (unprefixed), or the student's.

        Raises:
            [`ConfigError`]: the teacher needs its own inputs and the batch has none (a collator without `teacher`).
        """
        if self.processing is None:
            return {key: value for key, value in batch.items() if not key.startswith(TEACHER_PREFIX)}
        inputs = {key[len(TEACHER_PREFIX) :]: value for key, value in batch.items() if key.startswith(TEACHER_PREFIX)}
        if "pixel_values" not in inputs or "input_ids" not in inputs:
            raise ConfigError(
                "The batch holds no teacher inputs (`teacher_pixel_values`, `teacher_input_ids`): the teacher has its "
                "own processor, so the data collator must make them; give `ImageTextCollator(teacher=...)` (the "
                "trainer's default collator does), or leave `data_collator` unset."
            )
        if "valid" in batch:
            inputs["valid"] = batch["valid"]
        return inputs

    @torch.no_grad()
    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's normalised image and text embeddings of a batch's pairs, in float32 (call it under the
        run's autocast for its precision)."""
        from .evaluation import embed_batch

        inputs = {key: value for key, value in self.inputs_of(batch).items() if key not in ROW_INFO_KEYS}
        return embed_batch(self.model, inputs, self.image_preprocessor)

    def inverse_temperature(self) -> torch.Tensor:
        """The teacher's own `exp(logit_scale)`, a constant scalar on its device."""
        if self._inverse_temperature is None:
            with torch.no_grad():
                self._inverse_temperature = self.model.logit_scale.detach().float().exp().reshape(())
        return self._inverse_temperature


# --------------------------------------------------------------------------------------------------------------
# Teacher embeddings stored by a preparation run
# --------------------------------------------------------------------------------------------------------------

TEACHER_EMBEDDINGS_FILE = "teacher_embeddings.safetensors"


class StoredTeacherEmbeddings:
    """A teacher's normalised embeddings of a training set's images and captions, computed once (by a `prepare_only`
    run with a teacher, [`store_teacher_embeddings`]) and looked up by the collator for each row it batches.

    An image is found by its image id ([`training_image_id`]: the `image_id_column` value, else its file path or a
    digest of its bytes, the id the loss already uses), a caption by an id of its text, so that the lookup holds
    whatever a training run makes of the rows: rows of one image merged, one caption drawn per epoch, a stream.
    The teacher sees each image as its own image processor resizes it, unaugmented.

    Args:
        image_ids / image_embeds: `(N,)` int64 ids and `(N, D)` float32 embeddings of the images.
        text_ids / text_embeds: `(M,)` int64 ids and `(M, D)` float32 embeddings of the captions.
        inverse_temperature: the teacher's `exp(logit_scale)`.
        teacher: the teacher's name, for messages and the model card.
    """

    def __init__(
        self,
        image_ids: torch.Tensor,
        image_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        text_embeds: torch.Tensor,
        inverse_temperature: float,
        teacher: str,
    ) -> None:
        self.image_embeds = image_embeds.float()
        self.text_embeds = text_embeds.float()
        self.inverse_temperature = float(inverse_temperature)
        self.teacher = teacher
        self._image_rows = {int(key): row for row, key in enumerate(image_ids.tolist())}
        self._text_rows = {int(key): row for row, key in enumerate(text_ids.tolist())}

    @staticmethod
    def text_id(caption: str) -> int:
        """The id a (checked, stripped) caption is stored under."""
        from .captions import key_to_id

        return key_to_id("text:" + caption)

    @property
    def num_images(self) -> int:
        return len(self._image_rows)

    @property
    def num_texts(self) -> int:
        return len(self._text_rows)

    def has_image(self, image_id: int) -> bool:
        return int(image_id) in self._image_rows

    def lookup(self, image_ids: list[int], captions: list[str], valid: list[bool]) -> dict[str, torch.Tensor]:
        """`teacher_image_embeds` and `teacher_text_embeds` `(B, D)` of a batch's rows (zeros for unusable rows).

        Raises:
            [`ConfigError`]: a usable row whose image or caption the file does not hold (embeddings of other data).
        """
        dim = self.image_embeds.shape[1]
        images = torch.zeros(len(image_ids), dim)
        texts = torch.zeros(len(captions), dim)
        for position, (image_id, caption, usable) in enumerate(zip(image_ids, captions, valid)):
            if not usable:
                continue
            image_row = self._image_rows.get(int(image_id))
            text_row = self._text_rows.get(self.text_id(caption))
            if image_row is None or text_row is None:
                missing = "image" if image_row is None else f"caption {caption[:60]!r}"
                raise ConfigError(
                    f"The stored teacher embeddings (`teacher_embeddings`, of {self.teacher}) hold no embedding of a "
                    f"training row's {missing}: they were computed from other data (or another `image_id_column`). "
                    "Run the preparation again on this data with the teacher, and train from its output folder."
                )
            images[position] = self.image_embeds[image_row]
            texts[position] = self.text_embeds[text_row]
        return {"teacher_image_embeds": images, "teacher_text_embeds": texts}

    def check_covers(self, dataset: Any, data_args: Any) -> None:
        """Checks, before training, that every row of a loaded training set has its image and captions here.

        Raises:
            [`ConfigError`]: naming the first row whose image or caption is missing, and the fix.
        """
        from .captions import _image_keys, caption_fields, caption_list, key_to_id
        from .rows import BadSampleError, check_caption

        fields = [column for column in caption_fields(data_args) if column in dataset.column_names]
        rows = dataset.select_columns(fields).with_format(None)  # iterated in order, not read row by row by index
        for row, (key, values) in enumerate(zip(_image_keys(dataset, data_args), rows, strict=True)):
            texts = []
            for column in fields:
                for caption in caption_list(values[column]):
                    try:
                        texts.append(check_caption(caption))
                    except BadSampleError:
                        continue
            if not texts:
                continue  # left out of training anyway
            missing = None if key_to_id(key) in self._image_rows else "image"
            if missing is None:
                missing = next((f"caption {t[:60]!r}" for t in texts if self.text_id(t) not in self._text_rows), None)
            if missing is not None:
                raise ConfigError(
                    f"The stored teacher embeddings (`teacher_embeddings`, of {self.teacher}) hold no embedding of "
                    f"training row {row}'s {missing}: they were computed from other data. Train from the folder of "
                    "the preparation run that wrote them (`--dataset_name` that folder, the same `image_id_column`), "
                    "or run the preparation again on this data with the teacher."
                )

    def save(self, path: str) -> str:
        """Writes the embeddings to `path` (a folder gets [`TEACHER_EMBEDDINGS_FILE`]); returns the file written."""
        from safetensors.torch import save_file

        if os.path.isdir(path):
            path = os.path.join(path, TEACHER_EMBEDDINGS_FILE)
        image_ids = torch.tensor(list(self._image_rows), dtype=torch.long)
        text_ids = torch.tensor(list(self._text_rows), dtype=torch.long)
        save_file(
            {
                "image_ids": image_ids,
                "image_embeds": self.image_embeds.contiguous(),
                "text_ids": text_ids,
                "text_embeds": self.text_embeds.contiguous(),
            },
            path,
            metadata={"teacher": self.teacher, "inverse_temperature": repr(self.inverse_temperature)},
        )
        share_saved_weights(path)
        return path

    @classmethod
    def load(cls, path: str) -> StoredTeacherEmbeddings:
        """Reads a file written by [`save`] (or the one in a preparation run's folder).

        Raises:
            [`ConfigError`]: no such file, or a file that is not one of these.
        """
        from safetensors import SafetensorError, safe_open

        file = os.path.join(path, TEACHER_EMBEDDINGS_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ConfigError(
                f"`teacher_embeddings` {path!r}: no such file (a preparation run with a teacher writes "
                f"{TEACHER_EMBEDDINGS_FILE} into its output folder: `--prepare_only true "
                "--teacher_model_name_or_path TEACHER`)."
            )
        names = ("image_ids", "image_embeds", "text_ids", "text_embeds")
        try:
            with safe_open(file, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in names}
            inverse_temperature = float(metadata["inverse_temperature"])
        except (SafetensorError, KeyError, ValueError, OSError) as error:
            raise ConfigError(
                f"`teacher_embeddings` {file!r} is not a file of stored teacher embeddings ({error}); write it again "
                "with a preparation run (`--prepare_only true --teacher_model_name_or_path TEACHER`)."
            ) from None
        return cls(*(tensors[name] for name in names), inverse_temperature, metadata.get("teacher", file))


class StoredTeacher(Teacher):
    """A teacher whose embeddings were stored by a preparation run: the collator puts them in each batch
    (`teacher_image_embeds`, `teacher_text_embeds`), so no teacher model is loaded or run."""

    def __init__(self, store: StoredTeacherEmbeddings) -> None:
        self.model = None
        self.store = store
        self.processing = None
        self._inverse_temperature = torch.tensor(store.inverse_temperature)

    def to(self, device: torch.device | str) -> StoredTeacher:
        self._inverse_temperature = self._inverse_temperature.to(device)
        return self

    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "teacher_image_embeds" not in batch:
            raise ConfigError(
                "The batch holds no stored teacher embeddings; with `teacher_embeddings` the data collator must look "
                "them up: give `ImageTextCollator(teacher_embeddings=...)` (the trainer's default collator does), or "
                "leave `data_collator` unset."
            )
        return batch["teacher_image_embeds"].float(), batch["teacher_text_embeds"].float()

    def inverse_temperature(self) -> torch.Tensor:
        return self._inverse_temperature


def store_teacher_embeddings(
    dataset: Any, data_args: Any, teacher: Teacher, name: str, batch_size: int = 64
) -> StoredTeacherEmbeddings:
    """Embeds every image and every caption of a (prepared) training set once with `teacher`.

    Each image is embedded once however many rows show it, each distinct caption once; rows whose image does not
    decode or that have no caption are left out (the training run leaves them out too).

    Args:
        dataset (`datasets.Dataset`): the training rows, as the training run will read them.
        data_args ([`DataArguments`]): the columns (`image_column`, `image_id_column`, the caption columns).
        teacher ([`Teacher`]): a teacher with its own processing ([`Teacher.from_pretrained`]).
        name: the teacher's name or path, stored with the embeddings.
    """
    from .captions import caption_fields, caption_list, training_image_id
    from .collator import ImageTextCollator
    from .evaluation import embed_batch, text_encoder
    from .rows import BadSampleError, check_caption

    processing = teacher.processing
    device = next(teacher.model.parameters()).device
    collator = ImageTextCollator(
        tokenizer=processing.tokenizer,
        image_preprocessor=processing.image_preprocessor,
        max_seq_length=processing.max_seq_length,
        image_column=data_args.image_column,
        caption_column="_teacher_caption",
        max_image_pixels=data_args.max_image_pixels,
        padding=processing.padding,
        row_image_ids=False,
    )
    fields = [column for column in caption_fields(data_args) if column in dataset.column_names]
    image_ids: list[int] = []
    image_chunks: list[torch.Tensor] = []
    captions: dict[int, str] = {}
    pending: list[dict[str, Any]] = []
    pending_ids: list[int] = []

    @torch.no_grad()
    def embed_pending() -> None:
        batch = collator(pending)
        valid = batch["valid"]
        inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        image_embeds, _ = embed_batch(teacher.model, inputs, teacher.image_preprocessor)
        image_chunks.append(image_embeds.cpu()[valid])
        image_ids.extend(image_id for image_id, usable in zip(pending_ids, valid.tolist()) if usable)
        pending.clear()
        pending_ids.clear()

    seen: set[int] = set()
    for row in dataset.with_format(None):
        texts = []
        for column in fields:
            for caption in caption_list(row.get(column)):
                try:
                    texts.append(check_caption(caption))
                except BadSampleError:
                    continue
        if not texts:
            continue
        for text in texts:
            captions.setdefault(StoredTeacherEmbeddings.text_id(text), text)
        image_id = training_image_id(row, data_args.image_column, data_args.image_id_column)
        if image_id in seen:
            continue
        seen.add(image_id)
        pending.append({data_args.image_column: row[data_args.image_column], "_teacher_caption": texts[0]})
        pending_ids.append(image_id)
        if len(pending) == batch_size:
            embed_pending()
    if pending:
        embed_pending()
    if not image_ids:
        raise ConfigError("The training data has no usable pair to embed with the teacher.")
    encode = text_encoder(
        teacher.model,
        processing.tokenizer,
        padding=processing.padding,
        max_length=processing.max_seq_length,
        device=device,
        batch_size=batch_size,
    )
    text_ids = list(captions)
    text_embeds = encode([captions[key] for key in text_ids])
    logger.info(
        f"Teacher {name}: embedded {len(image_ids):,} images and {len(text_ids):,} captions of the training data."
    )
    return StoredTeacherEmbeddings(
        torch.tensor(image_ids, dtype=torch.long),
        torch.cat(image_chunks),
        torch.tensor(text_ids, dtype=torch.long),
        text_embeds,
        float(teacher.inverse_temperature()),
        name,
    )
