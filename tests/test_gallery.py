"""The retrieval gallery: the selection logic against hand-computed cases, and the PNG it draws."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from conftest import draw_shape, shape_rows
from matplotlib.colors import to_hex
from PIL import Image

from clip_trainer.gallery import (
    RETRIEVAL_EXAMPLES_FILENAME,
    draw_retrieval_gallery,
    gallery_size,
    save_retrieval_gallery,
    select_gallery_rows,
    select_zeroshot_rows,
)


def unit(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_ranking_by_hand():
    # Four images at 0, 30, 60 and 90 degrees; caption q sits at the angle written next to it.
    angles = torch.deg2rad(torch.tensor([0.0, 30.0, 60.0, 90.0]))
    images = torch.stack([angles.cos(), angles.sin()], dim=1)
    captions = torch.stack([torch.deg2rad(torch.tensor(a)) for a in (10.0, 80.0, 50.0, 35.0)])
    texts = torch.stack([captions.cos(), captions.sin()], dim=1)
    rows = select_gallery_rows(images, texts, num_queries=4, top_k=3, seed=0)
    expected = {
        # caption 0 at 10 deg: 0 (10 away), 30 (20), 60 (50); its image is row 0, first.
        0: ([0, 1, 2], 1),
        # caption 1 at 80 deg: 90 (10), 60 (20), 30 (50); its image (row 1, 30 deg) is third.
        1: ([3, 2, 1], 3),
        # caption 2 at 50 deg: 60 (10), 30 (20), 90 (40); its image (row 2) is first.
        2: ([2, 1, 3], 1),
        # caption 3 at 35 deg: 30 (5), 60 (25), 0 (35); its image (row 3, 90 deg) is fourth, outside the top 3.
        3: ([1, 2, 0], 4),
    }
    assert sorted(rows.queries) == [0, 1, 2, 3]
    for query, ranked, true_row, rank, scores in zip(
        rows.queries, rows.ranked, rows.true_rows, rows.true_ranks, rows.scores
    ):
        assert (ranked, rank) == expected[query]
        assert true_row == query
        assert scores == pytest.approx([float(texts[query] @ images[row]) for row in ranked])


def test_shared_images_are_ranked_once_and_ties_go_before_the_true_image():
    # Rows 0 and 1 show the same image (id "a"); row 2's image scores exactly as high as it for caption 0.
    images = unit([1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    texts = unit([1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0])
    rows = select_gallery_rows(images, texts, image_ids=["a", "a", "b", "c"], num_queries=4, top_k=5, seed=1)
    by_query = {
        query: (ranked, rank, true_row)
        for query, ranked, rank, true_row in zip(rows.queries, rows.ranked, rows.true_ranks, rows.true_rows)
    }
    # Three unique images; the tie between "a" (rows 0, 1) and "b" (row 2) counts against the true one, as in
    # retrieval_metrics, so for captions of image "a" image "b" comes first and "a" is rank 2.
    assert by_query[0] == ([2, 0, 3], 2, 0)
    assert by_query[1] == ([2, 0, 3], 2, 0)
    # Caption 2 belongs to image "b" but points at "c"; "a" ties with "b" at 0 and goes before it.
    assert by_query[2] == ([3, 0, 2], 3, 2)
    assert by_query[3] == ([3, 0, 2], 1, 3)


def test_same_seed_same_queries_other_seed_other_queries():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(50, 8, generator=generator), torch.randn(50, 8, generator=generator)
    first = select_gallery_rows(images, texts, seed=3)
    assert first == select_gallery_rows(images, texts, seed=3)
    assert first.queries != select_gallery_rows(images, texts, seed=4).queries
    assert len(set(first.queries)) == 5


def test_zeroshot_selection_by_hand():
    classifier = unit([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0])
    images = unit([0.9, 0.1], [0.2, 0.8], [-1.0, -0.1])
    rows = select_zeroshot_rows(images, [0, 0, 2], classifier, num_images=3, top_k=2, seed=0)
    expected = {0: [0, 1], 1: [1, 0], 2: [2, 1]}
    for row, classes, label in zip(rows.images, rows.classes, rows.labels):
        assert classes == expected[row]
        assert label == [0, 0, 2][row]


def shapes_data():
    rows = shape_rows()
    images = [draw_shape(color, shape, background) for color, shape, background, _ in rows]
    captions = [caption for *_, caption in rows]
    return images, captions


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_writes_a_png_of_the_documented_size(tmp_path):
    images, captions = shapes_data()
    generator = torch.Generator().manual_seed(0)
    image_embeds = torch.randn(len(images), 16, generator=generator)
    text_embeds = image_embeds + 0.8 * torch.randn(len(images), 16, generator=generator)
    path = save_retrieval_gallery(
        image_embeds,
        text_embeds,
        [encoded(image) for image in images],
        captions,
        path=tmp_path / "sub" / RETRIEVAL_EXAMPLES_FILENAME,
        num_queries=3,
        top_k=4,
    )
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == gallery_size(3, 4)
        pixels = np.asarray(png.convert("RGB"))
    # Something is drawn: the thumbnails' colours (pure shape colours) appear in the picture.
    assert (np.abs(pixels.astype(int) - [30, 60, 220]).sum(-1) < 30).any()


def test_emoji_captions_draw_without_a_warning_per_character(tmp_path, recwarn):
    images, captions = shapes_data()
    captions = [f"\U0001f389\U0001f431 {caption}" for caption in captions]  # glyphs DejaVu Sans lacks, first
    embeds = torch.randn(len(images), 16, generator=torch.Generator().manual_seed(0))
    path = save_retrieval_gallery(embeds, embeds, [encoded(image) for image in images], captions,
                                  path=tmp_path / RETRIEVAL_EXAMPLES_FILENAME, num_queries=2, top_k=2)  # fmt: skip
    assert Image.open(path).size == gallery_size(2, 2)
    assert not [w for w in recwarn if "missing from font" in str(w.message)]


def framed_thumbnails(figure, color="#1a9641"):
    """(title, pixels) of every thumbnail whose frame has `color`, top to bottom."""
    framed = []
    for axes in figure.axes:
        if axes.images and to_hex(axes.spines["left"].get_edgecolor()) == color:
            framed.append((axes.get_position().y0, axes.get_title(), np.asarray(axes.images[0].get_array())))
    return [(title, pixels) for _, title, pixels in sorted(framed, key=lambda entry: -entry[0])]


def test_marked_image_is_the_true_one_in_the_picture():
    images, captions = shapes_data()
    # Caption i is closest to image (i + 1) % n, then to its own image i, so every true image is drawn at rank 2.
    n = len(images)
    image_embeds = torch.eye(n)
    text_embeds = torch.eye(n) * 0.6 + torch.roll(torch.eye(n), 1, dims=1) * 0.8
    figure = draw_retrieval_gallery(image_embeds, text_embeds, images, captions, num_queries=3, top_k=3, seed=0)
    rows = select_gallery_rows(image_embeds, text_embeds, num_queries=3, top_k=3, seed=0)
    framed = framed_thumbnails(figure)
    assert len(framed) == 3
    for (title, pixels), query in zip(framed, rows.queries):
        assert title.startswith("#2 ")
        thumbnail = images[query].copy()
        thumbnail.thumbnail((160, 160))
        assert np.array_equal(pixels, np.asarray(thumbnail))


def test_a_missed_true_image_is_added_with_its_rank():
    images, captions = shapes_data()
    n = len(images)
    # Caption i scores image i lowest of all: rank n, outside any top-k.
    text_embeds = -torch.eye(n)
    figure = draw_retrieval_gallery(torch.eye(n), text_embeds, images, captions, num_queries=2, top_k=2)
    assert [title for title, _ in framed_thumbnails(figure)] == [f"true: #{n}", f"true: #{n}"]


def test_zeroshot_section_and_determinism(tmp_path):
    images, captions = shapes_data()
    class_names = ["circle", "square", "triangle"]
    labels = [class_names.index(caption.split()[2]) for caption in captions]
    classifier = torch.eye(3, 8)
    image_embeds = classifier[labels] + 0.3 * torch.randn(len(images), 8, generator=torch.Generator().manual_seed(2))
    arguments = dict(class_names=class_names, class_labels=labels, classifier=classifier, num_zeroshot=3, top_k=3)
    first = save_retrieval_gallery(image_embeds, image_embeds, images, captions, path=tmp_path / "a.png", **arguments)
    again = save_retrieval_gallery(image_embeds, image_embeds, images, captions, path=tmp_path / "b.png", **arguments)
    other = save_retrieval_gallery(
        image_embeds, image_embeds, images, captions, path=tmp_path / "c.png", seed=1, **arguments
    )
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in (first, again, other)]
    assert pixels[0].shape[:2][::-1] == gallery_size(5, 3, 3)
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_a_500_pair_validation_set_takes_seconds(tmp_path):
    images, captions = shapes_data()
    images, captions = (images * 21)[:500], (captions * 21)[:500]
    embeds = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    save_retrieval_gallery(embeds, embeds, images, captions, path=tmp_path / "g.png")
    assert time.perf_counter() - start < 5


def test_bad_inputs_name_the_argument(tmp_path):
    images, captions = shapes_data()
    embeds = torch.randn(len(images), 4)
    with pytest.raises(ValueError, match="one entry per validation row"):
        save_retrieval_gallery(embeds, embeds, images[:-1], captions, path=tmp_path / "g.png")
    with pytest.raises(ValueError, match="need all of `class_names`"):
        save_retrieval_gallery(embeds, embeds, images, captions, path=tmp_path / "g.png", class_names=["a"])


def test_an_unreadable_image_is_drawn_as_a_placeholder():
    images, captions = shapes_data()
    embeds = torch.eye(len(images))
    shown = select_gallery_rows(embeds, embeds, num_queries=2, top_k=2).ranked[0][0]
    images[shown] = b"not an image"
    figure = draw_retrieval_gallery(embeds, embeds, images, captions, num_queries=2, top_k=2)
    placeholders = [axes for axes in figure.axes if any(text.get_text() == "unreadable\nimage" for text in axes.texts)]
    assert len(placeholders) == 1 and placeholders[0].get_title().startswith("#1 ")
