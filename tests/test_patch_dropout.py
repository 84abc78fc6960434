"""Patch dropout (FLIP): each training image keeps its class token and a random subset of its patches, as many as
open_clip keeps, drawn per image from the seed; evaluation sees every patch; cached accumulation replays the draw;
a run trains, saves a plain model and reports what an independent computation of that model gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, TINY_VISION, build_trainer, drop_option, write_shapes_csv
from test_evaluators import independent_recalls, write_pairs
from test_gradient_cache import TOLERANCES, make_batches, make_model
from transformers import (
    AutoModel,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    ConvNextConfig,
    Siglip2Config,
    SiglipConfig,
    SiglipModel,
    VisionTextDualEncoderConfig,
)

from clip_trainer import run
from clip_trainer.errors import ConfigError
from clip_trainer.gradient_cache import GradientCache
from clip_trainer.loss import clip_loss, contrastive_loss
from clip_trainer.patch_dropout import PatchDropout, kept_patches, patch_dropout_problem

PATCHES = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2  # 16
QUIET = ["--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu", "true"]


def tiny(family: str):
    torch.manual_seed(0)
    if family == "clip":
        return CLIPModel(CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16))
    return SiglipModel(SiglipConfig(text_config=TINY_TEXT, vision_config=TINY_VISION))


def patch_dropout_hooks(model) -> list:
    """The hooks of a [`PatchDropout`] anywhere in `model` (transformers registers hooks of its own)."""
    hooks = [hook for module in model.modules() for hook in module._forward_hooks.values()]
    return [hook for hook in hooks if isinstance(getattr(hook, "__self__", None), PatchDropout)]


def kept_positions(full: torch.Tensor, dropped: torch.Tensor) -> list[list[int]]:
    """For each image, the position in `full` (every token) of each row of `dropped`, found by exact equality: every
    token differs from the others by its position embedding."""
    positions = []
    for image_full, image_dropped in zip(full, dropped):
        rows = []
        for token in image_dropped:
            matches = (image_full == token).all(dim=-1).nonzero().flatten().tolist()
            assert len(matches) == 1
            rows.append(matches[0])
        positions.append(rows)
    return positions


# --------------------------------------------------------------------------------------------------------------
# Which tokens are kept
# --------------------------------------------------------------------------------------------------------------


# open_clip's count, max(1, int(patches * (1 - p))), written out for 16 patches: rounded down, at least one.
@pytest.mark.parametrize(("probability", "count"), [(0.3, 11), (0.5, 8), (0.75, 4), (0.99, 1)])
def test_each_image_keeps_its_class_token_and_its_own_subset_of_patches(probability, count):
    model = tiny("clip").train()
    dropout = PatchDropout(probability, seed=3).attach(model)
    pixels = torch.randn(6, 3, 32, 32)
    dropped = model.vision_model.embeddings(pixels)
    dropout.enabled = False
    full = model.vision_model.embeddings(pixels)
    assert full.shape[1] == PATCHES + 1 and dropped.shape[1] == count + 1 == kept_patches(PATCHES, probability) + 1
    positions = kept_positions(full, dropped)
    for rows in positions:
        assert rows[0] == 0  # the class token, first
        assert rows == sorted(set(rows)) and all(1 <= row <= PATCHES for row in rows[1:])
    if count > 1:  # 6 images drawing one subset each: not all the same
        assert len({tuple(rows) for rows in positions}) > 1


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_tower_on_the_kept_tokens_is_the_tower_run_on_that_subset(family):
    """Nothing after the embeddings depends on the token count: the pooled output equals the tower's own layers,
    norms and pooling (CLIP: token 0; SigLIP: its attention head) applied to the kept tokens by hand."""
    model = tiny(family).train()
    dropout = PatchDropout(0.5, seed=0).attach(model)
    vision = model.vision_model
    pixels = torch.randn(3, 3, 32, 32)
    captured = {}
    handle = vision.embeddings.register_forward_hook(lambda module, args, output: captured.update(kept=output))
    pooled = vision(pixel_values=pixels).pooler_output
    handle.remove()
    kept = captured["kept"]
    dropout.enabled = False
    full = vision.embeddings(pixels)
    positions = kept_positions(full, kept)
    if family == "clip":
        assert kept.shape[1] == 9 and all(rows[0] == 0 for rows in positions)
        hidden = vision.encoder(inputs_embeds=vision.pre_layrnorm(kept)).last_hidden_state
        expected = vision.post_layernorm(hidden[:, 0])
    else:  # no class token: 8 of the 16 patches
        assert kept.shape[1] == 8 and all(0 <= row < PATCHES for rows in positions for row in rows)
        hidden = vision.encoder(inputs_embeds=kept).last_hidden_state
        expected = vision.head(vision.post_layernorm(hidden))
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    assert not torch.allclose(pooled, vision(pixel_values=pixels).pooler_output)  # all patches: another output


@pytest.mark.parametrize("tower", ["vit", "clip_vision_model", "siglip_vision_model"])
def test_a_dual_encoders_vit_tower_keeps_its_class_token_and_half_its_patches(tower):
    from transformers import BertConfig, CLIPVisionConfig, SiglipVisionConfig, VisionTextDualEncoderModel, ViTConfig

    vision = {"vit": ViTConfig, "clip_vision_model": CLIPVisionConfig, "siglip_vision_model": SiglipVisionConfig}
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision[tower](**TINY_VISION), BertConfig(vocab_size=50, **TINY_TEXT), projection_dim=16
    )
    torch.manual_seed(0)
    model = VisionTextDualEncoderModel(config).train()
    dropout = PatchDropout(0.5, seed=0).attach(model)
    prefix = 0 if tower == "siglip_vision_model" else 1
    assert dropout.prefix_tokens == prefix and dropout.num_patches == PATCHES
    pixels = torch.randn(2, 3, 32, 32)
    embeddings = next(m for m in model.vision_model.modules() if type(m).__name__.endswith("VisionEmbeddings")
                      or type(m).__name__ == "ViTEmbeddings")  # fmt: skip
    assert embeddings(pixels).shape[1] == prefix + 8
    trained = model.get_image_features(pixel_values=pixels).pooler_output
    model.eval()
    assert embeddings(pixels).shape[1] == prefix + PATCHES
    assert trained.shape == model.get_image_features(pixel_values=pixels).pooler_output.shape == (2, 16)


def test_the_draw_follows_the_seed_step_process_and_draw_and_replays():
    def draw(**settings) -> torch.Tensor:
        step = settings.pop("step", 0)
        dropout = PatchDropout(0.5, **{"seed": 42, **settings}, step=lambda: step)
        return dropout.kept_indices(4, PATCHES, 8, torch.device("cpu"))

    first = draw()
    assert torch.equal(first, draw())  # reproducible
    for other in ({"seed": 43}, {"process_index": 1}, {"step": 1}):
        assert not torch.equal(first, draw(**other)), other
    dropout = PatchDropout(0.5, seed=42)
    state = dropout.get_state()
    one, two = (dropout.kept_indices(4, PATCHES, 8, torch.device("cpu")) for _ in range(2))
    assert torch.equal(one, first) and not torch.equal(one, two)  # each draw of a step is another
    dropout.set_state(state)
    assert torch.equal(dropout.kept_indices(4, PATCHES, 8, torch.device("cpu")), one)  # replayed
    # A run resumed at step 1 draws what the run that went through step 0 drew at step 1.
    clock = {"step": 0}
    going = PatchDropout(0.5, seed=42, step=lambda: clock["step"])
    going.kept_indices(4, PATCHES, 8, torch.device("cpu"))
    clock["step"] = 1
    assert torch.equal(going.kept_indices(4, PATCHES, 8, torch.device("cpu")), draw(step=1))


# --------------------------------------------------------------------------------------------------------------
# What sees every patch
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_evaluation_off_switch_and_zero_are_the_plain_model_exactly(family):
    model, plain = tiny(family), tiny(family)
    pixels = torch.randn(3, 3, 32, 32)

    def features(m) -> torch.Tensor:
        return m.get_image_features(pixel_values=pixels).pooler_output

    dropout = PatchDropout(0.75, seed=0).attach(model)
    model.eval(), plain.eval()
    assert torch.equal(features(model), features(plain))
    model.train(), plain.train()
    assert not torch.allclose(features(model), features(plain))  # training: patches dropped
    dropout.enabled = False
    assert torch.equal(features(model), features(plain))
    dropout.enabled = True
    dropout.detach()
    assert torch.equal(features(model), features(plain))
    PatchDropout(0.0, seed=0).attach(model)
    assert torch.equal(features(model), features(plain))


def test_the_last_phase_trains_with_every_patch():
    model = tiny("clip").train()
    step = {"now": 0}
    PatchDropout(0.5, seed=0, off_after_steps=3, step=lambda: step["now"]).attach(model)
    pixels = torch.randn(2, 3, 32, 32)
    counts = []
    for step["now"] in range(5):
        counts.append(model.vision_model.embeddings(pixels).shape[1])
    assert counts == [9, 9, 9, 17, 17]


# --------------------------------------------------------------------------------------------------------------
# Cached accumulation: both passes of a micro-batch keep the same patches
# --------------------------------------------------------------------------------------------------------------


def _cached_gradients(model, dropout, batches, replay: bool) -> dict[str, torch.Tensor]:
    def embed(batch):
        outputs = model(**batch, return_loss=False)
        return outputs.image_embeds, outputs.text_embeds

    cache = GradientCache(
        embed=embed,
        loss_scalars=lambda: (model.logit_scale.exp(),),
        loss=lambda images, texts, scale, pad_to, valid: contrastive_loss(
            images, texts, scale, pad_to=pad_to, valid=valid
        ),
        backward=lambda loss: loss.backward(),
        micro_batch_size=max(len(batch["input_ids"]) for batch in batches),
        accumulation_steps=len(batches),
        random_sources=[dropout] if replay else None,
    )
    model.zero_grad(set_to_none=True)
    dropout.set_state((0, 0))
    cache.start_step(batches)
    for batch in batches:
        cache.training_step(batch)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_cached_accumulation_keeps_the_same_patches_in_both_passes():
    """float64: the cached step's gradients equal one backward of the loss over every micro-batch's embeddings,
    each micro-batch forwarded once with gradients, keeping the patches of the same draw."""
    model = make_model(torch.float64)
    dropout = PatchDropout(0.5, seed=11).attach(model)
    batches = make_batches([4, 3, 5], torch.float64)

    model.zero_grad(set_to_none=True)
    dropout.set_state((0, 0))
    outputs = [model(**batch, return_loss=False) for batch in batches]  # draws 0, 1, 2 of step 0
    loss = clip_loss(torch.cat([o.image_embeds for o in outputs]), torch.cat([o.text_embeds for o in outputs]),
                     model.logit_scale.exp())  # fmt: skip
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    got = _cached_gradients(model, dropout, batches, replay=True)
    rtol, atol = TOLERANCES[torch.float64]
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    # Without the replay the second pass keeps other patches than the first: the gradient is wrong.
    wrong = _cached_gradients(model, dropout, batches, replay=False)
    name = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(wrong[name], expected[name], rtol=1e-3, atol=1e-8)


def test_the_trainers_cached_step_equals_the_plain_step_with_the_same_patches(tmp_path, tiny_clip_dir, shapes_csv):
    """Through the real Trainer loop: the gradients handed to the optimizer at step 0 equal a plain forward of the
    recorded micro-batches, in order, through the initial weights with the run's own draws (seed, process 0, step 0)."""
    from test_gradient_cache import RecordingTrainer, assert_gradients_close

    trainer = build_trainer(
        tmp_path, tiny_clip_dir, shapes_csv, trainer_class=RecordingTrainer, per_device_train_batch_size=4,
        gradient_accumulation_steps=3, max_steps=1, max_grad_norm=0, accumulation_mode="cached", patch_dropout=0.5,
    )  # fmt: skip
    assert trainer.gradient_cache.random_sources == [trainer.patch_dropout]
    batch = next(iter(trainer.get_train_dataloader()))
    # The FLOPs logged count the kept image tokens: 8 of 16 patches and the class token.
    with_dropout = trainer.floating_point_ops(batch)
    trainer.train()
    assert not trainer.patch_dropout.attached  # the trained model is the plain model again

    model = trainer.initial_model  # a deep copy taken at construction, hook included: take the hook off it
    assert len(patch_dropout_hooks(model)) == 1
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if hook in patch_dropout_hooks(module):
                del module._forward_hooks[key]
    dropout = PatchDropout(0.5, seed=trainer.args.seed).attach(model)
    model.train()
    model.zero_grad(set_to_none=True)
    embeddings = [trainer.embed(model, batch) for batch in trainer.record["batches"]]
    loss = clip_loss(torch.cat([i for i, _ in embeddings]), torch.cat([t for _, t in embeddings]),
                     model.logit_scale.exp())  # fmt: skip
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert_gradients_close(trainer.record["grads"], expected, torch.float32)
    assert dropout.get_state() == (0, 3)  # three draws, one per micro-batch, as the trainer's step made

    trainer.patch_dropout.attach(trainer.model)
    trainer.patch_dropout.probability = 0.0
    assert trainer.floating_point_ops(batch) > with_dropout


# --------------------------------------------------------------------------------------------------------------
# What is refused
# --------------------------------------------------------------------------------------------------------------


def test_unsupported_towers_are_refused_by_name():
    vision = {key: value for key, value in TINY_VISION.items() if key != "image_size"}
    siglip2 = Siglip2Config(text_config=TINY_TEXT, vision_config={**vision, "num_patches": 16})
    assert "SigLIP 2 (NaFlex)" in patch_dropout_problem(siglip2)
    from transformers import BertConfig

    convnext = VisionTextDualEncoderConfig.from_vision_text_configs(ConvNextConfig(), BertConfig())
    message = patch_dropout_problem(convnext)
    assert "vision-text dual encoder" in message and "'convnext'" in message and "drop `patch_dropout`" in message
    for ok in (CLIPConfig(), SiglipConfig()):
        assert patch_dropout_problem(ok) is None
    from transformers import CLIPVisionConfig, ViTConfig

    for tower in (CLIPVisionConfig(), ViTConfig()):
        assert patch_dropout_problem(VisionTextDualEncoderConfig.from_vision_text_configs(tower, BertConfig())) is None
    with pytest.raises(ConfigError, match="SigLIP 2"):
        from transformers import Siglip2Model

        PatchDropout(0.5).attach(Siglip2Model(siglip2))


def test_the_command_refuses_siglip2_and_bad_values_in_one_line(base_args, tmp_path, capsys):
    vision = {key: value for key, value in TINY_VISION.items() if key != "image_size"}
    config = Siglip2Config(text_config={**TINY_TEXT, "max_position_embeddings": 64},
                           vision_config={**vision, "num_patches": 16})  # fmt: skip
    path = tmp_path / "siglip2.json"
    path.write_text(config.to_json_string())
    siglip2 = [*drop_option(base_args, "model_name_or_path"), "--config_name", str(path)]
    cases = [
        ([*siglip2, "--patch_dropout", "0.5"], "SigLIP 2 (NaFlex)"),
        ([*base_args, "--patch_dropout", "1"], "`patch_dropout`"),
        ([*base_args, "--patch_dropout_off_after_steps", "3"], "`patch_dropout` is 0"),
    ]
    for argv, expected in cases:
        assert run.cli(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------------------------------------------
# Runs of the command
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def drops(monkeypatch) -> list[tuple[int, int]]:
    """Every thinning the run makes: (optimizer step, tokens kept)."""
    seen = []
    original = PatchDropout.drop

    def recording(self, tokens):
        kept = original(self, tokens)
        seen.append((self._current_step(), kept.shape[1]))
        return kept

    monkeypatch.setattr(PatchDropout, "drop", recording)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_run_with_patch_dropout_saves_the_plain_model_and_its_true_scores(
    family, tiny_clip_dir, tmp_path, monkeypatch, drops
):
    monkeypatch.chdir(tmp_path)
    train = write_shapes_csv(tmp_path / "train", repeats=2)
    pairs = write_pairs(tmp_path / "held-out")
    if family == "clip":
        model = ["--model_name_or_path", str(tiny_clip_dir), "--export_onnx", "true"]
        steps, kept_tokens = list(range(6)), 9
    else:  # from scratch, the last two steps without dropout
        config = SiglipConfig(text_config={**TINY_TEXT, "max_position_embeddings": 64}, vision_config=TINY_VISION)
        (tmp_path / "siglip.json").write_text(config.to_json_string())
        model = ["--config_name", "siglip.json", "--tokenizer_vocab_size", "300",
                 "--patch_dropout_off_after_steps", "4"]  # fmt: skip
        steps, kept_tokens = list(range(4)), 8
    run.main([*model, "--train_file", str(train), "--validation_file", str(pairs), "--do_train", "--do_eval",
              "--output_dir", "out", "--max_steps", "6", "--per_device_train_batch_size", "8",
              "--per_device_eval_batch_size", "16", "--learning_rate", "3e-3", "--eval_strategy", "no",
              "--save_strategy", "no", "--seed", "1", "--patch_dropout", "0.5", *QUIET])  # fmt: skip
    # Training dropped patches at every step before the last phase, once per step (one micro-batch), never after.
    assert [step for step, _ in drops] == steps and {kept for _, kept in drops} == {kept_tokens}

    out = tmp_path / "out"
    saved = json.loads((out / "config.json").read_text())
    assert "patch_dropout" not in json.dumps(saved)
    loaded = AutoModel.from_pretrained(out)
    plain = type(loaded)(loaded.config)
    assert set(loaded.state_dict()) == set(plain.state_dict())
    assert not patch_dropout_hooks(loaded)
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    results = json.loads((out / "eval_results.json").read_text())
    expected = independent_recalls(loaded, processor, pairs, family)
    assert {key: results[key] for key in expected} == pytest.approx(expected, abs=1e-12)
    if family == "clip":  # exported from the plain model and checked against it by the export itself
        assert (out / "onnx" / "vision_model.onnx").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        {"lora_rank": 4},
        {"vision_trainable_layers": 1, "gradient_checkpointing": True},
        {"gradient_accumulation_steps": 2, "accumulation_mode": "cached", "gradient_checkpointing": True},
    ],
    ids=["lora", "partial-locking-checkpointing", "cached-checkpointing"],
)
def test_patch_dropout_trains_beside_other_options(settings, tmp_path, tiny_clip_dir, shapes_csv, drops):
    trainer = build_trainer(tmp_path, tiny_clip_dir, shapes_csv, max_steps=2, patch_dropout=0.5, **settings)
    trainer.train()
    assert drops and {kept for _, kept in drops} == {9}
    assert not patch_dropout_hooks(trainer.model)
    # It trained: the image features moved away from the starting model's.
    pixels = torch.randn(2, 3, 32, 32)
    start = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    trainer.model.eval()
    with torch.no_grad():
        after, before = (m.get_image_features(pixel_values=pixels).pooler_output for m in (trainer.model, start))
    assert not torch.allclose(after, before)


@pytest.mark.slow
def test_the_throughput_benchmark_times_each_patch_dropout():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(script), "--preset", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "8",
               "--repeats", "1", "--patch-dropout", "0,0.5"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["patch_dropout"] == [0.0, 0.5] and summary["speedup"]["0.0"] == 1.0
    assert all(value > 0 for value in summary["samples_per_second"].values())
    # The image tower runs on 32 + 1 of its 64 + 1 tokens, the text tower on all of its own: fewer FLOPs, not half.
    share = summary["flops_per_sample"]["0.5"] / summary["flops_per_sample"]["0.0"]
    assert 0.5 < share < 0.9
