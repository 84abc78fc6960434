"""Exact contrastive gradient accumulation: the GradCache method (Gao et al., 2021) inside `transformers.Trainer`.

Plain gradient accumulation sums the losses of the micro-batches, so each pair only meets the negatives of its own
micro-batch. CLIP's loss does not decompose over micro-batches, so getting the loss and gradients of the whole
accumulated batch takes two passes:

1. Embed every micro-batch without building a graph, compute the loss over all embeddings at once and backpropagate
   it to the embeddings only. This costs a `batch x dim` tensor per tower, not activations.
2. Forward each micro-batch again, this time with a graph, and backpropagate the embeddings' cached gradients through
   it (`sum(embeddings * cached_gradient)`, whose gradient with respect to the parameters is the chain rule's).

The Trainer drives the second pass one micro-batch at a time, as it would plain accumulation, so DDP's `no_sync`,
fp16 loss scaling, gradient clipping and the optimizer step are all the Trainer's. The loss is a parameter: any
contrastive loss over the batch's embeddings (CLIP's softmax loss, SigLIP's sigmoid loss) is accumulated exactly.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


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
    sources: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def capture(cls, sources: list[Any] | None = None) -> RandomState:
        """The global generators' states, and those of `sources`: other random draws of the forward (patch dropout's),
        anything with `get_state()` / `set_state(state)`, as a `torch.Generator` has."""
        # Devices that were never touched have no state worth keeping, and querying them would initialise CUDA.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(
            cpu=torch.get_rng_state(), cuda=cuda, sources=[(source, source.get_state()) for source in sources or ()]
        )

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        for source, state in self.sources:
            source.set_state(state)


class GradientCache:
    """Computes one optimizer step's gradients with every pair of the accumulated batch as a negative of every other.

    It knows nothing of the Trainer; it is given what it calls:

    Args:
        embed (`Callable[[dict], tuple[Tensor, ...]]`): a micro-batch (as the DataLoader gave it) to its image and
            text embeddings, through the model being trained, with autocast as the training step uses it; with hard
            negatives in the batch, also their embeddings `(batch, k, dim)` and their validity `(batch, k)`.
        loss_scalars (`Callable[[], tuple[Tensor, ...]]`): the differentiable scalars the loss takes besides the
            embeddings, computed from the model's parameters (CLIP: the inverse temperature `exp(logit_scale)`).
        loss (`Callable[..., Tensor]`): `loss(image_embeds, text_embeds, *scalars, pad_to=..., valid=...)` over the
            whole accumulated batch (distributed across processes when it is); a [`ContrastiveLoss`] is one, with
            `loss_scalars` its `scalars` of the model. When the micro-batches carry `image_ids`, or `embed` gives
            hard negatives, it is also passed `image_ids=`, `hard_negatives=` and `hard_negative_valid=`, for the
            whole accumulated batch: rows of one image are masked and hard negatives counted across micro-batches.
        backward (`Callable[[Tensor], None]`): backpropagates a surrogate loss (through the accelerator, so that
            fp16 loss scaling and DDP see it as any other backward).
        micro_batch_size (`int`): the per-device micro-batch size; with `accumulation_steps` it fixes the padding
            of the accumulated batch, so that every process's gather has the same shape on every step.
        accumulation_steps (`int`): micro-batches per optimizer step.
        constants (`Callable[[dict], dict[str, Tensor]]`, *optional*): per micro-batch, more tensors the loss takes
            that carry no gradient (a teacher's embeddings, for distillation): computed in the first pass, concatenated
            over the accumulated batch like the embeddings, and passed to `loss` as keyword arguments.
        random_sources (`list`, *optional*): random draws of the forward besides torch's global generators, each with
            `get_state()` / `set_state(state)` (the trainer's [`PatchDropout`]): replayed in the second pass as dropout
            is, so that both passes of a micro-batch keep the same patches.

    [`CLIPContrastiveTrainer`] creates one when `gradient_accumulation_steps > 1` and `accumulation_mode="cached"`,
    hands it each step's micro-batches through [`start_step`] and forwards the Trainer's per-micro-batch
    `training_step` calls to [`training_step`]. The first of those calls embeds all micro-batches without gradients
    and computes the loss of the whole accumulated batch; every call then re-runs its micro-batch with gradients and
    backpropagates the cached embedding gradients.

    The gradients equal those of one forward and backward of the loss over the concatenated batch, with the same
    dropout masks; the memory is that of one micro-batch plus two `accumulated_batch x dim` embedding tables. The cost
    is a second forward of every micro-batch.
    """

    def __init__(
        self,
        embed: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]],
        loss_scalars: Callable[[], tuple[torch.Tensor, ...]],
        loss: Callable[..., torch.Tensor],
        backward: Callable[[torch.Tensor], None],
        micro_batch_size: int,
        accumulation_steps: int,
        constants: Callable[[dict[str, Any]], dict[str, torch.Tensor]] | None = None,
        random_sources: list[Any] | None = None,
    ) -> None:
        self.embed = embed
        self.loss_scalars = loss_scalars
        self.loss = loss
        self.backward = backward
        self.pad_to = micro_batch_size * accumulation_steps
        self.relations = accepted_keywords(loss, RELATION_KEYWORDS)
        self.constants = constants
        self.random_sources = list(random_sources or [])
        self._batches: list[dict[str, Any]] = []
        self._random_states: list[RandomState] = []
        self._image_grads: list[torch.Tensor] | None = None
        self._text_grads: list[torch.Tensor] | None = None
        self._scalar_grads: list[torch.Tensor] | None = None
        self._hard_grads: list[torch.Tensor] | None = None
        self._loss: torch.Tensor | None = None

    def start_step(self, batch_samples: list[dict[str, Any]]) -> None:
        """Takes the micro-batches of the next optimizer step (fewer than `accumulation_steps` at the end of an
        epoch), as the Trainer's `get_batch_samples` returns them."""
        self._batches = list(batch_samples)
        self._random_states = []
        self._image_grads = self._text_grads = self._scalar_grads = self._loss = None
        self._hard_grads = None

    def owns(self, inputs: dict[str, Any]) -> bool:
        """Whether `inputs` is one of the current step's micro-batches (the very object, not an equal one)."""
        return any(batch is inputs for batch in self._batches)

    def training_step(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Backpropagates micro-batch `inputs`' share of the accumulated batch's gradients.

        Returns:
            `torch.Tensor`: the loss of the whole accumulated batch divided by the number of micro-batches, so that
            the Trainer's sum over the step's calls logs the accumulated batch's loss.
        """
        index = next(i for i, batch in enumerate(self._batches) if batch is inputs)
        num_micro = len(self._batches)
        if self._loss is None:
            self._cache_embedding_gradients()

        self._random_states[index].restore()
        image_embeds, text_embeds, *hard = self.embed(inputs)
        surrogate = (image_embeds * self._image_grads[index]).sum() + (text_embeds * self._text_grads[index]).sum()
        if hard and self._hard_grads is not None:
            # This micro-batch's own hard-negative slots: the cache padded every micro-batch to the most slots.
            surrogate = surrogate + (hard[0] * self._hard_grads[index][:, : hard[0].shape[1]]).sum()
        if index == num_micro - 1:
            # The loss scalars' gradients enter once, with the micro-batch whose backward DDP synchronises: a
            # parameter that takes no gradient in the synchronised backward would be left out of the all-reduce.
            for scalar, grad in zip(self.loss_scalars(), self._scalar_grads):
                surrogate = surrogate + scalar * grad.to(scalar.dtype)
        loss = self._loss / num_micro
        if index == num_micro - 1:
            self.start_step([])  # the step is done: release the micro-batches and the cached gradients
        if surrogate.requires_grad:  # False only when every parameter the micro-batch reaches is frozen
            self.backward(surrogate)
        return loss

    def _cache_embedding_gradients(self) -> None:
        """First pass: the embeddings of every micro-batch without a graph, the accumulated batch's loss, and its
        gradients with respect to the embeddings and to the loss scalars."""
        image_chunks, text_chunks, valid_chunks = [], [], []
        id_chunks, hard_chunks = [], []
        constant_chunks: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for batch in self._batches:
                self._random_states.append(RandomState.capture(self.random_sources))
                image_embeds, text_embeds, *hard = self.embed(batch)
                image_chunks.append(image_embeds)
                text_chunks.append(text_embeds)
                if batch.get("image_ids") is not None:
                    id_chunks.append(batch["image_ids"].to(image_embeds.device))
                if hard:
                    hard_chunks.append(hard)
                valid = batch.get("valid")
                valid_chunks.append(
                    torch.ones(len(image_embeds), dtype=torch.bool, device=image_embeds.device)
                    if valid is None
                    else valid.to(image_embeds.device)
                )
                if self.constants is not None:
                    # After the micro-batch's embedding, whose random state was captured just before it.
                    constant_chunks.append(self.constants(batch))
            scalars = self.loss_scalars()

        # Leaves: the loss is backpropagated to the embeddings and the scalars only, never into the model. The
        # scalars are detached so that their gradients reach the parameters through the surrogate of the second
        # pass, inside the backward that DDP reduces, and not here, outside any DDP forward.
        images = torch.cat(image_chunks).requires_grad_(True)
        texts = torch.cat(text_chunks).requires_grad_(True)
        scalar_leaves = [scalar.detach().to(images.dtype).requires_grad_(True) for scalar in scalars]
        # The same padding on every process and every step (also the shorter last step of an epoch), so that the
        # processes' gathers of the accumulated batch always agree in shape.
        pad_to = max(self.pad_to, images.shape[0])
        # In the embeddings' precision (float32) whatever the mixed-precision setting: the loss and the cached
        # gradients are exact, and only the towers' own forward and backward run in half precision.
        # Rows of one image and hard negatives are related across the whole accumulated batch, not per micro-batch;
        # passed only when there are any, so that a loss without these options keeps working.
        relations = {}
        if id_chunks and len(id_chunks) == len(image_chunks):
            relations["image_ids"] = torch.cat(id_chunks)
        hard_leaf = None
        if hard_chunks and len(hard_chunks) == len(image_chunks):
            hard_leaf, relations["hard_negative_valid"] = _padded_hard_negatives(hard_chunks)
            hard_leaf = hard_leaf.to(images.dtype).requires_grad_(True)
            relations["hard_negatives"] = hard_leaf
        relations = {key: value for key, value in relations.items() if key in self.relations}
        if "hard_negatives" not in relations:
            hard_leaf = None
        # The teacher's embeddings (distillation) are constants of the whole accumulated batch.
        constants = {key: torch.cat([chunk[key] for chunk in constant_chunks]) for key in (constant_chunks or [{}])[0]}
        with torch.autocast(device_type=images.device.type, enabled=False):
            loss = self.loss(
                images, texts, *scalar_leaves, pad_to=pad_to, valid=torch.cat(valid_chunks), **relations, **constants
            )
        # A plain autograd backward to the leaves: unscaled, since these gradients are cached and not stepped on.
        loss.backward()

        sizes = [chunk.shape[0] for chunk in image_chunks]
        self._image_grads = list(images.grad.split(sizes))
        self._text_grads = list(texts.grad.split(sizes))
        self._scalar_grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in scalar_leaves]
        if hard_leaf is not None:
            grad = hard_leaf.grad if hard_leaf.grad is not None else torch.zeros_like(hard_leaf)
            self._hard_grads = list(grad.split(sizes))
        self._loss = loss.detach()


RELATION_KEYWORDS = ("image_ids", "hard_negatives", "hard_negative_valid")
"""What a loss may be told about the rows of a batch besides their embeddings (see [`ContrastiveLoss`])."""


def accepted_keywords(function: Callable, names: tuple[str, ...]) -> set[str]:
    """Which of `names` `function` takes as keyword arguments: all of them with `**kwargs`. A loss written before these
    existed (or a subclass that does without them) is called as it always was."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a callable whose signature cannot be read: try everything
        return set(names)
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return set(names)
    keywords = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {name for name in names if name in keywords}


def _padded_hard_negatives(chunks: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batches' hard negatives `(rows, k, dim)` and validity `(rows, k)` as one batch: micro-batches hold
    different numbers of slots, so each is padded with empty (invalid) slots to the most."""
    slots = max(hard.shape[1] for hard, _ in chunks)
    embeds, valid = [], []
    for hard, hard_valid in chunks:
        missing = slots - hard.shape[1]
        embeds.append(torch.cat([hard, hard.new_zeros(hard.shape[0], missing, hard.shape[2])], dim=1))
        valid.append(torch.cat([hard_valid.bool(), hard_valid.new_zeros(hard.shape[0], missing, dtype=torch.bool)], 1))
    return torch.cat(embeds), torch.cat(valid)
