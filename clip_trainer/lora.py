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

from .arguments import DEFAULT_LORA_TARGET_MODULES, CLIPTrainingArguments, ConfigError

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
    """`model` wrapped by peft with LoRA adapters on `args.lora_target_modules` of rank `args.lora_rank`; the default
    targets are the attention projections of both towers, by the names the model's family gives them.

    Only the adapters train: every weight of the model, `logit_scale` included, is frozen. The temperature of a
    pretrained CLIP usually sits at its clamp (100) already, and keeping it fixed makes the adapter a complete
    description of the fine-tune (checkpoints hold the adapter only).
    """
    from .modeling import TOWERS, model_family, tower_modules

    peft = _peft()
    targets = list(args.lora_target_modules)
    if tuple(targets) == DEFAULT_LORA_TARGET_MODULES:
        # The default means "the attention projections of both towers", which BERT-style text towers (Chinese-CLIP's,
        # AltCLIP's) name `query`, `key`, `value`: the family knows its names.
        targets = list(model_family(model.config).lora_targets)
    config = peft.LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.lora_rank,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        exclude_modules=_inside_torch_attention(model) or None,
        bias="none",
    )
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as error:  # no module matches `target_modules`
        raise ConfigError(f"`lora_target_modules` {targets}: {error}") from None
    for tower in TOWERS:
        adapted = any(
            "lora_" in name for module in tower_modules(model, tower) for name, _ in module.named_parameters()
        )
        if not adapted:
            logger.warning(
                f"`lora_target_modules` {targets} match no module of the {tower} tower of this "
                f"{type(model).__name__}: the {tower} tower stays as it is."
            )
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info(
        f"LoRA rank {args.lora_rank}: training {trainable:,} of {total:,} parameters ({trainable / total:.2%})."
    )
    return wrapped


def _inside_torch_attention(model: nn.Module) -> list[str]:
    """The modules inside a `torch.nn.MultiheadAttention` (SigLIP's attention-pooling head): the attention reads their
    weights itself and never calls them, so an adapter there gets no gradient and trains nothing. peft would adapt its
    `out_proj` as it adapts the encoders' (the names end alike), and count it as trained."""
    return [
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    ]


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model with the adapters of the `PeftModel` `model` merged into its weights (`merge_and_unload` on a
    deep copy, so `model` keeps training or saving as it is)."""
    return copy.deepcopy(model).merge_and_unload()


def merged_from_state_dict(model: nn.Module, state_dict: dict) -> nn.Module:
    """The plain merged model of the `PeftModel` `model` whose weights are whole only in `state_dict` (gathered from
    the processes FSDP shards it across): a fresh model of the same architecture and adapters, loaded with them, then
    peft's `merge_and_unload`."""
    base = model.get_base_model()
    fresh = _peft().get_peft_model(type(base)(base.config), model.peft_config[model.active_adapter])
    fresh.load_state_dict(state_dict)
    return fresh.merge_and_unload()


def scale_saved_adapter(adapter_dir: str, factor: float) -> None:
    """Multiplies the update `B A` of the adapter saved in `adapter_dir` by `factor` (its `lora_B` weights).

    WiSE-FT's mix of a LoRA fine-tune with its base, `(1 - a) W0 + a (W0 + s B A)`, is `W0 + s (a B) A`: the adapter
    scaled by `a`, merged into the base model, is the interpolated model saved beside it. Exact because LoRA trains
    nothing but its adapters (see [`apply_lora`]); peft has no call that scales a saved adapter."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    tensors = load_file(path)
    scaled = {name: tensor * factor if ".lora_B." in name else tensor for name, tensor in tensors.items()}
    save_file(scaled, path, metadata={"format": "pt"})


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
