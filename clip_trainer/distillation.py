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
