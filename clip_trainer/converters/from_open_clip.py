"""Importing open_clip ViT checkpoints as `transformers.CLIPModel` folders that `run_clip.py` trains as they are.

[`convert_open_clip`] maps an open_clip ViT (a model name plus a `.pt`/`.safetensors` checkpoint, or a model object)
onto `CLIPModel` weight by weight, builds the matching `CLIPProcessor` (a CLIP BPE tokenizer and a
`CLIPImageProcessorPil`), and checks that both give the same embeddings before it returns. Architectures that
`CLIPModel` cannot express exactly are refused with a message naming each feature, rather than converted
approximately: timm or ResNet image towers, Hugging Face text towers, attentional pooling, average pooling instead of
the class token, custom text pooling, QK-norm and the other NormFormer options, layer scale, a logit bias (SigLIP).

What is not identical, by design or by necessity:

- **Padding.** open_clip pads token ids with 0, the HF tokenizer pads with `<|endoftext|>` (as OpenAI's own HF
  tokenizer does) and returns an attention mask. Id 0 is the token `!`; an HF tokenizer whose pad token is `!`
  tokenizes every `!` in a caption as padding once reloaded. Up to and including the first `<|endoftext|>` the ids are
  equal, and the text embedding is pooled there by a causal tower, so the padding value cannot change it.
- **Caption cleaning.** open_clip runs `ftfy.fix_text` and `html.unescape` before tokenizing; the HF tokenizer
  normalises with NFC, collapses whitespace and lowercases. Captions with HTML entities (`&amp;`) or mojibake are
  tokenized differently.
- **Centre crop.** torchvision puts the crop at `round((size - crop) / 2)`, transformers at `(size - crop) // 2`; they
  differ by one pixel when `size - crop` is 3 modulo 4 (for example a 224 crop of a 231-pixel side). Images with
  transparency are composited on white by transformers, while open_clip drops the alpha channel.

open_clip imports torchvision. The torchvision wheels on PyPI are built against PyPI's CUDA torch and fail to import
beside a CPU-only torch ("operator torchvision::nms does not exist"); with such a torch, install the matching
torchvision build from the PyTorch index (`--index-url https://download.pytorch.org/whl/cpu`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import importlib.util
import os
import sys
from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.utils import logging

from ..checkpoints import check_writable_folder
from ..errors import ConfigError, OpenCLIPConversionError
from .open_clip_weights import clip_weight_pairs, open_clip_to_clip

logger = logging.get_logger(__name__)

__all__ = [
    "OpenCLIPConversionError",
    "clip_bpe_tokenizer",
    "clip_bpe_vocab_and_merges",
    "convert_open_clip",
    "default_bpe_path",
    "image_processor_from_preprocess",
    "import_open_clip",
    "main",
    "save_converted",
]

INSTALL_HINT = 'pip install "clip-trainer[open-clip]"'

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# OpenAI's tokenizer keeps the first 49152 - 256 - 2 merges of the file: 256 byte tokens, their 256 end-of-word
# forms, the merges and 2 special tokens make the 49408 ids of every CLIP text tower.
_NUM_MERGES = 49152 - 256 - 2
_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"


def import_open_clip():
    """Imports open_clip, or raises an `ImportError` that says how to install it or why it does not import."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            f"Converting open_clip models needs open_clip ({error}); install it with `{INSTALL_HINT}`."
        ) from None
    except (RuntimeError, OSError) as error:
        # open_clip imports torchvision, whose C++ operators fail to register beside a torch they were not built for.
        raise ImportError(
            f"open_clip is installed but does not import: {error}. open_clip imports torchvision, which must be built "
            f"for the installed torch {torch.__version__}: for a CPU-only torch, install torchvision from "
            "https://download.pytorch.org/whl/cpu."
        ) from None
    return open_clip


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def default_bpe_path() -> str:
    """The CLIP BPE merges file bundled with open_clip, found without importing open_clip (and so torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The CLIP BPE file {_BPE_FILENAME} ships with open_clip; install it with `{INSTALL_HINT}`.")
    return os.path.join(list(spec.submodule_search_locations)[0], _BPE_FILENAME)


def _byte_symbols() -> list[str]:
    """The 256 byte symbols in OpenAI's order: printable Latin-1 bytes as themselves, the others shifted past 255.

    This is GPT-2's byte-to-unicode table, which keeps whitespace and control bytes out of the BPE's symbols; the order
    matters because it assigns the first 256 token ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in set(printable)]
    return [chr(byte) for byte in printable] + [chr(256 + shift) for shift in range(len(others))]


def clip_bpe_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """
    Derives `vocab.json` and `merges.txt` content from OpenAI's `bpe_simple_vocab_16e6.txt.gz`, as OpenAI's tokenizer
    defines them.

    Ids run: the 256 byte symbols, the same with the end-of-word suffix `</w>`, one token per merge (the two parts
    joined) in file order, then `<|startoftext|>` and `<|endoftext|>`.

    Args:
        bpe_path (`str`, *optional*):
            The gzipped merges file; defaults to the one bundled with open_clip.

    Returns:
        `tuple[dict[str, int], list[tuple[str, str]]]`: the vocabulary (49408 tokens) and the 48894 merges by rank.
    """
    bpe_path = bpe_path or default_bpe_path()
    try:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise OpenCLIPConversionError(f"Cannot read the CLIP BPE file {bpe_path}: {error}.") from None
    # The first line is a version header, not a merge.
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(merge) != 2 for merge in merges):
        raise OpenCLIPConversionError(
            f"{bpe_path} is not a CLIP BPE merges file: expected {_NUM_MERGES} lines of two symbols after the header."
        )
    symbols = _byte_symbols()
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols), *("".join(merge) for merge in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_bpe_tokenizer(bpe_path: str | None = None, context_length: int = 77) -> CLIPTokenizer:
    """
    The Hugging Face equivalent of open_clip's default `SimpleTokenizer` (OpenAI's CLIP BPE).

    Call it with `padding="max_length", truncation=True` to get open_clip's fixed-length layout: `<|startoftext|>`,
    the caption's tokens, `<|endoftext|>`, truncated to `context_length` with the end token kept. Padding uses
    `<|endoftext|>` rather than open_clip's 0 (see the module docstring).

    Args:
        bpe_path (`str`, *optional*):
            The gzipped merges file; defaults to the one bundled with open_clip.
        context_length (`int`, *optional*, defaults to 77):
            `model_max_length`: the text tower's number of positions.

    Returns:
        [`CLIPTokenizer`]: the tokenizer (tokenizers-backed, which is `CLIPTokenizerFast` in transformers 5).
    """
    vocab, merges = clip_bpe_vocab_and_merges(bpe_path)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=context_length,
    )


def _check_tokenizer(tokenizer, open_clip) -> None:
    """Refuses open_clip tokenizers that the CLIP BPE tokenizer does not reproduce."""
    from open_clip.tokenizer import SimpleTokenizer, get_clean_fn

    if not isinstance(tokenizer, SimpleTokenizer):
        raise OpenCLIPConversionError(
            f"The tokenizer is a {type(tokenizer).__name__}; only open_clip's SimpleTokenizer (OpenAI's CLIP BPE) is "
            "converted. A model with a Hugging Face tokenizer (hf_tokenizer_name) should use that tokenizer directly."
        )
    problems = []
    if tokenizer.clean_fn is not get_clean_fn("lower"):
        problems.append("caption cleaning other than clean='lower'")
    if tokenizer.reduction_fn is not None:
        problems.append("a reduction_mask (random or shuffled truncation)")
    vocab, merges = clip_bpe_vocab_and_merges()
    # open_clip names the special tokens <start_of_text>/<end_of_text>; HF's CLIP pre-tokenizer expects OpenAI's names.
    expected = {token: index for token, index in vocab.items() if token not in (BOS_TOKEN, EOS_TOKEN)}
    expected.update({"<start_of_text>": vocab[BOS_TOKEN], "<end_of_text>": vocab[EOS_TOKEN]})
    if tokenizer.encoder != expected or tokenizer.bpe_ranks != {merge: rank for rank, merge in enumerate(merges)}:
        problems.append(f"a vocabulary other than open_clip's bundled {_BPE_FILENAME} (or extra special tokens)")
    if problems:
        raise OpenCLIPConversionError(f"Cannot convert the open_clip tokenizer: it uses {'; '.join(problems)}.")


# ----------------------------------------------------------------------------------------------------------------
# Image preprocessing
# ----------------------------------------------------------------------------------------------------------------


def _preprocess_settings(preprocess) -> dict:
    """Reads an open_clip evaluation transform (a torchvision `Compose`) into open_clip's preprocess-config keys."""
    from torchvision import transforms as T

    settings: dict = {}
    for transform in getattr(preprocess, "transforms", [preprocess]):
        name = type(transform).__name__
        if isinstance(transform, T.Resize):
            size = transform.size
            size = [size] if isinstance(size, int) else list(size)
            if transform.max_size is not None:
                raise OpenCLIPConversionError("Cannot convert the preprocessing: Resize with max_size.")
            settings["interpolation"] = transform.interpolation.value
            if len(size) == 1:
                settings.update(resize_mode="shortest", resize=size[0])
            else:
                settings.update(resize_mode="squash", size=tuple(size))
        elif isinstance(transform, T.CenterCrop):
            settings["size"] = tuple(transform.size)
        elif isinstance(transform, T.Normalize):
            settings.update(mean=tuple(transform.mean), std=tuple(transform.std))
        elif isinstance(transform, T.ToTensor) or getattr(transform, "__name__", name) in (
            "MaybeConvertMode",
            "_convert_to_rgb",
        ):
            if getattr(transform, "mode", "RGB") != "RGB":
                raise OpenCLIPConversionError(
                    f"Cannot convert the preprocessing: conversion to mode {transform.mode}."
                )
        else:
            # ResizeKeepRatio and CenterCropOrPad are open_clip's 'longest' and non-square modes; random crops and
            # colour jitter are training transforms.
            raise OpenCLIPConversionError(
                f"Cannot convert the preprocessing step {name}: only Resize (shortest edge or both sides), CenterCrop, "
                "RGB conversion, ToTensor and Normalize map onto CLIPImageProcessorPil; pass the evaluation transform."
            )
    return settings


def image_processor_from_preprocess(preprocess=None, preprocess_cfg: dict | None = None) -> CLIPImageProcessorPil:
    """
    The `CLIPImageProcessorPil` equivalent of an open_clip evaluation transform.

    open_clip's default evaluation transform (resize the shortest edge, centre crop, RGB, scale to [0, 1], normalise)
    and its `resize_mode="squash"` map exactly; `resize_mode="longest"` (which pads), non-square crops and training
    transforms are refused.

    Args:
        preprocess (`torchvision.transforms.Compose`, *optional*):
            The transform, as returned by `open_clip.create_model_and_transforms` (the second, evaluation one).
        preprocess_cfg (`dict`, *optional*):
            Used when `preprocess` is not given: open_clip's preprocess config (`size`, `mean`, `std`,
            `interpolation`, `resize_mode`), for example `open_clip.get_model_preprocess_cfg(model)`.

    Returns:
        [`CLIPImageProcessorPil`]: the PIL-backed processor (the torchvision-backed one would need torchvision).
    """
    if preprocess is not None:
        settings = _preprocess_settings(preprocess)
    elif preprocess_cfg is not None:
        # open_clip's own defaults (PreprocessCfg) for what a model's config leaves out.
        settings = {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, **preprocess_cfg}
    else:
        raise ValueError("Pass `preprocess` (an open_clip evaluation transform) or `preprocess_cfg`.")
    mode = settings.get("resize_mode", "shortest")
    size = settings.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    interpolation = settings.get("interpolation", "bicubic")
    resamples = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}
    if interpolation not in resamples:
        raise OpenCLIPConversionError(f"Cannot convert the preprocessing: interpolation {interpolation!r}.")
    if "mean" not in settings or "std" not in settings:
        raise OpenCLIPConversionError("Cannot convert the preprocessing: it has no Normalize step (mean and std).")
    common = {
        "resample": resamples[interpolation],
        "image_mean": [float(value) for value in settings["mean"]],
        "image_std": [float(value) for value in settings["std"]],
    }
    if mode == "squash":
        return CLIPImageProcessorPil(size={"height": height, "width": width}, do_center_crop=False, **common)
    if mode != "shortest" or height != width:
        raise OpenCLIPConversionError(
            f"Cannot convert the preprocessing: resize_mode={mode!r} with size {size}; CLIPImageProcessorPil resizes "
            "the shortest edge then centre-crops a square, or squashes to a size."
        )
    # A Compose may resize to a side other than the crop; a preprocess config always resizes to the crop size.
    shortest = settings.get("resize", height)
    return CLIPImageProcessorPil(
        size={"shortest_edge": shortest}, crop_size={"height": height, "width": width}, do_center_crop=True, **common
    )


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def _activation_name(module: nn.Module, open_clip) -> str | None:
    if isinstance(module, open_clip.transformer.QuickGELU):
        return "quick_gelu"
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(module.approximate)
    return None


def _block_problems(block: nn.Module) -> list[str]:
    """What in one open_clip transformer block `CLIPEncoderLayer` cannot express."""
    problems = []
    name = type(block).__name__
    attn = getattr(block, "attn", None)
    if name == "ResidualAttentionBlock":
        if hasattr(block, "ln_1_kv"):
            problems.append("cross-attention blocks")
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn or not attn.batch_first:
            problems.append("attention with separate key/value sizes, extra key/value biases or zero attention")
    elif name == "CustomResidualAttentionBlock":
        for flag, present in (
            ("qk_norm", not isinstance(attn.ln_q, nn.Identity)),
            ("scaled_cosine_attn", attn.logit_scale is not None),
            ("scale_heads", attn.head_scale is not None),
            ("scale_attn_inner", not isinstance(attn.ln_inner, nn.Identity)),
            ("scale_attn", not isinstance(block.ln_attn, nn.Identity)),
            ("scale_fc", not isinstance(block.mlp.ln, nn.Identity)),
        ):
            if present:
                problems.append(f"{flag}=True")
    else:
        return [f"transformer blocks of type {name}"]
    if attn.in_proj_bias is None or attn.out_proj.bias is None:
        problems.append("attention without biases")
    if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
        problems.append("layer scale (ls_init_value)")
    return problems


def _tower_settings(tower: str, blocks: Sequence[nn.Module], norms: Sequence[nn.Module], open_clip, problems) -> dict:
    """The `CLIP{Text,Vision}Config` fields that describe a stack of blocks, or problems appended to `problems`."""
    for block in blocks:
        problems.extend(f"{tower}: {problem}" for problem in _block_problems(block))
    activations = {_activation_name(block.mlp.gelu, open_clip) for block in blocks if hasattr(block, "mlp")}
    if None in activations or len(activations) != 1:
        names = sorted({type(block.mlp.gelu).__name__ for block in blocks})
        problems.append(f"{tower}: activation {', '.join(names)} (only GELU, tanh GELU and QuickGELU map)")
    norms = [*norms, *(norm for block in blocks for norm in (block.ln_1, block.ln_2))]
    if not all(isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None for norm in norms):
        problems.append(f"{tower}: normalisation layers other than LayerNorm with weight and bias")
    eps = {norm.eps for norm in norms if isinstance(norm, nn.LayerNorm)}
    if len(eps) > 1:
        problems.append(f"{tower}: LayerNorms with different eps {sorted(eps)}")
    if problems:
        return {}
    first = blocks[0]
    return {
        "hidden_size": first.ln_1.normalized_shape[0],
        "intermediate_size": first.mlp.c_fc.out_features,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": first.attn.num_heads,
        "hidden_act": activations.pop(),
        "layer_norm_eps": eps.pop(),
    }


def _text_parts(model: nn.Module, open_clip, problems: list[str]) -> dict | None:
    """The text tower's modules, wherever the model class keeps them, or problems appended to `problems`."""
    if isinstance(model, open_clip.CustomTextCLIP):
        text = model.text
        if not isinstance(text, open_clip.transformer.TextTransformer):
            problems.append(f"text: a {type(text).__name__} text tower (a Hugging Face text model, hf_model_name)")
            return None
        if text.cls_emb is not None:
            problems.append("text: a class token appended to the text (embed_cls)")
        if getattr(text, "use_pad_mask", False):
            problems.append("text: bidirectional attention with a padding mask")
        parts = {name: getattr(text, name) for name in ("token_embedding", "positional_embedding", "transformer")}
        parts.update(ln_final=text.ln_final, projection=text.text_projection, attn_mask=text.attn_mask)
        parts.update(pool_type=text.pool_type, eos_id=text.eos_id)
        return parts
    parts = {name: getattr(model, name) for name in ("token_embedding", "positional_embedding", "transformer")}
    parts.update(ln_final=model.ln_final, projection=model.text_projection, attn_mask=model.attn_mask)
    parts.update(pool_type=model.text_pool_type, eos_id=getattr(model, "text_eos_id", None))
    return parts


def _check_text_pooling(parts: dict, eos_id: int, vocab_size: int, problems: list[str]) -> None:
    """`CLIPTextTransformer` pools at the first `eos_token_id`; refuse open_clip poolings that differ from it."""
    pool_type = parts["pool_type"]
    if pool_type == "argmax":
        # argmax of the ids finds the first eos only when eos is the highest id a caption can contain.
        if eos_id != vocab_size - 1:
            problems.append(f"text: argmax pooling with {vocab_size} tokens but <|endoftext|> = {eos_id} not the last")
    elif pool_type == "eos":
        if parts["eos_id"] != eos_id:
            problems.append(
                f"text: eos pooling at token {parts['eos_id']} while the tokenizer ends text with {eos_id}"
            )
    else:
        problems.append(f"text: pool_type={pool_type!r} (CLIPModel pools at the end-of-text token)")


def _model_problems_and_config(
    model: nn.Module, open_clip, bos_id: int, eos_id: int
) -> tuple[list[str], CLIPConfig | None]:
    problems: list[str] = []
    if type(model) not in (open_clip.CLIP, open_clip.CustomTextCLIP):
        return [f"model class {type(model).__name__} (only CLIP and CustomTextCLIP; CoCa has a text decoder)"], None
    if getattr(model, "logit_bias", None) is not None:
        problems.append("a logit bias (init_logit_bias: SigLIP's sigmoid loss, which CLIPModel does not have)")

    visual = model.visual
    vision = {}
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        kind = {"TimmModel": "a timm image tower (timm_model_name)", "ModifiedResNet": "a ResNet image tower"}
        problems.append(f"vision: {kind.get(type(visual).__name__, f'a {type(visual).__name__} image tower')}")
    else:
        if visual.attn_pool is not None:
            problems.append("vision: attentional pooling (attentional_pool)")
        elif visual.pool_type != "tok":
            problems.append(f"vision: pool_type={visual.pool_type!r} (CLIPModel pools the class token)")
        if isinstance(visual.ln_pre, nn.Identity):
            problems.append("vision: no LayerNorm before the transformer (no_ln_pre)")
        if visual.proj is None:
            problems.append("vision: no image projection")
        if len(set(visual.image_size)) != 1 or len(set(visual.patch_size)) != 1:
            problems.append(f"vision: non-square image {visual.image_size} or patch {visual.patch_size} size")
        if visual.conv1.bias is not None:
            problems.append("vision: a patch embedding with bias")
        vision = _tower_settings(
            "vision", visual.transformer.resblocks, [visual.ln_pre, visual.ln_post], open_clip, problems
        )

    text = {}
    parts = _text_parts(model, open_clip, problems)
    if parts is not None:
        projection = parts["projection"]
        if projection is None:
            problems.append("text: no text projection (proj_type='none')")
        elif isinstance(projection, nn.Linear) and projection.bias is not None:
            problems.append("text: a text projection with bias (proj_bias)")
        num_positions = parts["positional_embedding"].shape[0]
        mask = parts["attn_mask"]
        causal = torch.full((num_positions, num_positions), float("-inf")).triu(1)
        if mask is None or mask.shape != causal.shape or not torch.equal(mask.cpu().float(), causal):
            problems.append("text: attention that is not causal (no_causal_mask)")
        vocab_size = parts["token_embedding"].num_embeddings
        _check_text_pooling(parts, eos_id, vocab_size, problems)
        text = _tower_settings("text", parts["transformer"].resblocks, [parts["ln_final"]], open_clip, problems)
        text.update(vocab_size=vocab_size, max_position_embeddings=num_positions)

    if problems:
        return problems, None
    projection_dim = visual.proj.shape[1]
    text_projection_dim = parts["projection"].shape[1] if isinstance(parts["projection"], torch.Tensor) else None
    if isinstance(parts["projection"], nn.Linear):
        text_projection_dim = parts["projection"].out_features
    if text_projection_dim != projection_dim:
        return [f"image and text projections of different sizes ({projection_dim}, {text_projection_dim})"], None
    config = CLIPConfig(
        # projection_dim in the tower configs too, for CLIPTextModelWithProjection / CLIPVisionModelWithProjection.
        text_config={
            **text,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": eos_id,
            "projection_dim": projection_dim,
        },
        vision_config={
            **vision,
            "image_size": visual.image_size[0],
            "patch_size": visual.patch_size[0],
            "projection_dim": projection_dim,
        },
        projection_dim=projection_dim,
        logit_scale_init_value=float(model.logit_scale.detach().reshape(())),
    )
    return [], config


def _clip_state_dict(model: nn.Module, open_clip) -> dict[str, torch.Tensor]:
    """open_clip's weights under `CLIPModel`'s names (the table in `open_clip_weights`); every tensor is a float32
    copy."""
    parts = _text_parts(model, open_clip, [])
    pairs = clip_weight_pairs(
        len(model.visual.transformer.resblocks),
        len(parts["transformer"].resblocks),
        text_prefix="text." if isinstance(model, open_clip.CustomTextCLIP) else "",
        linear_text_projection=isinstance(parts["projection"], nn.Linear),
    )
    state = open_clip_to_clip(model.state_dict(), pairs)
    return {key: value.detach().to(torch.float32).contiguous().clone() for key, value in state.items()}


def _check_embeddings(model: nn.Module, clip_model: CLIPModel, input_ids: torch.Tensor, atol: float) -> None:
    """Both models embed random pixels and `input_ids` alike, within `atol`, or the conversion is refused."""
    # The check runs in float32 and eval mode; a half-precision model is compared through a float32 copy.
    half = any(parameter.dtype != torch.float32 for parameter in model.parameters())
    reference = copy.deepcopy(model).float() if half else model
    was_training = reference.training
    reference.eval()
    clip_model.eval()
    side = clip_model.config.vision_config.image_size
    pixel_values = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            image_diff = (
                reference.encode_image(pixel_values) - clip_model.get_image_features(pixel_values).pooler_output
            )
            text_diff = reference.encode_text(input_ids) - clip_model.get_text_features(input_ids).pooler_output
    finally:
        reference.train(was_training)
    differences = {"image": image_diff.abs().max().item(), "text": text_diff.abs().max().item()}
    # `not <=` so that a NaN difference fails too.
    failed = {tower: value for tower, value in differences.items() if not value <= atol}
    if failed:
        details = ", ".join(f"{tower} embeddings differ by up to {value:.3g}" for tower, value in failed.items())
        raise OpenCLIPConversionError(f"The converted model does not reproduce open_clip: {details} (atol={atol}).")
    logger.info(f"Converted model matches open_clip: max abs difference {differences} (atol={atol}).")


def convert_open_clip(
    model_name: str | None = None,
    checkpoint: str | None = None,
    model: nn.Module | None = None,
    preprocess=None,
    tokenizer=None,
    force_quick_gelu: bool = False,
    check: bool = True,
    atol: float = 1e-4,
) -> tuple[CLIPModel, CLIPProcessor]:
    """
    Converts an open_clip ViT into a `transformers.CLIPModel` and a `CLIPProcessor` that embed exactly alike.

    Either give `model_name` and `checkpoint` (open_clip builds and loads the model with its own loader, which reads
    `.pt`, `.bin` and `.safetensors` files with or without a `state_dict` wrapper), or an open_clip `model` object.
    The activation is read from the built model, so QuickGELU models become `hidden_act="quick_gelu"`; a checkpoint
    trained with QuickGELU under a model name without `-quickgelu` needs `force_quick_gelu=True`, exactly as open_clip
    itself does (the weights load either way, but the embeddings differ).

    Args:
        model_name (`str`, *optional*):
            An open_clip model name (`"ViT-B-32"`, a name registered with `open_clip.add_model_config`, or
            `"local-dir:/path"`). Also picks the tokenizer when `tokenizer` is not given.
        checkpoint (`str`, *optional*):
            A checkpoint file, or an open_clip pretrained tag (downloaded by open_clip). Required with `model_name`
            unless `model` is given or the name is a `local-dir:` folder holding its weights.
        model (`torch.nn.Module`, *optional*):
            An open_clip `CLIP` or `CustomTextCLIP` model, used instead of building one.
        preprocess (`torchvision.transforms.Compose`, *optional*):
            open_clip's evaluation transform; defaults to the model's own preprocess config.
        tokenizer (*optional*):
            open_clip's tokenizer; defaults to `open_clip.get_tokenizer(model_name)`.
        force_quick_gelu (`bool`, *optional*, defaults to `False`):
            Passed to `open_clip.create_model` when the model is built here.
        check (`bool`, *optional*, defaults to `True`):
            Compare both models' image and text embeddings on random pixels and tokenized captions before returning.
        atol (`float`, *optional*, defaults to 1e-4):
            Largest absolute difference in any embedding component that the check accepts.

    Returns:
        `tuple[CLIPModel, CLIPProcessor]`: the float32 model in eval mode, and the processor to save beside it.

    Raises:
        [`OpenCLIPConversionError`]: naming every feature of the model, tokenizer or preprocessing that `CLIPModel` and
        `CLIPProcessor` cannot reproduce exactly, or if the check fails.
        `ImportError`: if open_clip is not installed or does not import.
    """
    open_clip = import_open_clip()
    if model is None:
        if not model_name:
            raise ValueError("Pass `model_name` (with `checkpoint`) or an open_clip `model`.")
        if checkpoint is None and not model_name.startswith("local-dir:"):
            raise ValueError(
                f"No weights for {model_name!r}: pass `checkpoint` (a checkpoint file or a pretrained tag)."
            )
        looks_like_path = checkpoint is not None and (os.sep in checkpoint or os.path.splitext(checkpoint)[1])
        if looks_like_path and not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"Checkpoint {checkpoint} does not exist.")
        try:
            model = open_clip.create_model(model_name, pretrained=checkpoint, force_quick_gelu=force_quick_gelu)
        except RuntimeError as error:
            # open_clip reports unknown names and tags, and weights that do not fit the architecture, this way.
            raise OpenCLIPConversionError(
                f"open_clip cannot build {model_name!r} from {checkpoint}: {error}"
            ) from None
    if isinstance(model, torch.jit.ScriptModule):
        raise OpenCLIPConversionError("The model is TorchScript (jit=True); convert the eager open_clip model.")

    if tokenizer is None:
        context_length = getattr(model, "context_length", None)
        tokenizer = open_clip.get_tokenizer(model_name or "", context_length=context_length)
    _check_tokenizer(tokenizer, open_clip)
    eos_id = tokenizer.eot_token_id

    problems, config = _model_problems_and_config(model, open_clip, tokenizer.sot_token_id, eos_id)
    if problems:
        listed = "; ".join(dict.fromkeys(problems))
        raise OpenCLIPConversionError(f"Cannot convert {model_name or type(model).__name__} to CLIPModel: {listed}.")

    hf_tokenizer = clip_bpe_tokenizer(context_length=config.text_config.max_position_embeddings)
    if preprocess is not None:
        image_processor = image_processor_from_preprocess(preprocess)
    else:
        image_processor = image_processor_from_preprocess(preprocess_cfg=open_clip.get_model_preprocess_cfg(model))
    crop = image_processor.crop_size if image_processor.do_center_crop else image_processor.size
    side = config.vision_config.image_size
    if (crop["height"], crop["width"]) != (side, side):
        raise OpenCLIPConversionError(
            f"The preprocessing makes {crop['height']}x{crop['width']} images but the image tower takes {side}x{side}."
        )

    clip_model = CLIPModel(config)
    clip_model.load_state_dict(_clip_state_dict(model, open_clip), strict=True)
    clip_model.eval()
    if check:
        captions = ["a photo of a cat.", "A diagram of the CLIP architecture, drawn by hand!", "x " * 100]
        _check_embeddings(model, clip_model, tokenizer(captions), atol)
    return clip_model, CLIPProcessor(image_processor=image_processor, tokenizer=hf_tokenizer)


def save_converted(clip_model: CLIPModel, processor: CLIPProcessor, output_dir: str) -> str:
    """
    Writes a converted model and its processor into one folder, ready for `run_clip.py --model_name_or_path`.

    Args:
        clip_model ([`CLIPModel`]): the converted model.
        processor ([`CLIPProcessor`]): its tokenizer and image processor.
        output_dir (`str`): folder to write into; created if missing.

    Returns:
        `str`: `output_dir`.
    """
    os.makedirs(output_dir, exist_ok=True)
    clip_model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert an open_clip ViT checkpoint into a transformers CLIPModel folder (weights, config, "
        "tokenizer and image processor), checking that both give the same embeddings.",
    )
    parser.add_argument("model_name", help="open_clip model name, e.g. ViT-B-32, or local-dir:/path/to/folder.")
    parser.add_argument("--checkpoint", help="checkpoint file (.pt, .bin, .safetensors) or open_clip pretrained tag.")
    parser.add_argument("--output_dir", required=True, help="folder to write the CLIPModel and processor into.")
    parser.add_argument(
        "--force_quick_gelu",
        action="store_true",
        help="build the model with QuickGELU, for checkpoints trained with it under a name without -quickgelu.",
    )
    parser.add_argument("--no_check", action="store_true", help="skip comparing the embeddings of both models.")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Command line: `clip-trainer import-open-clip MODEL_NAME --checkpoint FILE --output_dir DIR`."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    made = not os.path.isdir(args.output_dir)
    try:
        check_writable_folder(args.output_dir)  # before the conversion, as training checks its output_dir
        clip_model, processor = convert_open_clip(
            args.model_name, args.checkpoint, force_quick_gelu=args.force_quick_gelu, check=not args.no_check
        )
    except (ConfigError, OpenCLIPConversionError, ImportError, FileNotFoundError, ValueError) as error:
        if made and os.path.isdir(args.output_dir):
            with contextlib.suppress(OSError):  # the folder the check made, if still empty; nothing else
                os.rmdir(args.output_dir)
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    save_converted(clip_model, processor, args.output_dir)
    print(f"Wrote the converted CLIPModel and its processor to {args.output_dir}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
