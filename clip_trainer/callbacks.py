"""Trainer callbacks, one job each."""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)


def set_tower_trainable(model, tower: str, trainable: bool) -> None:
    """Turns gradients on or off for one tower: `vision` (vision model + projection) or `text` (likewise)."""
    modules = {
        "vision": (model.vision_model, model.visual_projection),
        "text": (model.text_model, model.text_projection),
    }[tower]
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(trainable)


class FreezeTowersCallback(TrainerCallback):
    """Freezes the image and/or text tower for the first `unfreeze_after_steps` optimizer steps, or for the whole run.

    Frozen parameters get no gradient, so the optimizer leaves them (and their weight decay) untouched; they stay in
    the optimizer's groups so that they can train once unfrozen. This is the seed project's `freeze_image_encoder`.
    """

    def __init__(self, freeze_vision: bool, freeze_text: bool, unfreeze_after_steps: int | None = None) -> None:
        self.towers = [name for name, frozen in (("vision", freeze_vision), ("text", freeze_text)) if frozen]
        self.unfreeze_after_steps = unfreeze_after_steps

    def freeze(self, model) -> None:
        for tower in self.towers:
            set_tower_trainable(model, tower, False)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        still_frozen = self.unfreeze_after_steps is None or state.global_step < self.unfreeze_after_steps
        if self.towers and still_frozen:
            self.freeze(model)
            logger.info(f"Frozen: {', '.join(self.towers)} tower(s).")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.towers and self.unfreeze_after_steps is not None and state.global_step == self.unfreeze_after_steps:
            for tower in self.towers:
                set_tower_trainable(model, tower, True)
            logger.info(f"Step {state.global_step}: unfrozen {', '.join(self.towers)} tower(s).")


class ClampLogitScaleCallback(TrainerCallback):
    """Clamps `logit_scale` to `[0, log(max_logit_scale)]` after every optimizer step, as CLIP does (at ln 100).

    In place and on the device: no host synchronisation in the training step.
    """

    def __init__(self, max_log_scale: float) -> None:
        self.max_log_scale = max_log_scale

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        logit_scale = getattr(model, "logit_scale", None)
        if logit_scale is None:  # the model is wrapped (DDP, compile): reach the CLIP module
            logit_scale = getattr(getattr(model, "module", model), "logit_scale", None)
        if logit_scale is not None:
            with torch.no_grad():
                logit_scale.clamp_(0.0, self.max_log_scale)
