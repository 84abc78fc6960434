"""Building the CLIP model and its processor (tokenizer + image processor) from the model arguments."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
)
from transformers.utils import logging

from .arguments import ConfigError, ModelArguments

logger = logging.get_logger(__name__)


def load_clip_config(model_args: ModelArguments) -> CLIPConfig:
    """The model's configuration, loaded cheaply (no weights) so that arguments can be checked against it first."""
    source = model_args.config_name or model_args.model_name_or_path
    try:
        config = CLIPConfig.from_pretrained(
            source,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
    except OSError as error:
        key = "config_name" if model_args.config_name else "model_name_or_path"
        raise ConfigError(f"Cannot load a CLIP config from `{key}` = {source!r}: {error}") from None
    if model_args.dropout is not None:
        for tower in (config.text_config, config.vision_config):
            # CLIP's layers read only `attention_dropout`; `dropout` is set too so the saved config says it.
            tower.attention_dropout = model_args.dropout
            tower.dropout = model_args.dropout
    return config


def max_text_positions(config: CLIPConfig) -> int:
    return config.text_config.max_position_embeddings


def image_input_size(image_processor) -> tuple[int, tuple[int, int]]:
    """`(shortest_edge, (crop_height, crop_width))` the collator resizes and crops images to."""
    size = image_processor.size
    crop = getattr(image_processor, "crop_size", None) or size
    if "shortest_edge" in size:
        shortest = size["shortest_edge"]
    else:
        shortest = min(size["height"], size["width"])
    if "height" in crop:
        crop_hw = (crop["height"], crop["width"])
    else:
        crop_hw = (crop["shortest_edge"], crop["shortest_edge"])
    return shortest, crop_hw


def load_processor(
    model_args: ModelArguments, config: CLIPConfig, training_captions: Iterable[str] | None = None
) -> CLIPProcessor:
    """The tokenizer and image processor: given ones, the model's own, or new ones for a model built from scratch.

    A model built from scratch without `tokenizer_name` gets a tokenizer trained on `training_captions`, and one
    without `image_processor_name` a CLIP image processor sized for `config.vision_config.image_size`.
    """
    common = {"cache_dir": model_args.cache_dir, "trust_remote_code": model_args.trust_remote_code}
    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    if tokenizer_source is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **common)
    else:
        if training_captions is None:
            raise ConfigError("A model built from scratch needs `tokenizer_name` or training captions to train one.")
        from .tokenization import train_caption_tokenizer

        logger.info("No tokenizer given: training one on the training captions.")
        tokenizer = train_caption_tokenizer(
            training_captions,
            vocab_size=model_args.tokenizer_vocab_size,
            model_max_length=max_text_positions(config),
        )

    processor_source = model_args.image_processor_name or model_args.model_name_or_path
    if processor_source is not None:
        # The PIL backend: the torchvision one would make torchvision a hard dependency.
        image_processor = AutoImageProcessor.from_pretrained(processor_source, backend="pil", **common)
    else:
        side = config.vision_config.image_size
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_model(model_args: ModelArguments, config: CLIPConfig, tokenizer=None) -> CLIPModel:
    """The CLIP model: pretrained weights from `model_name_or_path`, or a new model built from `config`.

    For a model built from scratch the text config takes the tokenizer's vocabulary size and special-token ids; CLIP
    pools the text at `eos_token_id`, which must therefore match the tokenizer.
    """
    if model_args.model_name_or_path is not None:
        return CLIPModel.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            use_safetensors=True,
        )
    # `_from_config` writes the attention implementation into the config it is given; keep the caller's intact.
    config = copy.deepcopy(config)
    if tokenizer is not None:
        from .tokenization import text_config_token_ids

        for key, value in text_config_token_ids(tokenizer).items():
            setattr(config.text_config, key, value)
    return CLIPModel._from_config(config, attn_implementation=model_args.attn_implementation)
