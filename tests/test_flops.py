"""FLOP counting of a CLIP training step against a hand count, and the count leaving the model untouched."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from flops import count_training_step_flops, measure_peak_flops, mfu, training_flops_per_sample  # noqa: E402

WIDTH, MLP, LAYERS, HEADS = 32, 64, 2, 2
IMAGE, PATCH, CHANNELS = 32, 8, 3
TEXT_LENGTH, VOCAB, PROJECTION = 16, 100, 16


def tiny_model(attn_implementation: str) -> CLIPModel:
    tower = {"hidden_size": WIDTH, "intermediate_size": MLP, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS}
    config = CLIPConfig(
        text_config={
            **tower,
            "max_position_embeddings": TEXT_LENGTH,
            "vocab_size": VOCAB,
            "bos_token_id": VOCAB - 2,
            "eos_token_id": VOCAB - 1,
            "pad_token_id": 0,
        },
        vision_config={**tower, "image_size": IMAGE, "patch_size": PATCH},
        projection_dim=PROJECTION,
    )
    torch.manual_seed(0)
    model = CLIPModel._from_config(config, attn_implementation=attn_implementation)
    return model.train()


def tiny_batch(rows: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB - 2, (rows, TEXT_LENGTH), generator=generator)
    input_ids[:, -1] = VOCAB - 1
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, TEXT_LENGTH // 2 :] = 0  # padding costs the same matmuls: it changes no count
    return {
        "pixel_values": torch.randint(0, 256, (rows, CHANNELS, IMAGE, IMAGE), dtype=torch.uint8, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_ids": torch.arange(rows),  # not a model input: ignored
    }


def transformer_forward_flops(tokens: int, width: int, mlp: int, layers: int) -> tuple[int, int]:
    """Forward FLOPs of one sequence through the layers: (projections and MLP, attention scores and mixing).

    Per layer: q, k, v and output projections 4 x 2*T*d*d; scores Q K^T 2*T*T*d and mixing A V 2*T*T*d (summed over
    heads); MLP 2 x 2*T*d*f. A multiply-add counts as 2 FLOPs.
    """
    dense = layers * (4 * 2 * tokens * width * width + 2 * 2 * tokens * width * mlp)
    attention = layers * (2 * 2 * tokens * tokens * width)
    return dense, attention


def hand_count(rows: int, attention_backward_factor: float) -> float:
    """One training step on `rows` pairs: every matmul 3x its forward (forward, grad of input, grad of weight).

    Exceptions: the patch embedding's input is the pixels, which need no gradient (2x); the logits matmul is
    `rows x rows x projection`; a fused attention backward recomputes the scores (2.5x forward instead of 2x).
    """
    patches = (IMAGE // PATCH) ** 2
    vision_dense, vision_attention = transformer_forward_flops(patches + 1, WIDTH, MLP, LAYERS)
    text_dense, text_attention = transformer_forward_flops(TEXT_LENGTH, WIDTH, MLP, LAYERS)
    patch_embedding = 2 * patches * (CHANNELS * PATCH * PATCH) * WIDTH
    projections = 2 * WIDTH * PROJECTION * 2  # image and text projection of the pooled token
    per_pair = 3 * (vision_dense + text_dense + projections) + 2 * patch_embedding
    per_pair += (1 + attention_backward_factor) * (vision_attention + text_attention)
    # The loss's logits (forward + both gradients) and the model's own logits_per_text (forward only, unused).
    logits = 3 * 2 * rows * rows * PROJECTION + 2 * rows * rows * PROJECTION
    return rows * per_pair + logits


@pytest.mark.parametrize(("attn_implementation", "attention_backward_factor"), [("eager", 2.0), ("sdpa", 2.5)])
def test_counted_flops_match_hand_count(attn_implementation, attention_backward_factor):
    model = tiny_model(attn_implementation)
    counted = count_training_step_flops(model, tiny_batch(4))
    expected = hand_count(4, attention_backward_factor)
    assert counted == pytest.approx(expected, rel=0.02)


def test_per_sample_flops_extrapolate_the_logits_term():
    model = tiny_model("eager")
    per_pair_at_4 = training_flops_per_sample(model, tiny_batch(4))
    assert per_pair_at_4 == pytest.approx(hand_count(4, 2.0) / 4, rel=1e-9)
    # Counted on 4 rows, extrapolated to a training batch of 64: equal to the hand count at 64.
    per_pair_at_64 = training_flops_per_sample(model, tiny_batch(4), train_batch_size=64)
    assert per_pair_at_64 == pytest.approx(hand_count(64, 2.0) / 64, rel=1e-6)


def test_counting_leaves_weights_grads_and_rng_untouched():
    model = tiny_model("sdpa")
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 0.5)
    model.text_projection.weight.grad = None
    grads = {name: parameter.grad for name, parameter in model.named_parameters()}
    grad_values = {name: None if grad is None else grad.clone() for name, grad in grads.items()}
    weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    rng_state = torch.get_rng_state()

    assert training_flops_per_sample(model, tiny_batch(4), train_batch_size=8) > 0

    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, weights[name]), name
        assert parameter.grad is grads[name], name  # the very same tensors, not recomputed ones
        if grad_values[name] is None:
            assert parameter.grad is None
        else:
            assert torch.equal(parameter.grad, grad_values[name]), name
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert model.training


def test_peak_and_mfu():
    peak = measure_peak_flops("cpu", n=128, iterations=2)
    assert peak > 0
    assert mfu(100.0, 1e9, 1e12) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)
