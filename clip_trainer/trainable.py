"""Which parameters train, and at which rate: one policy for tower freezing, partial locking and LoRA.

Three options decide whether a parameter trains, and they compose in one place, [`TrainableParameters`]:

- LoRA (`lora_rank`): only the adapters may train at all (peft freezes the rest when it wraps the model);
- partial locking (`vision_trainable_layers`, `text_trainable_layers`; LiT and friends): a tower's embeddings and all
  but its top N encoder layers never train; its final norm and projection do (N = 0 leaves only those);
- freezing (`freeze_vision_model`, `freeze_text_model`; the seed project's `freeze_image_encoder`): a whole tower is
  fixed for the first `unfreeze_after_steps` optimizer steps, or for the whole run.

A parameter trains at step `s` when LoRA allows it, partial locking does not lock it, and its tower is not frozen at
`s`. So a frozen tower unfreezes to its top layers only, and unfreezing a tower of a LoRA model unfreezes its adapters,
never its base weights. Frozen parameters stay in the optimizer's groups (with no gradient, the optimizer leaves them
and their weight decay alone), so that they can train once unfrozen.

Layer-wise learning-rate decay ([`layerwise_lr_scales`]) gives each parameter its factor of the learning rate: 1 for
the final norm and projection (and anything outside the towers, such as `logit_scale`), `decay ** k` for the k-th
encoder layer from the top, `decay ** (layers + 1)` for the embeddings (BEiT's convention).
"""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from .lora import is_lora_model
from .modeling import TOWERS, tower_layers, tower_modules

logger = logging.get_logger(__name__)


def _names(model: nn.Module, modules) -> set[str]:
    """The names (in `model.named_parameters()`) of the parameters of `modules`, submodules of `model`."""
    name_of = {id(parameter): name for name, parameter in model.named_parameters()}
    return {name_of[id(parameter)] for module in modules for parameter in module.parameters()}


class TrainableParameters:
    """The trainable-parameter policy of a run, computed once from the model and the training arguments.

    Parameters are known by their names in the model the trainer holds (DDP's `module.` set aside): FSDP2 replaces
    every parameter object with a sharded one when the Trainer prepares the model, and keeps the names.

    Args:
        model: the model as the trainer holds it (a peft `PeftModel` for LoRA).
        frozen_towers: towers frozen at the start (`vision`, `text`).
        unfreeze_after_steps: the optimizer step at which they unfreeze; `None`: never.
        trainable_layers: `{tower: N}`: the towers whose lower layers are locked, and how many top layers train.
    """

    def __init__(
        self,
        model: nn.Module,
        frozen_towers: list[str] | tuple[str, ...] = (),
        unfreeze_after_steps: int | None = None,
        trainable_layers: dict[str, int] | None = None,
    ) -> None:
        base = getattr(model, "module", model)
        self.frozen_towers = list(frozen_towers)
        self.trainable_layers = dict(trainable_layers or {})
        self.unfreeze_after_steps = unfreeze_after_steps
        # LoRA: what peft left trainable (the adapters) is all that may ever train.
        self.allowed = (
            {name for name, p in base.named_parameters() if p.requires_grad} if is_lora_model(base) else None
        )
        self.frozen = _names(base, (module for tower in self.frozen_towers for module in tower_modules(base, tower)))
        self.locked: set[str] = set()
        for tower, layers in self.trainable_layers.items():
            parts = tower_layers(base, tower)
            lower = list(parts.layers)[: max(len(parts.layers) - layers, 0)]
            self.locked |= _names(base, (*parts.embeddings, *lower))

    @classmethod
    def from_arguments(cls, model: nn.Module, args) -> TrainableParameters:
        """The policy [`CLIPTrainingArguments`] describe."""
        frozen = (("vision", args.freeze_vision_model), ("text", args.freeze_text_model))
        layers = (("vision", args.vision_trainable_layers), ("text", args.text_trainable_layers))
        return cls(
            model,
            frozen_towers=[tower for tower, is_frozen in frozen if is_frozen],
            unfreeze_after_steps=args.unfreeze_after_steps,
            trainable_layers={tower: n for tower, n in layers if n is not None},
        )

    @property
    def is_default(self) -> bool:
        """Whether the policy leaves every parameter as it is (nothing frozen or locked)."""
        return not self.frozen_towers and not self.trainable_layers

    def towers_frozen_at(self, step: int) -> bool:
        return bool(self.frozen_towers) and (self.unfreeze_after_steps is None or step < self.unfreeze_after_steps)

    def trains(self, name: str, step: int) -> bool:
        """Whether the parameter `name` trains at optimizer step `step`."""
        if self.allowed is not None and name not in self.allowed:
            return False
        if name in self.locked:
            return False
        return not (name in self.frozen and self.towers_frozen_at(step))

    def apply(self, model: nn.Module, step: int) -> tuple[int, int]:
        """Sets `requires_grad` of every parameter of `model` for step `step`; returns (trainable, total) counts."""
        trainable = total = 0
        for name, parameter in getattr(model, "module", model).named_parameters():
            parameter.requires_grad_(self.trains(name, step))
            total += parameter.numel()
            trainable += parameter.numel() if parameter.requires_grad else 0
        return trainable, total

    def describe(self) -> str:
        parts = []
        if self.allowed is not None:
            parts.append("LoRA adapters only")
        if self.frozen_towers:
            until = (
                f" until step {self.unfreeze_after_steps}" if self.unfreeze_after_steps is not None else " for the run"
            )
            parts.append(f"{' and '.join(self.frozen_towers)} tower(s) frozen{until}")
        for tower, layers in self.trainable_layers.items():
            parts.append(f"{tower} tower trains its top {layers} layer(s), final norm and projection")
        return "; ".join(parts) or "every parameter"


class TrainableParametersCallback(TrainerCallback):
    """Applies a [`TrainableParameters`] policy: at the start of training (a resumed run past `unfreeze_after_steps`
    starts unfrozen) and at the unfreezing step."""

    def __init__(self, policy: TrainableParameters) -> None:
        self.policy = policy

    def _apply(self, model: nn.Module, step: int, when: str) -> None:
        trainable, total = self.policy.apply(model, step)
        logger.info(f"{when}: training {trainable:,} of {total:,} parameters ({self.policy.describe()}).")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model, state.global_step, "Trainable parameters")

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.policy.frozen_towers and state.global_step == self.policy.unfreeze_after_steps:
            self._apply(
                model, state.global_step, f"Step {state.global_step}: unfrozen {', '.join(self.policy.frozen_towers)}"
            )


def layerwise_lr_scales(model: nn.Module, decay: float) -> dict[int, float]:
    """`id(parameter)` -> the factor of the learning rate it trains at, for every parameter of `model`.

    LoRA adapters inside a layer take that layer's factor.
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
