"""Tests for `clip_trainer.rows`: captions, and the cheap up-front check of a dataset's rows."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature

from clip_trainer.images import BadSampleError, load_image
from clip_trainer.rows import BadRowReport, check_caption, find_bad_rows


def noise_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------


def test_check_caption():
    assert check_caption("  a dog on a beach \n") == "a dog on a beach"
    # Numbers are text to whoever wrote the file (codes, years): their decimal form, not a float's.
    assert check_caption(2024) == "2024" and check_caption(3.0) == "3" and check_caption(2.5) == "2.5"
    assert check_caption(np.str_("numpy string")) == "numpy string"
    for value, reason in [
        (None, "missing caption (None)"),
        (float("nan"), "missing caption (NaN)"),
        (["a", "b"], "caption is not a string (list)"),
        (b"bytes", "caption is not a string (bytes)"),
        ("", "empty caption"),
        (" \t\n", "empty caption"),
    ]:
        with pytest.raises(BadSampleError) as info:
            check_caption(value)
        assert info.value.reason == reason


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
        2: f"empty caption (image {image_dir / 'images' / 'good.png'})",  # the row's image names it
        3: f"empty image file: {image_dir / 'images' / 'empty.jpg'}",
        4: f"missing caption (None) (image {image_dir / 'images' / 'good.jpg'})",
        5: "image is missing (None)",
        7: f"image path is a directory: {image_dir / 'images'}",
    }
    assert report.good_indices() == [0, 6]
    kept = dataset.select(report.good_indices())
    assert kept["caption"] == ["a", "g"]
    assert report.summary() == (
        "skipped 6 of 8 rows (1 image file not found, 1 empty caption, 1 empty image file, 1 missing caption, "
        "1 image is missing, 1 image path is a directory): "
        f"row 1: image file not found: {image_dir / 'images' / 'missing.jpg'}; row 2: empty caption (image "
        f"{image_dir / 'images' / 'good.png'}); "
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


def test_urls_are_named_and_base64_images_kept_up_front():
    import base64

    text = base64.b64encode(encode(noise_image(8, 8), "PNG")).decode()
    dataset = Dataset.from_dict({"image": ["http://example.com/a.jpg", text], "caption": ["a", "b"]})
    report = find_bad_rows(dataset, "image", "caption")
    assert report.bad_indices == [0]
    assert "URLs are not fetched" in report.reasons[0]
