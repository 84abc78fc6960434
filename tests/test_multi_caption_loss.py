"""Rows of one image are never each other's negatives, and hard negatives count against their image: both losses
against float64 references written out here with the mask, locally, in 2 processes (gathered, and SigLIP's ring) and
through cached accumulation."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import TINY_TEXT, TINY_VISION

from clip_trainer.gradient_cache import GradientCache
from clip_trainer.loss import (
    clip_loss,
    contrastive_loss,
    distributed_clip_loss,
    distributed_sigmoid_loss,
    sigmoid_contrastive_loss,
    sigmoid_loss,
)

# --------------------------------------------------------------------------------------------------------------
# The references: python floats (double precision), no torch, the mask written out
# --------------------------------------------------------------------------------------------------------------


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _softplus(x: float) -> float:
    """log(1 + e^x) = -log sigmoid(-x)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def reference_clip(image, text, scale, ids, valid=None, hard=None, hard_valid=None) -> float:
    """CLIP's loss where row i's candidates are the valid rows of other images and its own pair (as image and as text),
    plus, for its image, its own valid hard negatives; the mean over valid rows of the two directions."""
    n = len(image)
    valid = valid or [True] * n
    rows = [i for i in range(n) if valid[i]]
    total = 0.0
    for i in rows:
        candidates = [j for j in rows if ids[j] != ids[i] or j == i]
        to_text = [scale * _dot(image[i], text[j]) for j in candidates]
        if hard is not None:
            to_text += [scale * _dot(image[i], h) for h, ok in zip(hard[i], hard_valid[i]) if ok]
        total += _log_sum_exp(to_text) - scale * _dot(image[i], text[i])
        to_image = [scale * _dot(text[i], image[j]) for j in candidates]
        total += _log_sum_exp(to_image) - scale * _dot(text[i], image[i])
    return total / 2 / max(len(rows), 1)


def reference_sigmoid(image, text, scale, bias, ids, valid=None, hard=None, hard_valid=None) -> float:
    """SigLIP's loss where a pair of one image is positive (+1), every other pair of valid rows negative (-1), and each
    valid hard negative a negative pair of its image; the sum divided by the valid rows."""
    n = len(image)
    valid = valid or [True] * n
    rows = [i for i in range(n) if valid[i]]
    total = 0.0
    for i in rows:
        for j in rows:
            label = 1.0 if ids[i] == ids[j] else -1.0
            total += _softplus(-label * (scale * _dot(image[i], text[j]) + bias))
        if hard is not None:
            total += sum(_softplus(scale * _dot(image[i], h) + bias) for h, ok in zip(hard[i], hard_valid[i]) if ok)
    return total / max(len(rows), 1)


def random_problem(n: int, k: int, dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, dim, generator=generator, dtype=torch.float64), dim=-1)

    hard_valid = torch.rand(n, k, generator=generator) < 0.7
    return unit(n), unit(n), unit(n, k), hard_valid


IDS = [3, 7, 3, 1, 7, 3, 9, 2]  # images 3 (three captions) and 7 (two) repeat
VALID = [True, True, True, True, False, True, True, True]


@pytest.mark.parametrize("with_hard", [False, True], ids=["image-ids", "image-ids+hard-negatives"])
@pytest.mark.parametrize("with_valid", [False, True], ids=["all-rows", "an-unusable-row"])
def test_both_losses_equal_the_written_out_references(with_hard, with_valid):
    image, text, hard, hard_valid = random_problem(len(IDS), 3, 5, seed=1)
    scale, bias = 9.5, -2.5
    ids = torch.tensor(IDS)
    valid = torch.tensor(VALID) if with_valid else None
    extra = {"hard_negatives": hard, "hard_negative_valid": hard_valid} if with_hard else {}
    python = dict(
        ids=IDS,
        valid=VALID if with_valid else None,
        hard=hard.tolist() if with_hard else None,
        hard_valid=hard_valid.tolist(),
    )
    t = torch.tensor(scale, dtype=torch.float64)
    b = torch.tensor(bias, dtype=torch.float64)
    got = clip_loss(image, text, t, valid=valid, image_ids=ids, **extra)
    assert got.item() == pytest.approx(reference_clip(image.tolist(), text.tolist(), scale, **python), rel=1e-12)
    got = sigmoid_loss(image, text, t, b, valid=valid, image_ids=ids, **extra)
    expected = reference_sigmoid(image.tolist(), text.tolist(), scale, bias, **python)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_hard_negatives_alone_and_distinct_ids_change_nothing_else():
    image, text, hard, hard_valid = random_problem(6, 2, 4, seed=2)
    t = torch.tensor(14.3, dtype=torch.float64)
    b = torch.tensor(-3.0, dtype=torch.float64)
    distinct = torch.arange(6) * 10
    # Ids that are all different: the plain losses, exactly.
    assert clip_loss(image, text, t, image_ids=distinct).item() == pytest.approx(clip_loss(image, text, t).item())
    assert sigmoid_loss(image, text, t, b, image_ids=distinct).item() == pytest.approx(
        sigmoid_loss(image, text, t, b).item(), rel=1e-14
    )
    # Hard negatives without ids: every row its own image.
    python = dict(ids=list(range(6)), hard=hard.tolist(), hard_valid=hard_valid.tolist())
    got = clip_loss(image, text, t, hard_negatives=hard, hard_negative_valid=hard_valid)
    assert got.item() == pytest.approx(reference_clip(image.tolist(), text.tolist(), 14.3, **python), rel=1e-12)
    # Hard negatives make the loss larger: they are more candidates, never positives.
    assert got.item() > clip_loss(image, text, t).item()


def test_two_rows_of_one_image_are_not_each_others_negatives():
    """A batch of two captions of one image: for the softmax loss each row's only candidate is its own pair (loss 0,
    no gradient pushing the two apart); for the sigmoid loss all four pairs are positives."""
    image, text, _, _ = random_problem(2, 1, 4, seed=3)
    image = image[[0, 0]].clone().requires_grad_(True)  # one image, two captions
    text = text.clone().requires_grad_(True)
    t = torch.tensor(10.0, dtype=torch.float64)
    same = torch.tensor([5, 5])
    masked = clip_loss(image, text, t, image_ids=same)
    masked.backward()
    assert masked.item() == 0.0 and text.grad.abs().max() == 0
    assert clip_loss(image.detach(), text.detach(), t).item() > 0.01  # without ids: pushed apart
    b = torch.tensor(-1.0, dtype=torch.float64)
    logits = 10.0 * image.detach() @ text.detach().T - 1.0
    expected = -F.logsigmoid(logits).sum() / 2  # every pair labelled +1
    assert sigmoid_loss(image, text, t, b, image_ids=same).item() == pytest.approx(expected.item(), rel=1e-12)


# --------------------------------------------------------------------------------------------------------------
# 2 processes (gloo), each holding its rows: every variant in one spawn, against 1 process on the whole batch
# --------------------------------------------------------------------------------------------------------------

SIZES, PAD_TO = [5, 4], 5
GLOBAL_IDS = [0, 1, 0, 2, 3, 4, 1, 5, 0]  # image 0 on both processes and twice on the first; image 1 on both
MASKED = [3]  # an unusable row
CASES = {
    "softmax/image-ids": ("softmax", False, True, False),
    "softmax/hard-negatives": ("softmax", False, False, True),
    "softmax/both": ("softmax", False, True, True),
    "sigmoid/both": ("sigmoid", False, True, True),
    "sigmoid-ring/both": ("sigmoid", True, True, True),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _parameters():
    """Two towers and the two scalars, as float64 leaves; inputs for 9 rows and 2 hard negatives per row."""
    generator = torch.Generator().manual_seed(11)
    n = sum(SIZES)
    inputs = {
        "image": torch.randn(n, 6, generator=generator, dtype=torch.float64),
        "text": torch.randn(n, 5, generator=generator, dtype=torch.float64),
        "hard": torch.randn(n, 2, 5, generator=generator, dtype=torch.float64),
        "hard_valid": torch.tensor([[True, True], [True, False], [False, False]] * 3),
    }
    weights = [
        torch.randn(6, 4, generator=generator, dtype=torch.float64).requires_grad_(True),
        torch.randn(5, 4, generator=generator, dtype=torch.float64).requires_grad_(True),
        torch.tensor(math.log(12.0), dtype=torch.float64, requires_grad=True),
        torch.tensor(-2.0, dtype=torch.float64, requires_grad=True),
    ]
    return inputs, weights


def _embed(inputs: dict, weights: list, rows) -> dict:
    image_weight, text_weight, _, _ = weights
    return {
        "image": F.normalize(inputs["image"][rows] @ image_weight, dim=-1),
        "text": F.normalize(inputs["text"][rows] @ text_weight, dim=-1),
        "hard": F.normalize(inputs["hard"][rows] @ text_weight, dim=-1),
        "hard_valid": inputs["hard_valid"][rows],
    }


def _loss(case: str, embeds: dict, weights: list, ids, valid, distributed: bool):
    family, ring, with_ids, with_hard = CASES[case]
    scale, bias = weights[2].exp(), weights[3]
    extra = {"image_ids": ids} if with_ids else {}
    if with_hard:
        extra.update(hard_negatives=embeds["hard"], hard_negative_valid=embeds["hard_valid"])
    if family == "softmax":
        if distributed:
            return distributed_clip_loss(embeds["image"], embeds["text"], scale, pad_to=PAD_TO, valid=valid, **extra)
        return clip_loss(embeds["image"], embeds["text"], scale, valid=valid, **extra)
    if distributed:
        return distributed_sigmoid_loss(
            embeds["image"], embeds["text"], scale, bias, pad_to=PAD_TO, ring=ring, valid=valid, **extra
        )
    return sigmoid_loss(embeds["image"], embeds["text"], scale, bias, valid=valid, **extra)


def _share(rank: int, world_size: int, case: str) -> dict:
    inputs, weights = _parameters()
    start = sum(SIZES[:rank])
    rows = slice(start, start + SIZES[rank])
    valid = torch.tensor([row not in MASKED for row in range(rows.start, rows.stop)])
    loss = _loss(case, _embed(inputs, weights, rows), weights, torch.tensor(GLOBAL_IDS[rows]), valid, True)
    loss.backward()
    grads = [weight.grad if weight.grad is not None else torch.zeros_like(weight) for weight in weights]
    for grad in grads:  # what DDP does: the average over processes
        dist.all_reduce(grad)
        grad /= world_size
    losses = [torch.zeros_like(loss) for _ in range(world_size)]
    dist.all_gather(losses, loss.detach())
    return {"loss": torch.stack(losses).mean(), "grads": grads}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {case: _share(rank, world_size, case) for case in CASES}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        dist.barrier()  # both leave together: gloo aborts a process whose peer tears the group down mid-exchange
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("multi-caption-loss")
    mp.spawn(_worker, args=(2, _free_port(), str(out_dir)), nprocs=2, join=True)
    return torch.load(out_dir / "result.pt")


# Spawns processes (slow on 2 cores): the slow tier; the default suite keeps one exact two-process test (test_loss.py).
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_and_the_reference(two_process_results, case):
    inputs, weights = _parameters()
    n = sum(SIZES)
    valid = torch.tensor([row not in MASKED for row in range(n)])
    embeds = _embed(inputs, weights, slice(0, n))
    loss = _loss(case, embeds, weights, torch.tensor(GLOBAL_IDS), valid, False)
    loss.backward()
    result = two_process_results[case]
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
    for got, weight in zip(result["grads"], weights):
        expected = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # The one-process loss is the written-out reference's.
    family, _, with_ids, with_hard = CASES[case]
    python = dict(
        ids=GLOBAL_IDS if with_ids else list(range(n)),
        valid=valid.tolist(),
        hard=embeds["hard"].tolist() if with_hard else None,
        hard_valid=embeds["hard_valid"].tolist(),
    )
    image, text = embeds["image"].tolist(), embeds["text"].tolist()
    scale = math.exp(weights[2].item())
    expected = (
        reference_clip(image, text, scale, **python)
        if family == "softmax"
        else reference_sigmoid(image, text, scale, weights[3].item(), **python)
    )
    assert result["loss"].item() == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Cached accumulation: rows of one image and hard negatives across micro-batches
# --------------------------------------------------------------------------------------------------------------

VOCAB, EOS, SEQ = 64, 63, 7


def _tiny_model(family: str):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    text = {**TINY_TEXT, "vocab_size": VOCAB, "max_position_embeddings": SEQ, "pad_token_id": 1}
    torch.manual_seed(0)
    if family == "softmax":
        config = CLIPConfig(
            text_config={**text, "bos_token_id": 0, "eos_token_id": EOS}, vision_config=TINY_VISION, projection_dim=16
        )
        model = CLIPModel(config).double()
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=TINY_VISION)).double()
        with torch.no_grad():  # away from the zero init, so that both scalars take gradients
            model.logit_scale.fill_(1.5)
            model.logit_bias.fill_(-2.0)
    return model.train()


def _micro_batches(generator: torch.Generator) -> list[dict]:
    """Three micro-batches as the collator makes them: captions, then hard negatives (0, 2 and 1 slots), `image_ids`
    with images repeated inside and across micro-batches."""
    layout = [  # (image ids, hard negatives per row)
        ([4, 8, 4], [2, 0, 1]),
        ([8, 6], [0, 0]),
        ([1, 4, 2, 6], [1, 0, 0, 1]),
    ]
    batches = []
    for ids, counts in layout:
        rows, extra = len(ids), sum(counts)
        input_ids = torch.randint(2, EOS, (rows + extra, SEQ), generator=generator)
        input_ids[:, -1] = EOS
        index = torch.full((rows, max(counts)), -1, dtype=torch.long)
        start = 0
        for row, count in enumerate(counts):
            index[row, :count] = torch.arange(start, start + count)
            start += count
        batches.append(
            {
                "pixel_values": torch.randn(rows, 3, 32, 32, generator=generator, dtype=torch.float64),
                "input_ids": input_ids,
                "image_ids": torch.tensor(ids),
                "valid": torch.ones(rows, dtype=torch.bool),
                "hard_negative_index": index,
            }
        )
    return batches


def _scalars(model, family: str):
    scale = model.logit_scale.exp().reshape(())
    return (scale,) if family == "softmax" else (scale, model.logit_bias)


def _loss_of(family: str):
    if family == "softmax":
        return lambda images, texts, *scalars, **kwargs: contrastive_loss(images, texts, *scalars, **kwargs)
    return lambda images, texts, *scalars, **kwargs: sigmoid_contrastive_loss(images, texts, *scalars, **kwargs)


@pytest.mark.parametrize("family", ["softmax", "sigmoid"])
def test_cached_accumulation_masks_and_counts_hard_negatives_across_micro_batches(family):
    model = _tiny_model(family)
    batches = _micro_batches(torch.Generator().manual_seed(2))

    def embed(batch):
        # What `embed_batch_with_hard_negatives` does, kept in float64 (it gives the trainer float32).
        inputs = {key: batch[key] for key in ("pixel_values", "input_ids")}
        outputs = model(**inputs, return_loss=False)
        rows, index = outputs.image_embeds.shape[0], batch["hard_negative_index"]
        hard = outputs.text_embeds[rows:][index.clamp(min=0)]
        return outputs.image_embeds, outputs.text_embeds[:rows], hard, index >= 0

    cache = GradientCache(
        embed=embed,
        loss_scalars=lambda: _scalars(model, family),
        loss=_loss_of(family),
        backward=lambda loss: loss.backward(),
        micro_batch_size=4,
        accumulation_steps=3,
    )
    cache.start_step(batches)
    total = sum(cache.training_step(batch) for batch in batches)
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    # The reference: every micro-batch forward with a graph, one loss over the whole accumulated batch.
    model.zero_grad(set_to_none=True)
    outputs = [embed(batch) for batch in batches]
    slots = max(hard.shape[1] for _, _, hard, _ in outputs)
    image = torch.cat([image for image, _, _, _ in outputs])
    text = torch.cat([text for _, text, _, _ in outputs])
    hard = torch.cat([F.pad(h, (0, 0, 0, slots - h.shape[1])) for _, _, h, _ in outputs])
    hard_valid = torch.cat([F.pad(v, (0, slots - v.shape[1])) for _, _, _, v in outputs])
    ids = torch.cat([batch["image_ids"] for batch in batches])
    scalars = _scalars(model, family)
    if family == "softmax":
        expected_loss = clip_loss(
            image, text, *scalars, image_ids=ids, hard_negatives=hard, hard_negative_valid=hard_valid
        )
    else:
        expected_loss = sigmoid_loss(
            image, text, *scalars, image_ids=ids, hard_negatives=hard, hard_negative_valid=hard_valid
        )
    expected_loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and "logit_scale" in got
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )
    torch.testing.assert_close(total, expected_loss.detach(), rtol=1e-12, atol=1e-12)
    # The written-out reference agrees on the accumulated batch's loss.
    python = dict(ids=ids.tolist(), hard=hard.tolist(), hard_valid=hard_valid.tolist())
    t = scalars[0].item()
    reference = (
        reference_clip(image.tolist(), text.tolist(), t, **python)
        if family == "softmax"
        else reference_sigmoid(image.tolist(), text.tolist(), t, scalars[1].item(), **python)
    )
    assert total.item() == pytest.approx(reference, rel=1e-12)
