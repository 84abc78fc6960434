"""Opt-in reduced-scale JPEG decoding: smaller decodes of large photos, close to the exact pixels, exact otherwise."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from clip_trainer.images import load_image
from clip_trainer.preprocessing import ImagePreprocessor

resize_and_crop = ImagePreprocessor.from_image_processor(
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
)


def _jpeg(width: int, height: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height))
    buffer = io.BytesIO()
    small.convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_draft_decodes_large_images_smaller_and_close(mode):
    large = _jpeg(640, 480, mode)
    assert load_image(large, draft_size=(224, 224)).size == (320, 240)
    full = resize_and_crop(load_image(large)).astype(int)
    drafted = resize_and_crop(load_image(large, draft_size=resize_and_crop.draft_size)).astype(int)
    assert drafted.shape == full.shape == (3, 224, 224)
    assert np.abs(full - drafted).mean() < 3
    # Not twice the target: decoded in full, so pixel-exact.
    small = _jpeg(320, 240, mode)
    assert load_image(small, draft_size=(224, 224)).size == (320, 240)
    assert np.array_equal(
        resize_and_crop(load_image(small)),
        resize_and_crop(load_image(small, draft_size=(224, 224))),
    )
