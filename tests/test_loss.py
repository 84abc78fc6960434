"""The contrastive loss against a float64 reference written out here, and its 2-process form against 1 process."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip_trainer.loss import clip_loss, distributed_clip_loss


def reference_clip_loss(image: list[list[float]], text: list[list[float]], scale: float) -> float:
    """CLIP's loss from its definition, with python floats (double precision) and no torch."""
    n = len(image)
    logits = [[scale * sum(a * b for a, b in zip(image[i], text[j])) for j in range(n)] for i in range(n)]

    def cross_entropy(rows: list[list[float]]) -> float:
        total = 0.0
        for i, row in enumerate(rows):
            top = max(row)
            log_sum_exp = top + math.log(sum(math.exp(v - top) for v in row))
            total += log_sum_exp - row[i]
        return total / len(rows)

    columns = [[logits[i][j] for i in range(n)] for j in range(n)]
    return (cross_entropy(logits) + cross_entropy(columns)) / 2


def random_pairs(n: int, dim: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=generator, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=generator, dtype=dtype), dim=-1)
    return image, text


@pytest.mark.parametrize("n, dim, scale", [(1, 4, 1.0), (5, 8, 14.3), (17, 3, 100.0)])
def test_clip_loss_matches_float64_reference(n, dim, scale):
    image, text = random_pairs(n, dim, seed=n)
    expected = reference_clip_loss(image.tolist(), text.tolist(), scale)
    got = clip_loss(image, text, torch.tensor(scale, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    got32 = clip_loss(image.float(), text.float(), torch.tensor(scale))
    assert got32.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_clip_loss_is_low_for_matching_pairs_and_symmetric():
    eye = torch.eye(4, dtype=torch.float64)
    # Perfectly aligned pairs with a high scale: the loss approaches zero.
    assert clip_loss(eye, eye, torch.tensor(100.0, dtype=torch.float64)).item() < 1e-10
    image, text = random_pairs(6, 5, seed=3)
    scale = torch.tensor(7.0, dtype=torch.float64)
    assert clip_loss(image, text, scale).item() == pytest.approx(clip_loss(text, image, scale).item(), rel=1e-12)


def test_masked_rows_are_no_pairs():
    image, text = random_pairs(6, 4, seed=4)
    scale = torch.tensor(14.3, dtype=torch.float64)
    valid = torch.tensor([True, True, False, True, False, True])
    image.requires_grad_(True)
    masked = clip_loss(image, text, scale, valid=valid)
    masked.backward()
    assert masked.item() == pytest.approx(clip_loss(image.detach()[valid], text[valid], scale).item(), rel=1e-12)
    assert image.grad[~valid].abs().max() == 0 and image.grad[valid].abs().max() > 0
    nothing = clip_loss(image, text, scale, valid=torch.zeros(6, dtype=torch.bool))
    assert nothing.item() == 0 and nothing.requires_grad  # a batch of only unusable samples: 0, in the graph


# --- the distributed loss: 2 processes (gloo) against 1 process holding the whole batch --------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _features(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """A stand-in for a tower: a shared parameter maps inputs to normalised embeddings."""
    return F.normalize(inputs @ weight, dim=-1)


# (local batch sizes, pad_to, masked global rows): all run in one spawn of two processes.
DISTRIBUTED_CASES = {
    "even": ([4, 4], 4, []),
    "uneven-padded": ([5, 3], 5, []),
    "unusable-rows-masked": ([5, 3], 5, [1, 6]),
}


def _distributed_share(rank: int, world_size: int, sizes: list[int], pad_to: int, masked: list[int]) -> dict:
    image_inputs, text_inputs, image_weight, text_weight, log_scale = _problem(sum(sizes))
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    image_weight.requires_grad_(True)
    text_weight.requires_grad_(True)
    log_scale.requires_grad_(True)
    valid = torch.tensor([row not in masked for row in range(rows.start, rows.stop)])
    loss = distributed_clip_loss(
        _features(image_weight, image_inputs[rows]),
        _features(text_weight, text_inputs[rows]),
        log_scale.exp(),
        pad_to=pad_to,
        valid=valid,
    )
    loss.backward()
    # What DDP does with the parameter gradients: average them over processes.
    grads = [image_weight.grad, text_weight.grad, log_scale.grad]
    for grad in grads:
        dist.all_reduce(grad)
        grad /= world_size
    losses = [torch.zeros_like(loss) for _ in range(world_size)]
    dist.all_gather(losses, loss.detach())
    return {"loss": torch.stack(losses).mean(), "grads": grads}


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: str):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {name: _distributed_share(rank, world_size, *case) for name, case in DISTRIBUTED_CASES.items()}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        # Both processes leave together: gloo aborts a process whose peer tears the group down mid-exchange.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("distributed-clip")
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(out_dir)), nprocs=2, join=True)
    return torch.load(out_dir / "result.pt")


def _problem(n: int):
    generator = torch.Generator().manual_seed(11)
    image_inputs = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    text_inputs = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    image_weight = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    text_weight = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    return image_inputs, text_inputs, image_weight, text_weight, log_scale


@pytest.mark.parametrize("case", list(DISTRIBUTED_CASES))
def test_two_process_loss_and_gradients_equal_one_process(distributed_results, case):
    sizes, _, masked = DISTRIBUTED_CASES[case]
    result = distributed_results[case]

    image_inputs, text_inputs, image_weight, text_weight, log_scale = _problem(sum(sizes))
    for tensor in (image_weight, text_weight, log_scale):
        tensor.requires_grad_(True)
    # The reference holds the usable rows only.
    keep = torch.tensor([row not in masked for row in range(sum(sizes))])
    image_inputs, text_inputs = image_inputs[keep], text_inputs[keep]
    loss = clip_loss(_features(image_weight, image_inputs), _features(text_weight, text_inputs), log_scale.exp())
    loss.backward()

    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
    for got, expected in zip(result["grads"], [image_weight.grad, text_weight.grad, log_scale.grad]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
