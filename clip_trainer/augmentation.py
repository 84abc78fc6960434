"""Training-time image augmentation: a random resized crop to the model's input size, colour jitter and grayscale.

It runs in the collator's DataLoader workers on PIL images and ends, like [`ImagePreprocessor`], at uint8; the same
normalisation follows on the device, so an augmented image differs from an evaluation image only in what was cropped
and recoloured. The random resized crop *replaces* the preprocessor's resize and center crop (as open_clip's training
transform does): a box covering `scale` of the image's area with an aspect ratio in `ratio` is resized straight to the
output size with the preprocessor's filter.

**Randomness.** Each training row's crop and colours are drawn from a `torch.Generator` of its own, seeded by
[`augmentation_seed`] from the run's seed, the epoch and the row's index in the training set (a stream: the row's
position in its reader's stream, which runs on from pass to pass, and its image). The trainer puts that seed in each
row under [`AUGMENTATION_SEED_KEY`] (see `captions.AugmentationSeededRows`, `captions.seed_stream_augmentation`); the epoch reaches
the DataLoader's workers through the indices, as it does for caption sampling (`captions.py`). So a row is cropped
alike in every run of the seed, whatever the number of workers or processes, and a run resumed from a checkpoint
draws exactly what the uninterrupted run drew: torch's global generator, which a resume restores from `rng_state.pth`
at another point of its stream (the DataLoader fetches ahead, skipped batches are not collated, workers are seeded
anew), plays no part. Each epoch crops a row anew; two rows (two copies of one image among them) are cropped
differently; dropout and every other random draw are left as they were. A distillation teacher replays the row's
generator, so it sees the student's crop and colours at its own size. A row without a seed (a collator used outside
the trainer, a torch `IterableDataset`) draws its generator's seed from torch's global generator instead.

torchvision's `RandomResizedCrop`/`ColorJitter` draw the same way; torchvision is not a dependency of clip-trainer, so
the few lines are written here, after torchvision's algorithms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from PIL import ImageEnhance

from .images import BadSampleError, rgb_pixels_or_bad_sample
from .preprocessing import ImagePreprocessor

__all__ = ["AUGMENTATION_SEED_KEY", "ImageAugmentation", "augmentation_seed"]

# The training row's entry that holds the seed of its augmentation's generator (put there by the trainer's data).
AUGMENTATION_SEED_KEY = "_augmentation_seed"

# Seeds are non-negative 63-bit integers: they fit the int64 column of a stream and `torch.Generator.manual_seed`.
_SEED_MASK = (1 << 63) - 1


def augmentation_seed(seed: int, draw: int, row: int) -> int:
    """The seed of one training row's augmentation: a hash of `(seed, draw, row)`, so that neighbouring epochs and
    rows get unrelated generators.

    Args:
        seed: the run's seed.
        draw: the epoch (a stream: the row's position in its reader's stream).
        row: the row's index in the training set (a stream: its image id, see `captions.training_image_id`).
    """
    # numpy's SeedSequence mixes a list of integers into well spread state; torch has no such hash of several.
    entropy = [seed & _SEED_MASK, draw & _SEED_MASK, row & _SEED_MASK]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) & _SEED_MASK


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(high: int, generator: torch.Generator | None) -> int:
    """An integer in `[0, high)`."""
    return int(torch.randint(high, (), generator=generator))


@dataclass(frozen=True)
class ImageAugmentation:
    """Random resized crop (open_clip's default `scale=(0.9, 1.0)`, `ratio=(3/4, 4/3)`), then optional colour jitter
    and grayscale, to the output size of an [`ImagePreprocessor`].

    Attributes:
        scale: the range of the crop's share of the image's area.
        ratio: the range of the crop's aspect ratio (width / height), drawn log-uniformly.
        color_jitter: brightness, contrast and saturation factors drawn from `[1 - x, 1 + x]`, applied in a random
            order (torchvision's `ColorJitter(x, x, x)`); 0 is off.
        grayscale_probability: the chance of turning the image gray (three equal channels).
    """

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float = 0.0
    grayscale_probability: float = 0.0

    @classmethod
    def from_data_arguments(cls, data_args) -> ImageAugmentation | None:
        """The augmentation `DataArguments` ask for (`augment`, ...), or `None` when `augment` is off."""
        if not data_args.augment:
            return None
        return cls(
            scale=(float(data_args.augment_scale_min), 1.0),
            color_jitter=float(data_args.color_jitter),
            grayscale_probability=float(data_args.grayscale_probability),
        )

    def crop_box(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """A random `(left, top, right, bottom)` box, by torchvision's `RandomResizedCrop.get_params`: ten tries at
        a box of the drawn area and ratio that fits, else the largest center box within `ratio`. Drawn from
        `generator` (`None`: torch's global generator)."""
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(log_low, log_high, generator))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = _randint(height - crop_height + 1, generator)
                left = _randint(width - crop_width + 1, generator)
                return left, top, left + crop_width, top + crop_height
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            crop_width, crop_height = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            crop_width, crop_height = round(height * max(self.ratio)), height
        else:
            crop_width, crop_height = width, height
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
        return left, top, left + crop_width, top + crop_height

    def _jitter(self, image: PIL.Image.Image, generator: torch.Generator | None) -> PIL.Image.Image:
        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        low, high = max(0.0, 1.0 - self.color_jitter), 1.0 + self.color_jitter
        for index in torch.randperm(len(enhancers), generator=generator).tolist():
            image = enhancers[index](image).enhance(_uniform(low, high, generator))
        return image

    def __call__(
        self, image: PIL.Image.Image, preprocessor: ImagePreprocessor, generator: torch.Generator | None = None
    ) -> np.ndarray:
        """A randomly cropped (and recoloured) `(3, height, width)` uint8 array of `preprocessor.output_size`.

        The draws come from `generator` (`None`: torch's global generator) and depend on the image's size only, not
        on the output size: a generator seeded alike gives a teacher's preprocessor the same crop and colours.

        Raises:
            [`BadSampleError`]: if the image has no pixels or cannot be resized.
        """
        image = rgb_pixels_or_bad_sample(image)
        width, height = image.size
        try:
            out_height, out_width = preprocessor.output_size
            image = image.resize(
                (out_width, out_height), resample=preprocessor.resample, box=self.crop_box(width, height, generator)
            )
            if self.color_jitter > 0:
                image = self._jitter(image, generator)
            grayscale = self.grayscale_probability > 0
            if grayscale and float(torch.rand((), generator=generator)) < self.grayscale_probability:
                image = image.convert("L").convert("RGB")
            return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))
        except Exception as error:  # e.g. MemoryError on an absurd aspect ratio
            raise BadSampleError(f"cannot augment image ({type(error).__name__}: {error})") from None
