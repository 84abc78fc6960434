"""Training-time augmentation: random in training, reproducible with the seed, absent from evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoProcessor, CLIPModel

from clip_trainer import CLIPContrastiveTrainer, CLIPTrainingArguments, DataArguments, load_image_text_data
from clip_trainer.arguments import ConfigError
from clip_trainer.augmentation import ImageAugmentation
from clip_trainer.collator import ImageTextCollator
from clip_trainer.images import load_image

AUGMENTATION = ImageAugmentation(scale=(0.5, 1.0), color_jitter=0.3, grayscale_probability=0.3)


def augmenting_trainer(tmp_path, model_dir, train, validation, **training) -> CLIPContrastiveTrainer:
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    defaults = {"per_device_eval_batch_size": 16, "report_to": "none", "use_cpu": True, "dataloader_num_workers": 0}
    args = CLIPTrainingArguments(output_dir=str(tmp_path / "out"), **{**defaults, **training})
    return CLIPContrastiveTrainer(
        model=CLIPModel.from_pretrained(model_dir),
        args=args,
        data_collator=ImageTextCollator.from_processor(processor, augmentation=AUGMENTATION),
        train_dataset=train,
        eval_dataset=validation,
        processing_class=processor,
    )


def test_training_batches_are_random_and_evaluation_batches_are_the_preprocessors(tiny_clip_dir, shapes_csv, tmp_path):
    data = load_image_text_data(DataArguments(train_file=str(shapes_csv)), seed=1)
    trainer = augmenting_trainer(tmp_path, tiny_clip_dir, data.train, data.validation)
    row = [data.train[0]]
    first, second = trainer.data_collator(row)["pixel_values"], trainer.data_collator(row)["pixel_values"]
    assert first.shape == second.shape == (1, 3, 32, 32) and first.dtype == torch.uint8
    assert not torch.equal(first, second)
    # Evaluation: a collator without augmentation, pixels exactly the deterministic preprocessor's.
    preprocessor = trainer.image_preprocessor
    expected = np.stack([preprocessor(load_image(image)) for image in data.validation["image"]])
    batches = [batch["pixel_values"] for batch in trainer.get_eval_dataloader()]
    assert torch.equal(torch.cat(batches), torch.from_numpy(expected))
    assert trainer.eval_data_collator.augmentation is None and trainer.data_collator.augmentation is AUGMENTATION


def test_crops_differ_across_workers_and_epochs_and_follow_the_seed(tiny_clip_dir, shapes_csv, tmp_path):
    data = load_image_text_data(DataArguments(train_file=str(shapes_csv)), seed=1, evaluate=False)
    same_row = Dataset.from_list([data.train[0]] * 4)
    trainer = augmenting_trainer(
        tmp_path, tiny_clip_dir, same_row, None, per_device_train_batch_size=2, dataloader_num_workers=2,
        dataloader_persistent_workers=False, eval_strategy="no",
    )  # fmt: skip

    def epoch(number: int) -> list[torch.Tensor]:
        loader = trainer.get_train_dataloader()
        loader.set_epoch(number)  # as the Trainer does before each epoch
        return [batch["pixel_values"] for batch in loader]

    torch.manual_seed(5)
    first, second = epoch(0), epoch(1)
    torch.manual_seed(6)  # torch's global generator plays no part: the run's seed, the epoch and the row do
    again = epoch(0)
    # Batches 0 and 1 come from the two workers: rows of the same image, cropped differently.
    assert not torch.equal(first[0], first[1])
    assert any(not torch.equal(a, b) for a, b in zip(first, second))  # a new epoch draws new crops
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the same seed and epoch draw the same ones


def test_crop_boxes_stay_inside_the_image_and_keep_the_area():
    augmentation = ImageAugmentation()
    torch.manual_seed(0)
    for width, height in [(64, 64), (200, 50), (33, 120)]:
        for _ in range(20):
            left, top, right, bottom = augmentation.crop_box(width, height)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            share = (right - left) * (bottom - top) / (width * height)
            ratio = (right - left) / (bottom - top)
            # Either a drawn box (area 0.9-1, ratio 3/4-4/3, up to rounding) or the fallback center box.
            assert (
                0.85 <= share <= 1.0
                or ratio == pytest.approx(4 / 3, abs=0.05)
                or ratio == pytest.approx(0.75, abs=0.05)
            )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--augment_scale_min", "0"], "`augment_scale_min` is 0.0; it must be in (0, 1]"),
        (["--color_jitter", "1.5"], "`color_jitter` is 1.5"),
        (["--grayscale_probability", "2"], "`grayscale_probability` is 2.0"),
    ],
)
def test_bad_augmentation_values_are_refused(flags, message):
    from clip_trainer.command_line import parse_arguments

    with pytest.raises(ConfigError) as error:
        parse_arguments(["--model_name_or_path", "m", "--dataset_name", "emoji", "--augment", "true", *flags])
    assert message in str(error.value)
