"""SigLIP's sigmoid loss against a float64 reference written out here and its gradients against finite differences;
its distributed forms (all-gather and ring, 2 and 4 gloo processes) against 1 process on the concatenated batch."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip_trainer import loss as loss_module
from clip_trainer.loss import distributed_clip_loss, distributed_sigmoid_loss, sigmoid_contrastive_loss, sigmoid_loss


def reference_sigmoid_loss(image: list[list[float]], text: list[list[float]], scale: float, bias: float) -> float:
    """SigLIP's loss from its definition, with python floats (double precision) and no torch."""
    n = len(image)
    total = 0.0
    for i in range(n):
        for j in range(n):
            logit = scale * sum(a * b for a, b in zip(image[i], text[j])) + bias
            label = 1.0 if i == j else -1.0
            total -= math.log(1 / (1 + math.exp(-label * logit)))
    return total / n  # by the number of pairs, not the n * n combinations


def random_pairs(n: int, dim: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=generator, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=generator, dtype=dtype), dim=-1)
    return image, text


@pytest.mark.parametrize(
    "n, dim, scale, bias", [(1, 4, 1.0, 0.0), (5, 8, 10.0, -10.0), (17, 3, 3.7, 2.5)], ids=["one", "init", "other"]
)
def test_sigmoid_loss_matches_float64_reference(n, dim, scale, bias):
    image, text = random_pairs(n, dim, seed=n)
    expected = reference_sigmoid_loss(image.tolist(), text.tolist(), scale, bias)
    got = sigmoid_loss(image, text, torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    got32 = sigmoid_loss(image.float(), text.float(), torch.tensor(scale), torch.tensor(bias))
    assert got32.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("shape", [(), (1,)], ids=["scalar", "shape-1"])  # `SiglipModel` keeps shape-(1,) parameters
def test_sigmoid_loss_gradients_match_finite_differences(shape):
    image, text = random_pairs(6, 5, seed=2)
    scale = torch.full(shape, 10.0, dtype=torch.float64)
    bias = torch.full(shape, -10.0, dtype=torch.float64)
    inputs = tuple(tensor.clone().requires_grad_(True) for tensor in (image, text, scale, bias))
    assert torch.autograd.gradcheck(sigmoid_loss, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_sigmoid_loss_is_stable_for_large_logits():
    """Logits of +-500: `log(sigmoid(x))` would be log(0) = -inf in float32; the loss must stay exact."""
    eye = torch.eye(3)
    # Matching pairs get z = 1000 * 1 - 500 (loss ~0), the 6 others z = -500, also right (loss ~0) ...
    assert sigmoid_loss(eye, eye, torch.tensor(1000.0), torch.tensor(-500.0)).item() == pytest.approx(0.0, abs=1e-30)
    # ... and with the bias at +500 the 6 negatives get z = 500, each costing -log sigmoid(-500) = 500.
    scale = torch.tensor(1000.0, requires_grad=True)
    loss = sigmoid_loss(eye, eye, scale, torch.tensor(500.0))
    assert loss.item() == pytest.approx(6 * 500 / 3, rel=1e-6)
    loss.backward()
    assert torch.isfinite(scale.grad)


# --- distributed: 2 and 4 processes (gloo), each holding its rows, against 1 process holding them all -------------

# (name, local batch sizes, pad_to) per world size.
SCENARIOS = {
    2: [("even", [4, 4], None), ("uneven-padded", [5, 3], 5), ("one-process-empty", [3, 0], 3)],
    # 4 processes take the ring through every kind of step: a block alone, a block and a gradient, a gradient alone.
    4: [("even", [3, 3, 3, 3], None), ("uneven-padded", [4, 1, 0, 2], 4)],
}
MODES = ("gather", "ring")
CASES = [(world, name, mode) for world, cases in SCENARIOS.items() for name, _, _ in cases for mode in MODES]
# One spawn of 4 processes runs every case: the 2-process ones in a group of the world's ranks 1 and 3, whose ranks
# in the group (0 and 1) differ from their ranks in the world, as a ring's neighbours must be found in the group.
WORLD_SIZE = 4
PAIR_GROUP = [1, 3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _problem(n: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Inputs, two towers' weights and SigLIP's temperature and bias parameters, shaped like `SiglipModel`'s."""
    generator = torch.Generator().manual_seed(7)
    return {
        "image_inputs": torch.randn(n, 6, generator=generator, dtype=dtype),
        "text_inputs": torch.randn(n, 5, generator=generator, dtype=dtype),
        "image_weight": torch.randn(6, 4, generator=generator, dtype=dtype),
        "text_weight": torch.randn(5, 4, generator=generator, dtype=dtype),
        # Not SigLIP's init (t = 10, b = -10): closer to 0, the loss's gradients with respect to them are larger.
        "log_scale": torch.tensor([math.log(3.0)], dtype=dtype),
        "bias": torch.tensor([-1.5], dtype=dtype),
    }


PARAMETERS = ("image_weight", "text_weight", "log_scale", "bias")


def _forward(problem: dict[str, torch.Tensor], rows: slice, loss_fn):
    """Embeds `rows` with trainable towers and returns (loss, image_embeds, text_embeds); embeddings keep their grad."""
    for name in PARAMETERS:
        problem[name].requires_grad_(True)
    image_embeds = F.normalize(problem["image_inputs"][rows] @ problem["image_weight"], dim=-1)
    text_embeds = F.normalize(problem["text_inputs"][rows] @ problem["text_weight"], dim=-1)
    image_embeds.retain_grad()
    text_embeds.retain_grad()
    # The temperature as SigLIP models feed it, through `exp`; the bias as it is.
    loss = loss_fn(image_embeds, text_embeds, problem["log_scale"].exp(), problem["bias"])
    return loss, image_embeds, text_embeds


_gather_with_gradient = loss_module.gather_with_gradient


def _no_gather(*args, **kwargs):
    raise AssertionError("the ring must not all-gather the texts")


def _share(sizes: list[int], group, loss_fn, dtype: torch.dtype = torch.float64) -> dict:
    """This process's loss share and embedding gradients, and the parameter gradients averaged as DDP does."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    problem = _problem(sum(sizes), dtype)
    start = sum(sizes[:rank])
    loss, image_embeds, text_embeds = _forward(problem, slice(start, start + sizes[rank]), loss_fn)
    loss.backward()
    grads = {}
    for name in PARAMETERS:
        grad = problem[name].grad
        if grad is not None:  # CLIP's loss has no bias
            dist.all_reduce(grad, group=group)
            grads[name] = grad / world_size
    return {
        "loss": loss.detach(),
        "requires_grad": loss.requires_grad,
        "grads": grads,
        "image_embeds_grad": image_embeds.grad,
        "text_embeds_grad": text_embeds.grad,
    }


def _cases(world_size: int, group) -> dict:
    results = {}
    for name, sizes, pad_to in SCENARIOS[world_size]:
        for mode in MODES:
            ring = mode == "ring"
            # The ring must exchange blocks itself; a fall-back to the all-gather would fail here.
            loss_module.gather_with_gradient = _no_gather if ring else _gather_with_gradient

            def loss_fn(image, text, scale, bias, pad_to=pad_to, ring=ring):
                return distributed_sigmoid_loss(image, text, scale, bias, pad_to=pad_to, group=group, ring=ring)

            results[name, mode] = _share(sizes, group, loss_fn)
    loss_module.gather_with_gradient = _gather_with_gradient
    return results


def _autocast_cases(group) -> dict:
    """Float32 embeddings, the loss under bf16 autocast, as a mixed-precision trainer computes it."""
    results = {}
    for mode in MODES:

        def loss_fn(image, text, scale, bias, ring=mode == "ring"):
            # Scalars, as CLIP models keep them: they do not promote bf16 matmul results back to float32.
            scale, bias = scale.reshape(()), bias.reshape(())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return distributed_sigmoid_loss(image, text, scale, bias, pad_to=4, group=group, ring=ring)

        results[mode] = _share([4, 1, 0, 2], group, loss_fn, dtype=torch.float32)
    return results


def _empty_cases(group) -> dict:
    """No process holds a pair: every sample of every batch was unusable."""
    results = {}
    for mode in MODES:

        def loss_fn(image, text, scale, bias, ring=mode == "ring"):
            return distributed_sigmoid_loss(image, text, scale, bias, pad_to=2, group=group, ring=ring)

        results[mode] = _share([0, 0], group, loss_fn)

    def clip_fn(image, text, scale, bias):
        return distributed_clip_loss(image, text, scale, pad_to=2, group=group)

    results["clip"] = _share([0, 0], group, clip_fn)
    return results


# Rows of the 4 x 3 global batch that are no pair (samples the collator could not use), masked by `valid`.
MASKED_SIZES, MASKED_ROWS = [3, 3, 3, 3], {1, 7, 8}


def _masked_cases(group) -> dict:
    rank = dist.get_rank(group)
    valid = torch.tensor([3 * rank + i not in MASKED_ROWS for i in range(3)])
    results = {}
    for mode in MODES:

        def loss_fn(image, text, scale, bias, ring=mode == "ring"):
            return distributed_sigmoid_loss(image, text, scale, bias, pad_to=3, group=group, ring=ring, valid=valid)

        results[mode] = _share(MASKED_SIZES, group, loss_fn)
    return results


def _dispatch_cases(rank: int, world_size: int) -> dict:
    """[`sigmoid_contrastive_loss`] over the world: distributed with `gather_negatives`, the local batch without."""
    image, text = random_pairs(4 * world_size, 4, seed=3)
    rows = slice(4 * rank, 4 * rank + 4)
    image, text = image[rows], text[rows]
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    return {
        "gathered": sigmoid_contrastive_loss(image, text, scale, bias),
        "ring": sigmoid_contrastive_loss(image, text, scale, bias, ring=True),
        "local": sigmoid_contrastive_loss(image, text, scale, bias, gather_negatives=False),
        "expected_share": distributed_sigmoid_loss(image, text, scale, bias),
        "expected_local": sigmoid_loss(image, text, scale, bias),
    }


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        pair = dist.new_group(PAIR_GROUP)  # every process of the world takes part in creating a group
        results = {
            WORLD_SIZE: _cases(WORLD_SIZE, None),
            "autocast": _autocast_cases(None),
            "dispatch": _dispatch_cases(rank, WORLD_SIZE),
            "masked": _masked_cases(None),
        }
        if rank in PAIR_GROUP:
            results[2] = _cases(2, pair)
            results["empty"] = _empty_cases(pair)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # All processes leave together: gloo aborts a process whose peer tears the group down mid-exchange.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> dict:
    """Every case's results, from one spawn: `[world_size]` lists the processes' results in their group's order."""
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_distributed_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    return {
        WORLD_SIZE: [results[WORLD_SIZE] for results in ranks],
        2: [ranks[rank][2] for rank in PAIR_GROUP],
        "empty": [ranks[rank]["empty"] for rank in PAIR_GROUP],
        "autocast": [results["autocast"] for results in ranks],
        "dispatch": [results["dispatch"] for results in ranks],
        "masked": [results["masked"] for results in ranks],
    }


def _one_process(sizes: list[int]) -> dict:
    problem = _problem(sum(sizes))
    loss, image_embeds, text_embeds = _forward(problem, slice(None), sigmoid_loss)
    loss.backward()
    return {
        "loss": loss.detach(),
        "grads": {name: problem[name].grad for name in PARAMETERS},
        "image_embeds_grad": image_embeds.grad,
        "text_embeds_grad": text_embeds.grad,
    }


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=lambda message: f"{what}: {message}")


# Spawns processes (slow on 2 cores): the slow tier; the default suite keeps one exact two-process test (test_loss.py).
@pytest.mark.slow
@pytest.mark.parametrize("world_size, scenario, mode", CASES, ids=[f"{w}-processes-{s}-{m}" for w, s, m in CASES])
def test_distributed_sigmoid_loss_and_gradients_equal_one_process(distributed_results, world_size, scenario, mode):
    sizes = next(sizes for name, sizes, _ in SCENARIOS[world_size] if name == scenario)
    shares = [results[scenario, mode] for results in distributed_results[world_size]]
    expected = _one_process(sizes)

    # The logged loss: the mean of the processes' shares.
    _close(torch.stack([share["loss"] for share in shares]).mean(), expected["loss"], "loss")
    for name in PARAMETERS:
        _close(shares[0]["grads"][name], expected["grads"][name], name)
        assert expected["grads"][name].abs().max() > 1e-3, f"{name} takes no gradient: the check would be vacuous"
    # Each process's embedding gradients, before DDP's division by the world size, are the big batch's for its rows:
    # those of its texts came back from every process that scored them.
    for key in ("image_embeds_grad", "text_embeds_grad"):
        got = torch.cat([share[key] for share in shares]) / world_size
        _close(got, expected[key], key)


@pytest.mark.parametrize("world_size, scenario", [(w, name) for w, cases in SCENARIOS.items() for name, _, _ in cases])
def test_ring_and_all_gather_agree(distributed_results, world_size, scenario):
    for results in distributed_results[world_size]:
        gathered, ring = results[scenario, "gather"], results[scenario, "ring"]
        torch.testing.assert_close(ring["loss"], gathered["loss"], rtol=1e-13, atol=1e-15)
        for key in ("image_embeds_grad", "text_embeds_grad"):
            torch.testing.assert_close(ring[key], gathered[key], rtol=1e-12, atol=1e-15)


def test_ring_and_all_gather_agree_under_bf16_autocast(distributed_results):
    """Both compute the logits in bf16 and return float32 gradients that point the same way; bf16 rounds their
    backwards differently, so element by element they differ by more than float32 would."""
    shares = {mode: [results[mode] for results in distributed_results["autocast"]] for mode in MODES}
    for gathered, ring in zip(shares["gather"], shares["ring"]):
        torch.testing.assert_close(ring["loss"], gathered["loss"], rtol=1e-5, atol=1e-6)
        for name in PARAMETERS[2:]:
            torch.testing.assert_close(ring["grads"][name], gathered["grads"][name], rtol=2e-2, atol=1e-3)

    def flat(mode: str) -> torch.Tensor:
        embeddings = [share[key] for share in shares[mode] for key in ("image_embeds_grad", "text_embeds_grad")]
        return torch.cat(
            [grad.flatten() for grad in embeddings + [shares[mode][0]["grads"][name] for name in PARAMETERS[:2]]]
        )

    assert flat("ring").dtype == torch.float32
    assert F.cosine_similarity(flat("ring"), flat("gather"), dim=0) > 0.999


@pytest.mark.parametrize("mode", [*MODES, "clip"])
def test_a_global_batch_without_pairs_gives_zero_loss_in_the_graph(distributed_results, mode):
    for results in distributed_results["empty"]:
        share = results[mode]
        assert share["requires_grad"]  # in the graph: every process ran the backward's exchanges
        assert share["loss"].item() == 0.0  # not NaN (0 / 0)
        assert share["grads"].keys() == set(PARAMETERS if mode != "clip" else PARAMETERS[:3])
        for name, grad in share["grads"].items():
            assert torch.equal(grad, torch.zeros_like(grad)), name


def test_sigmoid_contrastive_loss_dispatches_on_gather_negatives(distributed_results):
    for dispatch in distributed_results["dispatch"]:
        assert dispatch["gathered"].item() == pytest.approx(dispatch["expected_share"].item(), rel=1e-12)
        assert dispatch["ring"].item() == pytest.approx(dispatch["expected_share"].item(), rel=1e-12)
        assert dispatch["local"].item() == pytest.approx(dispatch["expected_local"].item(), rel=1e-12)
        # The two are different losses (3 against 15 negatives per image), so the checks above tell them apart.
        assert abs(dispatch["gathered"].item() - dispatch["local"].item()) > 1e-3


def test_sigmoid_contrastive_loss_is_the_plain_loss_in_one_process():
    assert not dist.is_initialized()
    image, text = random_pairs(5, 4, seed=4)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    assert torch.equal(sigmoid_contrastive_loss(image, text, scale, bias), sigmoid_loss(image, text, scale, bias))


def test_masked_rows_are_no_pairs():
    """`valid=False` rows take no part: the loss and the other rows' gradients are those of the batch without them."""
    image, text = random_pairs(6, 4, seed=5)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True, False, True])
    image.requires_grad_(True)
    masked = sigmoid_loss(image, text, scale, bias, valid=valid)
    masked.backward()
    kept = sigmoid_loss(image.detach()[valid], text[valid], scale, bias)
    assert masked.item() == pytest.approx(kept.item(), rel=1e-12)
    assert image.grad[~valid].abs().max() == 0
    nothing = sigmoid_loss(image, text, scale, bias, valid=torch.zeros(6, dtype=torch.bool))
    assert nothing.item() == 0 and nothing.requires_grad


@pytest.mark.parametrize("mode", MODES)
def test_distributed_masked_rows_equal_one_process_without_them(distributed_results, mode):
    shares = [results[mode] for results in distributed_results["masked"]]
    keep = torch.tensor([row not in MASKED_ROWS for row in range(sum(MASKED_SIZES))])
    problem = _problem(sum(MASKED_SIZES))
    loss, image_embeds, text_embeds = _forward(
        problem, slice(None), lambda i, t, s, b: sigmoid_loss(i[keep], t[keep], s, b)
    )
    loss.backward()
    _close(torch.stack([share["loss"] for share in shares]).mean(), loss.detach(), "loss")
    for name in PARAMETERS:
        _close(shares[0]["grads"][name], problem[name].grad, name)
    got = torch.cat([share["image_embeds_grad"] for share in shares]) / WORLD_SIZE
    _close(got, image_embeds.grad, "image_embeds_grad")
    assert got[~keep].abs().max() == 0
