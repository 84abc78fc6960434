"""Evaluation for CLIP-style models: image-text retrieval and zero-shot classification.

- The maths ([`retrieval_metrics`], [`build_zeroshot_classifier`], [`zeroshot_accuracy`]) are plain functions of
  tensors, testable without a model or a trainer.
- [`RetrievalEvaluator`] is one evaluation set: it embeds the set with any model alone (`evaluator(model,
  processor)`), or computes the metrics from embeddings gathered elsewhere (`evaluator.compute_metrics(...)`: the
  trainer collects the embeddings of the whole set across processes in its evaluation loop and hands them over).
- The metric registry ([`METRICS`], from `clip_trainer.metrics`) names, describes and orders every metric reported.

Conventions shared by all metrics:

- **Ranks are 1-based and ties count against the positive.** The rank of a positive is `1 +` the number of
  non-positive candidates whose score is greater than *or equal to* the positive's score. A NaN score is treated the
  same way (it is never "strictly lower"), so a diverged model cannot report a good score. We chose the pessimistic
  convention because the optimistic one rewards collapse: a model mapping every input to the same vector would get
  a perfect recall@1, whereas here it gets the worst possible rank.
- **Equal inputs score alike.** [`RetrievalEvaluator`] gives every row with the same caption text one text embedding
  and every row of one image one image embedding ([`share_embeddings`]), so that a caption shared by several images
  ties with itself whatever batches its rows were embedded in, and the metrics do not depend on the batch size.
- **Zero-shot accuracy counts images**: each labelled image once, however many captions it has ([`zeroshot_rows`]).
- **Median rank** is the median of the per-query ranks; for an even number of queries it is the mean of the two
  middle ranks (as `numpy.median`), so it can be a half-integer.
- Embeddings are L2-normalised here whatever the caller did; half-precision inputs are upcast to float32, float64
  inputs stay float64.

Gathering across processes: call `Accelerator.gather_for_metrics` on each batch *inside* the evaluation loop (as
`Trainer.evaluation_loop` does), then concatenate. It drops the samples that the sharded sampler repeats to even out
the last batch, and with the sequential evaluation sampler the concatenation comes back in dataset order, so the
metrics equal the single-process ones. Two conditions: it only truncates while the prepared dataloader is still being
iterated (gathering the concatenated local tensors once, after the loop, keeps the repeated samples), and its
truncation counts rows, so every process must return exactly the rows its sampler gave it. A collator that drops
unusable rows breaks this (the gather needs equal shapes and the cut lands on the wrong rows); keep such rows with a
`False` validity flag, gather the flag with the embeddings, and filter afterwards.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import logging

# The registry lives in its own light module (the argument checks read it before torch is imported); it is part of
# this module's API.
from .metrics import (
    METRICS,
    METRICS_BY_NAME,
    RECALL_KS,
    RETRIEVAL_METRIC_NAMES,
    ZEROSHOT_KS,
    ZEROSHOT_METRIC_NAMES,
    MetricInfo,
    metric_info,
    render_metric_table,
    split_metric_key,
)

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_ZEROSHOT_TEMPLATES",
    "METRICS",
    "METRICS_BY_NAME",
    "MetricInfo",
    "RETRIEVAL_METRIC_NAMES",
    "RetrievalEvaluator",
    "ZEROSHOT_METRIC_NAMES",
    "build_zeroshot_classifier",
    "embed_batch",
    "embed_batch_with_hard_negatives",
    "hard_negative_accuracy",
    "hard_negative_scores",
    "metric_info",
    "render_metric_table",
    "retrieval_metrics",
    "share_embeddings",
    "split_metric_key",
    "text_encoder",
    "zeroshot_accuracy",
    "zeroshot_rows",
]

DEFAULT_ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a drawing of a {}.",
)
"""Generic prompt templates for zero-shot classification, a domain-neutral subset of the CLIP paper's prompts."""


def _as_float(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.ndim != 2:
        raise ValueError(f"`{name}` must have shape (num_rows, embed_dim), got shape {tuple(tensor.shape)}.")
    # Ranking needs float32 at least: in bfloat16 distinct similarities collapse into ties, which count as misses.
    dtype = tensor.dtype if tensor.dtype == torch.float64 else torch.float32
    return F.normalize(tensor.to(dtype), dim=-1)


def _check_ks(ks: Sequence[int], name: str) -> tuple[int, ...]:
    ks = tuple(dict.fromkeys(ks))
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"`{name}` must be a non-empty sequence of positive integers, got {ks}.")
    return ks


def _warn_if_not_finite(*tensors: torch.Tensor) -> None:
    if not all(bool(torch.isfinite(tensor).all()) for tensor in tensors):
        logger.warning("Embeddings contain NaN or inf; their scores count against the positives in every ranking.")


def _median(values: torch.Tensor) -> float:
    # `torch.median` returns the lower of the two middle values; we want the numpy convention, which is symmetric.
    values = values.double().sort().values
    middle = values.numel() // 2
    if values.numel() % 2:
        return float(values[middle])
    return float((values[middle - 1] + values[middle]) / 2)


def _group_rows(
    image_ids: Sequence[Hashable] | torch.Tensor | None, num_rows: int, name: str = "image_ids"
) -> tuple[list[int], list[int]]:
    """Returns, for each row, the index of its unique image, and for each unique image, the first row showing it."""
    if image_ids is None:
        return list(range(num_rows)), list(range(num_rows))
    # Tensors and numpy arrays hash per element only after conversion to python scalars.
    ids = image_ids.tolist() if hasattr(image_ids, "tolist") else list(image_ids)
    if len(ids) != num_rows:
        raise ValueError(f"`{name}` has {len(ids)} entries but the embeddings have {num_rows} rows.")
    group_of_id: dict[Hashable, int] = {}
    row_to_group, first_rows = [], []
    for row, image_id in enumerate(ids):
        group = group_of_id.get(image_id)
        if group is None:
            group = group_of_id[image_id] = len(first_rows)
            first_rows.append(row)
        row_to_group.append(group)
    return row_to_group, first_rows


def share_embeddings(embeds: torch.Tensor, keys: Sequence[Hashable] | torch.Tensor) -> torch.Tensor:
    """
    Gives every row the embedding of the first row with an equal key: one embedding per distinct caption text (keys
    are the captions) or per image (keys are image ids).

    Why: a caption's embedding depends slightly (about 1e-7) on the batch it was computed in, since captions are
    padded to the batch's longest and the float sums change with the shape; an image's can change with the batch size.
    Two rows with the same caption for different images would then score a little differently, and the rule that ties
    count against the positive would decide at random, so that the metrics would change with the evaluation batch size.
    With one embedding per caption text and per image, equal inputs score exactly alike, and the metrics depend on the
    model and the data only.

    Args:
        embeds (`torch.Tensor` of shape `(N, D)`): one embedding per row.
        keys (`Sequence[Hashable]` or `torch.Tensor` of shape `(N,)`): what makes two rows the same input.

    Returns:
        `torch.Tensor` of shape `(N, D)`: `embeds` with each row replaced by the first row of its key.
    """
    row_to_group, first_rows = _group_rows(keys, embeds.shape[0], "keys")
    first_row_of_each = torch.tensor(first_rows, dtype=torch.long)[torch.tensor(row_to_group, dtype=torch.long)]
    return embeds[first_row_of_each.to(embeds.device)]


def zeroshot_rows(
    labels: torch.Tensor, image_ids: Sequence[Hashable] | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The rows zero-shot accuracy scores: one per labelled image, so that an image with five captions counts once.

    Each image (rows with equal `image_ids`; every row its own image without them) is scored once, on its first
    labelled row, with that row's class. Rows of one image with different classes are a mistake in the data: a
    warning says how many images have them, and the first labelled row's class is used.

    Args:
        labels (`torch.Tensor` of shape `(N,)`): each row's class, -1 for a row without one.
        image_ids (`Sequence[Hashable]` or `torch.Tensor` of shape `(N,)`, *optional*): each row's image.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the row of each labelled image and its class (`int64`, on the CPU).
    """
    labels = torch.as_tensor(labels).long().cpu()
    row_to_group, _ = _group_rows(image_ids, labels.numel())
    chosen: dict[int, tuple[int, int]] = {}
    conflicts: set[int] = set()
    for row, (group, label) in enumerate(zip(row_to_group, labels.tolist())):
        if label < 0:
            continue
        first = chosen.setdefault(group, (row, label))
        if first[1] != label:
            conflicts.add(group)
    if conflicts:
        logger.warning_once(
            f"{len(conflicts)} image(s) of the evaluation set have rows with different classes; zero-shot accuracy "
            "scores each image once, with the class of its first labelled row: give every row of an image one label."
        )
    rows = torch.tensor([row for row, _ in chosen.values()], dtype=torch.long)
    classes = torch.tensor([label for _, label in chosen.values()], dtype=torch.long)
    return rows, classes


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    image_ids: Sequence[Hashable] | torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """
    Computes exact image-to-text and text-to-image retrieval metrics over a whole evaluation set.

    Rows are (image, caption) pairs as they come out of the dataset, so an image with five captions (as in COCO)
    appears on five rows. Rows sharing an image id are the same image; the gallery of images is deduplicated and each
    image is represented by the embedding on its first row.

    - **Text to image**: each of the `N` captions ranks the unique images; its one positive is its own image.
    - **Image to text**: each unique image ranks all `N` captions; all its captions are positives and its rank is the
      rank of its best-scoring caption, that is `1 +` the number of *other images'* captions scoring greater than or
      equal to it. A hit at `k` therefore means that at least one of its captions is in the top `k`.

    Ties count against the positive, and the median of an even number of ranks is the mean of the two middle ones
    (see the module docstring). Queries are scored `chunk_size` at a time against the full gallery, so memory is
    `O(chunk_size x N)` rather than `O(N x N)`; the result does not depend on `chunk_size`.

    Args:
        image_embeds (`torch.Tensor` of shape `(N, D)`):
            Image embedding of each row. Normalised here, so raw projections are fine too.
        text_embeds (`torch.Tensor` of shape `(N, D)`):
            Caption embedding of each row, on the same device as `image_embeds`.
        image_ids (`Sequence[Hashable]` or `torch.Tensor` of shape `(N,)`, *optional*):
            Identifier of the image on each row; rows with equal ids show the same image. If `None`, every row is its
            own image.
        ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 10)`):
            Cut-offs for recall@k. A cut-off larger than the gallery gives a recall of 1.
        chunk_size (`int`, *optional*, defaults to 1024):
            Number of queries scored at once.

    Returns:
        `dict[str, float]`: `i2t_recall@{k}` and `t2i_recall@{k}` for each `k` (fractions of queries in `[0, 1]`),
        `i2t_median_rank`, `t2i_median_rank`, and `mean_recall`, the mean of all the recalls. Keys carry no `eval_`
        prefix: the trainer adds it.

    Example:

    ```python
    >>> import torch
    >>> from clip_trainer.evaluation import retrieval_metrics

    >>> images = torch.eye(3)
    >>> captions = torch.eye(3).repeat_interleave(2, dim=0)  # two captions per image
    >>> metrics = retrieval_metrics(images.repeat_interleave(2, dim=0), captions, image_ids=[0, 0, 1, 1, 2, 2])
    >>> metrics["i2t_recall@1"], metrics["t2i_median_rank"]
    (1.0, 1.0)
    ```
    """
    images = _as_float(image_embeds, "image_embeds")
    texts = _as_float(text_embeds, "text_embeds")
    if images.shape != texts.shape:
        raise ValueError(
            f"`image_embeds` and `text_embeds` must have the same shape (one row per image-caption pair), got "
            f"{tuple(images.shape)} and {tuple(texts.shape)}."
        )
    if images.device != texts.device:
        raise ValueError(f"`image_embeds` is on {images.device} but `text_embeds` is on {texts.device}.")
    num_rows = images.shape[0]
    if num_rows == 0:
        raise ValueError("Cannot compute retrieval metrics on an empty evaluation set.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
    ks = _check_ks(ks, "ks")
    dtype = torch.promote_types(images.dtype, texts.dtype)
    images, texts = images.to(dtype), texts.to(dtype)
    _warn_if_not_finite(images, texts)

    device = images.device
    row_to_group, first_rows = _group_rows(image_ids, num_rows)
    row_to_group = torch.tensor(row_to_group, device=device)
    gallery = images[torch.tensor(first_rows, device=device)]
    num_images = gallery.shape[0]

    # Text to image: one positive per caption, the caption's own image.
    t2i_ranks = []
    for start in range(0, num_rows, chunk_size):
        scores = texts[start : start + chunk_size] @ gallery.T
        positives = row_to_group[start : start + chunk_size, None]
        positive_scores = scores.gather(1, positives)
        # `~(s < p)` rather than `s >= p`: ties and NaN both count against the positive.
        beaten_by = ~(scores < positive_scores)
        beaten_by.scatter_(1, positives, False)
        t2i_ranks.append(1 + beaten_by.sum(dim=1))
    t2i_ranks = torch.cat(t2i_ranks)

    # Image to text: several positives per image; only the best one matters, and only negatives can beat it.
    i2t_ranks = []
    for start in range(0, num_images, chunk_size):
        image_index = torch.arange(start, min(start + chunk_size, num_images), device=device)
        scores = gallery[image_index] @ texts.T
        is_positive = row_to_group[None, :] == image_index[:, None]
        # amax propagates NaN, so a NaN positive makes every negative count against the image.
        best_positive = scores.masked_fill(~is_positive, float("-inf")).amax(dim=1, keepdim=True)
        beaten_by = ~(scores < best_positive) & ~is_positive
        i2t_ranks.append(1 + beaten_by.sum(dim=1))
    i2t_ranks = torch.cat(i2t_ranks)

    metrics = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            # Integer count over integer total, so the value is exact and independent of `chunk_size`.
            metrics[f"{direction}_recall@{k}"] = int((ranks <= k).sum()) / ranks.numel()
    metrics["i2t_median_rank"] = _median(i2t_ranks)
    metrics["t2i_median_rank"] = _median(t2i_ranks)
    recalls = [value for key, value in metrics.items() if "_recall@" in key]
    metrics["mean_recall"] = sum(recalls) / len(recalls)
    return metrics


def build_zeroshot_classifier(
    encode_text: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_ZEROSHOT_TEMPLATES,
    *,
    placeholder: str = "{}",
) -> torch.Tensor:
    """
    Builds zero-shot classifier weights by prompt ensembling, as in the CLIP paper.

    For each class, every template is filled with the class name, the prompts are encoded, each embedding is
    L2-normalised, the embeddings are averaged, and the average is normalised again.

    Args:
        encode_text (`Callable[[list[str]], torch.Tensor]`):
            Maps a list of prompts to their text embeddings, shape `(len(prompts), D)`; for example a closure over a
            tokenizer and `CLIPModel.get_text_features`. It is called once per class, under `torch.no_grad()`.
        class_names (`Sequence[str]`):
            The `C` class names, in label order.
        templates (`Sequence[str]`, *optional*, defaults to `DEFAULT_ZEROSHOT_TEMPLATES`):
            Prompt templates, each with one `{}` placeholder for the class name.
        placeholder (`str`, *optional*, defaults to `"{}"`):
            How the templates mark the class name: `"{}"` (filled with `template.format(name)`) or `"{c}"`
            (`template.format(c=name)`, CLIP_benchmark's and open_clip's templates).

    Returns:
        `torch.Tensor` of shape `(C, D)`: one unit-norm row per class, float32 (float64 if `encode_text` returns
        float64), on the device of the embeddings `encode_text` returns.
    """
    if len(class_names) == 0:
        raise ValueError("`class_names` is empty; zero-shot classification needs at least one class.")
    if len(templates) == 0:
        raise ValueError("`templates` is empty; pass at least one template such as 'a photo of a {}.'.")
    if placeholder not in ("{}", "{c}"):
        raise ValueError(f"`placeholder` must be '{{}}' or '{{c}}', got {placeholder!r}.")
    for template in templates:
        # Without a placeholder every class would get the same prompt and the classifier would silently be chance.
        if placeholder not in template:
            raise ValueError(f"Template {template!r} has no {placeholder!r} placeholder for the class name.")

    weights = []
    with torch.no_grad():
        for name in class_names:
            if placeholder == "{}":
                prompts = [template.format(name) for template in templates]
            else:
                prompts = [template.format(c=name) for template in templates]
            embeds = encode_text(prompts)
            if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2 or embeds.shape[0] != len(prompts):
                shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise ValueError(
                    f"`encode_text` must return a tensor of shape ({len(prompts)}, embed_dim) for {len(prompts)} "
                    f"prompts, got {shape}."
                )
            embeds = _as_float(embeds, "encode_text(prompts)")
            weights.append(F.normalize(embeds.mean(dim=0), dim=-1))
    return torch.stack(weights)


def zeroshot_accuracy(
    image_embeds: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    classifier: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """
    Computes zero-shot top-k accuracy of image embeddings against a classifier from `build_zeroshot_classifier`.

    An image is correct at `k` when its true class ranks `k` or better among the classes by cosine similarity. Ties
    count against the true class (see the module docstring), so `k` larger than the number of classes `C` acts as `C`
    and gives an accuracy of 1; the key keeps the requested `k` so that metric names stay stable across datasets.

    Args:
        image_embeds (`torch.Tensor` of shape `(N, D)`):
            Image embeddings; normalised here.
        labels (`Sequence[int]` or `torch.Tensor` of shape `(N,)`):
            True class index of each image, in `[0, C)`.
        classifier (`torch.Tensor` of shape `(C, D)`):
            One row per class; normalised here.
        ks (`Sequence[int]`, *optional*, defaults to `(1, 5)`):
            Cut-offs for top-k accuracy.
        chunk_size (`int`, *optional*, defaults to 1024):
            Number of images scored at once, so memory is `O(chunk_size x C)`.

    Returns:
        `dict[str, float]`: fractions in `[0, 1]`:

        - `zeroshot_top{k}` for each `k`;
        - `zeroshot_balanced_accuracy`: the mean over the classes that occur in `labels` of each class's top-1 recall
          (the share of its images whose true class ranks first). Classes of the classifier with no image here are
          left out of the mean: their recall is undefined, not 0. Unlike top-1 it does not reward favouring a large
          class: answering one class always scores `1 / (classes present)`;
        - `zeroshot_majority_baseline`: the top-1 accuracy of always answering the most frequent class of `labels`,
          the score that top-1 has to beat to mean anything on unbalanced classes.
    """
    images = _as_float(image_embeds, "image_embeds")
    weights = _as_float(classifier, "classifier")
    if images.shape[1] != weights.shape[1]:
        raise ValueError(
            f"`image_embeds` has dimension {images.shape[1]} but `classifier` has dimension {weights.shape[1]}."
        )
    num_images, num_classes = images.shape[0], weights.shape[0]
    if num_images == 0:
        raise ValueError("Cannot compute zero-shot accuracy on an empty evaluation set.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
    ks = _check_ks(ks, "ks")
    dtype = torch.promote_types(images.dtype, weights.dtype)
    images, weights = images.to(dtype), weights.to(device=images.device, dtype=dtype)
    labels = torch.as_tensor(labels, device=images.device).long()
    if labels.shape != (num_images,):
        raise ValueError(f"`labels` must have shape ({num_images},), got {tuple(labels.shape)}.")
    if bool((labels < 0).any()) or bool((labels >= num_classes).any()):
        raise ValueError(f"`labels` must lie in [0, {num_classes}) for a classifier with {num_classes} classes.")
    _warn_if_not_finite(images, weights)

    ranks = []
    for start in range(0, num_images, chunk_size):
        scores = images[start : start + chunk_size] @ weights.T
        positives = labels[start : start + chunk_size, None]
        beaten_by = ~(scores < scores.gather(1, positives))
        beaten_by.scatter_(1, positives, False)
        ranks.append(1 + beaten_by.sum(dim=1))
    ranks = torch.cat(ranks)
    metrics = {f"zeroshot_top{k}": int((ranks <= k).sum()) / num_images for k in ks}
    # Per-class counts on the CPU in float64: exact for any realistic number of images, on any device.
    labels = labels.cpu()
    images_per_class = torch.bincount(labels, minlength=num_classes).double()
    hits_per_class = torch.bincount(labels, weights=(ranks == 1).cpu().double(), minlength=num_classes)
    present = images_per_class > 0
    metrics["zeroshot_balanced_accuracy"] = float((hits_per_class[present] / images_per_class[present]).mean())
    metrics["zeroshot_majority_baseline"] = float(images_per_class.max()) / num_images
    return metrics


# --------------------------------------------------------------------------------------------------------------
# Embedding a model's inputs
# --------------------------------------------------------------------------------------------------------------


def embed_batch(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], image_preprocessor
) -> tuple[torch.Tensor, ...]:
    """
    Image and text embeddings of one batch of [`ImageTextCollator`], in float32: the model's forward (every family's
    `image_embeds` and `text_embeds`, already normalised), with the collator's uint8 pixels normalised on their device
    by `image_preprocessor` as the image processor would have.

    The trainer embeds its batches with this function too, so that a model evaluated alone and inside a run sees the
    very same inputs.

    Args:
        model (`torch.nn.Module`): a `CLIPModel`, `SiglipModel`, `Siglip2Model` or `VisionTextDualEncoderModel`.
        batch (`dict[str, torch.Tensor]`): the collator's batch, on the model's device; its row information
            (`image_ids`, `class_labels`, `valid`) is not passed to the model.
        image_preprocessor ([`ImagePreprocessor`]): the preprocessor the collator resized with.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `(image_embeds, text_embeds)`, each `(batch, embed_dim)` (a batch's hard
        negatives, tokenized after its captions, are left out: see [`embed_batch_with_hard_negatives`]).
    """
    image_embeds, text_embeds, _, _ = embed_batch_with_hard_negatives(model, batch, image_preprocessor)
    return image_embeds, text_embeds


def embed_batch_with_hard_negatives(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], image_preprocessor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """
    [`embed_batch`], and the embeddings of the batch's hard negatives: the collator tokenizes them after the captions
    (`input_ids` has `batch + H` rows), so that they go through the text tower in the same forward (one forward per
    step, as DDP wants it) and come out normalised like the captions.

    Returns:
        `(image_embeds, text_embeds, hard_negatives, hard_negative_valid)`: the first two `(batch, embed_dim)`;
        `hard_negatives` `(batch, k, embed_dim)` and `hard_negative_valid` `(batch, k)` (`False` for an empty slot),
        or `None` for a batch without `hard_negative_index`.
    """
    from .collator import ROW_INFO_KEYS

    inputs = {key: value for key, value in batch.items() if key not in ROW_INFO_KEYS}
    pixels = inputs.get("pixel_values")
    if pixels is not None and pixels.dtype == torch.uint8:
        inputs["pixel_values"] = image_preprocessor.normalize(pixels, inputs.get("pixel_attention_mask"))
    outputs = model(**inputs, return_loss=False)
    image_embeds, text_embeds = outputs.image_embeds.float(), outputs.text_embeds.float()
    rows = image_embeds.shape[0]
    index = batch.get("hard_negative_index")
    if index is None:
        return image_embeds, text_embeds[:rows], None, None
    index = index.to(text_embeds.device)
    hard_negatives = text_embeds[rows:][index.clamp(min=0)]  # empty slots point at row 0 and are masked
    return image_embeds, text_embeds[:rows], hard_negatives, index >= 0


def hard_negative_scores(
    image_embeds: torch.Tensor,
    hard_negatives: torch.Tensor,
    hard_negative_valid: torch.Tensor,
    hard_negative_is_caption: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """
    Per row, the cosine similarity of its image to its best-scoring hard negative (`hard_negative_best`, -inf for a row
    without any) and whether it has any (`hard_negative_present`): what [`hard_negative_accuracy`] needs, as two
    `(batch,)` tensors that gather across processes whatever each row's number of hard negatives.

    A hard negative with the tokens of the row's own caption (`hard_negative_is_caption`, from the collator) scores
    +inf: it ties with the caption, and a tie counts against it. Scored from its embedding, it would win or lose by
    the ~1e-7 its batch's padding and shape change, and the metric would change with the evaluation batch size.
    """
    images = F.normalize(image_embeds.float(), dim=-1)
    scores = torch.einsum("bd,bkd->bk", images, F.normalize(hard_negatives.float(), dim=-1))
    scores = scores.masked_fill(~hard_negative_valid, float("-inf"))
    if hard_negative_is_caption is not None:
        scores = scores.masked_fill(hard_negative_is_caption.to(scores.device) & hard_negative_valid, float("inf"))
    best = scores.amax(dim=1) if scores.shape[1] else scores.new_full((scores.shape[0],), float("-inf"))
    return {"hard_negative_best": best, "hard_negative_present": hard_negative_valid.any(dim=1)}


def hard_negative_accuracy(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, best: torch.Tensor, present: torch.Tensor
) -> float:
    """
    The share of the rows with hard negatives whose image scores its own caption strictly above every one of its hard
    negatives (as SugarCrepe and Winoground-style tests score a model). Ties and NaN count against the caption.

    Args:
        image_embeds, text_embeds (`torch.Tensor` of shape `(N, D)`): each row's image and caption; normalised here.
        best (`torch.Tensor` of shape `(N,)`): each row's best hard-negative cosine ([`hard_negative_scores`]).
        present (`torch.Tensor` of shape `(N,)`): whether the row has hard negatives.

    Returns:
        `float` in `[0, 1]`, or NaN when no row has a hard negative.
    """
    images = _as_float(image_embeds, "image_embeds")
    texts = _as_float(text_embeds, "text_embeds").to(images.dtype)
    present = present.to(torch.bool)
    if not bool(present.any()):
        return float("nan")
    positive = (images * texts).sum(dim=1)
    wins = positive > best.to(device=positive.device, dtype=positive.dtype)
    return int((wins & present).sum()) / int(present.sum())


def normalized_features(features: Any) -> torch.Tensor:
    """`get_image_features` / `get_text_features` output as unit float32 vectors (transformers 5 returns a model output
    whose `pooler_output` is the projected embedding; older models return the tensor itself)."""
    features = getattr(features, "pooler_output", features)
    return F.normalize(features.float(), dim=-1)


def text_encoder(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    padding: str | bool,
    max_length: int,
    device: torch.device | str | None = None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    batch_size: int = 256,
) -> Callable[[list[str]], torch.Tensor]:
    """
    `encode_text` for [`build_zeroshot_classifier`]: normalised text embeddings of a list of prompts, tokenized as the
    collator tokenizes captions (the family's padding, truncated at `max_length`), in eval mode, on the CPU.

    Args:
        model (`torch.nn.Module`): a model with `get_text_features`.
        tokenizer: the caption tokenizer.
        padding (`str` or `bool`): the family's text padding (`"longest"`, or SigLIP's `"max_length"`).
        max_length (`int`): longest prompt in tokens.
        device (*optional*): where the model is; defaults to the device of its first parameter.
        context (*optional*): a context manager factory around each forward (the trainer's autocast).
        batch_size (`int`, *optional*, defaults to 256): prompts encoded at once.
    """

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        target = device if device is not None else next(model.parameters()).device
        was_training = model.training
        model.eval()
        chunks = []
        try:
            for start in range(0, len(texts), batch_size):
                tokens = tokenizer(
                    texts[start : start + batch_size],
                    padding=padding,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(target)
                with context():
                    chunks.append(normalized_features(model.get_text_features(**tokens)).cpu())
        finally:
            model.train(was_training)
        return torch.cat(chunks)

    return encode


# --------------------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------------------


class RetrievalEvaluator:
    """
    Image-text retrieval and zero-shot classification of one evaluation set: scores any model alone, or the
    embeddings a trainer has already gathered.

    - `evaluator(model, processor)` embeds every image and caption of the set with the model, batched by the project's
      [`ImageTextCollator`] (the family's caption padding, the image processor's resize and crop via
      [`ImagePreprocessor`]), on the model's device, with no trainer, and returns the metrics.
    - `evaluator.compute_metrics(embeddings, encode_text=...)` computes the same metrics from embeddings computed
      elsewhere: the trainer gathers them across processes in its evaluation loop (where it computes the loss) and
      hands them to the evaluator of that set.

    Either way the embeddings scored last stay in `evaluator.last_embeddings` (for the retrieval gallery).

    Rows showing the same image are one image to retrieval when the set has the `_image_id` column that
    [`load_image_text_data`] adds to every validation split (or name `image_id_column`); zero-shot accuracy is reported
    when it has the `_label` class-label column (or name `label_column`). Otherwise every row is its own image and
    there is no zero-shot accuracy. The metrics and their keys are those of [`METRICS`], `{prefix}_{metric}`.

    Args:
        dataset (`datasets.Dataset`): rows of an image (path, bytes, PIL image, ...) and a caption.
        name (`str`, *optional*): the set's name: its keys are `eval_{name}_{metric}`; `None` (the validation split)
            gives `eval_{metric}`.
        image_column / caption_column (`str`, *optional*, default to `"image"` / `"caption"`): the dataset's columns.
        image_id_column (`str`, *optional*): for a dataset without `_image_id`: rows with equal values in this column
            show the same image (as the command's `image_id_column`).
        hard_negative_column (`str`, *optional*): the column of each row's hard negatives (a caption or a list of
            them); when the set has it, `__call__` also reports `hard_negative_accuracy`. (Given embeddings,
            `compute_metrics` reports it whenever they include `hard_negative_best` and `hard_negative_present`.)
        label_column (`str`, *optional*): for a dataset without `_label`: the class of each row, for zero-shot
            accuracy (as the command's `label_column`).
        batch_size (`int`, *optional*, defaults to 32): rows embedded at once by `__call__`.
        zeroshot_templates (`Sequence[str]`, *optional*): prompt templates of the zero-shot classifier; defaults to
            [`DEFAULT_ZEROSHOT_TEMPLATES`].
        chunk_size (`int`, *optional*, defaults to 1024): queries ranked at once (see [`retrieval_metrics`]).
        max_seq_length (`int`, *optional*): longest caption in tokens; defaults to the text tower's positions (capped
            at the tokenizer's `model_max_length`), as the command's default.
        max_image_pixels, jpeg_draft: the collator's decoding settings (see [`ImageTextCollator`]).
        num_workers (`int`, *optional*, defaults to 0): DataLoader worker processes of `__call__`.

    Example:

    ```python
    >>> from transformers import AutoModel, AutoProcessor
    >>> from clip_trainer import DataArguments, RetrievalEvaluator, load_image_text_data

    >>> data_args = DataArguments(validation_file="val.csv", label_column="label")
    >>> data = load_image_text_data(data_args, seed=42, train=False)
    >>> evaluator = RetrievalEvaluator(data.validation, batch_size=64)
    >>> metrics = evaluator(AutoModel.from_pretrained("openai/clip-vit-base-patch32"),
    ...                     AutoProcessor.from_pretrained("openai/clip-vit-base-patch32"))
    >>> metrics["eval_t2i_recall@1"]
    ```
    """

    def __init__(
        self,
        dataset: Any,
        name: str | None = None,
        *,
        image_column: str = "image",
        caption_column: str = "caption",
        image_id_column: str | None = None,
        label_column: str | None = None,
        hard_negative_column: str | None = None,
        batch_size: int = 32,
        zeroshot_templates: Sequence[str] | None = None,
        chunk_size: int = 1024,
        max_seq_length: int | None = None,
        max_image_pixels: int | None = 89_478_485,
        jpeg_draft: bool = False,
        num_workers: int = 0,
    ) -> None:
        from .data import IMAGE_ID_COLUMN, LABEL_COLUMN, add_class_labels, add_image_ids, class_names_of

        if batch_size < 1 or chunk_size < 1:
            raise ValueError(f"`batch_size` and `chunk_size` must be positive, got {batch_size} and {chunk_size}.")
        columns = list(getattr(dataset, "column_names", None) or [])
        if image_id_column is not None and IMAGE_ID_COLUMN not in columns:
            dataset = add_image_ids(dataset, image_column, image_id_column)
        if label_column is not None and LABEL_COLUMN not in columns:
            dataset = add_class_labels(dataset, label_column)
        self.dataset = dataset
        self.name = name
        self.image_column = image_column
        self.caption_column = caption_column
        self.hard_negative_column = hard_negative_column
        self.batch_size = batch_size
        self.zeroshot_templates = list(zeroshot_templates or DEFAULT_ZEROSHOT_TEMPLATES)
        self.chunk_size = chunk_size
        self.max_seq_length = max_seq_length
        self.max_image_pixels = max_image_pixels
        self.jpeg_draft = jpeg_draft
        self.num_workers = num_workers
        self.class_names = class_names_of(dataset) if hasattr(dataset, "features") else None
        # Whether `compute_metrics` keeps the embeddings it scored (the trainer keeps them on its main process only).
        self.keep_embeddings = True
        self.last_embeddings: dict[str, Any] | None = None
        # The dataset's caption column, read once when the metrics first need the caption texts (`_row_captions`).
        self._captions: tuple[Any, list[Any]] | None = None

    @property
    def metric_key_prefix(self) -> str:
        """`eval` for the validation split, `eval_{name}` for a named set."""
        return "eval" if self.name is None else f"eval_{self.name}"

    def __repr__(self) -> str:
        rows = len(self.dataset) if hasattr(self.dataset, "__len__") else "?"
        return f"{type(self).__name__}(name={self.name!r}, rows={rows}, batch_size={self.batch_size})"

    def __call__(self, model: torch.nn.Module, processor: Any) -> dict[str, float]:
        """
        Embeds the set with `model` and returns its metrics.

        Args:
            model (`torch.nn.Module`): a CLIP, SigLIP, SigLIP 2 or vision-text dual encoder model, on any device.
            processor: its processor (a `tokenizer` and an `image_processor`).

        Returns:
            `dict[str, float]`: `{prefix}_{metric}` for the metrics of [`METRICS`] the evaluator computes (the
            zero-shot ones when the set has class labels).

        Raises:
            `ValueError`: when fewer than two rows of the set can be used (their images or captions are unusable).
        """
        from torch.utils.data import DataLoader

        from .collator import ImageTextCollator
        from .modeling import max_text_positions, model_family

        family = model_family(model.config)
        tokenizer = processor.tokenizer
        max_length = self.max_seq_length or min(max_text_positions(model.config), tokenizer.model_max_length)
        collator = ImageTextCollator.from_processor(
            processor,
            max_seq_length=max_length,
            image_column=self.image_column,
            caption_column=self.caption_column,
            max_image_pixels=self.max_image_pixels,
            jpeg_draft=self.jpeg_draft,
            padding=family.text_padding,
            hard_negative_column=self.hard_negative_column,
            row_image_ids=False,
        )
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collator, num_workers=self.num_workers
        )
        device = next(model.parameters()).device
        collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in loader:
                    batch = {key: value.to(device) for key, value in batch.items()}
                    image_embeds, text_embeds, hard, hard_valid = embed_batch_with_hard_negatives(
                        model, batch, collator.image_preprocessor
                    )
                    collected["image_embeds"].append(image_embeds.cpu())
                    collected["text_embeds"].append(text_embeds.cpu())
                    if hard is not None:
                        scores = hard_negative_scores(
                            image_embeds, hard, hard_valid, batch.get("hard_negative_is_caption")
                        )
                        for key, value in scores.items():
                            collected[key].append(value.cpu())
                    for key in ("image_ids", "class_labels", "valid"):
                        if key in batch:
                            collected[key].append(batch[key].cpu())
        finally:
            model.train(was_training)
        embeddings = {key: torch.cat(values) for key, values in collected.items()}
        valid = embeddings.pop("valid")
        embeddings = {key: value[valid] for key, value in embeddings.items()}
        embeddings["rows"] = torch.arange(len(valid))[valid]
        usable = int(valid.sum())
        if usable < 2:
            set_name = "the validation split" if self.name is None else f"evaluation set {self.name!r}"
            raise ValueError(
                f"{set_name} has {usable} usable pair(s) of {len(valid)} (the warnings above name the others); "
                "retrieval needs at least 2: fix or replace those files."
            )
        encode = text_encoder(model, tokenizer, padding=family.text_padding, max_length=max_length, device=device)
        metrics = self.compute_metrics(embeddings, encode_text=encode)
        if usable < len(valid):  # the metrics are over the usable pairs; how many were not, beside them
            metrics[f"{self.metric_key_prefix}_unusable_pairs"] = len(valid) - usable
        return metrics

    def compute_metrics(
        self,
        embeddings: dict[str, torch.Tensor],
        encode_text: Callable[[list[str]], torch.Tensor] | None = None,
        metric_key_prefix: str | None = None,
    ) -> dict[str, float]:
        """
        The set's metrics from embeddings computed already (the usable rows only).

        Args:
            embeddings (`dict[str, torch.Tensor]`): `image_embeds` and `text_embeds` (`(N, D)`), and when the set has
                them `image_ids` and `class_labels` (`(N,)`, -1 for a row without a class); `rows`, the dataset row
                of each, is kept for the gallery.
            encode_text (`Callable[[list[str]], torch.Tensor]`, *optional*): the model's text embeddings of a list of
                prompts (see [`text_encoder`]); needed for zero-shot accuracy when the set has class labels.
            metric_key_prefix (`str`, *optional*): the keys' prefix; defaults to [`metric_key_prefix`].

        Returns:
            `dict[str, float]`: `{prefix}_{metric}` for each retrieval metric, and the zero-shot ones when the set has
            class names and at least one labelled row.

        Rows of one image (equal `image_ids`) are scored with one image embedding, and rows with the same caption text
        (read from the set's caption column at `rows`) with one text embedding (see [`share_embeddings`]), so that the
        metrics do not depend on how the rows were batched. Zero-shot accuracy scores each labelled image once (see
        [`zeroshot_rows`]).
        """
        prefix = metric_key_prefix or self.metric_key_prefix
        embeddings = self._shared_embeddings(embeddings)
        images, texts = embeddings["image_embeds"], embeddings["text_embeds"]
        image_ids = embeddings.get("image_ids")
        metrics = retrieval_metrics(images, texts, image_ids, ks=RECALL_KS, chunk_size=self.chunk_size)
        best, present = embeddings.get("hard_negative_best"), embeddings.get("hard_negative_present")
        if best is not None and present is not None and bool(present.any()):
            metrics["hard_negative_accuracy"] = hard_negative_accuracy(images, texts, best, present)
        labels = embeddings.get("class_labels")
        classifier = None
        if self.class_names and labels is not None and bool((labels >= 0).any()):
            if encode_text is None:
                raise ValueError(
                    "This set has class labels, and zero-shot accuracy needs the model's text embeddings: pass "
                    "`encode_text` (see `clip_trainer.evaluation.text_encoder`)."
                )
            classifier = build_zeroshot_classifier(encode_text, self.class_names, self.zeroshot_templates)
            # Each labelled image once, however many captions (rows) it has.
            rows, classes = zeroshot_rows(labels, image_ids)
            metrics.update(
                zeroshot_accuracy(
                    images[rows.to(images.device)], classes, classifier, ks=ZEROSHOT_KS, chunk_size=self.chunk_size
                )
            )
        if self.keep_embeddings:
            # The embeddings scored, each image's and each caption text's one embedding.
            self.last_embeddings = {**embeddings, **({"classifier": classifier} if classifier is not None else {})}
        return {f"{prefix}_{key}": value for key, value in metrics.items()}

    def _shared_embeddings(self, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`embeddings` with one image embedding per image id and one text embedding per caption text."""
        shared = dict(embeddings)
        if embeddings.get("image_ids") is not None:
            shared["image_embeds"] = share_embeddings(embeddings["image_embeds"], embeddings["image_ids"])
        captions = self._row_captions(embeddings.get("rows"))
        if captions is not None:
            shared["text_embeds"] = share_embeddings(embeddings["text_embeds"], captions)
        return shared

    def _row_captions(self, rows: torch.Tensor | None) -> list[Hashable] | None:
        """The caption text of each of the dataset's `rows` as the collator tokenized it (stripped), or `None` when
        the rows or the set's caption column are unknown (then every row keeps its own text embedding)."""
        from datasets import Dataset, IterableDataset

        from .errors import BadSampleError
        from .rows import check_caption

        dataset = self.dataset
        if rows is None or isinstance(dataset, IterableDataset | torch.utils.data.IterableDataset):
            return None  # a stream's rows cannot be read again by position
        rows = rows.tolist()
        if isinstance(dataset, Dataset):
            if self.caption_column not in dataset.column_names:
                return None
            if self._captions is None or self._captions[0] is not dataset:
                # The column read at once from Arrow: reading the dataset row by row would decode every image.
                table = dataset.select_columns([self.caption_column]).with_format(None)
                self._captions = (dataset, table.to_dict()[self.caption_column])
            values = [self._captions[1][row] for row in rows]
        elif hasattr(dataset, "__getitem__"):  # a map-style torch dataset of row dicts, as the collator reads them
            values = [dataset[row].get(self.caption_column) for row in rows]
        else:
            return None
        keys: list[Hashable] = []
        for row, value in zip(rows, values):
            try:
                keys.append(check_caption(value))
            except BadSampleError:  # not a usable caption (its row was left out): a key no caption text equals
                keys.append(("row", row))
        return keys
