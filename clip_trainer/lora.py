"""LoRA adapters through peft: wrap a CLIP model so that only low-rank adapters train, and merge them back.

peft does the work ([`peft.get_peft_model`], `save_pretrained`, `merge_and_unload`), and `transformers.Trainer`
already knows a `PeftModel`: checkpoints hold the adapter, `load_best_model_at_end` and resuming load it back. What
this module adds is the one thing a CLIP user needs at the end and that neither library writes by itself: an
`output_dir` that holds a plain `CLIPModel` with the adapters merged (what `from_pretrained` and `pipeline(...)` load),
with the adapter beside it in `output_dir/adapter/`, and a card for the adapter that says so.

peft is an optional dependency: `pip install 'clip-trainer[lora]'`.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

from torch import nn
from transformers.utils import logging

from .arguments import CLIPTrainingArguments, ConfigError


logger = logging.get_logger(__name__)

ADAPTER_DIRNAME = "adapter"
"""Where the final save of a LoRA run puts the adapter, inside `output_dir`."""


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "LoRA needs peft, which is not installed: pip install 'clip-trainer[lora]' (or unset `lora_rank`)."
        ) from None
    return peft


def is_lora_model(model: nn.Module) -> bool:
    """Whether `model` is a peft `PeftModel` (without importing peft when it is not installed)."""
    return any(cls.__name__ == "PeftModel" and cls.__module__.startswith("peft") for cls in type(model).__mro__)


def apply_lora(model: nn.Module, args: CLIPTrainingArguments) -> nn.Module:
    """`model` wrapped by peft with LoRA adapters on `args.lora_target_modules` of rank `args.lora_rank`.

    Only the adapters train: every weight of the model, `logit_scale` included, is frozen. The temperature of a
    pretrained CLIP usually sits at its clamp (100) already, and keeping it fixed makes the adapter a complete
    description of the fine-tune (checkpoints hold the adapter only).
    """
    peft = _peft()
    config = peft.LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.lora_rank,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules),
        bias="none",
    )
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as error:  # no module matches `target_modules`
        raise ConfigError(f"`lora_target_modules` {list(args.lora_target_modules)}: {error}") from None
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info(
        f"LoRA rank {args.lora_rank}: training {trainable:,} of {total:,} parameters ({trainable / total:.2%})."
    )
    return wrapped


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model with the adapters of the `PeftModel` `model` merged into its weights (`merge_and_unload` on a
    deep copy, so `model` keeps training or saving as it is)."""
    return copy.deepcopy(model).merge_and_unload()


def adapter_settings(adapter_dir: str) -> dict[str, Any] | None:
    """The LoRA settings saved in `adapter_dir` (rank `r`, `lora_alpha`, `lora_dropout`, `target_modules`) and the
    adapter's size (`num_parameters`), or `None` when it holds no adapter."""
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        return None
    config = _peft().PeftConfig.from_pretrained(adapter_dir)
    settings: dict[str, Any] = {
        "r": getattr(config, "r", None),
        "lora_alpha": getattr(config, "lora_alpha", None),
        "lora_dropout": getattr(config, "lora_dropout", None),
        "target_modules": sorted(config.target_modules) if config.target_modules else [],
    }
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.isfile(weights):
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as handle:
            settings["num_parameters"] = sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return settings


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def write_adapter_card(adapter_dir: str, card_data: Any) -> str:
    """
    Writes the adapter's own `README.md` in `adapter_dir`, in place of peft's template.

    peft's card is an empty template whose `base_model` metadata is the base model's path on the author's machine
    (`_name_or_path`), which the Hub rejects and which publishes that path. This one says what the adapter is, its
    settings, how to load it on its base model with peft, and that the merged model is the parent folder's.

    Args:
        adapter_dir (`str`): the adapter's folder (`output_dir/adapter`).
        card_data ([`CLIPModelCardData`]): the run's card data, completed by the trainer (`lora` set).

    Returns:
        `str`: the path of the card written.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .model_card import _DEFAULT_TAGS, MODEL_CARD_FILENAME, _hub_id, _location, _origin

    lora = card_data.lora or adapter_settings(adapter_dir) or {}
    output_name = card_data.model_name or os.path.basename(os.path.abspath(os.path.dirname(adapter_dir)))
    location, _ = _location(card_data, output_name)
    base_id = _hub_id(card_data.base_model)
    family = card_data.family or "CLIP"
    metadata = ModelCardData(
        library_name="peft",
        pipeline_tag="zero-shot-image-classification",
        base_model=base_id,
        tags=[*_DEFAULT_TAGS, "lora", "peft"],
        license=card_data.license or None,
    )
    if base_id:
        base_line = f'base = AutoModel.from_pretrained("{base_id}")'
    elif card_data.base_model:
        name = os.path.basename(os.path.normpath(card_data.base_model))
        base_line = f'base = AutoModel.from_pretrained("path/to/{name}")  # the local model `{name}` it was trained on'
    else:
        base_line = 'base = AutoModel.from_pretrained("path/to/base-model")  # the model it was trained on'
    if card_data.repo_id:
        adapter_line = f'model = PeftModel.from_pretrained(base, "{location}", subfolder="{ADAPTER_DIRNAME}")'
    else:
        adapter_line = f'model = PeftModel.from_pretrained(base, "{location}/{ADAPTER_DIRNAME}")'
    targets = ", ".join(f"`{target}`" for target in lora.get("target_modules") or []) or "the configured modules"
    size = f" ({lora['num_parameters']:,} parameters)" if lora.get("num_parameters") else ""
    dropout = f", dropout {lora['lora_dropout']:g}" if lora.get("lora_dropout") else ""
    parent = f"the Hub repository `{location}`" if card_data.repo_id else f"the parent folder, `{location}`"
    text = f"""
# LoRA adapter of {output_name}

A [LoRA](https://arxiv.org/abs/2106.09685) adapter{size} for a {family} model, {_origin(card_data.base_model)}, \
trained with clip-trainer: rank {lora.get("r")}, alpha {_number(lora.get("lora_alpha"))}{dropout}, on the modules \
{targets}. Only the adapter was trained; every weight of the base model, the temperature included, stayed as it \
was.

The model with this adapter merged into its weights is {parent}: it loads without peft \
(`AutoModel.from_pretrained("{location}")`), and its card has the evaluation and usage code.

## Loading the adapter with peft

```python
from peft import PeftModel
from transformers import AutoModel, AutoProcessor

{base_line}
{adapter_line}
processor = AutoProcessor.from_pretrained("{location}")
# model.merge_and_unload() gives the merged model of the parent folder.
```
"""
    path = os.path.join(adapter_dir, MODEL_CARD_FILENAME)
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n{text}").save(path)
    return path
