"""CLIP's symmetric contrastive loss, over one process's batch or over the global batch of all processes.

Plain functions over embeddings, so the maths is tested without a model or a trainer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over one batch of matching pairs.

    Row `i` of `image_embeds` and row `i` of `text_embeds` are a pair; every other row is a negative. The loss is the
    mean of the image-to-text and text-to-image cross-entropies of `inverse_temperature * image_embeds @ text_embeds.T`.

    Args:
        image_embeds (`torch.Tensor` of shape `(batch, dim)`): L2-normalised image embeddings.
        text_embeds (`torch.Tensor` of shape `(batch, dim)`): L2-normalised text embeddings.
        inverse_temperature (`torch.Tensor`, scalar): `exp` of the model's `logit_scale` (CLIP's `t`, at most 100).
        valid (`torch.Tensor` of shape `(batch,)`, *optional*): `False` for rows that are no pair (a sample the
            collator could not use): they are neither queries nor negatives. The mean is over the valid pairs; with
            none the loss is 0, still connected to the graph, so every process of a distributed run runs the same
            backward. Masked rather than indexed, so that no host synchronisation is needed to count them.
    """
    logits = inverse_temperature * image_embeds @ text_embeds.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    if valid is None:
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    losses = _masked_cross_entropies(logits, labels, valid, valid) + _masked_cross_entropies(
        logits.T, labels, valid, valid
    )
    return losses.sum() / 2 / valid.sum().clamp(min=1)


def _masked_cross_entropies(
    logits: torch.Tensor, labels: torch.Tensor, row_valid: torch.Tensor, column_valid: torch.Tensor
) -> torch.Tensor:
    """Per-row cross-entropies with invalid columns excluded and invalid rows contributing exactly 0.

    An invalid row's logits are replaced by zeros before the softmax (not masked to -inf, whose all-masked softmax
    would be NaN and poison the backward even where its loss is multiplied by 0).
    """
    column_mask = torch.where(column_valid, 0.0, float("-inf")).to(logits.dtype)
    logits = torch.where(row_valid[:, None], logits + column_mask, torch.zeros_like(logits))
    return torch.where(
        row_valid, F.cross_entropy(logits, labels, reduction="none"), torch.zeros_like(labels, dtype=logits.dtype)
    )


class _GatherWithGradient(torch.autograd.Function):
    """All processes' tensors, with each gradient sent back to (and summed on) the process that owns the rows.

    Written here because `torch.distributed.nn.functional.all_gather` is deprecated in torch 2.13 and its import
    starts RPC machinery that can abort a process at exit; the backward is an all-reduce of the gradient of the
    whole gathered tensor followed by taking one's own slice (a reduce-scatter, which gloo lacks).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def gather_with_gradient(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenation of every process's `tensor` (same shape everywhere), differentiable back to each owner."""
    return _GatherWithGradient.apply(tensor, group)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def distributed_clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    pad_to: int | None = None,
    valid: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """This process's share of the CLIP loss over the global batch of all processes.

    Each process gathers every process's embeddings (gradients flow back to their owners through the gather) and
    scores its own rows against all of them: memory grows as `local x global`, not `global x global`. Summed over
    processes and divided by the world size, as DDP's gradient averaging does, the shares give exactly the loss and
    gradients of [`clip_loss`] on the concatenated batch.

    Args:
        image_embeds, text_embeds (`torch.Tensor` of shape `(local_batch, dim)`): this process's normalised pairs.
        inverse_temperature (`torch.Tensor`, scalar): `exp(logit_scale)`.
        pad_to (`int`, *optional*): the largest local batch any process can have (the per-device batch size).
            Local batches are padded to it and the padding is masked out, so processes may hold different numbers
            of pairs (an uneven last batch) without a host synchronisation to agree on sizes.
        valid (`torch.Tensor` of shape `(local_batch,)`, *optional*): `False` for rows that are no pair, as in
            [`clip_loss`]. With no valid pair anywhere the loss is 0 (connected to the graph).
        group: the process group; defaults to the world.
    """
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    local = image_embeds.shape[0]
    rows = pad_to if pad_to is not None else local
    if local > rows:
        raise ValueError(f"A local batch of {local} pairs is larger than pad_to={rows}.")

    local_valid = torch.ones(local, dtype=torch.bool, device=image_embeds.device) if valid is None else valid
    padded_valid = _pad_rows(local_valid, rows)
    all_valid = [torch.empty_like(padded_valid) for _ in range(world_size)]
    dist.all_gather(all_valid, padded_valid, group=group)
    column_valid = torch.cat(all_valid)
    all_images = gather_with_gradient(_pad_rows(image_embeds, rows), group)
    all_texts = gather_with_gradient(_pad_rows(text_embeds, rows), group)

    labels = rank * rows + torch.arange(local, device=image_embeds.device)
    # Padded and invalid columns are no negatives and take no gradient.
    logits_image_to_text = inverse_temperature * image_embeds @ all_texts.T
    logits_text_to_image = inverse_temperature * text_embeds @ all_images.T
    total = (
        _masked_cross_entropies(logits_image_to_text, labels, local_valid, column_valid).sum()
        + _masked_cross_entropies(logits_text_to_image, labels, local_valid, column_valid).sum()
    )
    # Normalise by the global number of pairs, times the world size that DDP's averaging divides by again.
    global_pairs = column_valid.sum().clamp(min=1)
    return total / 2 / global_pairs * world_size


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    gather_negatives: bool = True,
    pad_to: int | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """[`distributed_clip_loss`] when several processes train and `gather_negatives` is on, else [`clip_loss`]."""
    if gather_negatives and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return distributed_clip_loss(image_embeds, text_embeds, inverse_temperature, pad_to=pad_to, valid=valid)
    return clip_loss(image_embeds, text_embeds, inverse_temperature, valid=valid)
