"""Evaluation maths for CLIP: image-text retrieval and zero-shot classification over precomputed embeddings.

Everything here is a plain function of tensors, so it is testable without a model or a trainer. The trainer collects
the embeddings of the whole evaluation set and calls these functions once, on every process or on the main one.

Conventions shared by all metrics:

- **Ranks are 1-based and ties count against the positive.** The rank of a positive is `1 +` the number of
  non-positive candidates whose score is greater than *or equal to* the positive's score. A NaN score is treated the
  same way (it is never "strictly lower"), so a diverged model cannot report a good score. We chose the pessimistic
  convention because the optimistic one rewards collapse: a model mapping every input to the same vector would get
  a perfect recall@1, whereas here it gets the worst possible rank.
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

from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_ZEROSHOT_TEMPLATES",
    "RETRIEVAL_METRIC_NAMES",
    "ZEROSHOT_METRIC_NAMES",
    "build_zeroshot_classifier",
    "retrieval_metrics",
    "zeroshot_accuracy",
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

RETRIEVAL_METRIC_NAMES: tuple[str, ...] = (
    *(f"{direction}_recall@{k}" for direction in ("i2t", "t2i") for k in (1, 5, 10)),
    "i2t_median_rank",
    "t2i_median_rank",
    "mean_recall",
)
"""The keys [`retrieval_metrics`] returns with its default `ks`; the trainer logs them with an `eval_` prefix."""
ZEROSHOT_METRIC_NAMES: tuple[str, ...] = (
    "zeroshot_top1",
    "zeroshot_top5",
    "zeroshot_balanced_accuracy",
    "zeroshot_majority_baseline",
)
"""The keys [`zeroshot_accuracy`] returns with its default `ks`."""


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


def _group_rows(image_ids: Sequence[Hashable] | torch.Tensor | None, num_rows: int) -> tuple[list[int], list[int]]:
    """Returns, for each row, the index of its unique image, and for each unique image, the first row showing it."""
    if image_ids is None:
        return list(range(num_rows)), list(range(num_rows))
    # Tensors and numpy arrays hash per element only after conversion to python scalars.
    ids = image_ids.tolist() if hasattr(image_ids, "tolist") else list(image_ids)
    if len(ids) != num_rows:
        raise ValueError(f"`image_ids` has {len(ids)} entries but the embeddings have {num_rows} rows.")
    group_of_id: dict[Hashable, int] = {}
    row_to_group, first_rows = [], []
    for row, image_id in enumerate(ids):
        group = group_of_id.get(image_id)
        if group is None:
            group = group_of_id[image_id] = len(first_rows)
            first_rows.append(row)
        row_to_group.append(group)
    return row_to_group, first_rows


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

    Returns:
        `torch.Tensor` of shape `(C, D)`: one unit-norm row per class, float32 (float64 if `encode_text` returns
        float64), on the device of the embeddings `encode_text` returns.
    """
    if len(class_names) == 0:
        raise ValueError("`class_names` is empty; zero-shot classification needs at least one class.")
    if len(templates) == 0:
        raise ValueError("`templates` is empty; pass at least one template such as 'a photo of a {}.'.")
    for template in templates:
        # Without a placeholder every class would get the same prompt and the classifier would silently be chance.
        if "{}" not in template:
            raise ValueError(f"Template {template!r} has no '{{}}' placeholder for the class name.")

    weights = []
    with torch.no_grad():
        for name in class_names:
            prompts = [template.format(name) for template in templates]
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
