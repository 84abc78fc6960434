"""Tests for `clip_trainer.images`: robust decoding of every value a dataset holds, and mode conversion."""

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import PIL.Image
import pytest
from PIL import ImageOps

from clip_trainer.images import DEFAULT_MAX_PIXELS, HEADER_BYTES, BadSampleError, load_image


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
# Values that are no local file: URLs, base64 text, files that are no image
# ----------------------------------------------------------------------------------------------------------------


def test_a_url_is_refused_as_a_url():
    with pytest.raises(BadSampleError, match="URLs are not fetched: https://example.com/cat.jpg"):
        load_image("https://example.com/cat.jpg")


def test_base64_text_and_data_uris_are_images():
    import base64

    data = encode(noise_image(9, 7), "PNG")
    text = base64.b64encode(data).decode()
    assert pixels(load_image(text)).shape == (7, 9, 3)
    assert np.array_equal(pixels(load_image("data:image/png;base64," + text)), pixels(load_image(data)))
    # JSON Lines hold `{"bytes": ..., "path": ...}` image dicts with the bytes as base64 text.
    assert pixels(load_image({"bytes": text, "path": "x.png"})).shape == (7, 9, 3)


def test_a_large_file_that_is_no_image_is_refused_from_its_header(tmp_path, monkeypatch):
    path = tmp_path / "video.jpg"
    path.write_bytes(b"\x00\x01not an image" * (HEADER_BYTES // 4))  # four headers' worth
    reads = []
    real_open = open

    class CountingFile:
        def __init__(self, handle):
            self.handle = handle

        def read(self, size=-1):
            data = self.handle.read(size)
            reads.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: CountingFile(real_open(p, mode, *a, **k)))
    with pytest.raises(BadSampleError, match="not an image"):
        load_image(str(path))
    assert sum(reads) == HEADER_BYTES  # the first bytes only, not the whole file
