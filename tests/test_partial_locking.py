"""Partial locking (top N layers of a tower) and layer-wise learning-rate decay."""

from __future__ import annotations

import pytest
import torch
from conftest import build_trainer

from clip_trainer.arguments import ConfigError
from clip_trainer.run import main

LR = 3e-3
# Of the parameters checked below, those with weight decay (weight matrices and the patch convolution).
DECAYED = {
    "visual_projection.weight",
    "vision_model.encoder.layers.1.mlp.fc1.weight",
    "vision_model.encoder.layers.0.self_attn.k_proj.weight",
    "vision_model.embeddings.patch_embedding.weight",
}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model, prefix: str) -> dict[str, bool]:
    """Parameter name -> whether training changed it, for the parameters under `prefix`."""
    return {
        name: not torch.equal(before[name], parameter)
        for name, parameter in model.named_parameters()
        if name.startswith(prefix)
    }


@pytest.mark.parametrize("freeze_first", [False, True])
def test_only_the_top_layers_norm_and_projection_train(tiny_clip_dir, shapes_csv, tmp_path, freeze_first):
    extra = {"freeze_vision_model": True, "unfreeze_after_steps": 2} if freeze_first else {}
    trainer = build_trainer(
        tmp_path, tiny_clip_dir, shapes_csv, vision_trainable_layers=1, text_trainable_layers=0, max_steps=4, **extra
    )
    before = snapshot(trainer.model)
    trainer.train()
    model = trainer.model
    # Vision: embeddings, the pre-norm and the bottom layer bit-identical; the top layer, norm and projection trained.
    for prefix in ("vision_model.embeddings.", "vision_model.pre_layrnorm.", "vision_model.encoder.layers.0."):
        assert not any(changed(before, model, prefix).values()), prefix
    for prefix in ("vision_model.encoder.layers.1.", "vision_model.post_layernorm.", "visual_projection."):
        assert all(changed(before, model, prefix).values()), prefix
    # Text with 0 layers: only the final norm and projection train (a locked tower with a trainable head).
    for prefix in ("text_model.embeddings.", "text_model.encoder."):
        assert not any(changed(before, model, prefix).values()), prefix
    for prefix in ("text_model.final_layer_norm.", "text_projection."):
        assert all(changed(before, model, prefix).values()), prefix


def test_layerwise_lr_decay_gives_each_layer_its_rate(tiny_clip_dir, shapes_csv, tmp_path):
    decay = 0.5
    trainer = build_trainer(tmp_path, tiny_clip_dir, shapes_csv, layerwise_lr_decay=decay, weight_decay=0.1)
    optimizer = trainer.create_optimizer()
    rate = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    assert optimizer.param_groups[0]["lr"] == LR  # the rate the Trainer logs is the full one
    expected_scale = {
        "logit_scale": 1.0,
        "visual_projection.weight": 1.0,
        "vision_model.post_layernorm.weight": 1.0,
        "text_model.final_layer_norm.bias": 1.0,
        "vision_model.encoder.layers.1.mlp.fc1.weight": decay,
        "text_model.encoder.layers.1.self_attn.q_proj.bias": decay,
        "vision_model.encoder.layers.0.self_attn.k_proj.weight": decay**2,
        "text_model.encoder.layers.0.layer_norm1.weight": decay**2,
        "vision_model.pre_layrnorm.weight": decay**3,
        "vision_model.embeddings.patch_embedding.weight": decay**3,
        "vision_model.embeddings.class_embedding": decay**3,
        "text_model.embeddings.token_embedding.weight": decay**3,
    }
    named = dict(trainer.model.named_parameters())
    for name, scale in expected_scale.items():
        lr, weight_decay = rate[id(named[name])]
        assert lr == pytest.approx(LR * scale, rel=1e-12), name
        # The no-weight-decay split is kept: biases, norms, embeddings and logit_scale are not decayed.
        assert weight_decay == (0.1 if name in DECAYED else 0.0), name
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(named)


def test_trainable_layers_beyond_the_tower_are_refused(base_args):
    with pytest.raises(ConfigError, match="`vision_trainable_layers` is 3, but the vision tower has 2 layers"):
        main([*base_args, "--vision_trainable_layers", "3"])
    with pytest.raises(ConfigError, match="`layerwise_lr_decay` is 1.5"):
        main([*base_args, "--layerwise_lr_decay", "1.5"])
