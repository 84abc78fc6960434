"""Distillation from a teacher through the whole run: the collator makes the teacher's own inputs, the logged loss is
the contrastive loss plus the weighted KL divergence computed here from the two models' float64 embeddings, the
teacher never changes, cached accumulation stays exact, the starting model can be its own teacher, and bad settings
stop in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, TINY_VISION, draw_shape, needs_peft, shape_rows, write_shapes_csv
from PIL import Image
from test_distillation_loss import reference_distillation
from test_gradient_cache import assert_gradients_close, gradients, make_batches, make_model
from test_loss import reference_clip_loss
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
)

from clip_trainer import run
from clip_trainer.collator import ImageTextCollator, TeacherProcessing
from clip_trainer.errors import ConfigError
from clip_trainer.gradient_cache import GradientCache
from clip_trainer.loss import clip_loss, contrastive_loss, distillation_loss
from clip_trainer.preprocessing import ImagePreprocessor
from clip_trainer.tokenization import text_config_token_ids, train_caption_tokenizer
from clip_trainer.trainer import CLIPContrastiveTrainer

TEACHER_SCALE = 30.0
REPO = Path(__file__).resolve().parents[1]


def save_teacher(folder: Path, family: str = "clip") -> Path:
    """A tiny teacher of another width, image size, normalisation, tokenizer and (for SigLIP) family than the
    student of `tiny_clip_dir`, saved as a Hub model is."""
    positions = 64 if family == "siglip" else 20  # SigLIP pads every caption to its positions
    captions = [caption for *_, caption in shape_rows()]
    tokenizer = train_caption_tokenizer(captions * 3, vocab_size=280, model_max_length=positions)
    width = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**width, "max_position_embeddings": positions, **text_config_token_ids(tokenizer)}
    vision = {**width, "image_size": 48, "patch_size": 16}
    torch.manual_seed(7)
    if family == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        image_processor = SiglipImageProcessorPil(size={"height": 48, "width": 48})
        processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    else:
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 48},
            crop_size={"height": 48, "width": 48},
            image_mean=[0.5] * 3,
            image_std=[0.25] * 3,
        )
        processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(TEACHER_SCALE))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def one_batch_csv(tmp_path_factory) -> Path:
    """24 pairs: with a batch of 24 every step sees all of them, in some order (the losses do not depend on it)."""
    return write_shapes_csv(tmp_path_factory.mktemp("one-batch"), repeats=1)


def distill_args(tiny_clip_dir: Path, csv: Path, out: Path) -> list[str]:
    return [
        "--model_name_or_path", str(tiny_clip_dir),
        "--train_file", str(csv),
        "--validation_split_percentage", "0",
        "--output_dir", str(out),
        "--per_device_train_batch_size", "24",
        "--learning_rate", "3e-3",
        "--weight_decay", "0.0",
        "--warmup_steps", "0",
        "--lr_scheduler_type", "constant",
        "--max_steps", "2",
        "--logging_steps", "1",
        "--report_to", "none",
        "--dataloader_num_workers", "0",
        "--dataloader_persistent_workers", "false",
        "--save_strategy", "no",
        "--use_cpu", "true",
        "--seed", "1",
    ]  # fmt: skip


class RecordingTrainer(CLIPContrastiveTrainer):
    """The trainer `run.main` builds, kept for the test to look at afterwards."""

    instances: list[RecordingTrainer] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        RecordingTrainer.instances.append(self)


@pytest.fixture
def recorded(monkeypatch) -> list[RecordingTrainer]:
    RecordingTrainer.instances = []
    monkeypatch.setattr(run, "CLIPContrastiveTrainer", RecordingTrainer)
    return RecordingTrainer.instances


def training_logs(out: Path) -> list[dict]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def float64_embeddings(model_dir: Path, csv: Path, padding: str | bool = True) -> tuple[torch.Tensor, ...]:
    """A saved model's embeddings of every pair in `csv`, with its own processor (transformers', not clip-trainer's
    collator), in float64; and its inverse temperature."""
    rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    images = [Image.open(csv.parent / path).convert("RGB") for path, _, _ in rows]
    captions = [caption for _, caption, _ in rows]
    model = AutoModel.from_pretrained(model_dir).double().eval()
    pixels = AutoImageProcessor.from_pretrained(model_dir, backend="pil")(images, return_tensors="pt")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer(
        captions, padding=padding, truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        outputs = model(
            **{**pixels, "pixel_values": pixels["pixel_values"].double()},
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
        )
    return outputs.image_embeds, outputs.text_embeds, model.logit_scale.exp().item()


@pytest.mark.parametrize("teacher_family", ["clip", "siglip"])
def test_the_logged_loss_is_contrastive_plus_weighted_kl_and_the_teacher_never_changes(
    tiny_clip_dir, one_batch_csv, tmp_path, recorded, teacher_family
):
    teacher = save_teacher(tmp_path / "teacher", teacher_family)
    out = tmp_path / "out"
    run.main([*distill_args(tiny_clip_dir, one_batch_csv, out), "--teacher_model_name_or_path", str(teacher),
              "--distillation_weight", "0.7"])  # fmt: skip

    student_image, student_text, student_scale = float64_embeddings(tiny_clip_dir, one_batch_csv)
    padding = "max_length" if teacher_family == "siglip" else True
    teacher_image, teacher_text, teacher_scale = float64_embeddings(teacher, one_batch_csv, padding)
    assert teacher_scale == pytest.approx(TEACHER_SCALE)
    contrastive = reference_clip_loss(student_image.tolist(), student_text.tolist(), student_scale)
    divergence = reference_distillation(
        student_image.tolist(), student_text.tolist(), teacher_image.tolist(), teacher_text.tolist(),
        student_scale, teacher_scale,
    )  # fmt: skip
    first = training_logs(out)[0]
    assert first["step"] == 1
    assert first["distillation_kl"] == pytest.approx(divergence, rel=1e-4)
    assert first["loss"] == pytest.approx(contrastive + 0.7 * divergence, rel=1e-4)
    assert divergence > 0.05 * contrastive  # the term is large enough for the check to see it

    # The teacher is the saved model, unchanged after two optimizer steps, frozen and in eval mode; the student moved.
    (trainer,) = recorded
    saved = AutoModel.from_pretrained(teacher).state_dict()
    after = trainer.teacher.model.state_dict()
    assert saved.keys() == after.keys() and all(torch.equal(saved[key], after[key]) for key in saved)
    assert not trainer.teacher.model.training
    assert not any(parameter.requires_grad for parameter in trainer.teacher.model.parameters())
    student_before = AutoModel.from_pretrained(tiny_clip_dir).state_dict()
    student_after = AutoModel.from_pretrained(out).state_dict()
    assert any(not torch.equal(student_before[key], student_after[key]) for key in student_before)
    assert len(training_logs(out)) == 2 and all("distillation_kl" in entry for entry in training_logs(out))


@pytest.mark.parametrize("intra_modal_weight", [None, "0.5"])
def test_cached_accumulation_logs_the_same_loss_as_one_batch(
    tiny_clip_dir, teacher_dir, one_batch_csv, tmp_path, intra_modal_weight
):
    """Two micro-batches of 12 with cached accumulation: the first step's loss is the 24-pair batch's, with the
    teacher's distributions over all 24 pairs, and a fixed distillation temperature; with the image-to-image and
    text-to-text term, each row's distributions over the other 23."""
    out = tmp_path / "out"
    argv = [*distill_args(tiny_clip_dir, one_batch_csv, out), "--teacher_model_name_or_path", str(teacher_dir),
            "--distillation_temperature", "0.1", "--per_device_train_batch_size", "12",
            "--gradient_accumulation_steps", "2"]  # fmt: skip
    if intra_modal_weight is not None:
        argv += ["--distillation_intra_modal_weight", intra_modal_weight]
    run.main(argv)
    student_image, student_text, student_scale = float64_embeddings(tiny_clip_dir, one_batch_csv)
    teacher_image, teacher_text, _ = float64_embeddings(teacher_dir, one_batch_csv)
    contrastive = reference_clip_loss(student_image.tolist(), student_text.tolist(), student_scale)
    # With a temperature, both distributions are softmax(cosine / 0.1).
    divergence = reference_distillation(
        student_image.tolist(), student_text.tolist(), teacher_image.tolist(), teacher_text.tolist(), 10.0, 10.0,
        float(intra_modal_weight or 0),
    )  # fmt: skip
    first = training_logs(out)[0]
    assert first["distillation_kl"] == pytest.approx(divergence, rel=1e-4)
    assert first["loss"] == pytest.approx(contrastive + divergence, rel=1e-4)
    # The card names the loss trained: the contrastive loss, the teacher, and each weight.
    card = " ".join((out / "README.md").read_text().split())
    said = ("plus 1 x the KL divergence from the image-to-text and text-to-image similarity distributions of the "
            f"teacher `{teacher_dir.name}`")  # fmt: skip
    assert said in card
    assert ("and 0.5 x that of the image-to-image and text-to-text ones" in card) == (intra_modal_weight is not None)


def test_the_pretrained_model_as_its_own_teacher(tiny_clip_dir, one_batch_csv, tmp_path, recorded):
    """`distill_from_pretrained`: at the first step the student is its teacher (a KL divergence of 0, the loss is the
    contrastive loss alone); at the second it has moved away and is pulled back."""
    out = tmp_path / "out"
    run.main([*distill_args(tiny_clip_dir, one_batch_csv, out), "--distill_from_pretrained", "true"])
    student_image, student_text, student_scale = float64_embeddings(tiny_clip_dir, one_batch_csv)
    first, second = training_logs(out)
    assert first["distillation_kl"] == pytest.approx(0, abs=1e-6)
    assert first["loss"] == pytest.approx(
        reference_clip_loss(student_image.tolist(), student_text.tolist(), student_scale), rel=1e-4
    )
    assert second["distillation_kl"] > 1e-4
    (trainer,) = recorded
    assert trainer.teacher.processing is None  # it reads the student's own inputs
    pretrained = AutoModel.from_pretrained(tiny_clip_dir).state_dict()
    teacher = trainer.teacher.model.state_dict()
    assert all(torch.equal(pretrained[key], teacher[key]) for key in pretrained)


# --- the collator makes the teacher's inputs ---------------------------------------------------------------------


def test_the_collator_gives_the_teacher_its_own_size_tokens_and_the_same_augmented_view(tiny_clip_dir, teacher_dir):
    from transformers import AutoProcessor

    from clip_trainer.augmentation import ImageAugmentation

    student = AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher_images = ImagePreprocessor.from_image_processor(
        AutoImageProcessor.from_pretrained(teacher_dir, backend="pil")
    )
    # Tall images, so that the random crop's position matters.
    rows = [{"image": draw_shape("red", "circle", size=64).resize((64, 96)), "caption": "a red circle on white"},
            {"image": draw_shape("blue", "square", size=64), "caption": "a blue square on white"},
            {"image": b"not an image", "caption": "a broken one"}]  # fmt: skip
    collator = ImageTextCollator.from_processor(
        student,
        max_seq_length=16,
        augmentation=ImageAugmentation(scale=(0.3, 0.6), color_jitter=0.4),
        teacher=TeacherProcessing(teacher_tokenizer, teacher_images, max_seq_length=20),
    )
    torch.manual_seed(0)
    batch = collator(rows)
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["teacher_pixel_values"].shape == (3, 3, 48, 48)
    assert batch["valid"].tolist() == [True, True, False]
    expected = teacher_tokenizer([row["caption"] for row in rows[:2]] + [""], padding="longest", return_tensors="pt")
    assert torch.equal(batch["teacher_input_ids"], expected["input_ids"])
    assert torch.equal(batch["teacher_attention_mask"], expected["attention_mask"])
    assert not torch.equal(batch["teacher_input_ids"][:, :3], batch["input_ids"][:, :3])  # another vocabulary
    # The teacher's view is the student's crop and colours at the teacher's size: downsized to the student's size,
    # it is the student's image up to resampling.
    teacher_view = torch.nn.functional.interpolate(batch["teacher_pixel_values"][:2].float(), size=32, mode="area")
    difference = (teacher_view - batch["pixel_values"][:2].float()).abs().mean()
    assert difference < 6, difference
    # ... where an independent draw (another crop) is far from it.
    torch.manual_seed(1)
    other = collator(rows)["teacher_pixel_values"][:2].float()
    other_difference = (torch.nn.functional.interpolate(other, size=32, mode="area") - batch["pixel_values"][:2]).abs()
    assert other_difference.mean() > 3 * difference
    # Augmentation off: the teacher's pixels are its own preprocessor's.
    plain = ImageTextCollator.from_processor(
        student, max_seq_length=16, teacher=TeacherProcessing(teacher_tokenizer, teacher_images, 20)
    )(rows[:1])
    assert torch.equal(plain["teacher_pixel_values"][0], torch.from_numpy(teacher_images(rows[0]["image"])))


def test_a_naflex_teacher_embeds_its_own_patches(tiny_clip_dir):
    """A SigLIP 2 teacher (NaFlex: each image at its own aspect ratio, in patches) behind a CLIP student: the collator
    makes its patches, mask and shapes, and the teacher's embeddings are those of its model on its processor's
    inputs."""
    from transformers import AutoProcessor, Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model

    from clip_trainer.distillation import Teacher

    tokenizer = train_caption_tokenizer([c for *_, c in shape_rows()] * 3, vocab_size=280, model_max_length=64)
    text = {**TINY_TEXT, "max_position_embeddings": 64, **text_config_token_ids(tokenizer)}
    vision = {key: value for key, value in TINY_VISION.items() if key != "image_size"}
    torch.manual_seed(5)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config={**vision, "num_patches": 16}))
    image_processor = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)
    preprocessor = ImagePreprocessor.from_image_processor(image_processor)
    teacher = Teacher(model, preprocessor, TeacherProcessing(tokenizer, preprocessor, 64, "max_length"))
    rows = [{"image": draw_shape("red", "circle", size=40).resize((40, 64)), "caption": "a red circle on white"},
            {"image": draw_shape("blue", "square", size=48), "caption": "a blue square on black"}]  # fmt: skip
    student = AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    batch = ImageTextCollator.from_processor(student, max_seq_length=16, teacher=teacher.processing)(rows)
    assert {"teacher_pixel_attention_mask", "teacher_spatial_shapes"} <= batch.keys()
    got_image, got_text = teacher.embed(batch)

    expected_inputs = image_processor([row["image"] for row in rows], return_tensors="pt")
    captions = tokenizer([row["caption"] for row in rows], padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        expected = model(**expected_inputs, **captions)
    torch.testing.assert_close(got_image, expected.image_embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_text, expected.text_embeds, rtol=1e-4, atol=1e-5)


# --- cached accumulation: the teacher's embeddings are constants of the accumulated batch ----------------------


@pytest.mark.parametrize("intra_modal_weight", [0.0, 0.8])
def test_cached_accumulation_with_distillation_equals_one_big_batch(intra_modal_weight):
    """float64, with dropout in the student and a teacher of another width: the cached gradients and loss equal one
    backward of `clip_loss + weight x distillation_loss` over the concatenated batch (with and without the
    intra-modal term)."""
    student = make_model(torch.float64, dropout=0.3)
    config = CLIPConfig(
        text_config={**TINY_TEXT, "hidden_size": 48, "vocab_size": 64, "max_position_embeddings": 7, "bos_token_id": 0,
                     "pad_token_id": 1, "eos_token_id": 63},
        vision_config={**TINY_VISION, "hidden_size": 48},
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(3)
    teacher = CLIPModel(config).double().eval()
    teacher_scale = torch.tensor(25.0, dtype=torch.float64)
    weight = 0.6
    batches = make_batches([4, 3, 5], torch.float64)

    def embed(model, batch):
        outputs = model(**batch, return_loss=False)
        return outputs.image_embeds, outputs.text_embeds

    def teacher_constants(batch):
        with torch.no_grad():
            image, text = embed(teacher, batch)
        return {"teacher_image": image, "teacher_text": text}

    def loss(images, texts, scale, pad_to, valid, teacher_image, teacher_text):
        base = contrastive_loss(images, texts, scale, pad_to=pad_to, valid=valid)
        kl = distillation_loss(images, texts, teacher_image, teacher_text, scale, teacher_scale, pad_to=pad_to,
                               valid=valid, intra_modal_weight=intra_modal_weight)  # fmt: skip
        return base + weight * kl

    cache = GradientCache(
        embed=lambda batch: embed(student, batch),
        loss_scalars=lambda: (student.logit_scale.exp(),),
        loss=loss,
        backward=lambda value: value.backward(),
        micro_batch_size=5,
        accumulation_steps=3,
        constants=teacher_constants,
    )
    student.zero_grad(set_to_none=True)
    cache.start_step(batches)
    torch.manual_seed(4)
    total = sum(cache.training_step(batch) for batch in batches)
    got = gradients(student)

    student.zero_grad(set_to_none=True)
    torch.manual_seed(4)  # the same dropout masks, micro-batch by micro-batch
    outputs = [embed(student, batch) for batch in batches]
    image = torch.cat([image for image, _ in outputs])
    text = torch.cat([text for _, text in outputs])
    with torch.no_grad():
        teacher_image, teacher_text = embed(teacher, {k: torch.cat([b[k] for b in batches]) for k in batches[0]})
    scale = student.logit_scale.exp()
    kl = distillation_loss(image, text, teacher_image, teacher_text, scale, teacher_scale,
                           intra_modal_weight=intra_modal_weight)  # fmt: skip
    expected_loss = clip_loss(image, text, scale) + weight * kl
    expected_loss.backward()
    expected = gradients(student)
    assert kl.item() > 0.01
    assert_gradients_close(got, expected, torch.float64)
    torch.testing.assert_close(total, expected_loss.detach(), rtol=1e-12, atol=1e-12)
    # The teacher took no gradient.
    assert all(parameter.grad is None for parameter in teacher.parameters())


# --- settings refused in one line --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--distillation_weight", "0.5"], "there is no teacher to distil from"),
        (["--distillation_temperature", "0.1"], "there is no teacher to distil from"),
        (["--distillation_intra_modal_weight", "1"], "there is no teacher to distil from"),
        (["--prepare_only", "true", "--distillation_intra_modal_weight", "1"], "this is a preparation run"),
        (
            ["--teacher_model_name_or_path", "TEACHER", "--distillation_intra_modal_weight", "-1"],
            "`distillation_intra_modal_weight`",
        ),
        (["--distillation_weight", "0"], "`distillation_weight` is 0"),
        (["--teacher_model_name_or_path", "TEACHER", "--distill_from_pretrained", "true"], "keep one of them"),
        (["--teacher_model_name_or_path", "{tmp}/nowhere"], "`teacher_model_name_or_path`"),
        (["--teacher_model_name_or_path", "TEACHER", "--do_train", "false", "--do_eval", "true"], "add --do_train"),
    ],
)
def test_bad_distillation_settings_stop_in_one_line(tiny_clip_dir, teacher_dir, one_batch_csv, tmp_path, extra,
                                                    message):  # fmt: skip
    extra = [value.replace("TEACHER", str(teacher_dir)).replace("{tmp}", str(tmp_path)) for value in extra]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        run.main([*distill_args(tiny_clip_dir, one_batch_csv, tmp_path / "out"), *extra])
    assert "\n" not in str(error.value)


def test_distill_from_pretrained_refuses_a_model_trained_from_scratch(tiny_clip_dir, one_batch_csv, tmp_path):
    argv = distill_args(tiny_clip_dir, one_batch_csv, tmp_path / "out")
    argv[argv.index("--model_name_or_path")] = "--config_name"
    argv[argv.index("--config_name") + 1] = str(tiny_clip_dir / "config.json")
    with pytest.raises(ConfigError, match="trained from scratch"):
        run.main([*argv, "--distill_from_pretrained", "true"])


# --- with the other options: the sigmoid loss, LoRA, partial locking and WiSE-FT, streaming, torchrun ------------


def test_a_siglip_student_distils_its_softmax_over_the_batch(one_batch_csv, teacher_dir, tmp_path):
    """The sigmoid family: the student's distribution is still the softmax over the batch of its logits (its bias
    shifts a whole row and drops out), and the loss is the sigmoid loss plus the weighted KL divergence."""
    from test_sigmoid_loss import reference_sigmoid_loss

    student = save_teacher(tmp_path / "siglip-student", "siglip")  # a SigLIP model, here in the student's seat
    with torch.no_grad():  # a bias that would change the distributions if it took part in them
        model = SiglipModel.from_pretrained(student)
        model.logit_bias.fill_(-3.0)
        model.save_pretrained(student)
    out = tmp_path / "out"
    run.main([*distill_args(student, one_batch_csv, out), "--teacher_model_name_or_path", str(teacher_dir)])
    image, text, scale = float64_embeddings(student, one_batch_csv, padding="max_length")
    teacher_image, teacher_text, teacher_scale = float64_embeddings(teacher_dir, one_batch_csv)
    divergence = reference_distillation(
        image.tolist(), text.tolist(), teacher_image.tolist(), teacher_text.tolist(), scale, teacher_scale
    )
    sigmoid = reference_sigmoid_loss(image.tolist(), text.tolist(), scale, -3.0)
    first = training_logs(out)[0]
    assert first["distillation_kl"] == pytest.approx(divergence, rel=1e-4)
    assert first["loss"] == pytest.approx(sigmoid + divergence, rel=1e-4)


@needs_peft
def test_lora_distils_from_the_plain_pretrained_model(tiny_clip_dir, one_batch_csv, tmp_path, recorded):
    out = tmp_path / "out"
    run.main([*distill_args(tiny_clip_dir, one_batch_csv, out), "--distill_from_pretrained", "true",
              "--lora_rank", "4", "--learning_rate", "3e-2"])  # fmt: skip
    first, second = training_logs(out)
    # LoRA's adapters start at zero: the student starts as its teacher, then moves.
    assert first["distillation_kl"] == pytest.approx(0, abs=1e-6) and second["distillation_kl"] > 1e-5
    (trainer,) = recorded
    assert type(trainer.teacher.model) is CLIPModel  # the weights before LoRA wrapped them, without adapters


def test_partial_locking_and_wise_ft_with_the_pretrained_teacher(tiny_clip_dir, one_batch_csv, tmp_path):
    out = tmp_path / "out"
    argv = distill_args(tiny_clip_dir, one_batch_csv, out)
    argv[argv.index("--validation_split_percentage") + 1] = "25"
    run.main([*argv, "--distill_from_pretrained", "true", "--vision_trainable_layers", "1", "--eval_strategy",
              "steps", "--eval_steps", "2", "--wise_ft_alphas", "0.5"])  # fmt: skip
    assert (out / "wise_ft_results.json").is_file()
    assert all("distillation_kl" in entry for entry in training_logs(out))
    before, after = AutoModel.from_pretrained(tiny_clip_dir), AutoModel.from_pretrained(out)
    locked = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(before.state_dict()[locked], after.state_dict()[locked])


def test_a_streamed_run_distils(tiny_clip_dir, teacher_dir, one_batch_csv, tmp_path):
    """A stream of the 24 pairs with a batch of 24: the first batch is every pair, so its loss is the reference's."""
    out = tmp_path / "out"
    argv = distill_args(tiny_clip_dir, one_batch_csv, out)
    run.main([*argv, "--streaming", "true", "--shuffle_buffer_size", "8", "--teacher_model_name_or_path",
              str(teacher_dir)])  # fmt: skip
    image, text, scale = float64_embeddings(tiny_clip_dir, one_batch_csv)
    teacher_image, teacher_text, teacher_scale = float64_embeddings(teacher_dir, one_batch_csv)
    divergence = reference_distillation(
        image.tolist(), text.tolist(), teacher_image.tolist(), teacher_text.tolist(), scale, teacher_scale
    )
    first = training_logs(out)[0]
    assert first["distillation_kl"] == pytest.approx(divergence, rel=1e-4)
    assert first["loss"] == pytest.approx(
        reference_clip_loss(image.tolist(), text.tolist(), scale) + divergence, rel=1e-4
    )


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["live", "stored"])
def test_torchrun_two_processes_distil_over_the_global_batch(tiny_clip_dir, teacher_dir, one_batch_csv, tmp_path,
                                                             teacher):  # fmt: skip
    """2 processes of 12 pairs each: the first logged loss and KL divergence are those of all 24 pairs at once (the
    distributions are over the gathered global batch), with cached accumulation on top; the same with the teacher's
    embeddings stored by a preparation run and looked up by each process's collator, with the image-to-image and
    text-to-text term (each row left out of its own distribution at its place in the global batch)."""
    from test_distributed_run import torchrun

    out = tmp_path / "out"
    argv = distill_args(tiny_clip_dir, one_batch_csv, out)
    argv[argv.index("--per_device_train_batch_size") + 1] = "6"
    if teacher == "live":
        argv += ["--teacher_model_name_or_path", str(teacher_dir)]
    else:
        prepared = tmp_path / "prepared"
        run.main(["--train_file", str(one_batch_csv), "--validation_split_percentage", "0", "--prepare_only", "true",
                  "--output_dir", str(prepared), "--report_to", "none", "--use_cpu", "true",
                  "--teacher_model_name_or_path", str(teacher_dir)])  # fmt: skip
        index = argv.index("--train_file")
        argv = [
            *argv[:index],
            "--dataset_name",
            str(prepared),
            *argv[index + 2 :],
            "--teacher_embeddings",
            str(prepared),
        ]
    intra_modal_weight = 0.0 if teacher == "live" else 0.6
    if intra_modal_weight:
        argv += ["--distillation_intra_modal_weight", str(intra_modal_weight)]
    result = torchrun([*argv, "--gradient_accumulation_steps", "2", "--ddp_backend", "gloo",
                       "--distillation_weight", "0.5"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    image, text, scale = float64_embeddings(tiny_clip_dir, one_batch_csv)
    teacher_image, teacher_text, teacher_scale = float64_embeddings(teacher_dir, one_batch_csv)
    divergence = reference_distillation(
        image.tolist(), text.tolist(), teacher_image.tolist(), teacher_text.tolist(), scale, teacher_scale,
        intra_modal_weight,
    )  # fmt: skip
    first = training_logs(out)[0]
    assert first["distillation_kl"] == pytest.approx(divergence, rel=1e-4)
    contrastive = reference_clip_loss(image.tolist(), text.tolist(), scale)
    assert first["loss"] == pytest.approx(contrastive + 0.5 * divergence, rel=1e-4)


# --- the documented commands -------------------------------------------------------------------------------------


def documented_commands() -> list[list[str]]:
    """The command lines of the distillation section of docs/fine-tuning.md, as a shell would split them."""
    import re
    import shlex

    text = (REPO / "docs" / "fine-tuning.md").read_text().split("## Distillation from a teacher", 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL).group(1).replace("\\\n", " ")
    return [shlex.split(line, comments=True)[2:] for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_documented_commands_run(tmp_path, monkeypatch):
    """Each command of the docs on the bundled data, from a working folder beside a copy of the configs, shortened."""
    import shutil

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    short = ["--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end",
             "false", "--eval_on_start", "false", "--report_to", "none", "--dataloader_num_workers", "0",
             "--dataloader_persistent_workers", "false"]  # fmt: skip
    commands = documented_commands()
    assert len(commands) == 6 and any("--teacher_embeddings" in c for c in commands)
    for command in commands:
        run.main([*command, *short] if "--prepare_only" not in command else command)
    folders = ("outputs/demo", "outputs/demo-half-distilled", "outputs/demo-half-neighbours", "outputs/demo-kept",
               "outputs/demo-half-stored")  # fmt: skip
    for folder in folders:
        assert (tmp_path / folder / "model.safetensors").is_file()
    assert (tmp_path / "outputs/emoji-with-teacher/teacher_embeddings.safetensors").is_file()
    half = json.loads((tmp_path / "outputs/demo-half-distilled/config.json").read_text())
    assert half["vision_config"]["hidden_size"] == 64


def test_the_teacher_runs_in_the_training_precision(tiny_clip_dir, one_batch_csv, tmp_path):
    """Under bf16 the pretrained teacher's embeddings are its student's at the first step, bit for bit: the teacher's
    forward runs under the same autocast (float32 against the student's bf16 would differ by bf16's rounding)."""
    out = tmp_path / "out"
    run.main([*distill_args(tiny_clip_dir, one_batch_csv, out), "--distill_from_pretrained", "true", "--bf16", "true"])
    first, second = training_logs(out)
    assert first["distillation_kl"] == 0 and second["distillation_kl"] > 0


def test_a_batch_without_the_teacher_inputs_is_one_line(tiny_clip_dir, teacher_dir):
    """A collator of the caller's that does not make the teacher's inputs: the first step says what to give."""
    from transformers import AutoProcessor

    from clip_trainer.distillation import Teacher

    teacher = Teacher.from_pretrained(str(teacher_dir))
    batch = ImageTextCollator.from_processor(AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil"))(
        [{"image": draw_shape("red", "circle"), "caption": "a red circle on white"}]
    )
    with pytest.raises(ConfigError, match="ImageTextCollator\\(teacher=...\\)") as error:
        teacher.embed(batch)
    assert "\n" not in str(error.value)
