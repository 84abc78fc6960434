"""The distillation loss (KL from a teacher's similarity distributions to the student's) against a float64 reference
written out here, its masks, and its 2-process gathered form against 1 process."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip_trainer.loss import distillation_loss


def reference_distillation(
    student_image: list[list[float]],
    student_text: list[list[float]],
    teacher_image: list[list[float]],
    teacher_text: list[list[float]],
    student_scale: float,
    teacher_scale: float,
    intra_modal_weight: float = 0.0,
) -> float:
    """The loss from its definition, with python floats (double precision) and no torch: for each image its softmax
    over the texts, for each text its softmax over the images, KL(teacher || student) per row, the mean over rows,
    the mean of the two directions. With `intra_modal_weight`, plus that weight times the same for each image's
    softmax over the other images and each text's over the other texts (a row with no other adds 0, the mean still
    over all rows)."""
    n = len(student_image)

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    def log_softmax(row: list[float]) -> list[float]:
        top = max(row)
        log_sum_exp = top + math.log(sum(math.exp(v - top) for v in row))
        return [v - log_sum_exp for v in row]

    def mean_kl(teacher_rows: list[list[float]], student_rows: list[list[float]]) -> float:
        total = 0.0
        for teacher_row, student_row in zip(teacher_rows, student_rows):
            if not teacher_row:
                continue
            log_p, log_q = log_softmax(teacher_row), log_softmax(student_row)
            total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
        return total / len(teacher_rows)

    def others(a: list[list[float]], scale: float) -> list[list[float]]:
        """Each row's logits against every other row of its own modality."""
        return [[scale * dot(a[i], a[j]) for j in range(n) if j != i] for i in range(n)]

    s_i2t = [[student_scale * dot(student_image[i], student_text[j]) for j in range(n)] for i in range(n)]
    t_i2t = [[teacher_scale * dot(teacher_image[i], teacher_text[j]) for j in range(n)] for i in range(n)]
    s_t2i = [[s_i2t[i][j] for i in range(n)] for j in range(n)]
    t_t2i = [[t_i2t[i][j] for i in range(n)] for j in range(n)]
    cross = (mean_kl(t_i2t, s_i2t) + mean_kl(t_t2i, s_t2i)) / 2
    intra = (
        mean_kl(others(teacher_image, teacher_scale), others(student_image, student_scale))
        + mean_kl(others(teacher_text, teacher_scale), others(student_text, student_scale))
    ) / 2
    return cross + intra_modal_weight * intra


def embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)


def problem(n: int, student_dim: int = 6, teacher_dim: int = 9, seed: int = 0):
    """A student and a teacher of other widths, on the same n pairs."""
    return (
        embeddings(n, student_dim, seed),
        embeddings(n, student_dim, seed + 1),
        embeddings(n, teacher_dim, seed + 2),
        embeddings(n, teacher_dim, seed + 3),
    )


@pytest.mark.parametrize("intra_modal_weight", [0.0, 0.5])
@pytest.mark.parametrize("n, student_scale, teacher_scale", [(1, 1.0, 3.0), (5, 14.3, 100.0), (13, 50.0, 20.0)])
def test_distillation_loss_matches_float64_reference(n, student_scale, teacher_scale, intra_modal_weight):
    student_image, student_text, teacher_image, teacher_text = problem(n, seed=n)
    expected = reference_distillation(
        student_image.tolist(), student_text.tolist(), teacher_image.tolist(), teacher_text.tolist(),
        student_scale, teacher_scale, intra_modal_weight,
    )  # fmt: skip
    got = distillation_loss(
        student_image, student_text, teacher_image, teacher_text,
        torch.tensor(student_scale, dtype=torch.float64), teacher_scale, intra_modal_weight=intra_modal_weight,
    )  # fmt: skip
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    if n > 1:
        assert expected > 1e-3  # a real divergence, not a vacuous 0
    if n > 1 and intra_modal_weight:
        cross_only = reference_distillation(
            student_image.tolist(), student_text.tolist(), teacher_image.tolist(), teacher_text.tolist(),
            student_scale, teacher_scale,
        )  # fmt: skip
        assert expected - cross_only > 1e-3  # the image-to-image and text-to-text term is there


def test_the_intra_modal_term_leaves_each_row_out_of_its_own_distribution():
    # A student whose rows are the teacher's in another order within one modality changes the intra-modal term only
    # through the other rows: identical embeddings give 0, whatever each row's similarity to itself would add.
    image, text, _, _ = problem(6)
    scale = torch.tensor(20.0, dtype=torch.float64)
    assert distillation_loss(image, text, image, text, scale, scale, intra_modal_weight=2.0).abs().item() < 1e-15
    # Two identical images in the batch: each is the other's nearest neighbour for both models, finite and exact.
    image = torch.cat([image[:1], image[:5]])
    got = distillation_loss(image, text, image.flip(0), text, scale, 30.0, intra_modal_weight=1.0)
    expected = reference_distillation(image.tolist(), text.tolist(), image.flip(0).tolist(), text.tolist(), 20.0,
                                      30.0, 1.0)  # fmt: skip
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_the_loss_is_zero_for_a_student_that_ranks_as_the_teacher_and_positive_otherwise():
    image, text, _, _ = problem(7)
    scale = torch.tensor(20.0, dtype=torch.float64)
    assert distillation_loss(image, text, image, text, scale, scale).abs().item() < 1e-15
    # The same rankings at another sharpness are not the same distributions.
    assert distillation_loss(image, text, image, text, scale, 2 * scale).item() > 1e-3


def test_gradients_reach_the_student_and_its_inverse_temperature():
    student_image, student_text, teacher_image, teacher_text = problem(6)
    student_image.requires_grad_(True)
    student_text.requires_grad_(True)
    log_scale = torch.tensor(math.log(14.3), dtype=torch.float64, requires_grad=True)
    loss = distillation_loss(student_image, student_text, teacher_image, teacher_text, log_scale.exp(), 30.0)
    loss.backward()
    # Checked against central finite differences of the loss itself (float64).
    step = 1e-6

    def value(scale_offset: float = 0.0) -> float:
        with torch.no_grad():
            scale = (log_scale + scale_offset).exp()
            return distillation_loss(student_image, student_text, teacher_image, teacher_text, scale, 30.0).item()

    numeric = (value(step) - value(-step)) / (2 * step)
    assert log_scale.grad.item() == pytest.approx(numeric, rel=1e-6)
    assert student_image.grad.abs().max() > 0 and student_text.grad.abs().max() > 0


@pytest.mark.parametrize("intra_modal_weight", [0.0, 0.7])
def test_masked_rows_are_no_pairs(intra_modal_weight):
    student_image, student_text, teacher_image, teacher_text = problem(6)
    valid = torch.tensor([True, True, False, True, False, True])
    student_image.requires_grad_(True)
    scale = torch.tensor(14.3, dtype=torch.float64)
    masked = distillation_loss(student_image, student_text, teacher_image, teacher_text, scale, 40.0, valid=valid,
                               intra_modal_weight=intra_modal_weight)  # fmt: skip
    masked.backward()
    kept = reference_distillation(
        student_image.detach()[valid].tolist(), student_text[valid].tolist(), teacher_image[valid].tolist(),
        teacher_text[valid].tolist(), 14.3, 40.0, intra_modal_weight,
    )  # fmt: skip
    assert masked.item() == pytest.approx(kept, rel=1e-12)
    assert student_image.grad[~valid].abs().max() == 0 and student_image.grad[valid].abs().max() > 0
    assert torch.isfinite(student_image.grad).all()

    for alone in (torch.zeros(6, dtype=torch.bool), torch.tensor([False, False, True, False, False, False])):
        student_image.grad = None
        nothing = distillation_loss(student_image, student_text, teacher_image, teacher_text, scale, scale,
                                    valid=alone, intra_modal_weight=intra_modal_weight)  # fmt: skip
        nothing.backward()
        # Only unusable samples, or one pair alone (the same student and teacher scale: its one-column
        # distributions agree): 0, in the graph, and no NaN in the gradients.
        assert nothing.abs().item() < 1e-15 and torch.isfinite(student_image.grad).all()
        if not alone.any():
            assert torch.equal(student_image.grad, torch.zeros_like(student_image))


# --- the gathered loss: 2 processes (gloo) against 1 process holding the whole batch ------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _features(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """A stand-in for a tower: a shared parameter maps inputs to normalised embeddings."""
    return F.normalize(inputs @ weight, dim=-1)


def _tower_problem(n: int):
    generator = torch.Generator().manual_seed(11)
    image_inputs = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    text_inputs = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    image_weight = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    text_weight = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    teacher_image = F.normalize(torch.randn(n, 7, generator=generator, dtype=torch.float64), dim=-1)
    teacher_text = F.normalize(torch.randn(n, 7, generator=generator, dtype=torch.float64), dim=-1)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    return image_inputs, text_inputs, image_weight, text_weight, log_scale, teacher_image, teacher_text


TEACHER_SCALE = 60.0
# (local batch sizes, pad_to, masked global rows, intra-modal weight): all run in one spawn of two processes.
DISTRIBUTED_CASES = {
    "even": ([4, 4], 4, [], 0.0),
    "uneven-padded": ([5, 3], 5, [], 0.0),
    "unusable-rows-masked": ([5, 3], 5, [1, 6], 0.0),
    "intra-modal-uneven-masked": ([5, 3], 5, [1, 6], 0.8),
}


def _distributed_share(
    rank: int, world_size: int, sizes: list[int], pad_to: int, masked: list[int], intra_modal_weight: float
) -> dict:
    image_inputs, text_inputs, image_weight, text_weight, log_scale, teacher_image, teacher_text = _tower_problem(
        sum(sizes)
    )
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    for tensor in (image_weight, text_weight, log_scale):
        tensor.requires_grad_(True)
    valid = torch.tensor([row not in masked for row in range(rows.start, rows.stop)])
    loss = distillation_loss(
        _features(image_weight, image_inputs[rows]),
        _features(text_weight, text_inputs[rows]),
        teacher_image[rows],
        teacher_text[rows],
        log_scale.exp(),
        TEACHER_SCALE,
        pad_to=pad_to,
        valid=valid,
        intra_modal_weight=intra_modal_weight,
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


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: str, cases: list[str]):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {name: _distributed_share(rank, world_size, *DISTRIBUTED_CASES[name]) for name in cases}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        # Both processes leave together: gloo aborts a process whose peer tears the group down mid-exchange.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _two_process_results(out_dir, cases: list[str]) -> dict:
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(out_dir), cases), nprocs=2, join=True)
    return torch.load(out_dir / "result.pt")


def _check_against_one_process(case: str, result: dict) -> None:
    sizes, _, masked, intra_modal_weight = DISTRIBUTED_CASES[case]
    image_inputs, text_inputs, image_weight, text_weight, log_scale, teacher_image, teacher_text = _tower_problem(
        sum(sizes)
    )
    for tensor in (image_weight, text_weight, log_scale):
        tensor.requires_grad_(True)
    # The reference holds the usable rows only, in one process.
    keep = torch.tensor([row not in masked for row in range(sum(sizes))])
    loss = distillation_loss(
        _features(image_weight, image_inputs[keep]),
        _features(text_weight, text_inputs[keep]),
        teacher_image[keep],
        teacher_text[keep],
        log_scale.exp(),
        TEACHER_SCALE,
        intra_modal_weight=intra_modal_weight,
    )
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
    for got, expected in zip(result["grads"], [image_weight.grad, text_weight.grad, log_scale.grad]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert log_scale.grad.abs().item() > 0


# Spawns processes (slow on 2 cores): the slow tier; the default suite keeps one exact two-process test (test_loss.py).
@pytest.mark.slow
def test_two_process_distillation_equals_one_process_with_masked_and_uneven_rows(tmp_path):
    """One spawn covers the hardest case: uneven local batches, padded, with unusable rows on both processes, and the
    intra-modal term (each row left out of its own distribution at its place among both processes' rows)."""
    case = "intra-modal-uneven-masked"
    _check_against_one_process(case, _two_process_results(tmp_path, [case])[case])


@pytest.mark.slow
def test_two_process_distillation_equals_one_process_in_every_case(tmp_path):
    results = _two_process_results(tmp_path, list(DISTRIBUTED_CASES))
    for case in DISTRIBUTED_CASES:
        _check_against_one_process(case, results[case])
