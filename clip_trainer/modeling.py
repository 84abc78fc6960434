"""Building the model and its processor (tokenizer + image processor) from the model arguments.

The families, told apart by the config's `model_type`: CLIP (`CLIPModel`), MetaCLIP 2 (`MetaClip2Model`),
Chinese-CLIP (`ChineseCLIPModel`), AltCLIP (`AltCLIPModel`), SigLIP (`SiglipModel`), SigLIP 2 (`Siglip2Model`) and
vision-text dual encoders (`VisionTextDualEncoderModel`, any vision encoder joined to any text encoder). What differs
between them lives in one registry, [`FAMILIES`], which the rest of the package reads: classes, loss, caption padding,
tower layout (freezing, partial locking, layer-wise rates), LoRA targets, ONNX export. Only what the model arguments
name is loaded, and a checkpoint of another kind is refused by name before any weights are read.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import (
    AltCLIPModel,
    AltCLIPProcessor,
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    ChineseCLIPModel,
    ChineseCLIPProcessor,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    MetaClip2Model,
    PretrainedConfig,
    Siglip2Model,
    Siglip2Processor,
    SiglipModel,
    SiglipProcessor,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)
from transformers.utils import logging

from .arguments import DEFAULT_LORA_TARGET_MODULES, ConfigError, ModelArguments
from .config_files import written_as_path

logger = logging.get_logger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class TowerParts(NamedTuple):
    """One tower of a dual encoder, bottom to top, as partial locking and layer-wise learning rates see it.

    Attributes:
        embeddings: what comes before the first encoder layer (patch/token and position embeddings, and the vision
            tower's pre-norm).
        layers: the encoder layers, bottom first.
        final_norm: the norm after the last layer; `None` for a post-norm tower (BERT's), which has none.
        projection: the modules that project into the joint embedding space, bottom first (AltCLIP's text tower has
            two: its own `transformation` and the model's `text_projection`).
    """

    embeddings: tuple[nn.Module, ...]
    layers: nn.ModuleList
    final_norm: nn.Module | None
    projection: tuple[nn.Module, ...]


def _clip_vision_tower(model: nn.Module) -> TowerParts:
    # CLIP's ViT, which MetaCLIP 2, Chinese-CLIP and AltCLIP share.
    vision = model.vision_model
    return TowerParts(
        (vision.embeddings, vision.pre_layrnorm),
        vision.encoder.layers,
        vision.post_layernorm,
        (model.visual_projection,),
    )


def _clip_text_tower(model: nn.Module) -> TowerParts:
    text = model.text_model
    return TowerParts((text.embeddings,), text.encoder.layers, text.final_layer_norm, (model.text_projection,))


def _siglip_vision_tower(model: nn.Module) -> TowerParts:
    # SigLIP's projection is its tower's `head` (the vision tower's attention-pooling head).
    vision = model.vision_model
    return TowerParts((vision.embeddings,), vision.encoder.layers, vision.post_layernorm, (vision.head,))


def _siglip_text_tower(model: nn.Module) -> TowerParts:
    text = model.text_model
    return TowerParts((text.embeddings,), text.encoder.layers, text.final_layer_norm, (text.head,))


def _bert_text_tower(model: nn.Module) -> TowerParts:
    # Chinese-CLIP's BERT: post-norm layers (no final norm), pooled at [CLS] without BERT's pooler.
    text = model.text_model
    return TowerParts((text.embeddings,), text.encoder.layer, None, (model.text_projection,))


def _xlm_roberta_text_tower(model: nn.Module) -> TowerParts:
    # AltCLIP's XLM-R, followed inside the tower by a LayerNorm (`pre_LN`) and a linear `transformation`.
    text = model.text_model
    return TowerParts(
        (text.roberta.embeddings,),
        text.roberta.encoder.layers,
        text.pre_LN,
        (text.transformation, model.text_projection),
    )


def _position_embeddings(config: PretrainedConfig) -> int:
    return config.text_config.max_position_embeddings


def _positions_after_padding(config: PretrainedConfig) -> int:
    # RoBERTa numbers the tokens from `pad_token_id + 1` (fairseq's convention), so that many positions are never read.
    return config.text_config.max_position_embeddings - config.text_config.pad_token_id - 1


def _clip_image_processor(config: PretrainedConfig):
    side = config.vision_config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _chinese_clip_image_processor(config: PretrainedConfig):
    from transformers import ChineseCLIPImageProcessorPil

    side = config.vision_config.image_size
    return ChineseCLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _siglip_image_processor(config: PretrainedConfig):
    from transformers import SiglipImageProcessorPil

    side = config.vision_config.image_size
    return SiglipImageProcessorPil(size={"height": side, "width": side})


def _siglip2_image_processor(config: PretrainedConfig):
    from transformers import Siglip2ImageProcessorPil

    vision = config.vision_config
    return Siglip2ImageProcessorPil(patch_size=vision.patch_size, max_num_patches=vision.num_patches)


# LoRA's default targets, the attention projections of both towers, by the names the towers give them: CLIP's ViT
# and text transformer (`DEFAULT_LORA_TARGET_MODULES`), and BERT-style text towers (`query`, `key`, `value` and the
# attention's output `dense`; a bare `dense` would also match the MLP's).
_BERT_ATTENTION = ("query", "key", "value", "attention.output.dense")


@dataclass(frozen=True)
class ModelFamily:
    """What differs between the model families clip-trainer trains.

    Attributes:
        name: as the model card says it (`CLIP`, `SigLIP`, ...).
        model_class / processor_class: the transformers classes.
        loss: the family's own loss, `softmax` (CLIP's contrastive cross-entropy) or `sigmoid` (SigLIP's).
        text_padding: `longest` for text towers that pool at the end-of-text token (CLIP) or the first token (BERT);
            `max_length` for SigLIP's, which pools at the last position and so must always see captions padded to
            the one length it was trained with.
        docs: the transformers documentation page of the family.
        vision_tower / text_tower: the parts of each tower ([`TowerParts`]) from the model, for partial locking and
            layer-wise learning rates; `None` where the towers can be any model (a dual encoder).
        lora_targets: the module names `lora_target_modules` means by default: the attention projections of both
            towers.
        fixed_image_size: whether every image goes in at one size (not SigLIP 2's NaFlex), as augmentation's crops
            and the ONNX graphs need.
        text_positions: the longest caption the text tower reads, in tokens, from the model config.
        new_image_processor: the image processor of a model built from scratch, sized for its config.
    """

    name: str
    model_class: type
    processor_class: type
    loss: str
    text_padding: str
    docs: str
    vision_tower: Callable[[nn.Module], TowerParts] | None = _clip_vision_tower
    text_tower: Callable[[nn.Module], TowerParts] | None = _clip_text_tower
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGET_MODULES
    fixed_image_size: bool = True
    text_positions: Callable[[PretrainedConfig], int] = _position_embeddings
    new_image_processor: Callable[[PretrainedConfig], object] = _clip_image_processor


FAMILIES = {
    "clip": ModelFamily("CLIP", CLIPModel, CLIPProcessor, "softmax", "longest", "clip"),
    "siglip": ModelFamily(
        "SigLIP",
        SiglipModel,
        SiglipProcessor,
        "sigmoid",
        "max_length",
        "siglip",
        vision_tower=_siglip_vision_tower,
        text_tower=_siglip_text_tower,
        new_image_processor=_siglip_image_processor,
    ),
    "siglip2": ModelFamily(
        "SigLIP 2",
        Siglip2Model,
        Siglip2Processor,
        "sigmoid",
        "max_length",
        "siglip2",
        vision_tower=_siglip_vision_tower,
        text_tower=_siglip_text_tower,
        fixed_image_size=False,
        new_image_processor=_siglip2_image_processor,
    ),
    "vision-text-dual-encoder": ModelFamily(
        "vision-text dual encoder",
        VisionTextDualEncoderModel,
        VisionTextDualEncoderProcessor,
        "softmax",
        "longest",
        "vision-text-dual-encoder",
        vision_tower=None,
        text_tower=None,
        # Its towers can be CLIP's (`q_proj`, ...), or ViT's and BERT's, which name theirs `query`, `key`, `value`.
        lora_targets=(*DEFAULT_LORA_TARGET_MODULES, *_BERT_ATTENTION),
    ),
    # MetaCLIP 2 is CLIP's architecture with a multilingual (XLM-V) tokenizer; transformers pairs it with
    # CLIPProcessor.
    "metaclip_2": ModelFamily("MetaCLIP 2", MetaClip2Model, CLIPProcessor, "softmax", "longest", "metaclip_2"),
    "chinese_clip": ModelFamily(
        "Chinese-CLIP",
        ChineseCLIPModel,
        ChineseCLIPProcessor,
        "softmax",
        "longest",
        "chinese_clip",
        text_tower=_bert_text_tower,
        lora_targets=(*DEFAULT_LORA_TARGET_MODULES, *_BERT_ATTENTION),
        new_image_processor=_chinese_clip_image_processor,
    ),
    "altclip": ModelFamily(
        "AltCLIP",
        AltCLIPModel,
        AltCLIPProcessor,
        "softmax",
        "longest",
        "altclip",
        text_tower=_xlm_roberta_text_tower,
        lora_targets=(*DEFAULT_LORA_TARGET_MODULES, *_BERT_ATTENTION),
        text_positions=_positions_after_padding,
    ),
}
# SigLIP's recommended start for a model trained from scratch (Zhai et al. 2023): t = 10, b = -10, so that the
# many negatives of a batch start with a small loss; transformers initialises both at 0.
SIGLIP_INITIAL_INVERSE_TEMPERATURE = 10.0
SIGLIP_INITIAL_LOGIT_BIAS = -10.0


def model_family(config: PretrainedConfig) -> ModelFamily:
    """The family of a model config, or a [`ConfigError`] naming what clip-trainer trains instead."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError(
            f"This is a {config.model_type!r} model ({type(config).__name__}); clip-trainer trains "
            f"{', '.join(repr(name) for name in FAMILIES)} models. Give a checkpoint of one of them, a config to "
            "train one from scratch, or two towers (`vision_model_name_or_path`, `text_model_name_or_path`)."
        )
    return family


def tower_modules(model: nn.Module, tower: str) -> list[nn.Module]:
    """The modules of one tower, `vision` or `text`, projection included, for freezing and unfreezing."""
    names = {"vision": ("vision_model", "visual_projection"), "text": ("text_model", "text_projection")}[tower]
    # SigLIP keeps its projection (the `head`) inside the tower, and has no separate one.
    return [getattr(model, name) for name in names if getattr(model, name, None) is not None]


def _not_on_this_machine(source: str, key: str) -> str:
    """`source`, a path that does not exist, said with what its folder holds instead (a mistyped folder name)."""
    local = os.path.normpath(os.path.expanduser(source))
    if local != os.path.normpath(source) and os.path.exists(local):
        # `~` reaches here unexpanded from a config file or `--option=~/...`: no shell expanded it.
        full = os.path.abspath(local)
        return f"`{key}` {source!r} starts with `~`, which nothing expands here; give the full path, {full!r}"
    folder, name = os.path.split(local)
    where = f"`{key}` {source!r} is not on this machine (no {os.path.abspath(local)})"
    if folder and os.path.isdir(folder):
        entries = sorted(entry for entry in os.listdir(folder) if not entry.startswith("."))
        close = difflib.get_close_matches(name, entries, n=3, cutoff=0.5)
        if close:
            where += f"; did you mean {' or '.join(repr(os.path.join(folder, entry)) for entry in close)}?"
    return where


def _auto_config(source: str, key: str, model_args: ModelArguments) -> PretrainedConfig:
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise ConfigError(f"`{key}` {source!r} is a folder without a config.json, so it is not a saved model.")
    if not os.path.exists(source) and written_as_path(source):
        # A Hub id is `name` or `owner/name`: anything else is a path, and looking it up on the Hub would only
        # answer with a network error.
        raise ConfigError(_not_on_this_machine(source, key) + ".")
    try:
        return AutoConfig.from_pretrained(
            source,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        folder = os.path.dirname(os.path.normpath(source))
        if folder and os.path.isdir(folder) and not os.path.exists(source):
            # `out/cvs` beside a local `out/`: most likely a mistyped folder rather than a Hub id.
            raise ConfigError(
                f"{_not_on_this_machine(source, key)}, and loading it as a Hub id failed: {first_line}"
            ) from None
        raise ConfigError(f"Cannot load a model config from `{key}` = {source!r}: {first_line}") from None


def load_model_config(model_args: ModelArguments) -> PretrainedConfig:
    """The model's configuration, loaded cheaply (no weights) so that arguments can be checked against it first.

    Raises:
        [`ConfigError`]: for a source that has no config, or whose `model_type` clip-trainer does not train.
    """
    if model_args.vision_model_name_or_path is not None:
        vision = _auto_config(model_args.vision_model_name_or_path, "vision_model_name_or_path", model_args)
        text = _auto_config(model_args.text_model_name_or_path, "text_model_name_or_path", model_args)
        for key, tower in (("vision_model_name_or_path", vision), ("text_model_name_or_path", text)):
            if tower.model_type in FAMILIES and tower.model_type != "clip":
                raise ConfigError(
                    f"`{key}` is a whole {tower.model_type!r} model; give its {key.split('_')[0]} tower alone (for "
                    "SigLIP, a SiglipVisionModel / SiglipTextModel folder), or train the model itself as "
                    "`model_name_or_path`."
                )
        _check_weights(model_args.vision_model_name_or_path, "vision_model_name_or_path")
        _check_weights(model_args.text_model_name_or_path, "text_model_name_or_path")
        # A CLIP checkpoint given as a tower contributes that tower's config.
        vision = getattr(vision, "vision_config", vision)
        text = getattr(text, "text_config", text)
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            vision, text, projection_dim=model_args.projection_dim
        )
    else:
        key = "config_name" if model_args.config_name else "model_name_or_path"
        source = model_args.config_name or model_args.model_name_or_path
        config = _auto_config(source, key, model_args)
        try:
            model_family(config)
        except ConfigError as error:
            raise ConfigError(f"`{key}` {source!r}: {error}") from None
        _check_weights(model_args.model_name_or_path, "model_name_or_path")
        if model_args.config_name and model_args.model_name_or_path:
            saved = _auto_config(model_args.model_name_or_path, "model_name_or_path", model_args)
            differences = _architecture_differences(config, saved)
            if differences:
                # transformers would stop while loading the weights, with a traceback of size mismatches.
                raise ConfigError(
                    f"`config_name` {model_args.config_name!r} describes another model than the weights in "
                    f"`model_name_or_path` {model_args.model_name_or_path!r} ({'; '.join(differences[:3])}). Drop "
                    '`config_name` to use the saved model\'s own configuration (`--config_name ""` on the command '
                    "line unsets a config file's, as for evaluating a model the demo trained)."
                )
    if model_args.dropout is not None:
        for tower in (config.text_config, config.vision_config):
            # CLIP's and SigLIP's layers read only `attention_dropout`; `dropout` is set too so the saved config
            # says it (and so that towers that read it, BERT's among them, apply it).
            tower.attention_dropout = model_args.dropout
            tower.dropout = model_args.dropout
            if hasattr(tower, "attention_probs_dropout_prob"):  # BERT's and XLM-R's name for attention dropout
                tower.attention_probs_dropout_prob = model_args.dropout
    return config


# The settings that decide the shapes of a model's weights: a config that differs in one cannot load the weights.
_ARCHITECTURE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "image_size", "patch_size", "num_channels", "projection_dim",
)  # fmt: skip


def _architecture_differences(config: PretrainedConfig, saved: PretrainedConfig) -> list[str]:
    """Where `config` and `saved` disagree on the shapes of the weights, as `text vocab_size 4096 vs 2048` lines."""
    differences = []
    if config.model_type != saved.model_type:
        differences.append(f"model_type {config.model_type} vs {saved.model_type}")
    for part in ("", "text_config", "vision_config"):
        mine, theirs = (getattr(c, part, None) if part else c for c in (config, saved))
        if mine is None or theirs is None:
            continue
        for key in _ARCHITECTURE_KEYS:
            if hasattr(mine, key) and hasattr(theirs, key) and getattr(mine, key) != getattr(theirs, key):
                where = f"{part.removesuffix('_config')} " if part else ""
                differences.append(f"{where}{key} {getattr(mine, key)} vs {getattr(theirs, key)}")
    return differences


def _check_weights(source: str | None, key: str) -> None:
    """A local model folder must hold safetensors weights; checked with the config, before any data is loaded."""
    if source is None or not os.path.isdir(source):
        return
    if any(os.path.isfile(os.path.join(source, name)) for name in WEIGHT_FILES):
        return
    found = sorted(name for name in os.listdir(source) if name.endswith((".bin", ".pt", ".pth", ".ckpt")))
    pickled = f" (it has {', '.join(found)}: pickled weights, which can run code when loaded)" if found else ""
    raise ConfigError(
        f"`{key}` {source!r} has no model.safetensors{pickled}; clip-trainer loads safetensors weights only. "
        "Convert them (`model.save_pretrained(folder)` saves safetensors), or use `config_name` to train a new "
        "model from this config."
    )


def max_text_positions(config: PretrainedConfig) -> int:
    """The longest caption the model's text tower reads, in tokens (AltCLIP's XLM-R reads 2 fewer than it has
    position embeddings)."""
    family = FAMILIES.get(config.model_type)
    return family.text_positions(config) if family is not None else _position_embeddings(config)


# The files a saved tokenizer or image processor leaves in a folder (any one of them).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model",
)  # fmt: skip
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@contextlib.contextmanager
def _missing_in_folder(source: str, what: str, files: tuple[str, ...], option: str):
    """A local model folder without a tokenizer or image processor (a folder `CLIPModel.save_pretrained` wrote, with
    no processor saved beside it): one line naming the folder and the option that supplies one. transformers either
    raises a traceback or, for a tokenizer, builds an empty one from the model's config (a vocabulary of 2 tokens
    that reads every caption as unknown words) and trains on it without a word."""
    missing = ConfigError(
        f"{source} has no {what} (none of {', '.join(files)}; only `save_pretrained` of the model was written "
        f"there?): give {option} with a folder or Hub id that has the {what} the model was trained with (for "
        "example the model it was fine-tuned from), or save the processor into the folder."
    )
    if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, name)) for name in files):
        raise missing
    try:
        yield
    except OSError as error:
        if not os.path.isdir(source):
            raise
        raise missing from error


def load_processor(
    model_args: ModelArguments, config: PretrainedConfig, training_captions: Iterable[str] | None = None
):
    """The tokenizer and image processor: given ones, the model's own, or new ones for a model built from scratch.

    A model built from scratch without `tokenizer_name` gets a tokenizer trained on `training_captions`, and one
    without `image_processor_name` an image processor of its family sized for its config. A new dual encoder takes
    each tower's own.
    """
    family = model_family(config)
    common = {"cache_dir": model_args.cache_dir, "trust_remote_code": model_args.trust_remote_code}
    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path or model_args.text_model_name_or_path
    if tokenizer_source is not None:
        with _missing_in_folder(tokenizer_source, "tokenizer", TOKENIZER_FILES, "--tokenizer_name"):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **common)
    else:
        if training_captions is None:
            raise ConfigError("A model built from scratch needs `tokenizer_name` or training captions to train one.")
        from .tokenization import train_caption_tokenizer, train_siglip2_caption_tokenizer

        logger.info("No tokenizer given: training one on the training captions.")
        # transformers loads a SigLIP 2 folder's tokenizer as `Siglip2Tokenizer` whatever it was saved as.
        train = train_siglip2_caption_tokenizer if config.model_type == "siglip2" else train_caption_tokenizer
        try:
            tokenizer = train(
                training_captions,
                vocab_size=model_args.tokenizer_vocab_size,
                model_max_length=max_text_positions(config),
            )
        except ValueError as error:  # a vocabulary too small for the family's special and byte tokens
            raise ConfigError(f"`tokenizer_vocab_size`: {error} Give a larger one.") from None

    processor_source = (
        model_args.image_processor_name or model_args.model_name_or_path or model_args.vision_model_name_or_path
    )
    if processor_source is not None:
        # The PIL backend: the torchvision one would make torchvision a hard dependency.
        with _missing_in_folder(processor_source, "image processor", IMAGE_PROCESSOR_FILES, "--image_processor_name"):
            image_processor = AutoImageProcessor.from_pretrained(processor_source, backend="pil", **common)
    else:
        image_processor = family.new_image_processor(config)
    return family.processor_class(image_processor=image_processor, tokenizer=tokenizer)


def load_model(
    model_args: ModelArguments, config: PretrainedConfig, tokenizer=None, max_seq_length: int | None = None
) -> nn.Module:
    """The model: pretrained weights from `model_name_or_path`, two pretrained towers joined by new projections, or
    a new model built from `config`.

    For a model built from scratch the text config takes the tokenizer's vocabulary size and special-token ids (CLIP
    pools the text at `eos_token_id`, which must therefore match the tokenizer), and a SigLIP model starts at
    `t = 10, b = -10`. Seed the run before calling this: new weights are drawn from torch's generator.

    A `max_seq_length` above the text positions lengthens them: a pretrained text tower by Long-CLIP's stretching of
    its position table ([`extend_text_positions`]), a new one by being built with that many positions; the text
    config and the tokenizer's `model_max_length` say the new length.
    """
    model = _load_model(model_args, config, tokenizer, max_seq_length)
    if max_seq_length is not None:
        from .positions import extend_text_positions

        extend_text_positions(model, max_seq_length, tokenizer)
    return model


def _load_model(model_args, config, tokenizer, max_seq_length: int | None) -> nn.Module:
    family = model_family(config)
    common = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "trust_remote_code": model_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "use_safetensors": True,
    }
    if model_args.model_name_or_path is not None:
        return family.model_class.from_pretrained(model_args.model_name_or_path, config=config, **common)
    if model_args.vision_model_name_or_path is not None:
        # The towers' keyword arguments go through their `vision_` / `text_` prefixes.
        towers = {f"{side}_{key}": value for side in ("vision", "text") for key, value in common.items()}
        return VisionTextDualEncoderModel.from_vision_text_pretrained(
            model_args.vision_model_name_or_path,
            model_args.text_model_name_or_path,
            projection_dim=config.projection_dim,
            **towers,
        )
    # `_from_config` writes the attention implementation into the config it is given; keep the caller's intact.
    config = copy.deepcopy(config)
    if tokenizer is not None:
        from .tokenization import text_config_token_ids

        for key, value in text_config_token_ids(tokenizer).items():
            setattr(config.text_config, key, value)
    if max_seq_length is not None and max_seq_length > max_text_positions(config):
        # New weights have nothing to preserve: the tower is built at the longer length and learns every position
        # (with the rows a tower never reads, as AltCLIP's RoBERTa numbers its tokens after the padding id).
        unread = config.text_config.max_position_embeddings - max_text_positions(config)
        config.text_config.max_position_embeddings = max_seq_length + unread
        if tokenizer is not None:
            tokenizer.model_max_length = max_seq_length
    model = family.model_class._from_config(config, attn_implementation=model_args.attn_implementation)
    if family.loss == "sigmoid":
        with torch.no_grad():
            model.logit_scale.fill_(math.log(SIGLIP_INITIAL_INVERSE_TEMPERATURE))
            model.logit_bias.fill_(SIGLIP_INITIAL_LOGIT_BIAS)
    return model


TOWERS = ("vision", "text")


def tower_layers(model: nn.Module, tower: str) -> TowerParts:
    """The parts of `model`'s `vision` or `text` tower, for every family whose towers are known (or a wrapper that
    forwards attributes to one, such as a peft `PeftModel`).

    Raises:
        `ValueError`: for an unknown tower, or a family whose towers are arbitrary models (a dual encoder).
    """
    if tower not in TOWERS:
        raise ValueError(f"`tower` is {tower!r}; it must be one of {', '.join(TOWERS)}.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = FAMILIES.get(getattr(getattr(base, "config", None), "model_type", None))
    parts = None if family is None else {"vision": family.vision_tower, "text": family.text_tower}[tower]
    if parts is None:
        known = ", ".join(f.name for f in FAMILIES.values() if f.vision_tower is not None and f.text_tower is not None)
        raise ValueError(
            f"Partial locking and layer-wise learning rates know the towers of {known} models, not of "
            f"{type(base).__name__} (whose towers can be any model); unset `vision_trainable_layers`, "
            "`text_trainable_layers` and `layerwise_lr_decay` for this model."
        )
    return parts(base)
