"""Building the model and its processor (tokenizer + image processor) from the model arguments.

Only what the model arguments name is loaded, and a checkpoint that is not a model clip-trainer trains is refused by
name before any weights are read.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import NamedTuple

from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    PretrainedConfig,
)
from transformers.utils import logging

from .arguments import ConfigError, ModelArguments

logger = logging.get_logger(__name__)

# model_type -> what clip-trainer trains for it.
SUPPORTED_MODEL_TYPES = {"clip": CLIPModel}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def load_model_config(model_args: ModelArguments) -> PretrainedConfig:
    """The model's configuration, loaded cheaply (no weights) so that arguments can be checked against it first.

    Raises:
        [`ConfigError`]: for a source that has no config, or whose `model_type` clip-trainer does not train.
    """
    key = "config_name" if model_args.config_name else "model_name_or_path"
    source = model_args.config_name or model_args.model_name_or_path
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise ConfigError(f"`{key}` {source!r} is a folder without a config.json, so it is not a saved model.")
    try:
        config = AutoConfig.from_pretrained(
            source,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"Cannot load a model config from `{key}` = {source!r}: {first_line}") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"`{key}` {source!r} is a {config.model_type!r} model ({type(config).__name__}); clip-trainer trains "
            f"{', '.join(repr(name) for name in SUPPORTED_MODEL_TYPES)} models. Give a CLIP checkpoint, or a "
            "CLIPConfig as `config_name` to train one from scratch."
        )
    _check_weights(model_args.model_name_or_path)
    if model_args.dropout is not None:
        for tower in (config.text_config, config.vision_config):
            # CLIP's layers read only `attention_dropout`; `dropout` is set too so the saved config says it.
            tower.attention_dropout = model_args.dropout
            tower.dropout = model_args.dropout
    return config


def _check_weights(source: str | None) -> None:
    """A local model folder must hold safetensors weights; checked with the config, before any data is loaded."""
    if source is None or not os.path.isdir(source):
        return
    if any(os.path.isfile(os.path.join(source, name)) for name in WEIGHT_FILES):
        return
    found = sorted(name for name in os.listdir(source) if name.endswith((".bin", ".pt", ".pth", ".ckpt")))
    pickled = f" (it has {', '.join(found)}: pickled weights, which can run code when loaded)" if found else ""
    raise ConfigError(
        f"`model_name_or_path` {source!r} has no model.safetensors{pickled}; clip-trainer loads safetensors weights "
        "only. Convert them (`model.save_pretrained(folder)` saves safetensors), or use `config_name` to train a new "
        "model from this config."
    )


def max_text_positions(config: CLIPConfig) -> int:
    return config.text_config.max_position_embeddings


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
    """The model: pretrained weights from `model_name_or_path`, or a new model built from `config`.

    For a model built from scratch the text config takes the tokenizer's vocabulary size and special-token ids; CLIP
    pools the text at `eos_token_id`, which must therefore match the tokenizer. Seed the run before calling this:
    a new model's weights are drawn from torch's generator.
    """
    model_class = SUPPORTED_MODEL_TYPES[config.model_type]
    source = model_args.model_name_or_path
    if source is not None:
        return model_class.from_pretrained(
            source,
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
    return model_class._from_config(config, attn_implementation=model_args.attn_implementation)


class TowerParts(NamedTuple):
    """One tower of a dual encoder, bottom to top, as partial locking and layer-wise learning rates see it.

    Attributes:
        embeddings: what comes before the first encoder layer (patch/token and position embeddings, and the vision
            tower's pre-norm).
        layers: the encoder layers, bottom first.
        final_norm: the norm after the last layer.
        projection: the projection into the joint embedding space.
    """

    embeddings: tuple[nn.Module, ...]
    layers: nn.ModuleList
    final_norm: nn.Module
    projection: nn.Module


TOWERS = ("vision", "text")


def tower_layers(model: nn.Module, tower: str) -> TowerParts:
    """The parts of `model`'s `vision` or `text` tower, for `CLIPModel` (or a wrapper that forwards attributes to
    one, such as a peft `PeftModel`).

    Raises:
        `ValueError`: for an unknown tower, or a model family this helper does not know yet.
    """
    if tower not in TOWERS:
        raise ValueError(f"`tower` is {tower!r}; it must be one of {', '.join(TOWERS)}.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, CLIPModel):
        raise ValueError(
            f"Partial locking and layer-wise learning rates know the towers of CLIPModel, not of "
            f"{type(base).__name__}; unset `vision_trainable_layers`, `text_trainable_layers` and "
            "`layerwise_lr_decay` for this model."
        )
    if tower == "vision":
        vision = base.vision_model
        return TowerParts(
            (vision.embeddings, vision.pre_layrnorm),
            vision.encoder.layers,
            vision.post_layernorm,
            base.visual_projection,
        )
    text = base.text_model
    return TowerParts((text.embeddings,), text.encoder.layers, text.final_layer_norm, base.text_projection)
