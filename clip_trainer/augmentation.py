"""Training-time image augmentation: a random resized crop to the model's input size, colour jitter and grayscale.

It runs in the collator's DataLoader workers on PIL images and ends, like [`ImagePreprocessor`], at uint8; the same
normalisation follows on the device, so an augmented image differs from an evaluation image only in what was cropped
and recoloured. The random resized crop *replaces* the preprocessor's resize and center crop (as open_clip's training
transform does): a box covering `scale` of the image's area with an aspect ratio in `ratio` is resized straight to the
output size with the preprocessor's filter.

Randomness comes from torch's global generator. The Trainer seeds it in every DataLoader worker from the worker's base
seed and the process rank (`transformers.trainer_utils.seed_worker`), and torch draws new base seeds from the seeded
main process for every DataLoader iterator: the crops differ across workers, processes and epochs, and a run with the
same seed draws the same ones. (torchvision's `RandomResizedCrop`/`ColorJitter` do the same; torchvision is not a
dependency of clip-trainer, so the few lines are written here, after torchvision's algorithms.)
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

__all__ = ["ImageAugmentation"]


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _randint(high: int) -> int:
    """An integer in `[0, high)`."""
    return int(torch.randint(high, ()))


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

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """A random `(left, top, right, bottom)` box, by torchvision's `RandomResizedCrop.get_params`: ten tries at
        a box of the drawn area and ratio that fits, else the largest center box within `ratio`."""
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(log_low, log_high))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = _randint(height - crop_height + 1)
                left = _randint(width - crop_width + 1)
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

    def _jitter(self, image: PIL.Image.Image) -> PIL.Image.Image:
        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        low, high = max(0.0, 1.0 - self.color_jitter), 1.0 + self.color_jitter
        for index in torch.randperm(len(enhancers)).tolist():
            image = enhancers[index](image).enhance(_uniform(low, high))
        return image

    def __call__(self, image: PIL.Image.Image, preprocessor: ImagePreprocessor) -> np.ndarray:
        """A randomly cropped (and recoloured) `(3, height, width)` uint8 array of `preprocessor.output_size`.

        Raises:
            [`BadSampleError`]: if the image has no pixels or cannot be resized.
        """
        image = rgb_pixels_or_bad_sample(image)
        width, height = image.size
        try:
            out_height, out_width = preprocessor.output_size
            image = image.resize(
                (out_width, out_height), resample=preprocessor.resample, box=self.crop_box(width, height)
            )
            if self.color_jitter > 0:
                image = self._jitter(image)
            if self.grayscale_probability > 0 and float(torch.rand(())) < self.grayscale_probability:
                image = image.convert("L").convert("RGB")
            return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))
        except Exception as error:  # e.g. MemoryError on an absurd aspect ratio
            raise BadSampleError(f"cannot augment image ({type(error).__name__}: {error})") from None
