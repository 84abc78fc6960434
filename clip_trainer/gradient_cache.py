"""Exact contrastive gradient accumulation: the GradCache method (Gao et al., 2021) inside `transformers.Trainer`.

Plain gradient accumulation sums the losses of the micro-batches, so each pair only meets the negatives of its own
micro-batch. CLIP's loss does not decompose over micro-batches, so getting the loss and gradients of the whole
accumulated batch takes two passes:

1. Embed every micro-batch without building a graph, compute the loss over all embeddings at once and backpropagate
   it to the embeddings only. This costs a `batch x dim` tensor per tower, not activations.
2. Forward each micro-batch again, this time with a graph, and backpropagate the embeddings' cached gradients through
   it (`sum(embeddings * cached_gradient)`, whose gradient with respect to the parameters is the chain rule's).

The Trainer drives the second pass one micro-batch at a time, as it would plain accumulation, so DDP's `no_sync`,
fp16 loss scaling, gradient clipping and the optimizer step are all the Trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import DistributedType

from .loss import contrastive_loss

if TYPE_CHECKING:
    from torch import nn

    from .trainer import CLIPContrastiveTrainer


@dataclass
class RandomState:
    """The generator states that dropout draws from: the CPU generator and the generator of every CUDA device.

    Restoring it before the forward with gradients makes that forward draw the dropout masks of the forward
    without gradients, which is what makes the cached gradients the gradients of the model that is backpropagated.
    `torch.random.fork_rng` is a context manager that restores the state *after* a block; here a state is captured
    at one point and replayed at another, so it is stored explicitly.
    """

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> RandomState:
        # Devices that were never touched have no state worth keeping, and querying them would initialise CUDA.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class GradientCache:
    """Computes one optimizer step's gradients with every pair of the accumulated batch as a negative of every other.

    [`CLIPContrastiveTrainer`] creates one when `gradient_accumulation_steps > 1` and `accumulation_mode="cached"`,
    hands it each step's micro-batches through [`start_step`] and forwards the Trainer's per-micro-batch
    `training_step` calls to [`training_step`]. The first of those calls embeds all micro-batches without gradients
    and computes the loss of the whole accumulated batch (over all processes when `gather_negatives` is on); every
    call then re-runs its micro-batch with gradients and backpropagates the cached embedding gradients.

    The gradients equal those of one forward and backward of [`clip_loss`] over the concatenated batch, with the same
    dropout masks; the memory is that of one micro-batch plus two `accumulated_batch x dim` embedding tables. The cost
    is a second forward of every micro-batch.

    From the trainer it uses `args` (`gather_negatives`, `per_device_train_batch_size`,
    `gradient_accumulation_steps`, `device`), `model`, `optimizer`, `accelerator`, `_prepare_inputs`, `embed`,
    `logit_scale` and `compute_loss_context_manager`.
    """

    def __init__(self) -> None:
        self._batches: list[dict[str, Any]] = []
        self._random_states: list[RandomState] = []
        self._image_grads: list[torch.Tensor] | None = None
        self._text_grads: list[torch.Tensor] | None = None
        self._scale_grad: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    def start_step(self, batch_samples: list[dict[str, Any]]) -> None:
        """Takes the micro-batches of the next optimizer step (fewer than `gradient_accumulation_steps` at the end
        of an epoch), as the Trainer's `get_batch_samples` returns them."""
        self._batches = list(batch_samples)
        self._random_states = []
        self._image_grads = self._text_grads = self._scale_grad = self._loss = None

    def owns(self, inputs: dict[str, Any]) -> bool:
        """Whether `inputs` is one of the current step's micro-batches (the very object, not an equal one)."""
        return any(batch is inputs for batch in self._batches)

    def training_step(self, trainer: CLIPContrastiveTrainer, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Backpropagates micro-batch `inputs`' share of the accumulated batch's gradients.

        Returns:
            `torch.Tensor`: the loss of the whole accumulated batch divided by the number of micro-batches, so that
            the Trainer's sum over the step's calls logs the accumulated batch's loss.
        """
        index = next(i for i, batch in enumerate(self._batches) if batch is inputs)
        num_micro = len(self._batches)
        # What `Trainer.training_step` does before its forward.
        model.train()
        if hasattr(trainer.optimizer, "train") and callable(trainer.optimizer.train):
            trainer.optimizer.train()
        if self._loss is None:
            self._cache_embedding_gradients(trainer, model)

        self._random_states[index].restore()
        prepared = trainer._prepare_inputs(inputs)
        with trainer.compute_loss_context_manager():
            image_embeds, text_embeds = trainer.embed(model, prepared)
        surrogate = (image_embeds * self._image_grads[index]).sum() + (text_embeds * self._text_grads[index]).sum()
        if index == num_micro - 1:
            # The temperature's gradient enters once, with the micro-batch whose backward DDP synchronises: a
            # parameter that takes no gradient in the synchronised backward would be left out of the all-reduce.
            scale = trainer.logit_scale()
            surrogate = surrogate + scale * self._scale_grad.to(scale.dtype)
        loss = self._loss / num_micro
        if index == num_micro - 1:
            self.start_step([])  # the step is done: release the micro-batches and the cached gradients
        if surrogate.requires_grad:  # False only when every parameter the micro-batch reaches is frozen
            kwargs = {}
            if trainer.accelerator.distributed_type == DistributedType.DEEPSPEED:
                # As in `Trainer.training_step`: our loss is already the step's share, DeepSpeed must not divide it.
                kwargs["scale_wrt_gas"] = False
            # Through the accelerator, so that fp16 loss scaling and DeepSpeed see this backward like any other.
            trainer.accelerator.backward(surrogate, **kwargs)
        return loss

    def _cache_embedding_gradients(self, trainer: CLIPContrastiveTrainer, model: nn.Module) -> None:
        """First pass: the embeddings of every micro-batch without a graph, the accumulated batch's loss, and its
        gradients with respect to the embeddings and to `exp(logit_scale)`."""
        image_chunks, text_chunks = [], []
        with torch.no_grad():
            for batch in self._batches:
                prepared = trainer._prepare_inputs(batch)
                self._random_states.append(RandomState.capture())
                with trainer.compute_loss_context_manager():
                    image_embeds, text_embeds = trainer.embed(model, prepared)
                image_chunks.append(image_embeds)
                text_chunks.append(text_embeds)
            scale = trainer.logit_scale()

        # Leaves: the loss is backpropagated to the embeddings and the temperature only, never into the model. The
        # temperature is detached so that its gradient reaches the parameter through the surrogate of the second
        # pass, inside the backward that DDP reduces, and not here, outside any DDP forward.
        images = torch.cat(image_chunks).requires_grad_(True)
        texts = torch.cat(text_chunks).requires_grad_(True)
        scale_leaf = scale.detach().to(images.dtype).requires_grad_(True)
        args = trainer.args
        # The same padding on every process and every step (also the shorter last step of an epoch), so that the
        # processes' gathers of the accumulated batch always agree in shape.
        pad_to = max(args.per_device_train_batch_size * args.gradient_accumulation_steps, images.shape[0])
        # In the embeddings' precision (float32 from `embed`) whatever the mixed-precision setting: the loss and
        # the cached gradients are exact, and only the towers' own forward and backward run in half precision.
        with torch.autocast(device_type=images.device.type, enabled=False):
            loss = contrastive_loss(images, texts, scale_leaf, gather_negatives=args.gather_negatives, pad_to=pad_to)
        # A plain autograd backward to the leaves: unscaled, since these gradients are cached and not stepped on.
        loss.backward()

        sizes = [chunk.shape[0] for chunk in image_chunks]
        self._image_grads = list(images.grad.split(sizes))
        self._text_grads = list(texts.grad.split(sizes))
        self._scale_grad = scale_leaf.grad
        self._loss = loss.detach().to(args.device)
