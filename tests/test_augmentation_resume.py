"""A run that augments its training images resumes exactly: each row's crop and colours are drawn from a generator of
its own, seeded by the run's seed, the epoch (a stream: the row's place in it) and the row, so a run resumed from a
checkpoint trains on the same augmented images, after the resume, as the run that was never stopped (on the CPU: the
same losses and weights, bit for bit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clip_trainer import run
from clip_trainer.augmentation import ImageAugmentation
from clip_trainer.preprocessing import ImagePreprocessor

AUGMENT = ["--augment", "true", "--augment_scale_min", "0.4", "--color_jitter", "0.4",
           "--grayscale_probability", "0.3"]  # fmt: skip


def _losses(folder: Path) -> dict[int, float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def _resume_matches_uninterrupted(argv: list[str], tmp_path: Path, resume_from: int, steps: int) -> None:
    """Runs `argv` uninterrupted, then again from a copy of its checkpoint `resume_from` in a fresh folder, and checks
    that every loss logged after the resume and the final weights are the uninterrupted run's, bit for bit (CPU)."""
    common = [*argv, "--max_steps", str(steps), "--logging_steps", "1", "--save_strategy", "steps",
              "--save_steps", str(resume_from), "--save_total_limit", "10"]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run.main([*common, "--output_dir", str(full)])
    resumed.mkdir()
    shutil.copytree(full / f"checkpoint-{resume_from}", resumed / f"checkpoint-{resume_from}")
    run.main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "true"])

    reference, again = _losses(full / f"checkpoint-{steps}"), _losses(resumed / f"checkpoint-{steps}")
    after = [step for step in reference if step > resume_from]
    assert after == list(range(resume_from + 1, steps + 1))
    for step in after:
        assert again[step] == reference[step], f"step {step}"
    expected = load_file(str(full / "model.safetensors"))
    got = load_file(str(resumed / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    # The resume had something to reproduce: the weights moved after the checkpoint.
    at_checkpoint = load_file(str(full / f"checkpoint-{resume_from}" / "model.safetensors"))
    assert any(not torch.equal(at_checkpoint[name], expected[name]) for name in expected)


# --------------------------------------------------------------------------------------------------------------
# Each row's draws: a function of (seed, epoch, row)
# --------------------------------------------------------------------------------------------------------------


def _preprocessor(size: int) -> ImagePreprocessor:
    return ImagePreprocessor(
        shortest_edge=size, resize_to=None, resample=Image.Resampling.BICUBIC, crop_size=(size, size),
        rescale_factor=1 / 255, mean=None, std=None,
    )  # fmt: skip


def _crop(augmentation: ImageAugmentation, image: Image.Image, seed: int, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.from_numpy(augmentation(image, _preprocessor(size), generator=generator))


def test_a_rows_crops_depend_on_seed_epoch_and_row_only():
    from clip_trainer.augmentation import augmentation_seed

    augmentation = ImageAugmentation(scale=(0.3, 1.0), color_jitter=0.4, grayscale_probability=0.3)
    image = Image.effect_mandelbrot((64, 48), (-2.0, -1.0, 1.0, 1.0), 50).convert("RGB")
    crops = {(seed, epoch, row): _crop(augmentation, image, augmentation_seed(seed, epoch, row))
             for seed in (1, 2) for epoch in range(4) for row in (0, 7)}  # fmt: skip
    # The same (seed, epoch, row) gives the same crop, whatever was drawn before or from torch's global generator.
    torch.manual_seed(123)
    assert torch.equal(_crop(augmentation, image, augmentation_seed(1, 2, 7)), crops[1, 2, 7])
    # Each epoch another crop of the row; another row or another seed another crop in the same epoch.
    for seed in (1, 2):
        for row in (0, 7):
            epochs = [crops[seed, epoch, row] for epoch in range(4)]
            assert all(not torch.equal(a, b) for i, a in enumerate(epochs) for b in epochs[i + 1 :])
    assert not torch.equal(crops[1, 0, 0], crops[1, 0, 7])
    assert not torch.equal(crops[1, 0, 0], crops[2, 0, 0])
    # Seeds are 63-bit and spread: neighbouring arguments give unrelated seeds.
    seeds = {augmentation_seed(1, epoch, row) for epoch in range(50) for row in range(50)}
    assert len(seeds) == 2500 and all(0 <= seed < 2**63 for seed in seeds)


def test_the_collator_crops_a_row_by_its_seed_and_the_teacher_replays_it(tiny_clip_dir, shapes_csv):
    from transformers import AutoProcessor

    from clip_trainer.augmentation import AUGMENTATION_SEED_KEY
    from clip_trainer.collator import ImageTextCollator, TeacherProcessing

    processor = AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    augmentation = ImageAugmentation(scale=(0.3, 1.0), color_jitter=0.4)
    teacher = TeacherProcessing(processor.tokenizer, _preprocessor(48), 16)
    collator = ImageTextCollator.from_processor(processor, augmentation=augmentation, teacher=teacher)
    folder = shapes_csv.parent
    row = {"image": str(folder / "images" / "red_circle_white_0.png"), "caption": "a red circle on white"}
    image = Image.open(row["image"]).convert("RGB")

    def batch(seed: int) -> dict[str, torch.Tensor]:
        return collator([{**row, AUGMENTATION_SEED_KEY: seed}])

    torch.manual_seed(0)
    first = batch(11)
    torch.manual_seed(99)  # torch's global generator plays no part
    again, other = batch(11), batch(12)
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    # The student's crop is the one of a generator seeded with the row's seed; the teacher gets the same draws.
    assert torch.equal(first["pixel_values"][0], _crop(augmentation, image, 11))
    assert torch.equal(first["teacher_pixel_values"][0], _crop(augmentation, image, 11, size=48))


# --------------------------------------------------------------------------------------------------------------
# Resuming a run, as a user does
# --------------------------------------------------------------------------------------------------------------


def test_an_augmenting_run_resumes_exactly(base_args, tmp_path, monkeypatch):
    # 72 rows at batch 8: 9 steps an epoch; resumed from step 6, across the epoch's end, to step 12.
    monkeypatch.chdir(tmp_path)
    _resume_matches_uninterrupted([*base_args, *AUGMENT], tmp_path, resume_from=6, steps=12)


@pytest.mark.slow
def test_an_augmenting_run_with_a_worker_resumes_exactly(base_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [*base_args, *AUGMENT, "--dataloader_num_workers", "1", "--ema_decay", "0.8"]
    _resume_matches_uninterrupted(argv, tmp_path, resume_from=4, steps=11)
    expected = load_file(str(tmp_path / "full" / "checkpoint-11" / "ema.safetensors"))
    got = load_file(str(tmp_path / "resumed" / "checkpoint-11" / "ema.safetensors"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


@pytest.mark.slow
def test_an_augmenting_streamed_run_resumes_exactly(base_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The stream is read in a DataLoader worker, which resumes at the position saved in the checkpoint.
    argv = [*base_args, *AUGMENT, "--streaming", "true", "--shuffle_buffer_size", "16",
            "--dataloader_num_workers", "1"]  # fmt: skip
    _resume_matches_uninterrupted(argv, tmp_path, resume_from=4, steps=10)


def test_another_sampling_order_is_kept_and_told_the_epoch(tiny_clip_dir, shapes_csv, tmp_path):
    """`train_sampling_strategy` sequential: the rows in their order, each epoch cropped anew, and alike when the
    same epoch is read again (as a resumed run reads it)."""
    from transformers import AutoProcessor, CLIPModel

    from clip_trainer import CLIPContrastiveTrainer, CLIPTrainingArguments, DataArguments, load_image_text_data

    data_args = DataArguments(train_file=str(shapes_csv), augment=True, augment_scale_min=0.4, color_jitter=0.4)
    data = load_image_text_data(data_args, seed=1, evaluate=False)
    args = CLIPTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to="none", use_cpu=True,
        dataloader_num_workers=0, eval_strategy="no", train_sampling_strategy="sequential", seed=1,
    )  # fmt: skip
    trainer = CLIPContrastiveTrainer(
        model=CLIPModel.from_pretrained(tiny_clip_dir),
        args=args,
        train_dataset=data.train,
        data_args=data_args,
        processing_class=AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil"),
    )
    rows = len(data.train)

    def first_batch(epoch: int) -> dict[str, torch.Tensor]:
        loader = trainer.get_train_dataloader()
        loader.set_epoch(epoch)  # as the Trainer does before each epoch
        return next(iter(loader))

    sampler = trainer._get_train_sampler()
    sampler.set_epoch(2)
    assert list(sampler) == [2 * rows + row for row in range(rows)]
    epoch_0, epoch_1 = first_batch(0), first_batch(1)
    torch.manual_seed(3)
    again = first_batch(1)
    # The same rows in the same order (their captions), other crops in another epoch, the same in the same one.
    assert torch.equal(epoch_0["input_ids"], epoch_1["input_ids"])
    assert not torch.equal(epoch_0["pixel_values"], epoch_1["pixel_values"])
    assert torch.equal(epoch_1["pixel_values"], again["pixel_values"])
