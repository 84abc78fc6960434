"""The contrastive losses as objects the trainer holds: CLIP's softmax loss and SigLIP's sigmoid loss.

The maths lives in `loss.py` as plain functions over embeddings. An object here wraps one of them with everything
else about that loss that the trainer needs: the differentiable scalars it reads from the model, its options, whether
the inverse temperature is clamped after each optimizer step, what it logs, and how the model card names it.
[`build_loss`] picks one, once, from the model family and `loss_type`.

To add a loss: a subclass of [`ContrastiveLoss`] with its own `name` (it is then a `loss_type` the trainer can build;
`arguments.py` lists the choices the command accepts) and its test.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from .callbacks import ClampLogitScaleCallback
from .errors import ConfigError
from .loss import contrastive_loss, distillation_loss, sigmoid_contrastive_loss

if TYPE_CHECKING:
    from .arguments import CLIPTrainingArguments
    from .modeling import ModelFamily

logger = logging.get_logger(__name__)


def inverse_temperature(model: nn.Module) -> torch.Tensor:
    """`exp(logit_scale)`, the inverse temperature `t` (logits are `t * cosine`, plus SigLIP's bias), with its
    gradient; a scalar, whatever shape the model keeps it in (SigLIP: `(1,)`)."""
    return model.logit_scale.exp().reshape(())


def _whole(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter read outside the model's forward: under FSDP2 it is sharded there (a `DTensor`), and gathering it
    is a collective, so every process must read it (logging and evaluation do)."""
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


class ContrastiveLoss:
    """A contrastive loss over a batch of image and text embeddings, and what the trainer needs to know about it.

    Called as `loss(image_embeds, text_embeds, *loss.scalars(model), pad_to=..., valid=...)`: the scalars are
    computed from the model's parameters separately, so that [`GradientCache`] can cache their gradients like the
    embeddings'. A subclass sets `name` and `card_text` and implements `__call__`; it is registered under `name`
    for [`build_loss`].

    Args:
        gather_negatives (`bool`, *optional*, defaults to `True`): under distributed training, contrast each
            process's pairs against every process's batch (exact global-batch loss); else the local batch only.

    Attributes:
        name (`str`): the `loss_type` that selects it, and a model family's `loss`.
        card_text (`str`): how the model card names it ("... trained with clip-trainer ... and {card_text}.").
    """

    name: ClassVar[str]
    card_text: ClassVar[str]
    registry: ClassVar[dict[str, type[ContrastiveLoss]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            ContrastiveLoss.registry[cls.name] = cls

    def __init__(self, gather_negatives: bool = True) -> None:
        self.gather_negatives = gather_negatives

    @classmethod
    def from_arguments(cls, args: CLIPTrainingArguments) -> ContrastiveLoss:
        """The loss with the options `args` sets."""
        return cls(gather_negatives=args.gather_negatives)

    @classmethod
    def check_model(cls, model: nn.Module, family: ModelFamily) -> None:
        """Raises a [`ConfigError`] (or warns) when `model` cannot be trained (well) with this loss."""

    def scalars(self, model: nn.Module) -> tuple[torch.Tensor, ...]:
        """The differentiable scalars the loss takes besides the embeddings, read from `model`'s parameters."""
        return (inverse_temperature(model),)

    def __call__(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        *scalars: torch.Tensor,
        pad_to: int | None = None,
        valid: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        hard_negatives: torch.Tensor | None = None,
        hard_negative_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This process's loss over its batch (its share of the global batch's, when the negatives are gathered).

        Args:
            image_embeds, text_embeds (`torch.Tensor` of shape `(batch, dim)`): normalised pairs.
            scalars: what [`scalars`] returned.
            pad_to (`int`, *optional*): the largest local batch any process can have, see [`contrastive_loss`].
            valid (`torch.Tensor` of shape `(batch,)`, *optional*): `False` for rows that are no pair.
            image_ids (`torch.Tensor` of shape `(batch,)`, *optional*): the image each row shows; rows of one image
                (several captions of it) are never each other's negatives.
            hard_negatives (`torch.Tensor` of shape `(batch, k, dim)`, *optional*): normalised embeddings of captions
                that are wrong for each row's image, with `hard_negative_valid` (`(batch, k)`) flagging the real ones.
        """
        raise NotImplementedError

    def callbacks(self) -> list[TrainerCallback]:
        """The callbacks training with this loss needs (a clamp of the inverse temperature after each step)."""
        return []

    @torch.no_grad()
    def logged_values(self, model: nn.Module) -> dict[str, float]:
        """The loss's parameters as the training logs and evaluations report them (read from the device: call at
        logging time only)."""
        value = _whole(model.logit_scale).exp().item()
        return {"inverse_temperature": value, "temperature": 1.0 / value}

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({options})"


class SoftmaxContrastiveLoss(ContrastiveLoss):
    """CLIP's symmetric cross-entropy ([`contrastive_loss`]); `exp(logit_scale)` is clamped at `max_logit_scale`
    after every optimizer step, as CLIP does.

    Args:
        gather_negatives (`bool`, *optional*, defaults to `True`): see [`ContrastiveLoss`].
        max_logit_scale (`float`, *optional*, defaults to 100): the largest inverse temperature (CLIP: 100).
    """

    name = "softmax"
    card_text = "CLIP's contrastive (softmax) loss"

    def __init__(self, gather_negatives: bool = True, max_logit_scale: float = 100.0) -> None:
        super().__init__(gather_negatives)
        self.max_logit_scale = max_logit_scale

    @classmethod
    def from_arguments(cls, args: CLIPTrainingArguments) -> SoftmaxContrastiveLoss:
        return cls(gather_negatives=args.gather_negatives, max_logit_scale=args.max_logit_scale)

    @classmethod
    def check_model(cls, model: nn.Module, family: ModelFamily) -> None:
        if getattr(model, "logit_bias", None) is not None:
            logger.warning(
                f"`loss_type` is softmax for a {family.name} model: its `logit_bias` takes no part in the loss "
                "(and stays as it is). `auto` trains it with its own sigmoid loss."
            )
            model.logit_bias.requires_grad_(False)

    def __call__(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        *scalars: torch.Tensor,
        pad_to: int | None = None,
        valid: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        hard_negatives: torch.Tensor | None = None,
        hard_negative_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return contrastive_loss(
            image_embeds,
            text_embeds,
            *scalars,
            gather_negatives=self.gather_negatives,
            pad_to=pad_to,
            valid=valid,
            image_ids=image_ids,
            hard_negatives=hard_negatives,
            hard_negative_valid=hard_negative_valid,
        )

    def callbacks(self) -> list[TrainerCallback]:
        return [ClampLogitScaleCallback(math.log(self.max_logit_scale))]


class SigmoidContrastiveLoss(ContrastiveLoss):
    """SigLIP's sigmoid loss ([`sigmoid_contrastive_loss`]) with the model's learned `logit_bias`. Not clamped: SigLIP
    does not clamp, and its checkpoints sit above CLIP's 100 (`t ~ 117`).

    Args:
        gather_negatives (`bool`, *optional*, defaults to `True`): see [`ContrastiveLoss`].
        ring (`bool`, *optional*, defaults to `False`): with gathered negatives, pass the text embeddings round a
            ring of the processes instead of all-gathering them (same loss, `local x local` memory).
    """

    name = "sigmoid"
    card_text = "SigLIP's sigmoid loss, with its learned bias"

    def __init__(self, gather_negatives: bool = True, ring: bool = False) -> None:
        super().__init__(gather_negatives)
        self.ring = ring

    @classmethod
    def from_arguments(cls, args: CLIPTrainingArguments) -> SigmoidContrastiveLoss:
        return cls(gather_negatives=args.gather_negatives, ring=args.sigmoid_ring_exchange)

    @classmethod
    def check_model(cls, model: nn.Module, family: ModelFamily) -> None:
        if getattr(model, "logit_bias", None) is None:
            raise ConfigError(
                f"`loss_type` is sigmoid, which needs a learned `logit_bias`, and a {family.name} model has none; "
                "use `loss_type` softmax (or auto), or a SigLIP model."
            )

    def scalars(self, model: nn.Module) -> tuple[torch.Tensor, ...]:
        return inverse_temperature(model), model.logit_bias

    def __call__(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        *scalars: torch.Tensor,
        pad_to: int | None = None,
        valid: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        hard_negatives: torch.Tensor | None = None,
        hard_negative_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sigmoid_contrastive_loss(
            image_embeds,
            text_embeds,
            *scalars,
            gather_negatives=self.gather_negatives,
            pad_to=pad_to,
            ring=self.ring,
            valid=valid,
            image_ids=image_ids,
            hard_negatives=hard_negatives,
            hard_negative_valid=hard_negative_valid,
        )

    @torch.no_grad()
    def logged_values(self, model: nn.Module) -> dict[str, float]:
        return {**super().logged_values(model), "logit_bias": _whole(model.logit_bias).item()}


def build_loss(model: nn.Module, family: ModelFamily, args: CLIPTrainingArguments) -> ContrastiveLoss:
    """The loss `args.loss_type` names (`auto`: the family's own), checked against the model and set up from `args`.

    Raises:
        [`ConfigError`]: the loss needs what the model lacks (the sigmoid loss, a `logit_bias`), or no loss has
            that name.
    """
    name = family.loss if args.loss_type == "auto" else args.loss_type
    loss_class = ContrastiveLoss.registry.get(name)
    if loss_class is None:
        raise ConfigError(
            f"`loss_type` is {name!r}; choose auto or one of {', '.join(sorted(ContrastiveLoss.registry))}."
        )
    loss_class.check_model(model, family)
    return loss_class.from_arguments(args)


class DistillationLoss:
    """The distillation term a run with a teacher adds to the contrastive loss: `weight x` [`distillation_loss`], the
    KL divergence from the teacher's image-to-text and text-to-image distributions over the batch to the student's
    (gathered across processes like the contrastive loss's negatives), plus `intra_modal_weight x` the image-to-image
    and text-to-text one.

    Args:
        weight (`float`, *optional*, defaults to 1): what the KL divergence is multiplied by before it is added.
        temperature (`float`, *optional*): the softmax temperature of both distributions, `softmax(cosine /
            temperature)`; the student's learned inverse temperature then takes no part in the term. `None`: each
            model's own learned inverse temperature (`exp(logit_scale)`), so that the student also learns the
            teacher's sharpness (as open_clip's `DistillClipLoss` does).
        gather_negatives (`bool`, *optional*, defaults to `True`): under distributed training, the distributions
            are over the global batch.
        intra_modal_weight (`float`, *optional*, defaults to 0): adds this weight x the image-to-image and
            text-to-text divergence ([`distillation_loss`]) inside the term.
    """

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float | None = None,
        gather_negatives: bool = True,
        intra_modal_weight: float = 0.0,
    ) -> None:
        self.weight = weight
        self.temperature = temperature
        self.gather_negatives = gather_negatives
        self.intra_modal_weight = intra_modal_weight

    @classmethod
    def from_arguments(cls, args: CLIPTrainingArguments) -> DistillationLoss | None:
        """The term `args` asks for (`teacher_model_name_or_path`, `teacher_embeddings` or `distill_from_pretrained`),
        else `None`."""
        if (
            args.teacher_model_name_or_path is None
            and args.teacher_embeddings is None
            and not args.distill_from_pretrained
        ):
            return None
        weight = 1.0 if args.distillation_weight is None else args.distillation_weight
        intra_modal_weight = args.distillation_intra_modal_weight or 0.0
        return cls(weight, args.distillation_temperature, args.gather_negatives, intra_modal_weight)

    def inverse_temperatures(
        self, student: torch.Tensor, teacher: torch.Tensor
    ) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The student's and the teacher's inverse temperatures in the term: their own, or `1 / temperature`."""
        if self.temperature is None:
            return student, teacher
        return 1.0 / self.temperature, 1.0 / self.temperature

    def __call__(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        teacher_image_embeds: torch.Tensor,
        teacher_text_embeds: torch.Tensor,
        inverse_temperature: torch.Tensor,
        teacher_inverse_temperature: torch.Tensor,
        pad_to: int | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The KL divergence (not yet multiplied by `weight`) of this process's rows: its share of the global
        batch's, when gathered.

        Args:
            image_embeds, text_embeds: the student's normalised pairs.
            teacher_image_embeds, teacher_text_embeds: the teacher's embeddings of the same pairs (constants).
            inverse_temperature: the student's `exp(logit_scale)`, with its gradient.
            teacher_inverse_temperature: the teacher's `exp(logit_scale)`.
        """
        student_scale, teacher_scale = self.inverse_temperatures(inverse_temperature, teacher_inverse_temperature)
        return distillation_loss(
            image_embeds,
            text_embeds,
            teacher_image_embeds.to(image_embeds.dtype),
            teacher_text_embeds.to(image_embeds.dtype),
            student_scale,
            teacher_scale,
            gather=self.gather_negatives,
            pad_to=pad_to,
            valid=valid,
            intra_modal_weight=self.intra_modal_weight,
        )

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({options})"
