"""The image preprocessor obeys the image processor: its uint8 resize and crop plus the device-side normalisation
give the processor's own output, for CLIP's bicubic shortest-edge + crop, for a bilinear processor, and for a
processor that resizes to a square without cropping (SigLIP's way); what it cannot follow, it refuses."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from clip_trainer.preprocessing import ImagePreprocessor, UnsupportedImageProcessorError

# Square, landscape, portrait, odd sizes, smaller than the crop, extreme aspect ratios.
SIZES = [(224, 224), (640, 480), (480, 640), (225, 224), (223, 225), (50, 30), (31, 31), (17, 300), (600, 11)]


def noise_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_same_as_processor(image_processor, atol: float = 1e-6) -> None:
    """Ours, normalised as the trainer does on the device, against the processor's float32 output."""
    preprocessor = ImagePreprocessor.from_image_processor(image_processor)
    for seed, (width, height) in enumerate(SIZES):
        image = noise_image(width, height, seed=seed)
        reference = image_processor(image, return_tensors="pt").pixel_values[0].float()
        ours = preprocessor(image)
        assert ours.dtype == np.uint8 and ours.shape == (3, *preprocessor.output_size) and ours.flags.c_contiguous
        normalised = preprocessor.normalize(torch.from_numpy(ours)[None])[0]
        # Measured bit-identical; the tolerance leaves room for another float op order (one uint8 step is ~0.014).
        torch.testing.assert_close(
            normalised, reference, rtol=0, atol=atol, msg=lambda m, w=width, h=height: f"{w}x{h}: {m}"
        )


@pytest.mark.parametrize("shortest_edge, crop", [(224, (224, 224)), (256, (224, 224)), (96, (80, 64)), (64, (80, 72))])
def test_clip_bicubic_shortest_edge_and_crop(shortest_edge, crop):
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": shortest_edge}, crop_size={"height": crop[0], "width": crop[1]}
    )
    assert_same_as_processor(processor)


def test_bilinear_resampling_gives_bilinear_pixels():
    bilinear = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, resample=2)
    assert_same_as_processor(bilinear)
    bicubic = ImagePreprocessor.from_image_processor(
        CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    )
    image = noise_image(640, 480)
    # Not vacuous: the two filters give other pixels.
    assert not np.array_equal(ImagePreprocessor.from_image_processor(bilinear)(image), bicubic(image))


def test_no_center_crop_gives_the_processors_uncropped_square():
    processor = CLIPImageProcessorPil(size={"height": 48, "width": 40}, do_center_crop=False)
    assert_same_as_processor(processor)
    assert ImagePreprocessor.from_image_processor(processor).output_size == (48, 40)


def test_siglip_resize_to_square_with_mean_and_std_one_half():
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    assert_same_as_processor(processor)
    preprocessor = ImagePreprocessor.from_image_processor(processor)
    assert preprocessor.crop_size is None and preprocessor.mean == (0.5, 0.5, 0.5)


def test_rescale_and_normalize_switches_are_followed():
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_normalize=False, do_rescale=False
    )
    assert_same_as_processor(processor)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": {"shortest_edge": 32}, "do_center_crop": False}, "would not stack"),
        ({"size": {"longest_edge": 32}, "crop_size": {"height": 32, "width": 32}}, "not other rules"),
        ({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_pad": True}, "pads images"),
    ],
)
def test_settings_it_cannot_follow_are_refused(kwargs, message):
    with pytest.raises(UnsupportedImageProcessorError, match=message):
        ImagePreprocessor.from_image_processor(CLIPImageProcessorPil(**kwargs))


def test_other_modes_are_converted():
    preprocessor = ImagePreprocessor.from_image_processor(
        CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    )
    out = preprocessor(PIL.Image.new("L", (30, 20), 77))
    assert out.shape == (3, 16, 16) and (out == 77).all()


def test_a_sixteen_bit_image_is_what_the_processor_gives_after_to_rgb_as_the_docs_say():
    """docs/model-families.md: more than 8 bits per pixel are scaled to 8 (transformers' processors clip them to
    white); `clip_trainer.images.to_rgb` first gives the processor the pixels training saw."""
    from clip_trainer.images import to_rgb

    processor = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    preprocessor = ImagePreprocessor.from_image_processor(processor)
    ramp = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 54).astype(np.uint16)  # 0 .. 64,746
    image = PIL.Image.fromarray(ramp)
    assert image.mode == "I;16"
    ours = preprocessor.normalize(torch.from_numpy(preprocessor(image))[None])[0]
    reference = processor(to_rgb(image), return_tensors="pt").pixel_values[0].float()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    # The scale is 65535 -> 255 (a division by 257), written out: the centred crop of a linear ramp keeps its mean
    # grey level, within a uint8 step or two of resampling.
    expected = ramp.astype(np.float64) / 257.0
    assert abs(float(preprocessor(image).astype(np.float64).mean()) - expected.mean()) < 2.0
    # Without it the processor clips: almost white.
    assert processor(image, return_tensors="pt").pixel_values.mean() > ours.mean() + 1.0


def test_siglip2_naflex_patches_equal_the_processors():
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    processor = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=20)
    preprocessor = ImagePreprocessor.from_image_processor(processor)
    assert preprocessor.naflex and preprocessor.output_size is None
    images = [noise_image(width, height, seed=seed) for seed, (width, height) in enumerate(SIZES)]
    reference = processor(images, return_tensors="pt")
    batch = preprocessor.collate([preprocessor(image) for image in images])
    assert torch.equal(batch["pixel_attention_mask"], reference["pixel_attention_mask"])
    assert torch.equal(batch["spatial_shapes"], reference["spatial_shapes"])
    assert batch["pixel_values"].dtype == torch.uint8
    normalised = preprocessor.normalize(batch["pixel_values"], batch["pixel_attention_mask"])
    torch.testing.assert_close(normalised, reference["pixel_values"], rtol=0, atol=1e-6)
