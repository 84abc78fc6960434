"""Tests for `clip_trainer.images`: robust decoding, mode conversion, resize/crop parity and the up-front row check."""

import io
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import ImageOps

from clip_trainer.images import (
    DEFAULT_MAX_PIXELS,
    BadRowReport,
    BadSampleError,
    check_caption,
    find_bad_rows,
    load_image,
    resize_center_crop,
)


def encode(image: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` RGB pixels but holds almost no data: a decompression bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def pixels(image: PIL.Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ----------------------------------------------------------------------------------------------------------------
# Bad samples
# ----------------------------------------------------------------------------------------------------------------


def test_bad_sample_error_is_a_value_error_and_pickles():
    error = BadSampleError("truncated image")
    assert isinstance(error, ValueError)
    assert str(error) == error.reason == "truncated image"
    # DataLoader workers send exceptions to the main process.
    restored = pickle.loads(pickle.dumps(error))
    assert isinstance(restored, BadSampleError) and restored.reason == "truncated image"


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, "image is missing (None)"),
        (b"", "empty image bytes"),
        ({"bytes": None, "path": None}, "image is missing (no bytes and no path)"),
        ({"bytes": b"", "path": None}, "empty image bytes"),
        ("", "image path is empty"),
        (b"this is not an image", "not an image (cannot identify image file)"),
        (3.5, "unsupported image value (float)"),
    ],
)
def test_bad_values(value, expected):
    with pytest.raises(BadSampleError) as info:
        load_image(value)
    assert info.value.reason == expected


def test_missing_file(tmp_path):
    with pytest.raises(BadSampleError, match="image file not found: .*nope.jpg"):
        load_image(str(tmp_path / "nope.jpg"))
    # Relative paths are resolved against base_dir, and the message shows the resolved path.
    with pytest.raises(BadSampleError) as info:
        load_image("sub/nope.jpg", base_dir=str(tmp_path))
    assert info.value.reason == f"image file not found: {tmp_path / 'sub' / 'nope.jpg'}"
    with pytest.raises(BadSampleError, match="image file not found"):
        load_image({"bytes": None, "path": str(tmp_path / "nope.png")})


def test_zero_byte_file_and_directory(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadSampleError) as info:
        load_image(tmp_path / "empty.jpg")
    assert info.value.reason == f"empty image file: {tmp_path / 'empty.jpg'}"
    with pytest.raises(BadSampleError, match="image path is a directory"):
        load_image(tmp_path)


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("just some text\n")
    with pytest.raises(BadSampleError) as info:
        load_image(tmp_path / "notes.jpg")
    assert info.value.reason == f"not an image (cannot identify image file): {tmp_path / 'notes.jpg'}"


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("PNG", "png")])
@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_file(tmp_path, fmt, suffix, fraction):
    data = encode(noise_image(120, 80), fmt)
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(BadSampleError) as info:
        load_image(path)
    assert info.value.reason == f"truncated image: {path}"
    # The same from bytes, and from a lazily opened PIL image (the decode is forced, not left for later).
    with pytest.raises(BadSampleError, match="^truncated image$"):
        load_image(path.read_bytes())
    with PIL.Image.open(path) as lazy:
        with pytest.raises(BadSampleError, match="truncated image"):
            load_image(lazy)


def test_truncation_is_not_tolerated_globally():
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_too_large_with_small_limit():
    data = encode(noise_image(40, 30), "PNG")
    with pytest.raises(BadSampleError) as info:
        load_image(data, max_pixels=1000)
    assert info.value.reason == "image too large (40x30 pixels > limit 1000)"
    assert load_image(data, max_pixels=1200).size == (40, 30)
    assert load_image(data, max_pixels=None).size == (40, 30)


def test_decompression_bomb_is_refused_from_the_header():
    # Between Pillow's warning and error thresholds: our own check refuses it, and Pillow's warning is not emitted.
    bomb = png_header_only(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadSampleError) as info:
            load_image(bomb)
    assert info.value.reason == f"image too large (10000x10000 pixels > limit {DEFAULT_MAX_PIXELS})"
    # Above Pillow's own error threshold Pillow refuses it in `Image.open`, even with our check switched off.
    with pytest.raises(BadSampleError, match="image too large .*decompression bomb"):
        load_image(png_header_only(20_000, 20_000), max_pixels=None)


def test_corrupted_files_only_raise_bad_sample_error():
    rng = np.random.default_rng(0)
    originals = [encode(noise_image(64, 48), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")]
    for original in originals:
        for _ in range(25):
            data = np.frombuffer(original, dtype=np.uint8).copy()
            positions = rng.integers(0, len(data), size=int(rng.integers(1, 20)))
            data[positions] = rng.integers(0, 256, size=len(positions), dtype=np.uint8)
            try:
                image = load_image(data[: int(rng.integers(1, len(data) + 1))].tobytes())
            except BadSampleError:
                continue
            assert image.mode == "RGB"


# ----------------------------------------------------------------------------------------------------------------
# Inputs and modes
# ----------------------------------------------------------------------------------------------------------------


def test_accepted_inputs_give_the_same_pixels(tmp_path):
    original = noise_image(33, 21)
    data = encode(original, "PNG")
    (tmp_path / "a.png").write_bytes(data)
    expected = np.asarray(original)
    for value, base_dir in [
        (original, None),
        (data, None),
        (bytearray(data), None),
        ({"bytes": data, "path": "ignored-when-bytes-are-there.png"}, None),
        ({"bytes": None, "path": str(tmp_path / "a.png")}, None),
        ({"bytes": None, "path": "a.png"}, str(tmp_path)),
        (str(tmp_path / "a.png"), None),
        (tmp_path / "a.png", None),
        ("a.png", str(tmp_path)),
    ]:
        image = load_image(value, base_dir=base_dir)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_rgba_composites_on_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white, not black
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red stays red
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    image = load_image(PIL.Image.fromarray(rgba, "RGBA"))
    got = pixels(image)
    assert tuple(got[0, 0]) == (255, 255, 255)
    assert tuple(got[0, 1]) == (255, 0, 0)
    assert all(abs(v - 127) <= 1 for v in got[1, 0])


def test_la_and_palette_with_transparency(tmp_path):
    la = PIL.Image.fromarray(np.array([[[0, 0], [50, 255]]], dtype=np.uint8), "LA")
    assert pixels(load_image(la))[0].tolist() == [[255, 255, 255], [50, 50, 50]]

    palette = PIL.Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    for fmt in ("PNG", "GIF"):
        path = tmp_path / f"p.{fmt.lower()}"
        palette.save(path, fmt, transparency=0)
        with PIL.Image.open(path) as reopened:
            assert reopened.mode == "P" and "transparency" in reopened.info
        assert pixels(load_image(path))[0].tolist() == [[255, 255, 255], [255, 0, 0]]


def test_greyscale_one_bit_cmyk_ycbcr():
    grey = PIL.Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8), "L")
    assert pixels(load_image(grey))[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]

    one_bit = PIL.Image.new("1", (2, 1))
    one_bit.putpixel((1, 0), 1)
    assert pixels(load_image(one_bit))[0].tolist() == [[0, 0, 0], [255, 255, 255]]

    cmyk = PIL.Image.new("CMYK", (3, 1))
    for x, colour in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]):
        cmyk.putpixel((x, 0), colour)
    assert pixels(load_image(cmyk))[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]

    rgb = noise_image(8, 8)
    roundtrip = pixels(load_image(rgb.convert("YCbCr")))
    assert np.abs(roundtrip - np.asarray(rgb).astype(int)).max() <= 3


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(values).save(path)
    with PIL.Image.open(path) as reopened:
        assert reopened.mode == "I;16"
    expected = [0, 1, 128, 255]
    assert pixels(load_image(path))[0, :, 0].tolist() == expected
    big_endian = PIL.Image.fromarray(values.astype(">u2"))
    assert big_endian.mode == "I;16B"
    assert pixels(load_image(big_endian))[0, :, 0].tolist() == expected
    # 32-bit "I" holding 16-bit values (older Pillow opened 16-bit PNGs like this).
    assert pixels(load_image(PIL.Image.fromarray(values.astype(np.int32))))[0, :, 0].tolist() == expected


def test_float_and_int_modes():
    unit = PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    assert unit.mode == "F"
    assert pixels(load_image(unit))[0, :, 0].tolist() == [0, 128, 255, 0]
    eight_bit = PIL.Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))
    assert pixels(load_image(eight_bit))[0, :, 0].tolist() == [0, 100, 255]
    ints = PIL.Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert ints.mode == "I"
    assert pixels(load_image(ints))[0, :, 0].tolist() == [0, 100, 255]


def test_multi_frame_gif_gives_first_frame(tmp_path):
    red, blue = PIL.Image.new("RGB", (6, 4), (255, 0, 0)), PIL.Image.new("RGB", (6, 4), (0, 0, 255))
    path = tmp_path / "anim.gif"
    red.save(path, save_all=True, append_images=[blue], duration=100)
    with PIL.Image.open(path) as reopened:
        assert reopened.n_frames == 2
    got = pixels(load_image(path))
    assert (got == [255, 0, 0]).all()


def test_exif_orientation_is_applied():
    # Left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise to display".
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    image = PIL.Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", exif=exif, quality=95)
    loaded = load_image(data)
    assert loaded.size == (20, 40)
    got = pixels(loaded)
    assert got[5, 10, 0] > 200 and got[5, 10, 2] < 60  # top is red
    assert got[35, 10, 2] > 200 and got[35, 10, 0] < 60  # bottom is blue
    np.testing.assert_array_equal(
        got, pixels(ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(data))).convert("RGB"))
    )


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------


def test_check_caption():
    assert check_caption("  a dog on a beach \n") == "a dog on a beach"
    assert check_caption(np.str_("numpy string")) == "numpy string"
    for value, reason in [
        (None, "missing caption (None)"),
        (float("nan"), "missing caption (NaN)"),
        (3.0, "caption is not a string (float)"),
        (["a", "b"], "caption is not a string (list)"),
        (b"bytes", "caption is not a string (bytes)"),
        ("", "empty caption"),
        (" \t\n", "empty caption"),
    ]:
        with pytest.raises(BadSampleError) as info:
            check_caption(value)
        assert info.value.reason == reason


# ----------------------------------------------------------------------------------------------------------------
# Resize and crop parity with transformers
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_processors():
    from transformers import CLIPImageProcessorPil

    def make(shortest_edge: int, crop: tuple[int, int]):
        return CLIPImageProcessorPil(
            size={"shortest_edge": shortest_edge}, crop_size={"height": crop[0], "width": crop[1]}
        )

    return make


@pytest.mark.parametrize("shortest_edge, crop", [(224, (224, 224)), (256, (224, 224)), (96, (80, 64)), (64, (80, 72))])
def test_resize_center_crop_matches_clip_image_processor(clip_processors, shortest_edge, crop):
    processor = clip_processors(shortest_edge, crop)
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    # Square, landscape, portrait, odd sizes, smaller than the crop, extreme aspect ratios.
    sizes = [(224, 224), (640, 480), (480, 640), (225, 224), (223, 225), (50, 30), (31, 31), (17, 300), (600, 11)]
    for seed, (width, height) in enumerate(sizes):
        image = noise_image(width, height, seed=seed)
        reference = processor(image, return_tensors="pt").pixel_values[0]
        ours = resize_center_crop(image, shortest_edge, crop)
        assert ours.dtype == np.uint8 and ours.shape == (3, *crop) and ours.flags.c_contiguous
        # What the lead does on the device. Measured: bit-identical to the processor's float32 output; the
        # tolerance only leaves room for a different float op order elsewhere (one uint8 step is ~0.0142).
        normalised = (torch.from_numpy(ours).float() / 255 - mean) / std
        torch.testing.assert_close(normalised, reference, rtol=0, atol=1e-6)
        # And the underlying uint8 pixels are identical.
        recovered = torch.round((reference.double() * std.double() + mean.double()) * 255).to(torch.uint8)
        assert torch.equal(recovered, torch.from_numpy(ours)), (width, height)


def test_resize_center_crop_converts_other_modes_and_rejects_bad_arguments():
    grey = PIL.Image.new("L", (30, 20), 77)
    out = resize_center_crop(grey, 16, (16, 16))
    assert out.shape == (3, 16, 16) and (out == 77).all()
    with pytest.raises(ValueError, match="must be positive"):
        resize_center_crop(grey, 0, (16, 16))


# ----------------------------------------------------------------------------------------------------------------
# Up-front row check
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    noise_image(8, 8).save(tmp_path / "images" / "good.jpg")
    noise_image(8, 8, seed=1).save(tmp_path / "images" / "good.png")
    (tmp_path / "images" / "empty.jpg").write_bytes(b"")
    return tmp_path


def test_find_bad_rows_with_path_strings(image_dir):
    base = str(image_dir)
    dataset = Dataset.from_dict(
        {
            "image": [
                "images/good.jpg",
                "images/missing.jpg",
                str(image_dir / "images" / "good.png"),  # absolute paths ignore base_dir
                "images/empty.jpg",
                "images/good.jpg",
                None,
                "images/good.png",
                "images",
            ],
            "caption": ["a", "b", "  ", "d", None, "f", "g", "h"],
        }
    )
    report = find_bad_rows(dataset, "image", "caption", base_dir=base)
    assert report.num_rows == 8
    assert report.bad_indices == [1, 2, 3, 4, 5, 7]
    assert report.reasons == {
        1: f"image file not found: {image_dir / 'images' / 'missing.jpg'}",
        2: "empty caption",
        3: f"empty image file: {image_dir / 'images' / 'empty.jpg'}",
        4: "missing caption (None)",
        5: "image is missing (None)",
        7: f"image path is a directory: {image_dir / 'images'}",
    }
    assert report.good_indices() == [0, 6]
    kept = dataset.select(report.good_indices())
    assert kept["caption"] == ["a", "g"]
    assert report.summary() == (
        "skipped 6 of 8 rows (1 image file not found, 1 empty caption, 1 empty image file, 1 missing caption, "
        "1 image is missing, 1 image path is a directory): "
        f"row 1: image file not found: {image_dir / 'images' / 'missing.jpg'}; row 2: empty caption; "
        f"row 3: empty image file: {image_dir / 'images' / 'empty.jpg'} (and 3 more)"
    )


def test_find_bad_rows_with_image_feature(image_dir):
    good_bytes = (image_dir / "images" / "good.png").read_bytes()
    rows = [
        {"bytes": good_bytes, "path": None},
        {"bytes": None, "path": str(image_dir / "images" / "good.jpg")},
        {"bytes": None, "path": str(image_dir / "images" / "gone.jpg")},
        {"bytes": b"", "path": None},
        {"bytes": None, "path": None},
        {"bytes": None, "path": "images/good.png"},
        None,
        {"bytes": b"", "path": str(image_dir / "images" / "good.jpg")},  # empty bytes fall back to the path
    ]
    captions = ["a", "b", "c", "d", "e", "f", "g", float("nan")]
    for decode in (False, True):
        # Built as a plain struct and then cast, because `Image.encode_example` refuses a dict with neither field
        # set, which other writers (or a hand-made Arrow file) can still produce.
        dataset = Dataset.from_dict(
            {"img": rows, "text": [c if isinstance(c, str) else None for c in captions]},
            features=Features({"img": {"bytes": Value("binary"), "path": Value("string")}, "text": Value("string")}),
        ).cast_column("img", ImageFeature(decode=decode))
        report = find_bad_rows(dataset, "img", "text", base_dir=str(image_dir), max_reports=3)
        assert report.bad_indices == [2, 3, 4, 6, 7]
        # Only the first `max_reports` reasons are kept, but every bad row is counted.
        assert report.reasons == {
            2: f"image file not found: {image_dir / 'images' / 'gone.jpg'}",
            3: "empty image bytes",
            4: "image is missing (no bytes and no path)",
        }
        assert report.reason_counts == {
            "image file not found": 1,
            "empty image bytes": 1,
            "image is missing": 2,
            "missing caption": 1,
        }
        assert report.summary(total=100, max_listed=5).endswith(
            "row 4: image is missing (no bytes and no path) (and 2 more)"
        )
        assert report.summary(total=100).startswith("skipped 5 of 100 rows (2 image is missing, ")
        # Every row the check passes is loadable by the collator's function.
        undecoded = dataset.cast_column("img", ImageFeature(decode=False))
        for index in report.good_indices():
            assert load_image(undecoded[index]["img"], base_dir=str(image_dir)).mode == "RGB"


def test_find_bad_rows_respects_select_and_bytes_columns(image_dir):
    dataset = Dataset.from_dict(
        {"image": [b"\x89PNG fake but non-empty", b"", None, b"x"], "caption": ["a", "b", "c", ""]}
    )
    report = find_bad_rows(dataset.select([3, 2, 1, 0]), "image", "caption", base_dir=None)
    # Positions refer to the selected dataset, not to the underlying table.
    assert report.bad_indices == [0, 1, 2]
    assert report.reasons == {0: "empty caption", 1: "image is missing (None)", 2: "empty image bytes"}


def test_find_bad_rows_clean_dataset_and_unknown_column(image_dir):
    dataset = Dataset.from_dict({"image": ["images/good.jpg"] * 3, "caption": ["x", "y", "z"]})
    report = find_bad_rows(dataset, "image", "caption", base_dir=str(image_dir))
    assert report == BadRowReport(num_rows=3)
    assert report.summary() == "skipped 0 of 3 rows"
    with pytest.raises(KeyError, match="'picture' is not in the dataset"):
        find_bad_rows(dataset, "picture", "caption", base_dir=None)
