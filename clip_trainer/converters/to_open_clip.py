"""Writing a `transformers.CLIPModel` folder as open_clip files, the reverse of [`from_open_clip`].

[`save_open_clip`] writes `open_clip_config.json` (open_clip's `model_cfg` and `preprocess_cfg`) and
`open_clip_model.safetensors` (the weights under open_clip's names, mapped by the same table the import uses) beside
the Hugging Face files, so that `open_clip.create_model_and_transforms("local-dir:FOLDER")` and
`open_clip.get_tokenizer("local-dir:FOLDER")` build the same model with the folder's own tokenizer and image
preprocessing. Writing needs only torch and safetensors; open_clip is imported only to check the files, when it is
installed.

Only CLIP maps exactly. The other families are refused by name ([`open_clip_export_problem`]): open_clip builds
SigLIP's image tower (no class token, a patch embedding with a bias, a multi-head attention pooling head with its own
MLP) only as one of timm's named architectures, whose sizes are fixed; SigLIP 2's NaFlex inputs and a dual encoder's
arbitrary towers have no open_clip counterpart at all.

The text side uses open_clip's `HFTokenizer` (`hf_tokenizer_name` in `text_cfg`), which a `local-dir:` load reads from
the folder itself, so any tokenizer the model was trained with (OpenAI's BPE or a byte-level BPE trained on captions)
gives the same ids. What is not identical, by necessity (as for the import):

- **Caption cleaning.** open_clip runs `ftfy.fix_text` (which also straightens curly quotes: `o’clock` becomes
  `o'clock`), `html.unescape` and collapses runs of whitespace before the tokenizer sees a caption. Captions with
  typographic quotes, HTML entities (`&amp;`) or mojibake are tokenized differently; so are runs of spaces with a
  byte-level BPE (clip-trainer's own tokenizer), while CLIP's BPE collapses them itself.
- **Image preprocessing.** open_clip resizes with torchvision; its centre crop sits at `round((size - crop) / 2)`,
  transformers' at `(size - crop) // 2`: one pixel apart when `size - crop` is 3 modulo 4.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import sys
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel
from transformers.image_utils import PILImageResampling
from transformers.utils import logging

from ..arguments import describe_load_error
from ..checkpoints import share_saved_weights
from ..errors import ConfigError, OpenCLIPConversionError
from .open_clip_weights import clip_to_open_clip, clip_weight_pairs

logger = logging.get_logger(__name__)

__all__ = [
    "OPEN_CLIP_CONFIG_NAME",
    "OPEN_CLIP_WEIGHTS_NAME",
    "check_if_open_clip_imports",
    "check_open_clip_files",
    "export_open_clip",
    "main",
    "open_clip_config",
    "open_clip_export_problem",
    "open_clip_preprocess_config",
    "open_clip_state_dict",
    "save_open_clip",
]

# The names open_clip looks for in a `local-dir:` folder or an `hf-hub:` repository (open_clip.constants).
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"

# The families clip-trainer trains that open_clip cannot build exactly, and why.
_UNMAPPED_FAMILIES = {
    "siglip": "SigLIP (open_clip builds SigLIP's image tower, with its attention-pooling head, only as one of timm's "
    "named architectures of fixed sizes, so it has no exact open_clip form)",
    "siglip2": "SigLIP 2 (NaFlex inputs, a varying number of patches per image, which open_clip does not take)",
    "vision-text-dual-encoder": "a vision-text dual encoder (its towers are any transformers models, which "
    "open_clip's towers do not reproduce)",
}

# hidden_act -> open_clip's activation: QuickGELU (the model-wide `quick_gelu`) or nn.GELU with these keywords.
_QUICK_GELU = "quick_gelu"
_GELU_KWARGS: dict[str, dict[str, str] | None] = {
    "gelu": None,
    "gelu_pytorch_tanh": {"approximate": "tanh"},
    # transformers' NewGELUActivation computes the same tanh approximation by hand.
    "gelu_new": {"approximate": "tanh"},
}
_INTERPOLATIONS = {PILImageResampling.BICUBIC: "bicubic", PILImageResampling.BILINEAR: "bilinear"}


def _family_name(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    return _UNMAPPED_FAMILIES.get(model_type, f"model_type {model_type!r}")


def _config_problems(config: CLIPConfig) -> list[str]:
    """What in a CLIP config open_clip's `CLIP` cannot express."""
    problems = []
    vision, text = config.vision_config, config.text_config
    if vision.num_channels != 3:
        problems.append(f"{vision.num_channels} image channels (open_clip takes RGB)")
    acts = {"vision": vision.hidden_act, "text": text.hidden_act}
    for tower, act in acts.items():
        if act != _QUICK_GELU and act not in _GELU_KWARGS:
            problems.append(f"{tower} hidden_act {act!r} (open_clip has GELU, tanh GELU and QuickGELU)")
    if (acts["vision"] == _QUICK_GELU) != (acts["text"] == _QUICK_GELU):
        problems.append(
            f"hidden_act {acts['vision']!r} in the image tower but {acts['text']!r} in the text tower (open_clip's "
            "quick_gelu sets both)"
        )
    return problems


def open_clip_export_problem(config: Any) -> str | None:
    """
    Why a model cannot be written as open_clip files, in a few words, or `None` when it can.

    Args:
        config (`PretrainedConfig`): the model's config.

    Returns:
        `str | None`: the family (or the CLIP settings) open_clip cannot build exactly.
    """
    if getattr(config, "model_type", None) != "clip":
        return f"open_clip files are written for CLIP models only, and this is {_family_name(config)}"
    problems = _config_problems(config)
    return f"open_clip cannot build this CLIP exactly: it has {'; '.join(problems)}" if problems else None


def _mlp_ratio(width: int, intermediate: int) -> float:
    """The `mlp_ratio` for which open_clip's `int(width * mlp_ratio)` gives `intermediate` back."""
    ratio = intermediate / width
    # A ratio such as 8192 / 1664 can come back as 8191.999...; the next float up rounds down to the size itself.
    while int(width * ratio) < intermediate:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _tower_config(tower: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "width": tower.hidden_size,
        "layers": tower.num_hidden_layers,
        "mlp_ratio": _mlp_ratio(tower.hidden_size, tower.intermediate_size),
        "norm_kwargs": {"eps": tower.layer_norm_eps},
    }
    if tower.hidden_act != _QUICK_GELU and _GELU_KWARGS[tower.hidden_act] is not None:
        settings["act_kwargs"] = _GELU_KWARGS[tower.hidden_act]
    return settings


def open_clip_config(config: CLIPConfig, hf_tokenizer_name: str) -> dict[str, Any]:
    """
    open_clip's `model_cfg` for a CLIP config.

    Args:
        config ([`CLIPConfig`]): the model's config.
        hf_tokenizer_name (`str`):
            Written as `text_cfg.hf_tokenizer_name`: a `local-dir:` load reads the tokenizer from the folder whatever
            it says, an `hf-hub:` load from the Hub repository it names.

    Returns:
        `dict`: `embed_dim`, `quick_gelu`, `vision_cfg` and `text_cfg`.

    Raises:
        [`ConfigError`]: naming the family or setting open_clip cannot build exactly.
    """
    problem = open_clip_export_problem(config)
    if problem:
        raise ConfigError(f"{problem}.")
    vision, text = config.vision_config, config.text_config
    text_cfg: dict[str, Any] = {
        "context_length": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        "heads": text.num_attention_heads,
        **_tower_config(text),
        "hf_tokenizer_name": hf_tokenizer_name,
    }
    # `CLIPTextTransformer` pools at the highest id when eos_token_id is 2 (OpenAI's first checkpoints), else at the
    # first eos token: open_clip's "argmax" and "eos" pooling.
    if text.eos_token_id == 2:
        text_cfg["pool_type"] = "argmax"
    else:
        text_cfg.update(pool_type="eos", eos_id=text.eos_token_id)
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": vision.hidden_act == _QUICK_GELU,
        "vision_cfg": {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "head_width": vision.hidden_size // vision.num_attention_heads,
            **_tower_config(vision),
        },
        "text_cfg": text_cfg,
    }


def _side(size: dict | None, key: str) -> int | None:
    return None if not size else size.get(key)


def open_clip_preprocess_config(image_processor: Any, image_size: int | None = None) -> dict[str, Any]:
    """
    open_clip's `preprocess_cfg` for a CLIP image processor.

    Resizing the shortest edge to the crop size and centre-cropping is open_clip's `resize_mode="shortest"`, resizing
    to a fixed height and width its `"squash"`; a resize to another side than the crop (256 then 224) has no
    open_clip form and is refused, as are resampling filters other than bicubic and bilinear.

    Args:
        image_processor (`BaseImageProcessor`): the model's image processor (PIL- or torchvision-backed).
        image_size (`int`, *optional*): the image tower's side, which the processed images must have.

    Returns:
        `dict`: `size`, `mode`, `mean`, `std`, `interpolation`, `resize_mode` and `fill_color`.

    Raises:
        [`ConfigError`]: naming the setting open_clip cannot follow.
    """
    name = type(image_processor).__name__

    def refuse(what: str) -> ConfigError:
        return ConfigError(f"open_clip cannot reproduce the image processor ({name}): {what}.")

    if not getattr(image_processor, "do_resize", False):
        raise refuse("it does not resize (open_clip always resizes to the model's size)")
    size, crop = getattr(image_processor, "size", None) or {}, getattr(image_processor, "crop_size", None) or {}
    do_crop = bool(getattr(image_processor, "do_center_crop", False))
    shortest = _side(size, "shortest_edge")
    if shortest is not None and do_crop and shortest == crop.get("height") == crop.get("width"):
        resize_mode, side = "shortest", (shortest, shortest)
    elif size.get("height") is not None and size.get("width") is not None and (not do_crop or crop == size):
        resize_mode, side = "squash", (size["height"], size["width"])
    else:
        raise refuse(
            f"size {dict(size)}, crop_size {dict(crop) if do_crop else None}; open_clip resizes the shortest edge to "
            "the crop size then centre-crops, or resizes to a height and width"
        )
    if image_size is not None and side != (image_size, image_size):
        raise refuse(f"it makes {side[0]}x{side[1]} images but the image tower takes {image_size}x{image_size}")
    resample = getattr(image_processor, "resample", None)
    try:
        interpolation = _INTERPOLATIONS[PILImageResampling(resample)]
    except (KeyError, ValueError):
        raise refuse(f"resample {resample!r} (open_clip resizes with bicubic or bilinear)") from None
    rescale = (
        getattr(image_processor, "rescale_factor", 1 / 255) if getattr(image_processor, "do_rescale", True) else 1
    )
    if not math.isclose(rescale, 1 / 255):
        raise refuse(f"rescale_factor {rescale} (open_clip scales pixels to [0, 1])")
    if getattr(image_processor, "do_normalize", True):
        mean = [float(value) for value in image_processor.image_mean]
        std = [float(value) for value in image_processor.image_std]
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return {
        "size": side[0] if side[0] == side[1] else list(side),
        "mode": "RGB",
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "resize_mode": resize_mode,
        "fill_color": 0,
    }


def open_clip_state_dict(model: CLIPModel) -> dict[str, torch.Tensor]:
    """
    A `CLIPModel`'s weights under open_clip's names (the table of [`clip_weight_pairs`]), on the CPU, in the model's
    dtype.

    Raises:
        [`ConfigError`]: if the model has weights that open_clip's `CLIP` has no place for.
    """
    config = model.config
    pairs = clip_weight_pairs(config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers)
    mapped = {name for pair in pairs for name in pair.clip}
    unmapped = sorted(name for name, _ in model.named_parameters() if name not in mapped)
    if unmapped:
        raise ConfigError(
            f"The model has weights open_clip's CLIP has no place for: {', '.join(unmapped[:5])}"
            f"{' ...' if len(unmapped) > 5 else ''} (a LoRA model must be merged first)."
        )
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items() if name in mapped}
    return clip_to_open_clip(state, pairs)


def save_open_clip(
    model: CLIPModel,
    image_processor: Any,
    folder: str,
    hf_tokenizer_name: str | None = None,
) -> dict[str, str]:
    """
    Writes `open_clip_config.json` and `open_clip_model.safetensors` into `folder`, which must hold (or will hold) the
    model's tokenizer files: open_clip's `local-dir:` loader reads the tokenizer from there.

    Args:
        model ([`CLIPModel`]): the model (merged, if it was trained with LoRA).
        image_processor (`BaseImageProcessor`): its image processor, or a processor that has one.
        folder (`str`): the folder; created if missing.
        hf_tokenizer_name (`str`, *optional*):
            The Hub repository holding the tokenizer, for `hf-hub:` loads once the folder is uploaded; defaults to
            the folder's name (a `local-dir:` load reads the folder's own tokenizer whatever this says).

    Returns:
        `dict[str, str]`: the paths of the `config` and `weights` files.

    Raises:
        [`ConfigError`]: naming what open_clip cannot build exactly.
    """
    from safetensors.torch import save_file

    image_processor = getattr(image_processor, "image_processor", image_processor)
    hf_tokenizer_name = hf_tokenizer_name or os.path.basename(os.path.abspath(folder))
    model_cfg = open_clip_config(model.config, hf_tokenizer_name)
    preprocess_cfg = open_clip_preprocess_config(image_processor, model.config.vision_config.image_size)
    state = open_clip_state_dict(model)
    os.makedirs(folder, exist_ok=True)
    paths = {
        "config": os.path.join(folder, OPEN_CLIP_CONFIG_NAME),
        "weights": os.path.join(folder, OPEN_CLIP_WEIGHTS_NAME),
    }
    save_file(state, paths["weights"], metadata={"format": "pt"})
    share_saved_weights(paths["weights"])
    with open(paths["config"], "w", encoding="utf-8") as handle:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, handle, indent=2)
        handle.write("\n")
    logger.info(f"Wrote {paths['config']} and {paths['weights']}.")
    return paths


CHECK_CAPTIONS = ["a photo of a cat.", "A diagram of the CLIP architecture, drawn by hand!", "x " * 100]


def check_open_clip_files(folder: str, model: CLIPModel, atol: float = 1e-4) -> dict[str, float]:
    """
    Loads `folder` with open_clip (`local-dir:`) and compares its image and text embeddings with `model`'s, on random
    pixels and on captions tokenized by open_clip's tokenizer for the folder.

    Returns:
        `dict[str, float]`: the largest absolute difference of the `image` and `text` embeddings.

    Raises:
        [`OpenCLIPConversionError`]: if either differs by more than `atol` (or is NaN).
        `ImportError`: if open_clip is not installed or does not import.
    """
    from .from_open_clip import import_open_clip

    open_clip = import_open_clip()
    name = f"local-dir:{folder}"
    loaded = open_clip.create_model(name).eval()
    tokenizer = open_clip.get_tokenizer(name)
    on_cpu = all(parameter.device.type == "cpu" for parameter in model.parameters())
    as_float = all(parameter.dtype == torch.float32 for parameter in model.parameters())
    reference = model if on_cpu and as_float else copy.deepcopy(model).float().cpu()
    was_training = reference.training
    reference.eval()
    side = model.config.vision_config.image_size
    pixel_values = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    input_ids = tokenizer(CHECK_CAPTIONS)
    try:
        with torch.no_grad():
            image = loaded.encode_image(pixel_values) - reference.get_image_features(pixel_values).pooler_output
            # The ids open_clip's HFTokenizer makes are the folder tokenizer's, padded to the text positions; the
            # causal text tower pools at the end-of-text token, before any padding.
            text = loaded.encode_text(input_ids) - reference.get_text_features(input_ids=input_ids).pooler_output
    finally:
        reference.train(was_training)
    differences = {"image": image.abs().max().item(), "text": text.abs().max().item()}
    failed = {tower: value for tower, value in differences.items() if not value <= atol}  # NaN fails too
    if failed:
        details = ", ".join(f"{tower} embeddings differ by up to {value:.3g}" for tower, value in failed.items())
        raise OpenCLIPConversionError(f"The open_clip files in {folder} do not reproduce the model: {details}.")
    return differences


def check_if_open_clip_imports(folder: str, model: CLIPModel, atol: float = 1e-4) -> dict[str, float] | None:
    """[`check_open_clip_files`] where open_clip is installed and imports; `None` (and a log line) where it does not,
    since the files need no open_clip to be written (and a broken torchvision must not fail a finished run)."""
    if importlib.util.find_spec("open_clip") is None:
        logger.info("open_clip is not installed: the open_clip files are written but not loaded back to compare.")
        return None
    try:
        return check_open_clip_files(folder, model, atol)
    except ImportError as error:
        logger.warning(f"The open_clip files are written but not checked: {error}")
        return None


def export_open_clip(
    model_dir: str, hf_tokenizer_name: str | None = None, check: bool = True, atol: float = 1e-4
) -> dict[str, Any]:
    """
    Writes open_clip files beside the Hugging Face files of a CLIP model folder.

    Args:
        model_dir (`str`): a folder `CLIPModel.from_pretrained` loads, with its tokenizer and image processor.
        hf_tokenizer_name (`str`, *optional*): see [`save_open_clip`].
        check (`bool`, *optional*, defaults to `True`):
            When open_clip is installed, load the files with it and compare the embeddings ([`check_open_clip_files`]).
        atol (`float`, *optional*, defaults to 1e-4): the largest difference the check accepts.

    Returns:
        `dict`: the written `config` and `weights` paths, and `max_abs_diff` when checked.

    Raises:
        [`ConfigError`]: for a folder that does not load, or a model open_clip cannot build exactly.
    """
    if not os.path.isdir(model_dir):
        raise ConfigError(f"{model_dir} is not a folder; give a model folder (e.g. a run's output_dir).")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ConfigError(f"Cannot load {model_dir!r}: {describe_load_error(error)}") from None
    problem = open_clip_export_problem(config)
    if problem:
        raise ConfigError(f"{model_dir}: {problem}.")
    try:
        # The tokenizer is loaded only to know that open_clip's HFTokenizer will find one in the folder.
        AutoTokenizer.from_pretrained(model_dir)
        image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        model = CLIPModel.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ConfigError(f"Cannot load {model_dir!r}: {describe_load_error(error)}") from None
    result: dict[str, Any] = save_open_clip(model, image_processor, model_dir, hf_tokenizer_name)
    if check:
        differences = check_if_open_clip_imports(model_dir, model, atol)
        if differences is not None:
            result["max_abs_diff"] = differences
    return result


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write open_clip_config.json and open_clip_model.safetensors beside a CLIP model folder's files, "
        'so that open_clip.create_model_and_transforms("local-dir:MODEL_DIR") loads it with its tokenizer and '
        "preprocessing; checked against the model when open_clip is installed.",
    )
    parser.add_argument("model_dir", help="a CLIP model folder (a run's output_dir, or an imported model).")
    parser.add_argument(
        "--hf_tokenizer_name",
        help="the Hub repository that will hold the tokenizer, for open_clip's hf-hub: loads once the folder is "
        "uploaded (default: the folder's name; local-dir: loads read the folder's own tokenizer).",
    )
    parser.add_argument("--no_check", action="store_true", help="skip loading the files with open_clip to compare.")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest embedding difference the check accepts.")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Command line: `clip-trainer export-open-clip MODEL_DIR`."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        result = export_open_clip(args.model_dir, args.hf_tokenizer_name, check=not args.no_check, atol=args.atol)
    except (ConfigError, ImportError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError | ImportError) else 1
    except OpenCLIPConversionError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    if "max_abs_diff" in result:
        checked = f", checked with open_clip: max abs difference {result['max_abs_diff']}"
    elif args.no_check:
        checked = " (not checked: --no_check)"
    else:
        checked = " (not checked: open_clip does not import here; install the open-clip extra to compare)"
    print(f"Wrote {result['config']} and {result['weights']}{checked}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
