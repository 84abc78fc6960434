"""Contrastive losses over one process's batch or over the global batch of all processes: CLIP's symmetric
cross-entropy and SigLIP's sigmoid loss.

Plain functions over embeddings, so the maths is tested without a model or a trainer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    valid: torch.Tensor | None = None,
    image_ids: torch.Tensor | None = None,
    hard_negatives: torch.Tensor | None = None,
    hard_negative_valid: torch.Tensor | None = None,
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
        image_ids (`torch.Tensor` of shape `(batch,)`, *optional*): the image each row shows. Rows of one image
            (several captions of it) are no negatives of each other: row `j` is left out of row `i`'s candidates, as
            image and as text, when `image_ids[i] == image_ids[j]`. Default: every row its own image.
        hard_negatives (`torch.Tensor` of shape `(batch, k, dim)`, *optional*): normalised text embeddings of
            captions that are wrong for row `i`'s image; each image's candidate texts (the image-to-text direction)
            are the batch's captions and its own hard negatives.
        hard_negative_valid (`torch.Tensor` of shape `(batch, k)`, *optional*): `False` for the slots of
            `hard_negatives` that hold none (rows have different numbers of them). Default: all are real.
    """
    if valid is None and image_ids is None and hard_negatives is None:
        logits = inverse_temperature * image_embeds @ text_embeds.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    rows = image_embeds.shape[0]
    device = image_embeds.device
    labels = torch.arange(rows, device=device)
    row_valid = torch.ones(rows, dtype=torch.bool, device=device) if valid is None else valid.to(device)
    ids = None if image_ids is None else image_ids.to(device)
    total = _clip_sum(
        image_embeds, text_embeds, image_embeds, text_embeds, inverse_temperature, labels, row_valid, row_valid,
        ids, ids, hard_negatives, hard_negative_valid,
    )  # fmt: skip
    pairs = rows if valid is None else row_valid.sum().clamp(min=1)
    return total / 2 / pairs


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


def _padding_and_validity(
    embeds: torch.Tensor, pad_to: int | None, valid: torch.Tensor | None, group
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The rows every process pads its batch to, this process's validity flags, and every process's padded flags
    `(world_size, rows)`: padding and unusable rows are `False`, and take no part in the loss."""
    local = embeds.shape[0]
    rows = pad_to if pad_to is not None else local
    if local > rows:
        raise ValueError(f"A local batch of {local} pairs is larger than pad_to={rows}.")
    local_valid = torch.ones(local, dtype=torch.bool, device=embeds.device) if valid is None else valid
    padded = _pad_rows(local_valid, rows)
    everyone = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, padded, group=group)
    return rows, local_valid, torch.stack(everyone)


def distributed_clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    pad_to: int | None = None,
    valid: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    image_ids: torch.Tensor | None = None,
    hard_negatives: torch.Tensor | None = None,
    hard_negative_valid: torch.Tensor | None = None,
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
        image_ids, hard_negatives, hard_negative_valid: as in [`clip_loss`]. Image ids are gathered with the
            embeddings, so that rows of one image on different processes are no negatives of each other either; hard
            negatives stay with their image's process (they are candidates of that image only).

    A process with no pair (every sample of its batch unusable) contributes 0 and still takes part in the gathers; when
    no process has a pair, the loss is 0 rather than NaN, with zero gradients.
    """
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    local = image_embeds.shape[0]
    rows, local_valid, all_valid = _padding_and_validity(image_embeds, pad_to, valid, group)
    column_valid = all_valid.flatten()
    all_images = gather_with_gradient(_pad_rows(image_embeds, rows), group)
    all_texts = gather_with_gradient(_pad_rows(text_embeds, rows), group)
    labels = rank * rows + torch.arange(local, device=image_embeds.device)
    local_ids = column_ids = None
    if image_ids is not None:  # gathered beside the embeddings: rows of one image on two processes are related too
        local_ids = image_ids.to(image_embeds.device)
        column_ids = _gather_ids(local_ids, rows, group).flatten()
    total = _clip_sum(
        image_embeds, text_embeds, all_images, all_texts, inverse_temperature, labels, local_valid, column_valid,
        local_ids, column_ids, hard_negatives, hard_negative_valid,
    )  # fmt: skip
    # Normalise by the global number of pairs, times the world size that DDP's averaging divides by again. When no
    # process holds a pair, `total` is an empty sum: 0 over 1 keeps the loss finite (and still in the graph, so every
    # process runs the gather's backward) where 0 over 0 would be NaN; with a pair anywhere the clamp does nothing.
    return total / 2 / column_valid.sum().clamp(min=1) * world_size


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    gather_negatives: bool = True,
    pad_to: int | None = None,
    valid: torch.Tensor | None = None,
    image_ids: torch.Tensor | None = None,
    hard_negatives: torch.Tensor | None = None,
    hard_negative_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """[`distributed_clip_loss`] when several processes train and `gather_negatives` is on, else [`clip_loss`]."""
    relations = {"image_ids": image_ids, "hard_negatives": hard_negatives, "hard_negative_valid": hard_negative_valid}
    if gather_negatives and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return distributed_clip_loss(
            image_embeds, text_embeds, inverse_temperature, pad_to=pad_to, valid=valid, **relations
        )
    return clip_loss(image_embeds, text_embeds, inverse_temperature, valid=valid, **relations)


# --------------------------------------------------------------------------------------------------------------
# SigLIP's sigmoid loss
# --------------------------------------------------------------------------------------------------------------


def _sigmoid_logits_and_labels(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    logit_bias: torch.Tensor,
    positive_offset: int | None,
    positives: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The similarities, the logits `inverse_temperature * similarity + logit_bias` and the +-1 labels of a block of pairs.

    Image row `i` matches text column `i + positive_offset`; with `positive_offset=None` the block holds negatives only.
    `positives` (`(rows, columns)` booleans), when given, marks further positive pairs: a caption of the same image.
    """
    similarity = image_embeds @ text_embeds.T
    logits = inverse_temperature * similarity + logit_bias
    labels = torch.full_like(logits, -1.0)
    if positive_offset is not None:
        labels.diagonal(positive_offset).fill_(1.0)
    if positives is not None:
        labels.masked_fill_(positives, 1.0)
    return similarity, logits, labels


def _sigmoid_pair_sum(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    logit_bias: torch.Tensor,
    positive_offset: int | None = 0,
    column_weight: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sum_ij -log sigmoid(label_ij * logit_ij)` over a block of pairs, each text column weighted by `column_weight`
    and each image row by `row_weight` (0 for padding and for unusable samples)."""
    _, logits, labels = _sigmoid_logits_and_labels(
        image_embeds, text_embeds, inverse_temperature, logit_bias, positive_offset, positives
    )
    losses = -F.logsigmoid(labels * logits)
    if column_weight is not None:
        losses = losses * column_weight
    if row_weight is not None:
        losses = losses * row_weight[:, None]
    return losses.sum()


def _sigmoid_pair_sum_gradients(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    logit_bias: torch.Tensor,
    positive_offset: int | None,
    column_weight: torch.Tensor,
    row_weight: torch.Tensor,
    grad_output: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `grad_output * _sigmoid_pair_sum(...)` with respect to the images, the texts, the scale and the
    bias, written out so that the ring's backward holds one block's `local x local` logits and no autograd graph.

    The embeddings' gradients come in the embeddings' dtypes: under autocast the matmuls give bf16 or fp16, and the
    ring adds text gradients up across processes.
    """
    similarity, logits, labels = _sigmoid_logits_and_labels(
        image_embeds, text_embeds, inverse_temperature, logit_bias, positive_offset, positives
    )
    # d/dz of -log sigmoid(l * z) is -l * sigmoid(-l * z).
    grad_logits = -labels * torch.sigmoid(-labels * logits) * column_weight * row_weight[:, None] * grad_output
    grad_images = (inverse_temperature * (grad_logits @ text_embeds)).to(image_embeds.dtype)
    grad_texts = (inverse_temperature * (grad_logits.T @ image_embeds)).to(text_embeds.dtype)
    return grad_images, grad_texts, (grad_logits * similarity).sum(), grad_logits.sum()


def sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    logit_bias: torch.Tensor,
    valid: torch.Tensor | None = None,
    image_ids: torch.Tensor | None = None,
    hard_negatives: torch.Tensor | None = None,
    hard_negative_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss over one batch of matching pairs (Zhai et al., 2023, "Sigmoid Loss for Language Image
    Pre-Training").

    Every image-text combination is a binary classification. With logits
    `z_ij = inverse_temperature * image_embeds[i] . text_embeds[j] + logit_bias` and labels `l_ij = +1` when `i == j` (row `i`
    of both is a pair) and `-1` otherwise, the loss is

        `-sum_{i,j} log sigmoid(l_ij * z_ij) / n`

    where `n` is the number of pairs in the batch: the sum over all `n^2` combinations divided by `n`, as in the paper,
    not their mean (which would be `n` times smaller). An empty batch gives NaN (0 / 0), as [`clip_loss`] does.

    Args:
        image_embeds (`torch.Tensor` of shape `(batch, dim)`): L2-normalised image embeddings.
        text_embeds (`torch.Tensor` of shape `(batch, dim)`): L2-normalised text embeddings.
        inverse_temperature (`torch.Tensor`, scalar): the inverse temperature `t`, i.e. `exp` of the model's `logit_scale`
            (SigLIP starts it at `t = 10`).
        logit_bias (`torch.Tensor`, scalar): the bias `b`, used as it is (SigLIP starts it at `b = -10`).
        valid (`torch.Tensor` of shape `(batch,)`, *optional*): `False` for rows that are no pair (a sample the
            collator could not use): neither their image nor their text takes part, and `n` counts the valid pairs;
            with none the loss is 0, still connected to the graph.
        image_ids (`torch.Tensor` of shape `(batch,)`, *optional*): the image each row shows; a caption of the same
            image is a positive (`l_ij = +1` when `image_ids[i] == image_ids[j]`), not a negative.
        hard_negatives (`torch.Tensor` of shape `(batch, k, dim)`, *optional*): normalised embeddings of captions
            that are wrong for row `i`'s image: each adds a negative pair `(i, h)` to the sum (still divided by `n`).
        hard_negative_valid (`torch.Tensor` of shape `(batch, k)`, *optional*): `False` for empty slots.
    """
    weight = None if valid is None else valid.to(image_embeds.dtype)
    positives = None if image_ids is None else image_ids[:, None] == image_ids[None, :]
    total = _sigmoid_pair_sum(
        image_embeds, text_embeds, inverse_temperature, logit_bias, 0, weight, weight, positives=positives
    )
    if hard_negatives is not None:
        total = total + _sigmoid_hard_negative_sum(
            image_embeds, hard_negatives, inverse_temperature, logit_bias, hard_negative_valid, weight
        )
    pairs = image_embeds.shape[0] if valid is None else valid.sum().clamp(min=1)
    return total / pairs


class _RingShift:
    """`tensor` sent to the next process of the ring while the previous process's is received, until [`wait`].

    Non-blocking, so that the exchange of the next block overlaps the maths on the current one.
    """

    def __init__(self, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
        world_size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        # Kept referenced until the send completes.
        self.sent = tensor.contiguous()
        if world_size == 1:  # a ring of one: the shift is the identity
            self.received, self._works = self.sent, []
            return
        self.received = torch.empty_like(self.sent)
        self._works = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, self.sent, group=group, group_peer=(rank + 1) % world_size),
                dist.P2POp(dist.irecv, self.received, group=group, group_peer=(rank - 1) % world_size),
            ]
        )

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        return self.received


class _RingSigmoidPairSum(torch.autograd.Function):
    """The sigmoid loss's sum over this process's images against every process's texts, the text blocks passed round a
    ring of the processes.

    At step `k` a process holds the (padded) text block of the process `k` places to its left, adds its images'
    pairs with that block to the sum, and meanwhile passes the block on to its right. Only one block's
    `local x local` logits and two text blocks exist at a time.

    The backward runs the ring again rather than keeping every process's block: each block travels with the gradient
    that the processes it has visited have added to it, and comes back to its owner, after a full circle, with every
    process's gradient for it summed. A block's owner keeps its own part at home, so the gradient starts travelling at
    the second process and, like the block, makes `world_size - 1` hops; from the third step on it rides in the same
    exchange as the next block, one step behind it, so that every exchange overlaps the maths of a step.
    """

    @staticmethod
    def forward(ctx, image_embeds, text_block, inverse_temperature, logit_bias, block_weights, group, block_ids=None):
        world_size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        # `block_ids` (`(world_size, rows)`): every process's image ids, when rows of one image are positives.
        ctx.save_for_backward(image_embeds, text_block, inverse_temperature, logit_bias, block_weights, block_ids)
        ctx.group = group
        # What `torch.amp.custom_bwd` does, for whichever device the embeddings are on: the backward's matmuls run
        # under the autocast state of the forward's.
        device_type = image_embeds.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

        sums = []
        block = text_block
        row_weight = block_weights[rank, : image_embeds.shape[0]]  # this process's images: valid or not
        for step in range(world_size):
            shift = _RingShift(block, group) if step < world_size - 1 else None
            owner = (rank - step) % world_size
            positive_offset = 0 if step == 0 else None  # only a process's own block holds its positives
            sums.append(
                _sigmoid_pair_sum(
                    image_embeds,
                    block,
                    inverse_temperature,
                    logit_bias,
                    positive_offset,
                    block_weights[owner],
                    row_weight,
                    _same_image(block_ids, rank, owner, image_embeds.shape[0]),
                )
            )
            if shift is not None:
                block = shift.wait()
        return torch.stack(sums).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        image_embeds, text_block, inverse_temperature, logit_bias, block_weights, block_ids = ctx.saved_tensors
        group = ctx.group
        world_size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        device_type, autocast_enabled, autocast_dtype = ctx.autocast

        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
            grad_images = torch.zeros_like(image_embeds)
            grad_scale = torch.zeros_like(inverse_temperature)
            grad_bias = torch.zeros_like(logit_bias)
            block = text_block
            own_grad = travelling = None
            row_weight = block_weights[rank, : image_embeds.shape[0]]
            for step in range(world_size):
                # Out: this block, to the right neighbour's next step (none after the last step), and, from the third
                # step on, the gradient of the previous step's block to the right neighbour, who holds that block now.
                # In: the next block, and the gradient so far of the block held now, from the left.
                sends_block = step < world_size - 1
                sends_grad = step >= 2
                outgoing = ([block] if sends_block else []) + ([travelling] if sends_grad else [])
                shift = _RingShift(torch.stack(outgoing), group) if outgoing else None

                owner = (rank - step) % world_size
                positive_offset = 0 if step == 0 else None
                step_images, step_texts, step_scale, step_bias = _sigmoid_pair_sum_gradients(
                    image_embeds,
                    block,
                    inverse_temperature,
                    logit_bias,
                    positive_offset,
                    block_weights[owner],
                    row_weight,
                    grad_output,
                    _same_image(block_ids, rank, owner, image_embeds.shape[0]),
                )
                grad_images += step_images
                grad_scale += step_scale.reshape_as(grad_scale)
                grad_bias += step_bias.reshape_as(grad_bias)

                incoming = shift.wait().unbind() if shift is not None else ()
                if step == 0:
                    own_grad = step_texts
                elif sends_grad:
                    travelling = incoming[-1] + step_texts
                else:  # the second step: the first process to add to this block's travelling gradient
                    travelling = step_texts
                if sends_block:
                    block = incoming[0]
            # The last block held is the right neighbour's own: its gradient, complete, goes home; ours comes back.
            grad_texts = own_grad if world_size == 1 else own_grad + _RingShift(travelling, group).wait()

        return (
            grad_images if ctx.needs_input_grad[0] else None,
            grad_texts if ctx.needs_input_grad[1] else None,
            grad_scale if ctx.needs_input_grad[2] else None,
            grad_bias if ctx.needs_input_grad[3] else None,
            None,
            None,
            None,
        )


def distributed_sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    logit_bias: torch.Tensor,
    pad_to: int | None = None,
    group: dist.ProcessGroup | None = None,
    ring: bool = False,
    valid: torch.Tensor | None = None,
    image_ids: torch.Tensor | None = None,
    hard_negatives: torch.Tensor | None = None,
    hard_negative_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """This process's share of the sigmoid loss over the global batch of all processes.

    Each process scores its own images against every process's texts; the sigmoid loss is a sum over pairs, so the
    processes' shares together cover every image-text combination of the global batch once. Summed over processes
    and divided by the world size, as DDP's gradient averaging does, the shares give exactly the loss and gradients of
    [`sigmoid_loss`] on the concatenated batch: the sum over all combinations divided by the global number of pairs.

    Texts reach the other processes in one of two ways, with equal results:

    - `ring=False`: one differentiable all-gather of the texts ([`gather_with_gradient`]), then the local images
      against all of them at once; the logits take `local x global` memory.
    - `ring=True`: the text blocks go round a ring of the processes with point-to-point sends, one block per step
      (the way big_vision and open_clip distribute SigLIP); each step holds `local x local` logits and two blocks,
      never the global batch's texts, and the backward sends each block's gradient back round the ring to its owner.
      It takes `world_size - 1` sequential steps, each overlapping its exchange with its maths.

    Args:
        image_embeds, text_embeds (`torch.Tensor` of shape `(local_batch, dim)`): this process's normalised pairs.
        inverse_temperature (`torch.Tensor`, scalar): the inverse temperature, `exp` of the model's `logit_scale`.
        logit_bias (`torch.Tensor`, scalar): the bias added to every logit.
        pad_to (`int`, *optional*): the largest local batch any process can have (the per-device batch size). Local
            text blocks are padded to it and the padding masked out (padded rows are neither positives nor
            negatives), so processes may hold different numbers of pairs without a host synchronisation to agree on
            sizes. Without it, every process must hold the same number of pairs.
        group: the process group; defaults to the world.
        ring (`bool`, *optional*, defaults to `False`): exchange text blocks round a ring instead of all-gathering
            them.
        valid (`torch.Tensor` of shape `(local_batch,)`, *optional*): `False` for rows that are no pair, as in
            [`sigmoid_loss`]; they are masked like padding.
        image_ids, hard_negatives, hard_negative_valid: as in [`sigmoid_loss`]. Image ids are gathered (once, beside
            the validity flags), so that captions of one image on two processes are positives in either exchange;
            hard negatives are pairs of this process's images only, summed here.

    A process with no pair (every sample of its batch unusable) contributes 0 and still takes part in every exchange,
    forward and backward; when no process has a pair, the loss is 0 rather than NaN, with zero gradients.
    """
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    local = image_embeds.shape[0]
    rows, _, all_valid = _padding_and_validity(image_embeds, pad_to, valid, group)
    block_weights = all_valid.to(image_embeds.dtype)
    text_block = _pad_rows(text_embeds, rows)
    block_ids = None if image_ids is None else _gather_ids(image_ids.to(image_embeds.device), rows, group)
    if ring:
        device = image_embeds.device
        total = _RingSigmoidPairSum.apply(
            image_embeds,
            text_block,
            torch.as_tensor(inverse_temperature, device=device),
            torch.as_tensor(logit_bias, device=device),
            block_weights,
            group,
            block_ids,
        )
    else:
        all_texts = gather_with_gradient(text_block, group)
        total = _sigmoid_pair_sum(
            image_embeds,
            all_texts,
            inverse_temperature,
            logit_bias,
            rank * rows,
            block_weights.flatten(),
            block_weights[rank, :local],
            positives=None if block_ids is None else block_ids[rank, :local, None] == block_ids.flatten()[None, :],
        )
    if hard_negatives is not None:
        total = total + _sigmoid_hard_negative_sum(
            image_embeds,
            hard_negatives,
            inverse_temperature,
            logit_bias,
            hard_negative_valid,
            block_weights[rank, :local],
        )
    return total / block_weights.sum().clamp(min=1) * world_size


def sigmoid_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    inverse_temperature: torch.Tensor,
    logit_bias: torch.Tensor,
    gather_negatives: bool = True,
    pad_to: int | None = None,
    ring: bool = False,
    valid: torch.Tensor | None = None,
    image_ids: torch.Tensor | None = None,
    hard_negatives: torch.Tensor | None = None,
    hard_negative_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """[`distributed_sigmoid_loss`] when several processes train and `gather_negatives` is on, else [`sigmoid_loss`]."""
    relations = {"image_ids": image_ids, "hard_negatives": hard_negatives, "hard_negative_valid": hard_negative_valid}
    if gather_negatives and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return distributed_sigmoid_loss(
            image_embeds,
            text_embeds,
            inverse_temperature,
            logit_bias,
            pad_to=pad_to,
            ring=ring,
            valid=valid,
            **relations,
        )
    return sigmoid_loss(image_embeds, text_embeds, inverse_temperature, logit_bias, valid=valid, **relations)


# --------------------------------------------------------------------------------------------------------------
# Rows of one image (several captions) and hard negatives
# --------------------------------------------------------------------------------------------------------------
# Separate functions rather than branches inside the plain ones: without image ids and hard negatives the plain
# losses run exactly as they always have (and cost no extra gather).


def _gather_ids(ids: torch.Tensor, rows: int, group) -> torch.Tensor:
    """Every process's image ids, padded to `rows`: `(world_size, rows)`. No gradient: ids are labels."""
    padded = _pad_rows(ids, rows)
    everyone = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, padded, group=group)
    return torch.stack(everyone)


def _same_image(block_ids: torch.Tensor | None, rank: int, owner: int, local: int) -> torch.Tensor | None:
    """Which of this process's images and the `owner` process's texts show the same image (`None`: no ids)."""
    if block_ids is None:
        return None
    return block_ids[rank, :local, None] == block_ids[owner][None, :]


def _hard_negative_valid(hard_negatives: torch.Tensor, hard_negative_valid: torch.Tensor | None) -> torch.Tensor:
    if hard_negative_valid is not None:
        return hard_negative_valid.to(device=hard_negatives.device, dtype=torch.bool)
    return torch.ones(hard_negatives.shape[:2], dtype=torch.bool, device=hard_negatives.device)


def _candidates(
    row_ids: torch.Tensor, column_ids: torch.Tensor, labels: torch.Tensor, column_valid: torch.Tensor
) -> torch.Tensor:
    """`(rows, columns)`: the columns each row is contrasted with: its own pair, and every usable column that shows
    another image (a second caption of the row's image is neither a positive nor a negative there)."""
    columns = torch.arange(column_ids.shape[0], device=column_ids.device)
    own = columns[None, :] == labels[:, None]
    return column_valid[None, :] & ((row_ids[:, None] != column_ids[None, :]) | own)


def _cross_entropies_over(
    logits: torch.Tensor, labels: torch.Tensor, row_valid: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """Per-row cross-entropies over each row's candidate columns (a 2-D mask, where [`_masked_cross_entropies`] takes
    one set of columns for all rows); invalid rows give exactly 0, as there."""
    mask = torch.zeros_like(logits).masked_fill(~candidates, float("-inf"))
    logits = torch.where(row_valid[:, None], logits + mask, torch.zeros_like(logits))
    return torch.where(
        row_valid, F.cross_entropy(logits, labels, reduction="none"), torch.zeros_like(labels, dtype=logits.dtype)
    )


def _clip_sum(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    all_images: torch.Tensor,
    all_texts: torch.Tensor,
    inverse_temperature: torch.Tensor,
    labels: torch.Tensor,
    local_valid: torch.Tensor,
    column_valid: torch.Tensor,
    local_ids: torch.Tensor | None,
    column_ids: torch.Tensor | None,
    hard_negatives: torch.Tensor | None,
    hard_negative_valid: torch.Tensor | None,
) -> torch.Tensor:
    """The sum over this process's valid rows of both cross-entropies: every valid column a candidate, except, with
    image ids, the other rows of the row's own image; with hard negatives, each image's among its candidate texts."""
    logits_image_to_text = inverse_temperature * image_embeds @ all_texts.T
    logits_text_to_image = inverse_temperature * text_embeds @ all_images.T
    if local_ids is None and hard_negatives is None:  # one set of candidate columns for every row
        return (
            _masked_cross_entropies(logits_image_to_text, labels, local_valid, column_valid).sum()
            + _masked_cross_entropies(logits_text_to_image, labels, local_valid, column_valid).sum()
        )
    if local_ids is None:  # every row its own image: its column position is an id no other row has
        local_ids = labels
        column_ids = torch.arange(column_valid.shape[0], device=labels.device)
    candidates = _candidates(local_ids, column_ids, labels, column_valid)
    text_candidates = candidates
    if hard_negatives is not None:
        hard_logits = inverse_temperature * torch.einsum("bd,bkd->bk", image_embeds, hard_negatives)
        logits_image_to_text = torch.cat([logits_image_to_text, hard_logits], dim=1)
        text_candidates = torch.cat([candidates, _hard_negative_valid(hard_negatives, hard_negative_valid)], dim=1)
    return (
        _cross_entropies_over(logits_image_to_text, labels, local_valid, text_candidates).sum()
        + _cross_entropies_over(logits_text_to_image, labels, local_valid, candidates).sum()
    )


def _sigmoid_hard_negative_sum(
    image_embeds: torch.Tensor,
    hard_negatives: torch.Tensor,
    inverse_temperature: torch.Tensor,
    logit_bias: torch.Tensor,
    hard_negative_valid: torch.Tensor | None,
    row_weight: torch.Tensor | None,
) -> torch.Tensor:
    """`sum_ik -log sigmoid(-(t * image_i . hard_ik + b))`: each image's hard negatives as negative pairs, empty slots
    and unusable rows weighted 0."""
    logits = inverse_temperature * torch.einsum("bd,bkd->bk", image_embeds, hard_negatives) + logit_bias
    losses = -F.logsigmoid(-logits) * _hard_negative_valid(hard_negatives, hard_negative_valid).to(logits.dtype)
    if row_weight is not None:
        losses = losses * row_weight[:, None]
    return losses.sum()


# --------------------------------------------------------------------------------------------------------------
# Distillation: the KL divergence from a teacher's similarity distributions to the student's
# --------------------------------------------------------------------------------------------------------------


def _masked_log_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Each row's log-softmax over the columns `keep` (`(rows, columns)`) marks, with 0 (not -inf) elsewhere.

    Zeros rather than -inf: a zero probability times a `-inf - -inf` difference would be NaN, in the forward and in
    the backward, even where it is multiplied by 0. A row with no column kept has its logits replaced by zeros
    before the softmax (as in [`_masked_cross_entropies`]), so that it gives no NaN either.
    """
    row_kept = keep.any(dim=-1, keepdim=True)
    logits = torch.where(row_kept, logits.masked_fill(~keep, float("-inf")), torch.zeros_like(logits))
    return torch.where(keep, logits.log_softmax(dim=-1), torch.zeros_like(logits))


def _kl_divergence_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`sum_i KL(softmax(teacher_logits[i]) || softmax(student_logits[i]))`, each softmax over the columns `keep`
    marks in its row (a row with none adds 0). `torch.nn.functional.kl_div` takes no mask, and its zero-target
    convention would still need the masked entries out of the student's softmax, so the few lines are written here."""
    teacher_log_probs = _masked_log_softmax(teacher_logits, keep)
    student_log_probs = _masked_log_softmax(student_logits, keep)
    teacher_probs = torch.where(keep, teacher_log_probs.exp(), torch.zeros_like(teacher_log_probs))
    return (teacher_probs * (teacher_log_probs - student_log_probs)).sum()


def distillation_loss(
    student_image_embeds: torch.Tensor,
    student_text_embeds: torch.Tensor,
    teacher_image_embeds: torch.Tensor,
    teacher_text_embeds: torch.Tensor,
    student_inverse_temperature: torch.Tensor,
    teacher_inverse_temperature: torch.Tensor | float,
    gather: bool = True,
    pad_to: int | None = None,
    valid: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    intra_modal_weight: float = 0.0,
) -> torch.Tensor:
    """The KL divergence from the teacher's similarity distributions over the batch to the student's.

    Each image's distribution over the batch's texts is the softmax of its logits `inverse_temperature x cosine`
    (image-to-text), and each text's over the images likewise (text-to-image); the student's come from its
    embeddings and `student_inverse_temperature`, the teacher's from its own embeddings (of the same pairs, through
    its own processor; any width) and `teacher_inverse_temperature`. The loss is

        `(mean_i KL(p_i2t_i || q_i2t_i) + mean_i KL(p_t2i_i || q_t2i_i)) / 2`

    with `p` the teacher's and `q` the student's distributions, the means over the valid pairs. It is 0 when the
    student ranks the batch as the teacher does, at the same sharpness.

    With `intra_modal_weight` `w > 0` the loss adds `w x (mean_i KL(p_i2i_i || q_i2i_i) + mean_i KL(p_t2t_i ||
    q_t2t_i)) / 2`: each image's distribution over the batch's *other* images (the softmax of `inverse_temperature x
    cosine`, its own column left out), and each text's over the other texts. These tell which images (and captions)
    the teacher finds alike, which the cross-modal distributions of a teacher trained on the same pairs hardly do:
    on its own training pairs they are nearly one-hot, while a student trained on fewer pairs than its teacher
    learns from the teacher's neighbourhoods (the benchmark in docs/fine-tuning.md). The means are over the valid
    pairs; a pair with no other valid pair in the batch adds 0. For SigLIP models too the distributions are
    softmaxes over the batch of the model's logits: SigLIP's bias shifts a whole row and leaves its softmax unchanged.

    The teacher's embeddings and inverse temperature are constants (no gradient is asked of them); the student's
    inverse temperature may carry a gradient (it learns the teacher's sharpness) or be a constant.

    Args:
        student_image_embeds, student_text_embeds (`torch.Tensor` of shape `(batch, dim)`): the student's normalised
            pairs.
        teacher_image_embeds, teacher_text_embeds (`torch.Tensor` of shape `(batch, teacher_dim)`): the teacher's
            normalised embeddings of the same pairs, row for row.
        student_inverse_temperature, teacher_inverse_temperature (`torch.Tensor` or `float`, scalars): what each
            model's cosines are multiplied by before the softmax.
        gather (`bool`, *optional*, defaults to `True`): under distributed training, each process's rows are
            distributions over every process's batch (the student's columns gathered with their gradients, as in
            [`distributed_clip_loss`], and the teacher's); summed over processes and divided by the world size, the
            shares give the loss and gradients over the concatenated batch. Else (or with one process) the local batch.
        pad_to (`int`, *optional*): the largest local batch any process can have, as in [`distributed_clip_loss`].
        valid (`torch.Tensor` of shape `(batch,)`, *optional*): `False` for rows that are no pair: they are neither
            rows nor columns of any distribution. With no valid pair the loss is 0, still connected to the graph.
        group: the process group; defaults to the world.
        intra_modal_weight (`float`, *optional*, defaults to 0): the weight of the image-to-image and text-to-text
            term (above); 0 leaves it out.
    """
    distributed = gather and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    first_row = 0  # this process's first row among the columns
    if distributed:
        world_size = dist.get_world_size(group)
        rows, row_valid, all_valid = _padding_and_validity(student_image_embeds, pad_to, valid, group)
        column_valid = all_valid.flatten()
        first_row = dist.get_rank(group) * rows
        # The student's columns keep their gradients (back to the process that owns them); the teacher's have none.
        student_images = gather_with_gradient(_pad_rows(student_image_embeds, rows), group)
        student_texts = gather_with_gradient(_pad_rows(student_text_embeds, rows), group)
        teacher_images = gather_with_gradient(_pad_rows(teacher_image_embeds, rows), group)
        teacher_texts = gather_with_gradient(_pad_rows(teacher_text_embeds, rows), group)
    else:
        world_size = 1
        local = student_image_embeds.shape[0]
        row_valid = torch.ones(local, dtype=torch.bool, device=student_image_embeds.device) if valid is None else valid
        column_valid = row_valid
        student_images, student_texts = student_image_embeds, student_text_embeds
        teacher_images, teacher_texts = teacher_image_embeds, teacher_text_embeds

    keep = row_valid[:, None] & column_valid[None, :]

    def divergence(teacher_rows, teacher_columns, student_rows, student_columns, pairs):
        return _kl_divergence_sum(
            teacher_inverse_temperature * teacher_rows @ teacher_columns.T,
            student_inverse_temperature * student_rows @ student_columns.T,
            pairs,
        )

    total = divergence(teacher_image_embeds, teacher_texts, student_image_embeds, student_texts, keep)
    total = total + divergence(teacher_text_embeds, teacher_images, student_text_embeds, student_images, keep)
    if intra_modal_weight:
        # Each row's own column (its place among every process's rows) is no neighbour of itself.
        local_rows = torch.arange(len(row_valid), device=keep.device)
        others = keep.clone()
        others[local_rows, local_rows + first_row] = False
        intra = divergence(teacher_image_embeds, teacher_images, student_image_embeds, student_images, others)
        intra = intra + divergence(teacher_text_embeds, teacher_texts, student_text_embeds, student_texts, others)
        total = total + intra_modal_weight * intra
    # As in `distributed_clip_loss`: over the global number of pairs, times the world size that DDP's averaging
    # divides by again; clamped so that a batch without pairs gives 0, not 0 / 0.
    return total / 2 / column_valid.sum().clamp(min=1) * world_size
