"""The image preprocessor: a model's image processor settings, applied as uint8 work in the workers plus one
multiply-add on the device.

`transformers`' image processors resize, crop, rescale and normalise on the CPU and hand over float32 pixels: four
times the bytes of uint8 to move between DataLoader workers and to the device, and a normalisation per image on the
host. [`ImagePreprocessor`] reads the same settings from the image processor and splits the work: the collator's
workers resize and crop with the very Pillow calls the processor's PIL backend makes (so the pixels are identical)
and stop at uint8; [`ImagePreprocessor.normalize`] applies `(pixels * rescale_factor - mean) / std` on the device.

Every setting it honours is read here and nowhere else; a setting it cannot honour (padding, a `longest_edge` or
`max_height` size rule) stops the run with a message instead of being silently ignored.

Two layouts: one image size for the whole batch (CLIP's shortest edge + center crop, SigLIP's square resize), and
SigLIP 2's NaFlex, where each image keeps its aspect ratio at up to `max_num_patches` patches and the batch is a
padded sequence of patches with `pixel_attention_mask` and `spatial_shapes`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from .errors import UnsupportedImageProcessorError
from .images import BadSampleError, rgb_pixels_or_bad_sample

__all__ = ["ImagePreprocessor", "UnsupportedImageProcessorError"]


def _setting(image_processor: Any, name: str, default: Any = None) -> Any:
    value = getattr(image_processor, name, None)
    return default if value is None else value


def _size_dict(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {key: item for key, item in value.items() if item is not None}
    # `SizeDict` and similar objects expose their keys as attributes.
    return {
        key: getattr(value, key)
        for key in ("shortest_edge", "longest_edge", "height", "width")
        if getattr(value, key, None)
    }


def _shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    # The arithmetic of `transformers.image_transforms.get_resize_output_image_size(default_to_square=False)`: the
    # long edge is truncated, not rounded, so that output sizes (and pixels) match the processor's.
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _pixel_settings(image_processor: Any) -> dict[str, Any]:
    """The resampling filter, rescale factor and normalisation, which every layout reads the same way."""
    mean = std = None
    if _setting(image_processor, "do_normalize", False):
        mean, std = image_processor.image_mean, image_processor.image_std
        mean = tuple(float(v) for v in (mean if isinstance(mean, list | tuple) else [mean] * 3))
        std = tuple(float(v) for v in (std if isinstance(std, list | tuple) else [std] * 3))
    rescale = float(_setting(image_processor, "rescale_factor", 1 / 255)) if image_processor.do_rescale else 1.0
    resample = PIL.Image.Resampling(int(_setting(image_processor, "resample", PIL.Image.Resampling.BILINEAR)))
    return {"resample": resample, "rescale_factor": rescale, "mean": mean, "std": std}


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize, crop and normalise images as a `transformers` image processor does, with uint8 in between.

    Build it with [`from_image_processor`]. Calling it on a PIL image returns a `(3, height, width)` uint8 array;
    [`normalize`] turns a batch of them into the model's float input.

    Attributes:
        shortest_edge: resize so that the shorter side has this length, keeping the aspect ratio (CLIP).
        resize_to: or resize to exactly this `(height, width)` (SigLIP); at most one of the two is set.
        resample: the Pillow filter of the resize.
        crop_size: `(height, width)` of the center crop, or `None` for no crop.
        rescale_factor: multiplies the pixel values before normalising (1/255, or 1 when `do_rescale` is off).
        mean, std: per-channel normalisation, or `None` when `do_normalize` is off.
    """

    shortest_edge: int | None
    resize_to: tuple[int, int] | None
    resample: PIL.Image.Resampling
    crop_size: tuple[int, int] | None
    rescale_factor: float
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    # SigLIP 2's NaFlex: each image resized to at most `max_num_patches` patches of `patch_size`, aspect kept.
    patch_size: int | None = None
    max_num_patches: int | None = None

    @classmethod
    def from_image_processor(cls, image_processor: Any) -> ImagePreprocessor:
        """Reads the settings of a `transformers` image processor (`CLIPImageProcessor(Pil)`, `SiglipImageProcessor`,
        ...).

        Raises:
            [`UnsupportedImageProcessorError`]: for a setting this preprocessor cannot reproduce.
        """
        name = type(image_processor).__name__
        if getattr(image_processor, "max_num_patches", None) and getattr(image_processor, "patch_size", None):
            return cls._naflex(image_processor)
        if _setting(image_processor, "do_pad", False):
            raise UnsupportedImageProcessorError(
                f"{name} pads images (`do_pad=True`), which clip-trainer's image preprocessor does not do; save the "
                "image processor with do_pad=False (and a resize and crop that give one size) and pass it as "
                "`image_processor_name`."
            )
        shortest_edge = resize_to = None
        if _setting(image_processor, "do_resize", False):
            size = _size_dict(image_processor.size)
            if set(size) == {"shortest_edge"}:
                shortest_edge = int(size["shortest_edge"])
            elif set(size) == {"height", "width"}:
                resize_to = (int(size["height"]), int(size["width"]))
            else:
                raise UnsupportedImageProcessorError(
                    f"{name} resizes with size={size}; clip-trainer follows `shortest_edge` (keep the aspect ratio) or "
                    "`height` and `width` (resize to exactly that), not other rules. Save the image processor with "
                    "one of them and pass it as `image_processor_name`."
                )
        crop_size = None
        if _setting(image_processor, "do_center_crop", False):
            crop = _size_dict(image_processor.crop_size)
            if set(crop) == {"height", "width"}:
                crop_size = (int(crop["height"]), int(crop["width"]))
            elif set(crop) == {"shortest_edge"}:
                crop_size = (int(crop["shortest_edge"]),) * 2
            else:
                raise UnsupportedImageProcessorError(f"{name} has crop_size={crop}; it needs `height` and `width`.")
        if crop_size is None and shortest_edge is not None:
            raise UnsupportedImageProcessorError(
                f"{name} keeps the aspect ratio (`shortest_edge`) and does not crop, so images of different shapes "
                "would not stack into one batch; turn `do_center_crop` on or resize to `height` and `width`."
            )
        if crop_size is None and resize_to is None:
            raise UnsupportedImageProcessorError(
                f"{name} neither resizes nor crops images, so they would not share one size; set `do_resize`."
            )
        return cls(shortest_edge, resize_to, crop_size=crop_size, **_pixel_settings(image_processor))

    @classmethod
    def _naflex(cls, image_processor: Any) -> ImagePreprocessor:
        if not _setting(image_processor, "do_resize", True):
            raise UnsupportedImageProcessorError(
                f"{type(image_processor).__name__} with do_resize=False is not supported."
            )
        return cls(
            None, None, crop_size=None, **_pixel_settings(image_processor),
            patch_size=int(image_processor.patch_size), max_num_patches=int(image_processor.max_num_patches),
        )  # fmt: skip

    @property
    def naflex(self) -> bool:
        return self.max_num_patches is not None

    @property
    def output_size(self) -> tuple[int, int] | None:
        """`(height, width)` of every preprocessed image; `None` with NaFlex, where each image has its own."""
        if self.naflex:
            return None
        return self.crop_size or self.resize_to  # type: ignore[return-value]

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """The smallest `(width, height)` a JPEG may be decoded at without losing pixels this preprocessor keeps
        (`None`: decode in full)."""
        if self.naflex:
            return None
        if self.shortest_edge is not None:
            return (self.shortest_edge, self.shortest_edge)
        height, width = self.resize_to or self.output_size
        return (width, height)

    def placeholder(self) -> np.ndarray:
        """The blank image that stands in for an unusable sample (flagged invalid, so it counts for nothing)."""
        if self.naflex:
            return np.zeros((3, self.patch_size, self.patch_size), dtype=np.uint8)
        return np.zeros((3, *self.output_size), dtype=np.uint8)

    def collate(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """The batch's image inputs from the preprocessed images: `pixel_values` (uint8), and with NaFlex the
        patches padded to `max_num_patches` with `pixel_attention_mask` and `spatial_shapes`, as the processor
        gives them."""
        if not self.naflex:
            return {"pixel_values": torch.from_numpy(np.stack(images))}
        from transformers.models.siglip2.image_processing_pil_siglip2 import (
            convert_image_to_patches,
            pad_along_first_dim,
        )

        patches, masks, shapes = [], [], []
        for image in images:
            padded, mask = pad_along_first_dim(convert_image_to_patches(image, self.patch_size), self.max_num_patches)
            patches.append(padded)
            masks.append(mask)
            shapes.append((image.shape[1] // self.patch_size, image.shape[2] // self.patch_size))
        return {
            "pixel_values": torch.from_numpy(np.stack(patches)),
            "pixel_attention_mask": torch.from_numpy(np.stack(masks)),
            "spatial_shapes": torch.tensor(shapes, dtype=torch.long),
        }

    def __call__(self, image: PIL.Image.Image) -> np.ndarray:
        """Resizes and crops one image; returns a C-contiguous `(3, height, width)` uint8 array.

        Raises:
            [`BadSampleError`]: if the image has no pixels or cannot be resized (an absurd aspect ratio).
        """
        image = rgb_pixels_or_bad_sample(image)
        width, height = image.size
        try:
            if self.naflex:
                from transformers.models.siglip2.image_processing_pil_siglip2 import (
                    get_image_size_for_max_num_patches,
                )

                new_height, new_width = get_image_size_for_max_num_patches(
                    height, width, self.patch_size, self.max_num_patches
                )
            elif self.shortest_edge is not None:
                new_height, new_width = _shortest_edge_size(height, width, self.shortest_edge)
            elif self.resize_to is not None:
                new_height, new_width = self.resize_to
            else:
                new_height, new_width = height, width
            if (new_width, new_height) != image.size:
                image = image.resize((new_width, new_height), resample=self.resample)
            if self.crop_size is not None:
                # Offsets as in `transformers.image_transforms.center_crop`; a crop larger than the image is filled
                # with zeros around it, at the offset transformers' zero padding uses.
                crop_height, crop_width = self.crop_size
                top = (new_height - crop_height) // 2
                left = (new_width - crop_width) // 2
                image = image.crop((left, top, left + crop_width, top + crop_height))
            return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))
        except Exception as error:  # e.g. MemoryError on an absurd aspect ratio
            raise BadSampleError(f"cannot resize image ({type(error).__name__}: {error})") from None

    def normalize(self, pixels: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 pixels to the model's float input, on the pixels' device: `(batch, 3, height, width)` images, or
        NaFlex's `(batch, patches, patch_size * patch_size * 3)` patches (channels last), whose padding patches
        (`pixel_attention_mask` 0) stay 0 as the processor pads them.

        One fused multiply-add, `pixels * scale + shift`, with `scale = rescale_factor / std` and
        `shift = -mean / std`.
        """
        scale, shift = _affine(self.rescale_factor, self.mean, self.std, pixels.device)
        if pixels.ndim == 4:
            return torch.addcmul(shift, pixels.float(), scale)
        batch, patches, values = pixels.shape
        channels_last = pixels.float().view(batch, patches, values // 3, 3)
        normalised = torch.addcmul(shift.view(3), channels_last, scale.view(3)).view(batch, patches, values)
        if pixel_attention_mask is not None:
            normalised = normalised * pixel_attention_mask[..., None].to(normalised.dtype)
        return normalised


@functools.lru_cache(maxsize=16)
def _affine(
    rescale_factor: float, mean: tuple[float, ...] | None, std: tuple[float, ...] | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: building the constants at every step would copy them from the host each time.
    mean_tensor = torch.tensor(mean or (0.0, 0.0, 0.0), dtype=torch.float32).view(1, -1, 1, 1)
    std_tensor = torch.tensor(std or (1.0, 1.0, 1.0), dtype=torch.float32).view(1, -1, 1, 1)
    return (rescale_factor / std_tensor).to(device), (-mean_tensor / std_tensor).to(device)
