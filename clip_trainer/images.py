"""Decoding images robustly: any value a dataset holds (path, bytes, `datasets.Image` dict, PIL image) to RGB.

The collator calls [`load_image`] for every sample of every batch, usually inside DataLoader worker processes. A
single broken file in a web-scale dataset must not kill a run that has been going for hours, so it raises only
[`BadSampleError`] for anything wrong with a sample, and the collator can leave the sample out. The cheap up-front
pass over a dataset's rows is in `rows.py`; resizing and normalising is in `preprocessing.py`.
"""

import base64
import binascii
import io
import os
import re
import warnings
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import PIL.Image
from PIL import ExifTags, ImageOps
from transformers.utils import logging

from .errors import BadSampleError

logger = logging.get_logger(__name__)

# Pillow's own default for `PIL.Image.MAX_IMAGE_PIXELS` (about a quarter GiB as 24-bit RGB). Spelled out rather than
# read from Pillow, because other libraries change that global at import time and our limit should not move with it.
DEFAULT_MAX_PIXELS = 89_478_485

# Integer modes whose values span 0..65535 (Pillow opens 16-bit PNG and TIFF greyscale as one of these).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# A file whose first bytes Pillow cannot identify as an image is refused after reading this much, not read whole.
HEADER_BYTES = 64 * 1024
URL_PREFIXES = ("http://", "https://", "s3://", "gs://", "ftp://")
# `data:image/png;base64,...` URIs, and bare base64 (JSON Lines cannot hold raw bytes, so images come as base64 text).
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_BASE64_TEXT = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}$")
# Shorter strings are file names: no image encodes in fewer bytes than this.
_MIN_BASE64_IMAGE_LENGTH = 64

ImageSource = PIL.Image.Image | str | os.PathLike | bytes | bytearray | memoryview | dict[str, Any] | None
"""What [`load_image`] accepts: a PIL image, a path, encoded bytes, or the undecoded `datasets.Image` dict."""


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def _file_url(path: str) -> tuple[bool, str] | None:
    """`(on this machine, path)` of a `file:` URL with an absolute path (`file:///a`, `file://localhost/a`, `file:/a`,
    the short form of RFC 8089 that Java and Spark write), else `None`."""
    if path[:5].lower() != "file:":
        return None
    parts = urlsplit(path)
    return (parts.netloc in ("", "localhost"), unquote(parts.path)) if parts.path.startswith("/") else None


def resolve_image_path(path: str, base_dir: str | None) -> str:
    """An image path as a file to open: a local `file:` URL's path (as img2dataset's input lists and some exports
    write local images: `file:///data/a%20b.jpg` is `/data/a b.jpg`), a relative path joined to `base_dir` (the folder
    of the file that lists it)."""
    url = _file_url(path)
    if url is not None and url[0]:
        path = url[1]
    if base_dir is not None and not os.path.isabs(path):
        return os.path.join(base_dir, path)
    return path


def is_url(text: str) -> bool:
    """Whether an image value is a URL that is not a local file; clip-trainer reads local files and embedded bytes
    only."""
    url = _file_url(text)
    return text.lower().startswith(URL_PREFIXES) or (url is not None and not url[0])


def url_reason(url: str) -> str:
    """Why a URL row is left out, with the fix."""
    if url[:5].lower() == "file:":
        return (
            f"image is a file:// URL on another machine ({urlsplit(url).netloc!r}): {url[:100]} (copy the images here "
            "and give their paths, or file:///absolute/path for a file on this machine)"
        )
    return (
        f"image is a URL, and URLs are not fetched: {url[:100]} (download the images first, e.g. with img2dataset, "
        "and give their paths)"
    )


def looks_like_base64_image(text: str) -> bool:
    """Whether a string is an image's bytes as text (a `data:image/` URI, or long base64) rather than a file name."""
    return bool(_DATA_URI.match(text)) or (
        len(text) >= _MIN_BASE64_IMAGE_LENGTH and "." not in text[-8:] and bool(_BASE64_TEXT.match(text[:4096]))
    )


def decode_base64_image(text: str) -> bytes | None:
    """The bytes of a `data:image/...;base64,` URI or of a long base64 string, or `None` when `text` is neither."""
    match = _DATA_URI.match(text)
    if match:
        text = text[match.end() :]
    elif len(text) < _MIN_BASE64_IMAGE_LENGTH or not _BASE64_TEXT.match(text[:4096]):
        return None
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        return None


def _names_an_image(path: str, base_dir: str | None) -> bool:
    """Whether a path value leads to an image: an existing file, a URL (refused, with its own reason), or base64."""
    return os.path.exists(resolve_image_path(path, base_dir)) or is_url(path) or decode_base64_image(path) is not None


def _split_source(
    value: ImageSource, base_dir: str | None
) -> tuple[bytes | bytearray | memoryview | None, str | None]:
    """Reduce any accepted non-PIL value to either encoded bytes or a resolved path (exactly one is not None)."""
    if value is None:
        raise BadSampleError("image is missing (None)")
    if isinstance(value, dict):
        # The undecoded `datasets.Image` form. Embedded bytes win over the path, as in `datasets.Image.decode_example`:
        # after `push_to_hub` the path is only a leftover file name from the machine that built the dataset.
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str):  # JSON Lines hold bytes as base64 text
            data = decode_base64_image(data) or data.encode()
        if data:
            return data, None
        if path and data is not None and not _names_an_image(path, base_dir):
            # Empty bytes whose name is no file here (a tar member's name, a name left from the machine that built
            # the data): the bytes are what is wrong, not a missing file.
            raise BadSampleError(f"empty image (0 bytes): {path}")
        if path:
            value = path
        elif data is not None:
            raise BadSampleError("empty image bytes")
        else:
            raise BadSampleError("image is missing (no bytes and no path)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise BadSampleError("empty image bytes")
        return value, None
    if isinstance(value, (str, os.PathLike)):
        path = os.fsdecode(value)
        if not path.strip():
            raise BadSampleError("image path is empty")
        if is_url(path):
            raise BadSampleError(url_reason(path))
        resolved = resolve_image_path(path, base_dir)
        if not os.path.exists(resolved):
            data = decode_base64_image(path)
            if data:
                return data, None
        return None, resolved
    raise BadSampleError(f"unsupported image value ({type(value).__name__})")


def _read_file(path: str) -> bytes:
    # Reading the whole file up front closes it at once. Handing Pillow an open file instead would keep it open for
    # as long as the image lives when the format is multi-frame (GIF, TIFF), and workers would run out of handles.
    try:
        with open(path, "rb") as file:
            header = file.read(HEADER_BYTES)
            if not header:
                raise BadSampleError(f"empty image file: {path}")
            if len(header) == HEADER_BYTES and not _identifies_as_image(header):
                # A large file that is no image (a video, an archive, a text dump) is refused from its first bytes
                # rather than read whole into a worker's memory.
                raise BadSampleError(f"not an image (cannot identify image file): {path}")
            data = header + file.read()
    except FileNotFoundError:
        raise BadSampleError(image_not_found(path)) from None
    except IsADirectoryError:
        raise BadSampleError(f"image path is a directory: {path}") from None
    except OSError as error:
        raise BadSampleError(f"cannot read image file ({error.strerror or type(error).__name__}): {path}") from None
    return data


def _identifies_as_image(header: bytes) -> bool:
    """Whether Pillow recognises a format from a file's first bytes (its header is all `Image.open` reads)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PIL.Image.open(io.BytesIO(header))
    except PIL.UnidentifiedImageError:
        return False
    except Exception:  # a recognised format whose header runs past the prefix, or a bomb: decided on the whole file
        return True
    return True


def _check_size(image: PIL.Image.Image, max_pixels: int | None, where: str) -> None:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise BadSampleError(f"image too large ({width}x{height} pixels > limit {max_pixels}){where}")
    if width == 0 or height == 0:
        raise BadSampleError(f"image is empty ({width}x{height} pixels){where}")


def _cut_short(data: bytes | None) -> bool:
    """Whether encoded JPEG, PNG or WebP bytes end before their format's end: Pillow's decoders say "truncated" for
    some cuts only (a JPEG cut inside its tables is "cannot load this image", a WebP "could not create decoder
    object"), so the end marker is checked when a decode fails."""
    if not data:
        return False
    if data.startswith(b"\xff\xd8"):  # JPEG: ends with its EOI marker (some writers pad after it)
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if data.startswith(b"\x89PNG"):  # PNG: ends with its IEND chunk
        return b"IEND" not in data[-16:]
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":  # WebP: the RIFF header says how long the file is
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


def _load_pixels(image: PIL.Image.Image, where: str, data: bytes | None = None) -> None:
    # `Image.open` only reads the header. Decoding here means a truncated file fails in this function, where we can
    # turn it into a `BadSampleError`, instead of later inside a resize. Truncated files are rejected rather than
    # padded with grey: `ImageFile.LOAD_TRUNCATED_IMAGES` is a process-wide switch we have no business flipping.
    try:
        image.load()
    except OSError as error:
        if "truncated" in str(error).lower() or _cut_short(data):
            raise BadSampleError(f"truncated image{where}") from None
        raise BadSampleError(f"cannot decode image (OSError: {error}){where}") from None
    except PIL.Image.DecompressionBombError as error:
        raise BadSampleError(f"image too large ({error}){where}") from None
    except Exception as error:  # decoders raise SyntaxError, ValueError, zlib.error, ...
        raise BadSampleError(f"cannot decode image ({type(error).__name__}: {error}){where}") from None


def _high_depth_to_uint8(image: PIL.Image.Image) -> PIL.Image.Image:
    """Map 16-bit, 32-bit integer and float greyscale to 8-bit `L`, keeping the picture instead of clipping it."""
    array = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own `convert("L")` clips everything above 255 to white, which blanks out most 16-bit images.
        scaled = array.astype(np.float32) / 257.0
    else:
        # "I" and "F" carry no declared range, so infer it from the data: floats in [0, 1] are the usual
        # normalised-image convention, values up to 255 are 8-bit, and anything larger is taken as 16-bit.
        array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(array.max()) if array.size else 0.0
        if image.mode == "F" and peak <= 1.0:
            scaled = array * 255.0
        elif peak <= 255.0:
            scaled = array
        else:
            scaled = array / 257.0
    return PIL.Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _high_depth_to_uint8(image)
    bands = image.getbands()
    if "A" in bands or "a" in bands or "transparency" in image.info:
        # Composite on white, as `transformers.image_transforms.convert_to_rgb` does: a plain `convert("RGB")` drops
        # the alpha channel and shows whatever colour the transparent pixels happen to store, usually black.
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def rgb_pixels_or_bad_sample(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` in RGB for resizing, or [`BadSampleError`] when it has no pixels (what every resize step checks first)."""
    width, height = image.size
    if width == 0 or height == 0:
        raise BadSampleError(f"image is empty ({width}x{height} pixels)")
    try:
        return image if image.mode == "RGB" else to_rgb(image)
    except Exception as error:
        raise BadSampleError(f"cannot convert image to RGB ({type(error).__name__}: {error})") from None


def _apply_exif_orientation(image: PIL.Image.Image) -> PIL.Image.Image:
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a corrupt EXIF block should cost the orientation, not the whole sample
        logger.debug("Ignoring unreadable EXIF data.")
        return image
    if orientation in (None, 1):
        # `ImageOps.exif_transpose` would return a full copy even when there is nothing to do.
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # same as above
        logger.debug("Ignoring EXIF orientation %r that could not be applied.", orientation)
        return image


def image_not_found(path: str) -> str:
    """The reason for an image path that names no file; a path with spaces around it (a CSV field written
    `a.jpg , caption`) says so, since the message would not show them."""
    reason = f"image file not found: {path}"
    folder, name = os.path.split(path)
    if name != name.strip():
        stripped = os.path.join(folder, name.strip())
        there = ", and that file exists" if os.path.isfile(stripped) else ""
        reason += f" (the name {name!r} has spaces around it, part of the name; without them: {stripped!r}{there})"
    return reason


def load_image(
    value: ImageSource,
    base_dir: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> PIL.Image.Image:
    """
    Decode one image fully and return it as RGB, or raise [`BadSampleError`] saying why it cannot be used.

    The image is decoded here (not lazily), so truncation is caught here. EXIF orientation is applied. Modes are
    converted without losing the picture: transparency (RGBA, LA, P with a transparent colour, ...) is composited
    on white, 16-bit greyscale is scaled down rather than clipped, `F` images in [0, 1] are scaled up, CMYK, YCbCr,
    1-bit and palette images are converted by Pillow. Multi-frame files (GIF, TIFF, APNG) give their first frame.

    Args:
        value (`PIL.Image.Image`, `str`, `os.PathLike`, `bytes` or `dict`):
            A PIL image; a path to an image file; the encoded file contents; or the undecoded form of a
            `datasets.Image` column, `{"bytes": bytes | None, "path": str | None}` (bytes are used when present).
        base_dir (`str`, *optional*):
            Directory that relative paths are resolved against (for example the folder of a CSV file).
        max_pixels (`int`, *optional*, defaults to `DEFAULT_MAX_PIXELS`):
            Reject images with more pixels than this, checked from the header before any decoding, so that a small
            file declaring a huge image (a decompression bomb) cannot exhaust a worker's memory. `None` disables
            this check, but Pillow still refuses images above twice its global `PIL.Image.MAX_IMAGE_PIXELS`.
        draft_size (`tuple[int, int]`, *optional*):
            For a JPEG, let the decoder scale the image down by 1/2, 1/4 or 1/8 while decoding, as far as both sides
            stay at least `(width, height)` (`PIL.Image.Image.draft`). Decoding and the later resize get up to 2x
            faster on photos twice the target size or more; the pixels differ slightly from a full decode.

    Returns:
        `PIL.Image.Image`: A fully loaded image in mode `"RGB"`. A PIL input that is already RGB and upright may be
        returned as the same object.

    Raises:
        [`BadSampleError`]: For a missing value, missing, empty, unreadable, truncated, oversized or non-image file,
        or an image that cannot be converted to RGB. No other exception escapes for bad data.
    """
    where = ""
    # Pillow warns for images between 1x and 2x its global limit. Our explicit `max_pixels` check is the policy, and
    # a warning per sample from every worker would only flood the logs. (`catch_warnings` is not thread-safe; the
    # worst a race can do is leave this one warning category ignored.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        if isinstance(value, PIL.Image.Image):
            image = value
        else:
            data, path = _split_source(value, base_dir)
            if path is not None:
                where = f": {path}"
                data = _read_file(path)
            try:
                image = PIL.Image.open(io.BytesIO(data))
            except PIL.Image.DecompressionBombError as error:
                raise BadSampleError(f"image too large ({error}){where}") from None
            except PIL.UnidentifiedImageError:
                raise BadSampleError(f"not an image (cannot identify image file){where}") from None
            except Exception as error:  # broken headers raise SyntaxError, struct.error, ...
                if "truncated" in str(error).lower() or _cut_short(data):
                    raise BadSampleError(f"truncated image{where}") from None
                raise BadSampleError(f"cannot open image ({type(error).__name__}: {error}){where}") from None
        _check_size(image, max_pixels, where)
        if draft_size is not None and image.format == "JPEG":
            image.draft(None, draft_size)  # before decoding; the size check above read the full size
        _load_pixels(image, where, None if isinstance(value, PIL.Image.Image) else data)
        try:
            return to_rgb(_apply_exif_orientation(image))
        except Exception as error:  # exotic modes ("La", "LAB" variants) that Pillow cannot convert
            raise BadSampleError(
                f"cannot convert image to RGB (mode {image.mode}, {type(error).__name__}: {error}){where}"
            ) from None
