"""A picture of what the metrics mean: retrieval and zero-shot examples drawn from held-out embeddings.

[`save_retrieval_gallery`] writes `retrieval_examples.png`: for a few captions picked by a seed, the images the model
ranks first, with the true image framed in green (and shown at the end with its rank when it is not among them); and,
for zero-shot data, a few images with their best-scoring classes. The selection is a plain function of the embeddings,
[`select_gallery_rows`] (and [`select_zeroshot_rows`]), ranked by the same rule as
[`~clip_trainer.evaluation.retrieval_metrics`]: images that share an id are one image, and a tie with the true image
is ranked before it.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through `pyplot` (see `plots.py`). Only the
images shown are decoded, so a gallery of a 500-pair validation set takes well under a second once the embeddings
exist.
"""

from __future__ import annotations

import os
import random
import textwrap
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.utils import logging

from .evaluation import _group_rows
from .images import BadSampleError, load_image
from .plots import _matplotlib

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.get_logger(__name__)

__all__ = [
    "RETRIEVAL_EXAMPLES_FILENAME",
    "GalleryRows",
    "ZeroShotRows",
    "draw_retrieval_gallery",
    "gallery_size",
    "save_retrieval_gallery",
    "select_gallery_rows",
    "select_zeroshot_rows",
]

RETRIEVAL_EXAMPLES_FILENAME = "retrieval_examples.png"

# Layout, in inches at 100 dpi: a caption column, then `top_k + 1` image columns (the last shows a missed true image).
DPI = 100
CAPTION_WIDTH = 2.8
THUMB_SIZE = 1.6
ROW_HEIGHT = THUMB_SIZE + 0.5
TITLE_HEIGHT = 0.5
# Room under the last zero-shot row for its axis label.
BOTTOM_MARGIN = 0.5
THUMB_PIXELS = 160

TRUE_COLOR = "#1a9641"
MISS_COLOR = "#d7191c"
OTHER_COLOR = "#bdbdbd"


@dataclass
class GalleryRows:
    """
    The text-to-image examples to draw.

    Attributes:
        queries (`list[int]`): the caption rows chosen, in drawing order.
        ranked (`list[list[int]]`): for each query, the rows of its `top_k` best-scoring images, best first (one row
            per unique image: the first row that shows it).
        scores (`list[list[float]]`): their cosine similarities to the caption.
        true_rows (`list[int]`): for each query, the row of its own image (the first row showing it).
        true_ranks (`list[int]`): for each query, the rank of its own image (1-based, ties counted against it).
    """

    queries: list[int]
    ranked: list[list[int]]
    scores: list[list[float]]
    true_rows: list[int]
    true_ranks: list[int]


@dataclass
class ZeroShotRows:
    """
    The zero-shot examples to draw.

    Attributes:
        images (`list[int]`): the image rows chosen.
        classes (`list[list[int]]`): for each image, its `top_k` best-scoring classes, best first.
        scores (`list[list[float]]`): their cosine similarities to the image.
        labels (`list[int]`): the true class of each image.
    """

    images: list[int]
    classes: list[list[int]]
    scores: list[list[float]]
    labels: list[int]


def _normalized(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-d torch.Tensor (rows, embed_dim), got {getattr(tensor, 'shape', tensor)}."
        )
    return F.normalize(tensor.detach().to("cpu", torch.float32), dim=-1)


def _rank_order(scores: np.ndarray, positive: int | None) -> np.ndarray:
    """Indices by decreasing score; a tie with `positive` goes before it, as ties count against it in the metrics."""
    # NaN scores sort last here; the metrics count them against the positive as well.
    keys = np.where(np.isnan(scores), -np.inf, scores)
    is_positive = np.zeros(len(scores), dtype=bool)
    if positive is not None:
        is_positive[positive] = True
    return np.lexsort((np.arange(len(scores)), is_positive, -keys))


def select_gallery_rows(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    image_ids: Sequence[Hashable] | torch.Tensor | None = None,
    num_queries: int = 5,
    top_k: int = 5,
    seed: int = 0,
) -> GalleryRows:
    """
    Picks `num_queries` captions with a seeded generator and ranks the unique images for each.

    Args:
        image_embeds (`torch.Tensor` of shape `(N, D)`): the image embedding of each row.
        text_embeds (`torch.Tensor` of shape `(N, D)`): the caption embedding of each row.
        image_ids (`Sequence[Hashable]` or `torch.Tensor` of shape `(N,)`, *optional*):
            Rows with equal ids show the same image, which is then ranked once. `None`: every row is its own image.
        num_queries (`int`, *optional*, defaults to 5): captions to pick (all of them if there are fewer).
        top_k (`int`, *optional*, defaults to 5): images to rank per caption (all of them if there are fewer).
        seed (`int`, *optional*, defaults to 0): the same seed picks the same captions.

    Returns:
        [`GalleryRows`]: the chosen captions, their ranked images and the true image's row and rank.
    """
    images = _normalized(image_embeds, "image_embeds")
    texts = _normalized(text_embeds, "text_embeds")
    if images.shape != texts.shape:
        raise ValueError(
            f"`image_embeds` {tuple(images.shape)} and `text_embeds` {tuple(texts.shape)} differ in shape."
        )
    if num_queries < 1 or top_k < 1:
        raise ValueError(f"`num_queries` and `top_k` must be positive, got {num_queries} and {top_k}.")
    num_rows = images.shape[0]
    row_to_group, first_rows = _group_rows(image_ids, num_rows)
    queries = random.Random(seed).sample(range(num_rows), min(num_queries, num_rows))
    scores = (texts[queries] @ images[first_rows].T).numpy()
    rows = GalleryRows(queries=queries, ranked=[], scores=[], true_rows=[], true_ranks=[])
    for query, query_scores in zip(queries, scores):
        positive = row_to_group[query]
        order = _rank_order(query_scores, positive)
        top = order[: min(top_k, len(order))]
        rows.ranked.append([first_rows[group] for group in top])
        rows.scores.append([float(query_scores[group]) for group in top])
        rows.true_rows.append(first_rows[positive])
        rows.true_ranks.append(int(np.nonzero(order == positive)[0][0]) + 1)
    return rows


def select_zeroshot_rows(
    image_embeds: torch.Tensor,
    class_labels: Sequence[int] | torch.Tensor,
    classifier: torch.Tensor,
    image_ids: Sequence[Hashable] | torch.Tensor | None = None,
    num_images: int = 4,
    top_k: int = 5,
    seed: int = 0,
) -> ZeroShotRows:
    """
    Picks `num_images` unique images with a seeded generator and ranks the classes for each.

    Args:
        image_embeds (`torch.Tensor` of shape `(N, D)`): the image embedding of each row.
        class_labels (`Sequence[int]` or `torch.Tensor` of shape `(N,)`): the true class of each row, in `[0, C)`,
            or -1 for a row without a label (a blank label cell), which is never picked.
        classifier (`torch.Tensor` of shape `(C, D)`): one embedding per class, e.g. from
            [`~clip_trainer.evaluation.build_zeroshot_classifier`].
        image_ids (*optional*): rows with equal ids show the same image, which is then picked at most once.
        num_images (`int`, *optional*, defaults to 4): images to pick.
        top_k (`int`, *optional*, defaults to 5): classes to show per image.
        seed (`int`, *optional*, defaults to 0): the same seed picks the same images.

    Returns:
        [`ZeroShotRows`]: the chosen images, their best classes and scores, and their true classes.
    """
    images = _normalized(image_embeds, "image_embeds")
    weights = _normalized(classifier, "classifier")
    if images.shape[1] != weights.shape[1]:
        raise ValueError(f"`image_embeds` has dimension {images.shape[1]} but `classifier` has {weights.shape[1]}.")
    labels = [int(label) for label in (class_labels.tolist() if hasattr(class_labels, "tolist") else class_labels)]
    if len(labels) != images.shape[0] or any(not -1 <= label < weights.shape[0] for label in labels):
        raise ValueError(
            f"`class_labels` must give one class in [0, {weights.shape[0]}) (or -1: no label) for each of the "
            f"{images.shape[0]} rows."
        )
    _, first_rows = _group_rows(image_ids, images.shape[0])
    # Rows without a label count for retrieval only, as in the zero-shot evaluation: there is no true class to show.
    first_rows = [row for row in first_rows if labels[row] >= 0]
    # A stream of its own, so that the zero-shot images are not the retrieval queries' images again.
    chosen = random.Random(f"zeroshot:{seed}").sample(first_rows, min(num_images, len(first_rows)))
    scores = (images[chosen] @ weights.T).numpy()
    rows = ZeroShotRows(images=chosen, classes=[], scores=[], labels=[labels[row] for row in chosen])
    for row_scores, label in zip(scores, rows.labels):
        top = _rank_order(row_scores, label)[: min(top_k, weights.shape[0])]
        rows.classes.append([int(index) for index in top])
        rows.scores.append([float(row_scores[index]) for index in top])
    return rows


def gallery_size(num_queries: int, top_k: int, num_zeroshot: int = 0) -> tuple[int, int]:
    """The `(width, height)` in pixels of a gallery with these many rows, from the layout constants above."""
    width = CAPTION_WIDTH + (top_k + 1) * THUMB_SIZE
    height = TITLE_HEIGHT + num_queries * ROW_HEIGHT
    if num_zeroshot:
        height += TITLE_HEIGHT + num_zeroshot * ROW_HEIGHT + BOTTOM_MARGIN
    return round(width * DPI), round(height * DPI)


def _thumbnail(images: Sequence, row: int, base_dir: str | None, cache: dict[int, np.ndarray | None]):
    if row not in cache:
        try:
            image = load_image(images[row], base_dir=base_dir)
            image = image.copy()
            image.thumbnail((THUMB_PIXELS, THUMB_PIXELS), Image.Resampling.BICUBIC)
            cache[row] = np.asarray(image)
        except BadSampleError as error:
            logger.warning(f"Gallery: row {row} shows no image ({error}).")
            cache[row] = None
    return cache[row]


def _draw_image(axes, pixels: np.ndarray | None, title: str, color: str, width: float, title_color: str = "black"):
    if pixels is None:
        axes.text(0.5, 0.5, "unreadable\nimage", ha="center", va="center", fontsize=8, transform=axes.transAxes)
    else:
        axes.imshow(pixels)
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)
    axes.set_title(title, fontsize=9, color=title_color, pad=3)


def _draw_text(axes, text: str, fontsize: float = 9.5) -> None:
    axes.set_axis_off()
    axes.text(0.0, 0.5, text, ha="left", va="center", fontsize=fontsize, wrap=False, transform=axes.transAxes)


def _wrap(text: str, width: int = 30, max_lines: int = 5) -> str:
    lines = textwrap.wrap(" ".join(str(text).split()), width=width) or ["(empty caption)"]
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1][: width - 1] + "…"]
    return "\n".join(lines)


def draw_retrieval_gallery(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    images: Sequence,
    captions: Sequence[str],
    image_ids: Sequence[Hashable] | torch.Tensor | None = None,
    *,
    num_queries: int = 5,
    top_k: int = 5,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    classifier: torch.Tensor | None = None,
    num_zeroshot: int = 4,
    base_dir: str | None = None,
) -> Figure:
    """
    Draws the gallery that [`save_retrieval_gallery`] saves, and returns the figure (arguments as there, without
    `path`).

    Returns:
        `matplotlib.figure.Figure`: with an Agg canvas; `figure.savefig(path)` writes it.
    """
    num_rows = len(captions)
    if not len(images) == len(image_embeds) == len(text_embeds) == num_rows:
        raise ValueError(
            f"`images` ({len(images)}), `captions` ({num_rows}), `image_embeds` ({len(image_embeds)}) and "
            f"`text_embeds` ({len(text_embeds)}) must have one entry per validation row."
        )
    zeroshot_inputs = (class_names, class_labels, classifier)
    if any(value is not None for value in zeroshot_inputs) and any(value is None for value in zeroshot_inputs):
        raise ValueError("Zero-shot examples need all of `class_names`, `class_labels` and `classifier`.")
    if classifier is not None and len(class_names) != classifier.shape[0]:
        raise ValueError(
            f"`class_names` has {len(class_names)} names but `classifier` has {classifier.shape[0]} rows."
        )

    retrieval = select_gallery_rows(image_embeds, text_embeds, image_ids, num_queries, top_k, seed)
    zeroshot = None
    if classifier is not None:
        zeroshot = select_zeroshot_rows(image_embeds, class_labels, classifier, image_ids, num_zeroshot, top_k, seed)
    num_zeroshot_rows = len(zeroshot.images) if zeroshot else 0
    width, height = gallery_size(len(retrieval.queries), top_k, num_zeroshot_rows)
    Figure, FigureCanvasAgg = _matplotlib()
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    columns = top_k + 2
    # Rows in figure fractions: a title band, then the retrieval rows, then the zero-shot title and rows.
    fraction = DPI / height
    ratios = [CAPTION_WIDTH, *([THUMB_SIZE] * (top_k + 1))]
    cache: dict[int, np.ndarray | None] = {}

    def row_grid(top_inches: float, num: int):
        bottom = 1 - (top_inches + num * ROW_HEIGHT) * fraction
        return figure.add_gridspec(
            num,
            columns,
            width_ratios=ratios,
            left=0.01,
            right=0.99,
            top=1 - top_inches * fraction,
            bottom=bottom,
            wspace=0.08,
            hspace=0.45,
        )

    figure.text(
        0.01,
        1 - 0.3 * fraction,
        f"Text → image retrieval: the {top_k} best images for {len(retrieval.queries)} "
        f"held-out captions (true image framed in green)",
        fontsize=11,
        weight="bold",
        va="center",
    )
    grid = row_grid(TITLE_HEIGHT, len(retrieval.queries))
    for line, query in enumerate(retrieval.queries):
        rank = retrieval.true_ranks[line]
        verdict = "found at #1" if rank == 1 else f"true image at #{rank}"
        _draw_text(figure.add_subplot(grid[line, 0]), f"“{_wrap(captions[query])}”\n\n{verdict}")
        for column, (row, score) in enumerate(zip(retrieval.ranked[line], retrieval.scores[line]), start=1):
            is_true = row == retrieval.true_rows[line]
            pixels = _thumbnail(images, row, base_dir, cache)
            frame, frame_width = (TRUE_COLOR, 5) if is_true else (OTHER_COLOR, 1)
            _draw_image(figure.add_subplot(grid[line, column]), pixels, f"#{column}  {score:.2f}", frame, frame_width)
        if rank > len(retrieval.ranked[line]):
            pixels = _thumbnail(images, retrieval.true_rows[line], base_dir, cache)
            axes = figure.add_subplot(grid[line, columns - 1])
            _draw_image(axes, pixels, f"true: #{rank}", TRUE_COLOR, 5, title_color=MISS_COLOR)

    if zeroshot:
        top_inches = TITLE_HEIGHT + len(retrieval.queries) * ROW_HEIGHT
        figure.text(
            0.01,
            1 - (top_inches + 0.3) * fraction,
            f"Zero-shot classification: the {min(top_k, len(class_names))} "
            f"best of {len(class_names)} classes (true class in green)",
            fontsize=11,
            weight="bold",
            va="center",
        )
        grid = row_grid(top_inches + TITLE_HEIGHT, len(zeroshot.images))
        for line, row in enumerate(zeroshot.images):
            label = zeroshot.labels[line]
            hit = zeroshot.classes[line][0] == label
            color = TRUE_COLOR if hit else MISS_COLOR
            pixels = _thumbnail(images, row, base_dir, cache)
            _draw_image(figure.add_subplot(grid[line, 1]), pixels, "correct" if hit else "wrong", color, 3, color)
            _draw_text(figure.add_subplot(grid[line, 0]), f"true class:\n{_wrap(class_names[label], 26, 2)}")
            # Column 2 is left free for the class names, which sit left of the bars.
            bars = figure.add_subplot(grid[line, 3:])
            classes, scores = zeroshot.classes[line], zeroshot.scores[line]
            positions = np.arange(len(classes))[::-1]
            bars.barh(
                positions, scores, color=[TRUE_COLOR if c == label else OTHER_COLOR for c in classes], height=0.7
            )
            bars.set_yticks(positions, [_wrap(class_names[c], 40, 1) for c in classes], fontsize=9)
            bars.set_xlabel("cosine similarity", fontsize=8)
            bars.tick_params(axis="x", labelsize=8)
            low, high = min(0.0, min(scores)), max(max(scores), 0.0)
            # Room right of the longest bar (or of zero) for its label.
            bars.set_xlim(low, high + 0.18 * max(high - low, 1e-6))
            for position, score in zip(positions, scores):
                # Negative scores are labelled right of zero, away from the class names.
                bars.text(max(score, 0.0), position, f" {score:.2f}", va="center", fontsize=8)
            for side in ("top", "right"):
                bars.spines[side].set_visible(False)

    return figure


def save_retrieval_gallery(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    images: Sequence,
    captions: Sequence[str],
    image_ids: Sequence[Hashable] | torch.Tensor | None = None,
    *,
    path: str | os.PathLike,
    num_queries: int = 5,
    top_k: int = 5,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    classifier: torch.Tensor | None = None,
    num_zeroshot: int = 4,
    base_dir: str | None = None,
) -> str:
    """
    Draws retrieval examples (and zero-shot examples) from held-out embeddings into one PNG.

    Top: one row per chosen caption, with its text, then its `top_k` best-scoring images with rank and cosine
    similarity; the true image has a thick green frame, and when it is not among them it is added at the end with its
    rank in red. Bottom, when `class_names`, `class_labels` and `classifier` are all given: one row per chosen image,
    the image then its `top_k` classes with their similarities, the true class in green. The PNG is
    `gallery_size(num_queries, top_k, num_zeroshot)` pixels (fewer rows when there are fewer rows to pick from).

    Args:
        image_embeds (`torch.Tensor` of shape `(N, D)`): the image embedding of each validation row.
        text_embeds (`torch.Tensor` of shape `(N, D)`): the caption embedding of each row.
        images (`Sequence`): the image of each row, anything [`~clip_trainer.images.load_image`] reads (PIL images,
            encoded bytes, paths, `datasets.Image` dicts). Only the images drawn are decoded.
        captions (`Sequence[str]`): the caption of each row.
        image_ids (*optional*): rows with equal ids show the same image (COCO's five captions per image).
        path (`str` or `os.PathLike`): the PNG to write, e.g. `os.path.join(output_dir, RETRIEVAL_EXAMPLES_FILENAME)`.
        num_queries (`int`, *optional*, defaults to 5): captions to show.
        top_k (`int`, *optional*, defaults to 5): images (and classes) per row.
        seed (`int`, *optional*, defaults to 0): picks the captions and zero-shot images; the same seed, the same
            picture.
        class_names (`Sequence[str]`, *optional*): the zero-shot class names, in label order.
        class_labels (`Sequence[int]` or `torch.Tensor`, *optional*): the true class of each row.
        classifier (`torch.Tensor` of shape `(C, D)`, *optional*): the class embeddings.
        num_zeroshot (`int`, *optional*, defaults to 4): zero-shot images to show.
        base_dir (`str`, *optional*): folder that relative image paths are resolved against.

    Returns:
        `str`: the path written.
    """
    figure = draw_retrieval_gallery(
        image_embeds,
        text_embeds,
        images,
        captions,
        image_ids,
        num_queries=num_queries,
        top_k=top_k,
        seed=seed,
        class_names=class_names,
        class_labels=class_labels,
        classifier=classifier,
        num_zeroshot=num_zeroshot,
        base_dir=base_dir,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        # A caption's emoji or a script the plotting font lacks is drawn as a box, and matplotlib warns once per
        # character: a log full of them says nothing about the run.
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from font")
        figure.savefig(path, dpi=DPI)
    return str(path)
