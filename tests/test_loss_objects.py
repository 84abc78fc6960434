"""The loss objects the trainer holds: each equals its plain function (and the float64 references of test_loss.py and
test_sigmoid_loss.py) with the scalars read from a model, logs its parameters, clamps or not, names itself on the model
card; `build_loss` and the trainer pick the right one for `loss_type` auto/softmax/sigmoid; and a new loss is one
subclass that the trainer builds, trains with (cached accumulation included) and describes on the card."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT, TINY_VISION, shape_rows
from safetensors.torch import load_file
from test_families import SIGLIP_TEXT, scratch_args, write_config
from test_loss import random_pairs, reference_clip_loss
from test_sigmoid_loss import reference_sigmoid_loss
from transformers import (
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
)

from clip_trainer import (
    CLIPContrastiveTrainer,
    CLIPTrainingArguments,
    ConfigError,
    ContrastiveLoss,
    SigmoidContrastiveLoss,
    SoftmaxContrastiveLoss,
    build_loss,
)
from clip_trainer.callbacks import ClampLogitScaleCallback
from clip_trainer.loss import clip_loss, sigmoid_loss
from clip_trainer.modeling import model_family
from clip_trainer.run import main
from clip_trainer.tokenization import text_config_token_ids, train_caption_tokenizer


def tiny_clip(log_scale: float = math.log(14.3)) -> CLIPModel:
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16)).double()
    with torch.no_grad():
        model.logit_scale.fill_(log_scale)
    return model


def tiny_siglip(
    log_scale: float = math.log(3.7), bias: float = 2.5, tokenizer=None, dtype: torch.dtype = torch.float32
) -> SiglipModel:
    text = {**SIGLIP_TEXT, **(text_config_token_ids(tokenizer) if tokenizer is not None else {})}
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=TINY_VISION)).to(dtype)
    with torch.no_grad():
        model.logit_scale.fill_(log_scale)
        model.logit_bias.fill_(bias)
    return model


def arguments(tmp_path: Path, **overrides) -> CLIPTrainingArguments:
    return CLIPTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **overrides)


# --- each object is its function -------------------------------------------------------------------------------------


def test_the_softmax_object_is_clip_loss_with_the_models_inverse_temperature():
    model = tiny_clip()
    loss = SoftmaxContrastiveLoss()
    image, text = random_pairs(5, 8, seed=5)
    scalars = loss.scalars(model)
    assert len(scalars) == 1 and scalars[0].shape == () and scalars[0].item() == pytest.approx(14.3, rel=1e-12)
    got = loss(image, text, *scalars)
    assert got.item() == pytest.approx(reference_clip_loss(image.tolist(), text.tolist(), 14.3), rel=1e-12)
    # The scalar is the parameter's, not a copy: the gradient reaches `logit_scale` as the function's does.
    got.backward()
    leaf = torch.tensor(math.log(14.3), dtype=torch.float64, requires_grad=True)
    clip_loss(image, text, leaf.exp()).backward()
    torch.testing.assert_close(model.logit_scale.grad, leaf.grad, rtol=1e-12, atol=0)
    # Unusable rows and padding pass through: the loss of the valid rows alone.
    valid = torch.tensor([True, False, True, True, False])
    masked = loss(image, text, *loss.scalars(model), pad_to=8, valid=valid)
    expected = reference_clip_loss(image[valid].tolist(), text[valid].tolist(), 14.3)
    assert masked.item() == pytest.approx(expected, rel=1e-12)


def test_the_sigmoid_object_is_sigmoid_loss_with_the_models_scale_and_bias():
    model = tiny_siglip(dtype=torch.float64)
    loss = SigmoidContrastiveLoss()
    image, text = random_pairs(17, 3, seed=17)
    scale, bias = loss.scalars(model)
    assert scale.shape == () and scale.item() == pytest.approx(3.7, rel=1e-12) and bias is model.logit_bias
    got = loss(image, text, scale, bias)
    assert got.item() == pytest.approx(reference_sigmoid_loss(image.tolist(), text.tolist(), 3.7, 2.5), rel=1e-12)
    got.backward()
    leaves = [torch.tensor(value, dtype=torch.float64, requires_grad=True) for value in (math.log(3.7), 2.5)]
    sigmoid_loss(image, text, leaves[0].exp(), leaves[1]).backward()
    torch.testing.assert_close(model.logit_scale.grad, leaves[0].grad.reshape(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(model.logit_bias.grad, leaves[1].grad.reshape(1), rtol=1e-12, atol=0)
    valid = torch.arange(17) % 3 != 0
    masked = loss(image, text, *loss.scalars(model), pad_to=20, valid=valid)
    expected = reference_sigmoid_loss(image[valid].tolist(), text[valid].tolist(), 3.7, 2.5)
    assert masked.item() == pytest.approx(expected, rel=1e-12)


# --- what each logs, clamps and says on the card ---------------------------------------------------------------------


def test_each_object_logs_its_own_parameters():
    assert SoftmaxContrastiveLoss().logged_values(tiny_clip(math.log(14.3))) == pytest.approx(
        {"inverse_temperature": 14.3, "temperature": 1 / 14.3}
    )
    assert SigmoidContrastiveLoss().logged_values(tiny_siglip(math.log(3.7), -10.0)) == pytest.approx(
        {"inverse_temperature": 3.7, "temperature": 1 / 3.7, "logit_bias": -10.0}
    )


@pytest.mark.parametrize("max_logit_scale", [100.0, 50.0])
def test_the_softmax_object_clamps_the_inverse_temperature_after_a_step(max_logit_scale):
    model = tiny_clip(log_scale=6.0)  # t = 403
    (callback,) = SoftmaxContrastiveLoss(max_logit_scale=max_logit_scale).callbacks()
    callback.on_optimizer_step(None, None, None, model=model)
    assert model.logit_scale.item() == pytest.approx(math.log(max_logit_scale), abs=1e-12)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    callback.on_optimizer_step(None, None, None, model=model)
    assert model.logit_scale.item() == 2.0  # below the bound: left alone


def test_the_sigmoid_object_does_not_clamp():
    assert SigmoidContrastiveLoss().callbacks() == []


# --- built from the family and loss_type -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, loss_type, expected",
    [
        ("clip", "auto", SoftmaxContrastiveLoss),
        ("clip", "softmax", SoftmaxContrastiveLoss),
        ("siglip", "auto", SigmoidContrastiveLoss),
        ("siglip", "sigmoid", SigmoidContrastiveLoss),
        ("siglip", "softmax", SoftmaxContrastiveLoss),
    ],
)
def test_build_loss_picks_the_object_and_its_options(tmp_path, family, loss_type, expected):
    model = tiny_clip() if family == "clip" else tiny_siglip()
    args = arguments(
        tmp_path, loss_type=loss_type, gather_negatives=False, sigmoid_ring_exchange=True, max_logit_scale=50.0
    )
    loss = build_loss(model, model_family(model.config), args)
    assert type(loss) is expected and loss.name == (loss_type if loss_type != "auto" else expected.name)
    assert loss.gather_negatives is False
    if expected is SigmoidContrastiveLoss:
        assert loss.ring is True
    else:
        assert loss.max_logit_scale == 50.0


def test_build_loss_refuses_the_sigmoid_loss_without_a_bias_and_warns_of_softmax_for_siglip(tmp_path, caplog):
    model = tiny_clip()
    with pytest.raises(ConfigError, match=r"needs a learned `logit_bias`, and a CLIP model has none"):
        build_loss(model, model_family(model.config), arguments(tmp_path, loss_type="sigmoid"))
    with pytest.raises(ConfigError, match=r"`loss_type` is 'cosine'; set it to one of: auto, softmax, sigmoid"):
        build_loss(model, model_family(model.config), arguments(tmp_path, loss_type="cosine"))
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    siglip = tiny_siglip()
    build_loss(siglip, model_family(siglip.config), arguments(tmp_path, loss_type="softmax"))
    assert any("its `logit_bias` takes no part in the loss" in record.getMessage() for record in caplog.records)


# --- the trainer holds the object ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory) -> Path:
    """A tiny SigLIP with a caption tokenizer and a 32 px image processor, saved like a Hub model."""
    captions = [caption for *_, caption in shape_rows()]
    tokenizer = train_caption_tokenizer(captions * 4, vocab_size=300, model_max_length=64)
    folder = tmp_path_factory.mktemp("tiny-siglip")
    tiny_siglip(math.log(10.0), -10.0, tokenizer).save_pretrained(folder)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _trainer(tmp_path, folder, csv, **training) -> CLIPContrastiveTrainer:
    from conftest import build_trainer

    return build_trainer(tmp_path, folder, csv, **training)


def _clamps(trainer) -> bool:
    return any(isinstance(callback, ClampLogitScaleCallback) for callback in trainer.callback_handler.callbacks)


@pytest.mark.parametrize(
    "model, loss_type, expected",
    [
        ("clip", "auto", SoftmaxContrastiveLoss),
        ("clip", "softmax", SoftmaxContrastiveLoss),
        ("siglip", "auto", SigmoidContrastiveLoss),
        ("siglip", "sigmoid", SigmoidContrastiveLoss),
        ("siglip", "softmax", SoftmaxContrastiveLoss),
    ],
)
def test_the_trainer_holds_the_object_for_loss_type(
    tmp_path, tiny_clip_dir, siglip_folder, shapes_csv, model, loss_type, expected
):
    folder = tiny_clip_dir if model == "clip" else siglip_folder
    trainer = _trainer(
        tmp_path, folder, shapes_csv, loss_type=loss_type, gradient_accumulation_steps=2, accumulation_mode="cached"
    )
    assert type(trainer.contrastive_loss) is expected and trainer.loss_type == expected.name
    with pytest.raises(AttributeError):
        trainer.loss_type = "softmax"  # read-only: the object decides
    assert _clamps(trainer) == (expected is SoftmaxContrastiveLoss)
    assert trainer.gradient_cache.loss is trainer.contrastive_loss
    # The trainer's loss on a batch is the object's function on the trainer's embeddings.
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
        image, text = trainer.embed(trainer.model, batch)
    scale = trainer.model.logit_scale.exp().reshape(())
    if expected is SigmoidContrastiveLoss:
        reference = reference_sigmoid_loss(
            image.tolist(), text.tolist(), scale.item(), trainer.model.logit_bias.item()
        )
    else:
        reference = reference_clip_loss(image.tolist(), text.tolist(), scale.item())
    assert got.item() == pytest.approx(reference, rel=1e-5)


def test_the_trainer_refuses_the_sigmoid_loss_for_clip_before_building(tmp_path, tiny_clip_dir, shapes_csv):
    with pytest.raises(ConfigError, match="needs a learned `logit_bias`"):
        _trainer(tmp_path, tiny_clip_dir, shapes_csv, loss_type="sigmoid")


# --- a new loss is one object ----------------------------------------------------------------------------------------


def test_a_new_loss_is_one_subclass(tmp_path, tiny_clip_dir, shapes_csv, monkeypatch):
    """An image-to-text-only InfoNCE, registered by its name: the trainer builds it from `loss_type`, trains with it
    (through cached accumulation) and names it on the model card; nothing else changes."""
    monkeypatch.setattr(ContrastiveLoss, "registry", dict(ContrastiveLoss.registry))

    class ImageToTextLoss(ContrastiveLoss):
        name = "image-to-text"
        card_text = "a one-way (image-to-text) contrastive loss"

        def __call__(self, image_embeds, text_embeds, *scalars, pad_to=None, valid=None):
            logits = scalars[0] * image_embeds @ text_embeds.T
            return F.cross_entropy(logits, torch.arange(len(logits)))

    trainer = _trainer(
        tmp_path, tiny_clip_dir, shapes_csv, loss_type="image-to-text", max_steps=1, logging_steps=1,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, accumulation_mode="cached", max_grad_norm=0,
    )  # fmt: skip
    assert isinstance(trainer.contrastive_loss, ImageToTextLoss) and not _clamps(trainer)
    batches = []
    original = trainer.get_batch_samples

    def record(*args, **kwargs):
        samples, count = original(*args, **kwargs)
        batches.extend(samples)
        return samples, count

    trainer.get_batch_samples = record
    with torch.no_grad():
        initial = {name: p.clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    # The logged loss is the one-way loss of the whole accumulated batch, from the initial weights.
    after = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            parameter.copy_(initial[name])
        trainer.model.train()
        embeddings = [trainer.embed(trainer.model, batch) for batch in batches]
    image = torch.cat([i for i, _ in embeddings]).double()
    text = torch.cat([t for _, t in embeddings]).double()
    logits = trainer.model.logit_scale.exp().double() * image @ text.T
    expected = F.cross_entropy(logits, torch.arange(len(logits))).item()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert len(batches) == 2 and logged["loss"] == pytest.approx(expected, rel=1e-4)
    assert logged.keys() >= {"inverse_temperature", "temperature"} and "logit_bias" not in logged
    assert any(not torch.equal(after[name], initial[name]) for name in initial)
    trainer.create_model_card()
    assert (
        "and a one-way (image-to-text) contrastive loss." in (Path(trainer.args.output_dir) / "README.md").read_text()
    )


# --- as a user runs it -----------------------------------------------------------------------------------------------


def test_siglip_with_the_softmax_loss_clamps_logs_no_bias_and_says_so_on_the_card(base_args, tmp_path, caplog):
    config = write_config(tmp_path / "siglip.json", SiglipConfig(text_config=SIGLIP_TEXT, vision_config=TINY_VISION))
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    main([*scratch_args(base_args, config), "--loss_type", "softmax", "--max_logit_scale", "5", "--max_steps", "2",
          "--logging_steps", "1"])  # fmt: skip
    out = tmp_path / "out"
    weights = load_file(out / "model.safetensors")
    # SigLIP starts at t = 10, b = -10: the first step's clamp brings t to the asked 5 (a step of Adam at this rate
    # moves log t by about 0.003), and the bias takes no part in the loss.
    assert weights["logit_scale"].item() <= math.log(5.0) + 1e-6
    assert weights["logit_bias"].item() == -10.0
    train_logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(train_logs) == 2 and train_logs[0]["inverse_temperature"] == pytest.approx(5.0, rel=1e-6)
    assert all(e["temperature"] == pytest.approx(1 / e["inverse_temperature"]) for e in train_logs)
    assert not any("logit_bias" in e for e in train_logs)
    assert "and CLIP's contrastive (softmax) loss." in (out / "README.md").read_text()
    assert any("its `logit_bias` takes no part in the loss" in record.getMessage() for record in caplog.records)
