"""Cached accumulation gives the gradients of one big batch: in float64 and float32, with dropout, in 2 processes, and
through the real Trainer loop, where it also logs the big batch's loss."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_TEXT, TINY_VISION, build_trainer
from transformers import CLIPConfig, CLIPModel, TrainerCallback

from clip_trainer.gradient_cache import GradientCache, RandomState
from clip_trainer.loss import clip_loss, contrastive_loss
from clip_trainer.trainer import CLIPContrastiveTrainer

VOCAB, EOS, SEQ = 64, 63, 7
# (rtol, atol) for gradients that differ only in the order of floating-point sums.
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-6)}


def make_model(dtype: torch.dtype, dropout: float = 0.0, seed: int = 0) -> CLIPModel:
    """A tiny CLIP with attention dropout on both towers and a trainable `logit_scale`."""
    config = CLIPConfig(
        text_config={**TINY_TEXT, "vocab_size": VOCAB, "max_position_embeddings": SEQ, "bos_token_id": 0,
                     "pad_token_id": 1, "eos_token_id": EOS, "attention_dropout": dropout},
        vision_config={**TINY_VISION, "attention_dropout": dropout},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config).to(dtype)
    model.train()
    return model


def make_batches(sizes: list[int], dtype: torch.dtype, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of random pixels and captions of one length, so that they also concatenate into one batch."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        input_ids = torch.randint(2, EOS, (size, SEQ), generator=generator)
        input_ids[:, -1] = EOS
        batches.append(
            {
                "pixel_values": torch.randn(size, 3, 32, 32, generator=generator, dtype=dtype),
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
            }
        )
    return batches


def make_cache(model: CLIPModel, per_device_batch: int, accumulation: int) -> GradientCache:
    """The cache as the trainer builds it, with plain-autograd callables (no accelerator, no float32 cast), so that
    the cached path can be checked in float64 and in spawned processes."""

    def embed(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = model(**batch, return_loss=False)
        return outputs.image_embeds, outputs.text_embeds

    return GradientCache(
        embed=embed,
        loss_scalars=lambda: (model.logit_scale.exp(),),
        loss=lambda images, texts, scale, pad_to, valid: contrastive_loss(
            images, texts, scale, pad_to=pad_to, valid=valid
        ),
        backward=lambda loss: loss.backward(),
        micro_batch_size=per_device_batch,
        accumulation_steps=accumulation,
    )


def gradients(model: CLIPModel) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def cached_step(model: CLIPModel, batches: list[dict], seed: int, per_device_batch: int | None = None):
    """One optimizer step's gradients and summed returned losses, with the Trainer's call pattern."""
    model.zero_grad(set_to_none=True)
    cache = make_cache(model, per_device_batch or max(len(b["input_ids"]) for b in batches), len(batches))
    cache.start_step(batches)
    torch.manual_seed(seed)
    total = sum(cache.training_step(batch) for batch in batches)
    return gradients(model), total


def big_batch_step(model: CLIPModel, batches: list[dict], seed: int, one_forward: bool):
    """The reference: `clip_loss` over the concatenated batch, one backward.

    With `one_forward`, the batch goes through the model at once. Otherwise each micro-batch goes forward with
    gradients from the same seed, in order, so that dropout draws the masks the cached path draws, and the loss is
    still computed and backpropagated once over all embeddings.
    """
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if one_forward:
        inputs = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
        outputs = [model(**inputs, return_loss=False)]
    else:
        outputs = [model(**batch, return_loss=False) for batch in batches]
    image = torch.cat([output.image_embeds for output in outputs])
    text = torch.cat([output.text_embeds for output in outputs])
    loss = clip_loss(image, text, model.logit_scale.exp())
    loss.backward()
    return gradients(model), loss.detach()


def assert_gradients_close(got: dict, expected: dict, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    assert got.keys() == expected.keys() and "logit_scale" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cached_accumulation_equals_one_big_batch(dtype):
    model = make_model(dtype)
    batches = make_batches([4, 3, 5, 4], dtype)  # uneven micro-batches, as skipped samples leave them
    expected, expected_loss = big_batch_step(model, batches, seed=0, one_forward=True)
    got, loss = cached_step(model, batches, seed=0)
    assert_gradients_close(got, expected, dtype)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol)
    assert expected["logit_scale"].abs().item() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_cached_accumulation_with_dropout_reuses_the_masks(dtype):
    model = make_model(dtype, dropout=0.3)
    batches = make_batches([4, 4, 2], dtype)
    expected, expected_loss = big_batch_step(model, batches, seed=5, one_forward=False)
    got, loss = cached_step(model, batches, seed=5)
    assert_gradients_close(got, expected, dtype)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol)
    # Dropout is really on: other masks give other gradients, so the equality above is not vacuous.
    other, _ = cached_step(model, batches, seed=6)
    assert not torch.allclose(other["vision_model.encoder.layers.0.self_attn.q_proj.weight"],
                              expected["vision_model.encoder.layers.0.self_attn.q_proj.weight"])  # fmt: skip


def test_a_short_last_step_and_padding_to_the_full_step():
    """An epoch's last step with fewer micro-batches than `gradient_accumulation_steps` is still exact."""
    model = make_model(torch.float64)
    batches = make_batches([4, 1], torch.float64)
    expected, _ = big_batch_step(model, batches, seed=0, one_forward=True)
    got, _ = cached_step(model, batches, seed=0, per_device_batch=4)
    assert_gradients_close(got, expected, torch.float64)


def test_random_state_round_trip():
    state = RandomState.capture()
    first = torch.rand(3)
    state.restore()
    assert torch.equal(torch.rand(3), first)


def test_owns_only_the_stashed_micro_batches():
    batches = make_batches([2, 2], torch.float32)
    cache = make_cache(make_model(torch.float32), 2, 2)
    cache.start_step(batches)
    assert cache.owns(batches[1])
    assert not cache.owns(dict(batches[1]))  # an equal dict is not the Trainer's micro-batch


# --- 2 processes (gloo): each holds its micro-batches; the result equals 1 process on the global batch ------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RANK_SIZES = [[3, 2], [3, 3]]  # rank 0's second micro-batch is short: the gathered accumulated batch is padded


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = make_model(torch.float64)
        all_batches = make_batches([size for sizes in RANK_SIZES for size in sizes], torch.float64)
        start = sum(len(sizes) for sizes in RANK_SIZES[:rank])
        batches = all_batches[start : start + len(RANK_SIZES[rank])]
        per_device = max(size for sizes in RANK_SIZES for size in sizes)
        grads, loss = cached_step(model, batches, seed=0, per_device_batch=per_device)
        # What DDP does with the accumulated gradients at the synchronised micro-batch: average them.
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world_size
        # What the Trainer does with the logged loss: the mean over processes.
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"grads": grads, "loss": loss / world_size}, os.path.join(out_dir, "result.pt"))
        # Both processes leave together: gloo aborts a process whose peer tears the group down mid-exchange.
        dist.barrier()
    finally:
        dist.destroy_process_group()


# Spawns processes (slow on 2 cores): the slow tier; the default suite keeps one exact two-process test (test_loss.py).
@pytest.mark.slow
def test_two_processes_with_cached_accumulation_equal_one_big_batch(tmp_path):
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt")
    model = make_model(torch.float64)
    batches = make_batches([size for sizes in RANK_SIZES for size in sizes], torch.float64)
    expected, expected_loss = big_batch_step(model, batches, seed=0, one_forward=True)
    assert_gradients_close(result["grads"], expected, torch.float64)
    torch.testing.assert_close(result["loss"], expected_loss, rtol=1e-12, atol=1e-12)


# --- through the Trainer: a trainer, built directly, that records batches and gradients ---------------------------


class _RecordGradients(TrainerCallback):
    def __init__(self, store: dict) -> None:
        self.store = store

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.store.setdefault("grads", gradients(model))


class RecordingTrainer(CLIPContrastiveTrainer):
    """Keeps the initial weights, the first step's micro-batches and the gradients the optimizer is handed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.initial_model = copy.deepcopy(self.model)
        self.record: dict = {}
        self.add_callback(_RecordGradients(self.record))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.record.setdefault("batches", batches)
        return batches, num_items


def run_one_step(tmp_path, tiny_clip_dir, shapes_csv, mode: str, **overrides) -> RecordingTrainer:
    trainer = build_trainer(
        tmp_path, tiny_clip_dir, shapes_csv, trainer_class=RecordingTrainer,
        per_device_train_batch_size=4, gradient_accumulation_steps=4, max_steps=1,
        max_grad_norm=0,  # the recorded gradients are the raw ones, not clipped ones
        logging_steps=1, accumulation_mode=mode, **overrides,
    )  # fmt: skip
    trainer.train()
    return trainer


def reference_losses(trainer: RecordingTrainer) -> tuple[dict, torch.Tensor, dict, torch.Tensor]:
    """From the initial weights and the recorded micro-batches: the big batch's gradients and loss, and the mean of
    the micro-batches' own losses (plain accumulation)."""
    model = trainer.initial_model
    model.train()
    embeddings = [
        trainer.embed(model, batch) for batch in trainer.record["batches"]
    ]  # captions are padded per micro-batch
    image = torch.cat([image for image, _ in embeddings])
    text = torch.cat([text for _, text in embeddings])
    model.zero_grad(set_to_none=True)
    big_loss = clip_loss(image, text, model.logit_scale.exp())
    big_loss.backward(retain_graph=True)
    big_grads = gradients(model)
    model.zero_grad(set_to_none=True)
    micro_loss = sum(clip_loss(i, t, model.logit_scale.exp()) for i, t in embeddings) / len(embeddings)
    micro_loss.backward()
    return big_grads, big_loss.detach(), gradients(model), micro_loss.detach()


def test_trainer_cached_accumulation_equals_the_big_batch_and_logs_its_loss(tmp_path, tiny_clip_dir, shapes_csv):
    trainer = run_one_step(tmp_path, tiny_clip_dir, shapes_csv, "cached")
    assert trainer.gradient_cache is not None
    assert [len(batch["input_ids"]) for batch in trainer.record["batches"]] == [4, 4, 4, 4]
    big_grads, big_loss, micro_grads, micro_loss = reference_losses(trainer)
    assert_gradients_close(trainer.record["grads"], big_grads, torch.float32)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0] == pytest.approx(big_loss.item(), rel=1e-5)
    # Sanity: 16 pairs against each other give another loss than four groups of 4.
    assert abs(big_loss.item() - micro_loss.item()) > 1e-3


def test_trainer_independent_accumulation_is_plain_accumulation(tmp_path, tiny_clip_dir, shapes_csv):
    trainer = run_one_step(tmp_path, tiny_clip_dir, shapes_csv, "independent")
    assert trainer.gradient_cache is None
    big_grads, _, micro_grads, micro_loss = reference_losses(trainer)
    assert_gradients_close(trainer.record["grads"], micro_grads, torch.float32)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0] == pytest.approx(micro_loss.item(), rel=1e-5)
    # Fewer negatives, other gradients.
    name = "text_projection.weight"
    assert not torch.allclose(trainer.record["grads"][name], big_grads[name], rtol=1e-3, atol=1e-6)


def test_trainer_cached_accumulation_under_bf16_autocast(tmp_path, tiny_clip_dir, shapes_csv):
    """The towers run in bf16 and the loss and cached gradients in float32: the gradients point where float32's do."""
    trainer = run_one_step(tmp_path, tiny_clip_dir, shapes_csv, "cached", bf16=True)
    big_grads, big_loss, _, _ = reference_losses(trainer)
    got = torch.cat([trainer.record["grads"][name].flatten() for name in big_grads])
    expected = torch.cat([grad.flatten() for grad in big_grads.values()])
    assert torch.nn.functional.cosine_similarity(got, expected, dim=0) > 0.99
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0] == pytest.approx(big_loss.item(), rel=2e-2)


# --- the sigmoid loss: cached accumulation of a SigLIP model equals one big batch ---------------------------------


def test_cached_accumulation_of_the_sigmoid_loss_equals_one_big_batch():
    from transformers import SiglipConfig, SiglipModel

    from clip_trainer.loss import sigmoid_contrastive_loss, sigmoid_loss

    config = SiglipConfig(
        text_config={**TINY_TEXT, "vocab_size": VOCAB, "max_position_embeddings": SEQ, "pad_token_id": 1,
                     "attention_dropout": 0.2},
        vision_config={**TINY_VISION, "attention_dropout": 0.2},
    )  # fmt: skip
    torch.manual_seed(0)
    model = SiglipModel(config).double()
    with torch.no_grad():  # away from transformers' zero init, so that both scalars take gradients
        model.logit_scale.fill_(1.5)
        model.logit_bias.fill_(-2.0)
    model.train()
    batches = make_batches([4, 3, 5], torch.float64)

    def embed(batch):
        outputs = model(**batch)
        return outputs.image_embeds, outputs.text_embeds

    cache = GradientCache(
        embed=embed,
        loss_scalars=lambda: (model.logit_scale.exp().reshape(()), model.logit_bias),
        loss=lambda images, texts, scale, bias, pad_to, valid: sigmoid_contrastive_loss(
            images, texts, scale, bias, pad_to=pad_to, valid=valid
        ),
        backward=lambda loss: loss.backward(),
        micro_batch_size=5,
        accumulation_steps=3,
    )
    cache.start_step(batches)
    torch.manual_seed(3)
    total = sum(cache.training_step(batch) for batch in batches)
    got = gradients(model)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks, micro-batch by micro-batch
    outputs = [model(**batch) for batch in batches]
    image = torch.cat([output.image_embeds for output in outputs])
    text = torch.cat([output.text_embeds for output in outputs])
    expected_loss = sigmoid_loss(image, text, model.logit_scale.exp().reshape(()), model.logit_bias)
    expected_loss.backward()
    expected = gradients(model)
    assert {"logit_scale", "logit_bias"} <= expected.keys() and expected["logit_bias"].abs().item() > 0
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )
    torch.testing.assert_close(total, expected_loss.detach(), rtol=1e-12, atol=1e-12)
