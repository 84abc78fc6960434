"""Partial locking and layer-wise learning rates: per-layer treatment of a tower, read through
[`clip_trainer.modeling.tower_layers`].

- Partial locking (LiT and friends): [`lock_lower_layers`] freezes a tower's embeddings and all but its top N encoder
  layers; the final norm and the projection stay trainable. N = 0 leaves only the norm and projection training (a
  locked tower with a trainable head; `freeze_vision_model` fixes those too).
- Layer-wise learning-rate decay: [`layerwise_lr_scales`] gives each parameter its factor of the learning rate: 1 for
  the final norm and projection (and anything outside the towers, such as `logit_scale`), `decay ** k` for the k-th
  encoder layer from the top, `decay ** (layers + 1)` for the embeddings (BEiT's convention).
"""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from .modeling import TOWERS, tower_layers

logger = logging.get_logger(__name__)


def lock_lower_layers(model: nn.Module, tower: str, trainable_layers: int) -> None:
    """Turns gradients off for the embeddings and the lower layers of `tower`, leaving its top `trainable_layers`
    layers, final norm and projection as they were (so that a frozen tower stays frozen)."""
    parts = tower_layers(model, tower)
    frozen_layers = list(parts.layers)[: max(len(parts.layers) - trainable_layers, 0)]
    for module in (*parts.embeddings, *frozen_layers):
        for parameter in module.parameters():
            parameter.requires_grad_(False)


class PartialLockCallback(TrainerCallback):
    """Keeps the lower layers of the towers fixed for the whole run: at the start of training, and again after
    [`FreezeTowersCallback`] unfreezes a tower at `unfreeze_after_steps` (so freezing and partial locking compose: a
    frozen tower unfreezes to its top layers only). Added after the freeze callback, so it runs after it.
    """

    def __init__(self, trainable_layers: dict[str, int], unfreeze_after_steps: int | None = None) -> None:
        self.trainable_layers = trainable_layers
        self.unfreeze_after_steps = unfreeze_after_steps

    def _lock(self, model: nn.Module) -> None:
        for tower, layers in self.trainable_layers.items():
            lock_lower_layers(model, tower, layers)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._lock(model)
        logger.info(
            "Partial locking: "
            + ", ".join(f"{tower} tower trains its top {n} layer(s)" for tower, n in self.trainable_layers.items())
            + ", final norms and projections."
        )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.unfreeze_after_steps is not None and state.global_step == self.unfreeze_after_steps:
            self._lock(model)


def layerwise_lr_scales(model: nn.Module, decay: float) -> dict[int, float]:
    """`id(parameter)` -> the factor of the learning rate it trains at, for every parameter of `model`.

    Parameters are found by identity, not by name, so wrappers (peft, DDP) do not matter; LoRA adapters inside a
    layer take that layer's factor.
    """
    scales = {id(parameter): 1.0 for parameter in model.parameters()}
    for tower in TOWERS:
        parts = tower_layers(model, tower)
        depth = len(parts.layers)
        for index, layer in enumerate(parts.layers):
            for parameter in layer.parameters():
                scales[id(parameter)] = decay ** (depth - index)
        for module in parts.embeddings:
            for parameter in module.parameters():
                scales[id(parameter)] = decay ** (depth + 1)
    return scales
