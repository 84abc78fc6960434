"""Tests for the evaluation maths: exact ranks on constructed embeddings, a brute-force reference, and a 2-process
gather on CPU."""

from __future__ import annotations

import logging
import os
import socket
import statistics
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from clip_trainer.evaluation import (
    DEFAULT_ZEROSHOT_TEMPLATES,
    build_zeroshot_classifier,
    retrieval_metrics,
    zeroshot_accuracy,
)

RETRIEVAL_KEYS = [
    "i2t_recall@1",
    "i2t_recall@5",
    "i2t_recall@10",
    "t2i_recall@1",
    "t2i_recall@5",
    "t2i_recall@10",
    "i2t_median_rank",
    "t2i_median_rank",
    "mean_recall",
]


# ---------------------------------------------------------------------------------------------------------------------
# Independent reference: python loops over a full float64 similarity matrix.
# ---------------------------------------------------------------------------------------------------------------------


def reference_ranks(image_embeds, text_embeds, image_ids=None):
    """Per-query ranks, ties counted against the positive; returns (i2t ranks per unique image, t2i ranks per caption)."""
    images = image_embeds.double() / image_embeds.double().norm(dim=1, keepdim=True)
    texts = text_embeds.double() / text_embeds.double().norm(dim=1, keepdim=True)
    num_rows = len(texts)
    ids = list(range(num_rows)) if image_ids is None else list(image_ids)
    image_of_id, first_rows = {}, []
    for row, image_id in enumerate(ids):
        if image_id not in image_of_id:
            image_of_id[image_id] = len(first_rows)
            first_rows.append(row)
    image_of_row = [image_of_id[image_id] for image_id in ids]
    similarity = (texts @ images[first_rows].T).tolist()  # (captions, unique images)
    num_images = len(first_rows)

    t2i = []
    for caption in range(num_rows):
        positive = image_of_row[caption]
        score = similarity[caption][positive]
        t2i.append(
            1 + sum(1 for image in range(num_images) if image != positive and similarity[caption][image] >= score)
        )
    i2t = []
    for image in range(num_images):
        positives = {caption for caption in range(num_rows) if image_of_row[caption] == image}
        best = max(similarity[caption][image] for caption in positives)
        i2t.append(
            1
            + sum(1 for caption in range(num_rows) if caption not in positives and similarity[caption][image] >= best)
        )
    return i2t, t2i


def reference_metrics(image_embeds, text_embeds, image_ids=None, ks=(1, 5, 10)):
    i2t, t2i = reference_ranks(image_embeds, text_embeds, image_ids)
    metrics = {}
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            metrics[f"{direction}_recall@{k}"] = sum(rank <= k for rank in ranks) / len(ranks)
    metrics["i2t_median_rank"] = float(statistics.median(i2t))
    metrics["t2i_median_rank"] = float(statistics.median(t2i))
    recalls = [value for key, value in metrics.items() if "recall@" in key]
    metrics["mean_recall"] = sum(recalls) / len(recalls)
    return metrics


def assert_metrics_equal(actual, expected):
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key


def random_pairs(num_images=20, dim=8, seed=0, max_captions=5, noisy_duplicates=False, quantised=False):
    """Rows of (image, caption) pairs in shuffled order, 1 to `max_captions` captions per image, float64.

    `quantised` draws vectors with four entries of +-0.5: unit norm exactly and dot products in multiples of 1/4, so
    there are many exact ties and every summation order gives the same float.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(num):
        if not quantised:
            return torch.randn(num, dim, generator=generator, dtype=torch.float64)
        vectors = torch.zeros(num, dim, dtype=torch.float64)
        for row in range(num):
            columns = torch.randperm(dim, generator=generator)[:4]
            signs = torch.randint(0, 2, (4,), generator=generator) * 2 - 1
            vectors[row, columns] = 0.5 * signs.double()
        return vectors

    counts = torch.randint(1, max_captions + 1, (num_images,), generator=generator)
    image_ids = torch.arange(num_images).repeat_interleave(counts)
    image_ids = image_ids[torch.randperm(len(image_ids), generator=generator)]
    num_rows = len(image_ids)
    images = draw(num_images)
    # Captions lie near (gaussian) or half of the time on (quantised) their image, so recalls are neither 0 nor 1.
    if quantised:
        texts = draw(num_rows)
        matched = torch.rand(num_rows, generator=generator) < 0.5
        texts[matched] = images[image_ids[matched]]
    else:
        texts = images[image_ids] + 1.5 * draw(num_rows)
    image_embeds = images[image_ids]
    if noisy_duplicates:
        # Only the first row of each image may be used; make the others different so that a wrong choice shows.
        first_rows = {}
        for row, image_id in enumerate(image_ids.tolist()):
            first_rows.setdefault(image_id, row)
        later_rows = torch.tensor(sorted(set(range(num_rows)) - set(first_rows.values())))
        image_embeds[later_rows] = draw(len(later_rows))
    return image_embeds, texts, image_ids


# ---------------------------------------------------------------------------------------------------------------------
# Constructed cases with known ranks.
# ---------------------------------------------------------------------------------------------------------------------


def t2i_case(ranks):
    """One image per caption, images one-hot: caption n's score for image j is its j-th coordinate. Its own image
    scores 0, `rank - 1` other images score 1 and the rest -1."""
    num = len(ranks)
    texts = -torch.ones(num, num)
    for caption, rank in enumerate(ranks):
        texts[caption, caption] = 0.0
        others = [image for image in range(num) if image != caption][: rank - 1]
        texts[caption, others] = 1.0
    return torch.eye(num), texts


def i2t_case(ranks, captions_per_image=3):
    """Captions one-hot, so image g's score for caption n is its n-th coordinate. The best positive is the image's
    second caption (0); its other captions score below some negatives (-0.5, -2), `rank - 1` negatives score 1 and
    the rest -1. Rows after the first of each image carry a decoy embedding that must be ignored."""
    num_images, num_rows = len(ranks), len(ranks) * captions_per_image
    image_ids = torch.arange(num_images).repeat_interleave(captions_per_image)
    image_embeds = torch.full((num_rows, num_rows), 5.0)  # decoy: ties everything
    for image, rank in enumerate(ranks):
        positives = list(range(image * captions_per_image, (image + 1) * captions_per_image))
        row = -torch.ones(num_rows)
        row[positives] = torch.tensor([-0.5, 0.0, -2.0])
        negatives = [caption for caption in range(num_rows) if caption not in positives]
        row[negatives[: rank - 1]] = 1.0
        image_embeds[positives[0]] = row
    return image_embeds, torch.eye(num_rows), image_ids


def test_perfect_retrieval_one_caption_per_image():
    embeds = torch.eye(6)
    metrics = retrieval_metrics(embeds, embeds.clone())
    assert list(metrics) == RETRIEVAL_KEYS
    assert all(isinstance(value, float) for value in metrics.values())
    assert metrics == dict.fromkeys(RETRIEVAL_KEYS, 1.0)


def test_perfect_retrieval_five_captions_per_image_needs_the_deduplicated_gallery():
    # Captions equal to their image: with a gallery of one entry per row, each caption's image would tie with its own
    # four copies and (ties counting against) rank 5.
    images = torch.eye(4).repeat_interleave(5, dim=0)
    metrics = retrieval_metrics(images, images.clone(), image_ids=torch.arange(4).repeat_interleave(5))
    assert metrics == dict.fromkeys(RETRIEVAL_KEYS, 1.0)


def test_text_to_image_known_ranks():
    ranks = [1, 2, 3, 6, 11, 1, 1, 2, 12, 4, 1, 7]
    images, texts = t2i_case(ranks)
    metrics = retrieval_metrics(images, texts)
    assert metrics["t2i_recall@1"] == 4 / 12
    assert metrics["t2i_recall@5"] == 8 / 12
    assert metrics["t2i_recall@10"] == 10 / 12
    # Sorted ranks 1 1 1 1 2 [2 3] 4 6 7 11 12: the mean of the two middle ones.
    assert metrics["t2i_median_rank"] == 2.5
    assert reference_ranks(images, texts)[1] == ranks


def test_image_to_text_known_ranks_with_several_captions_per_image():
    ranks = [1, 2, 3, 6, 11]
    image_embeds, text_embeds, image_ids = i2t_case(ranks)
    metrics = retrieval_metrics(image_embeds, text_embeds, image_ids=image_ids)
    # A hit needs only one caption in the top k: image 0's first caption ranks behind its second one, yet it is a hit.
    assert metrics["i2t_recall@1"] == 1 / 5
    assert metrics["i2t_recall@5"] == 3 / 5
    assert metrics["i2t_recall@10"] == 4 / 5
    assert metrics["i2t_median_rank"] == 3.0
    assert reference_ranks(image_embeds, text_embeds, image_ids.tolist())[0] == ranks


def test_recall_at_k_beyond_gallery_size_is_one():
    images, texts = t2i_case([1, 3, 3])
    metrics = retrieval_metrics(images, texts, ks=(1, 2, 50))
    assert metrics["t2i_recall@1"] == 1 / 3
    assert metrics["t2i_recall@2"] == 1 / 3
    assert metrics["t2i_recall@50"] == 1.0
    assert list(metrics) == [
        "i2t_recall@1",
        "i2t_recall@2",
        "i2t_recall@50",
        "t2i_recall@1",
        "t2i_recall@2",
        "t2i_recall@50",
        "i2t_median_rank",
        "t2i_median_rank",
        "mean_recall",
    ]
    assert metrics["mean_recall"] == pytest.approx(sum(metrics[key] for key in list(metrics)[:6]) / 6)


# ---------------------------------------------------------------------------------------------------------------------
# Ties count against the positive.
# ---------------------------------------------------------------------------------------------------------------------


def test_ties_count_against_the_positive_text_to_image():
    images = torch.eye(4)
    texts = torch.eye(4)
    # Caption 0: image 3 scores higher (2), images 1 and 2 tie with the positive (1): rank 1 + 1 + 2 = 4.
    texts[0] = torch.tensor([1.0, 1.0, 1.0, 2.0])
    metrics = retrieval_metrics(images, texts, ks=(1, 3, 4))
    assert metrics["t2i_recall@1"] == 3 / 4
    assert metrics["t2i_recall@3"] == 3 / 4
    assert metrics["t2i_recall@4"] == 1.0
    assert metrics["t2i_median_rank"] == 1.0
    assert reference_ranks(images, texts)[1] == [4, 1, 1, 1]


def test_ties_count_against_the_positive_image_to_text():
    # Image 0 has captions 0 and 1, image 1 has captions 2 and 3; captions one-hot.
    texts = torch.eye(4)
    image_ids = [0, 0, 1, 1]
    images = torch.zeros(4, 4)
    images[0] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # its two captions tie with each other: positives never count
    images[2] = torch.tensor([0.0, 1.0, 1.0, 0.0])  # best positive (caption 2) ties with caption 1, a negative
    metrics = retrieval_metrics(images, texts, image_ids=image_ids, ks=(1, 2))
    assert metrics["i2t_recall@1"] == 1 / 2
    assert metrics["i2t_recall@2"] == 1.0
    assert metrics["i2t_median_rank"] == 1.5
    assert reference_ranks(images, texts, image_ids)[0] == [1, 2]


def test_collapsed_embeddings_get_the_worst_ranks():
    # The optimistic convention would score a model that maps everything to one vector as perfect.
    embeds = torch.ones(12, 3)
    image_ids = torch.arange(4).repeat_interleave(3)
    metrics = retrieval_metrics(embeds, embeds.clone(), image_ids=image_ids)
    assert metrics["t2i_median_rank"] == 4.0  # every other image (3) beats each caption
    assert metrics["i2t_median_rank"] == 10.0  # every negative caption (9) beats each image
    assert metrics["t2i_recall@1"] == metrics["i2t_recall@1"] == metrics["i2t_recall@5"] == 0.0


def test_nan_scores_count_against_the_positive(caplog):
    images = torch.eye(4)
    images[3] = float("nan")
    with caplog.at_level(logging.WARNING):
        metrics = retrieval_metrics(images, torch.eye(4), ks=(1, 2))
    assert "NaN" in caplog.text
    # The NaN image sits ahead of every caption's positive (ranks 2, 2, 2) and its own caption ranks last (4).
    assert metrics["t2i_recall@1"] == 0.0
    assert metrics["t2i_recall@2"] == 3 / 4
    assert metrics["t2i_median_rank"] == 2.0
    # Image to text: images 0-2 are fine; the NaN image ranks behind its 3 negatives.
    assert metrics["i2t_recall@1"] == 3 / 4
    assert metrics["i2t_median_rank"] == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Equivalences: chunking, the reference, input types.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantised", [False, True], ids=["gaussian", "exact-ties"])
def test_chunk_size_does_not_change_the_result(quantised):
    image_embeds, text_embeds, image_ids = random_pairs(quantised=quantised)
    num_rows = len(image_ids)
    results = [
        retrieval_metrics(image_embeds, text_embeds, image_ids, chunk_size=chunk_size)
        for chunk_size in (1, 3, num_rows, num_rows + 7)
    ]
    assert all(result == results[0] for result in results[1:])


@pytest.mark.parametrize(
    "seed, noisy_duplicates, quantised",
    [(0, False, False), (1, True, False), (2, False, True), (3, True, True)],
    ids=["gaussian", "noisy-duplicates", "exact-ties", "exact-ties-noisy-duplicates"],
)
def test_matches_brute_force_reference(seed, noisy_duplicates, quantised):
    image_embeds, text_embeds, image_ids = random_pairs(
        seed=seed, noisy_duplicates=noisy_duplicates, quantised=quantised
    )
    expected = reference_metrics(image_embeds, text_embeds, image_ids.tolist())
    # Sanity: the random data is neither trivial nor hopeless.
    assert 0.0 < expected["t2i_recall@1"] < 1.0
    assert_metrics_equal(retrieval_metrics(image_embeds, text_embeds, image_ids, chunk_size=7), expected)


def test_float32_input_matches_reference():
    image_embeds, text_embeds, image_ids = random_pairs(seed=4)
    expected = reference_metrics(image_embeds, text_embeds, image_ids.tolist())
    assert_metrics_equal(retrieval_metrics(image_embeds.float(), text_embeds.float(), image_ids), expected)


def test_half_precision_is_ranked_in_float32():
    image_embeds, text_embeds, image_ids = random_pairs(seed=5)
    image_embeds, text_embeds = image_embeds.bfloat16(), text_embeds.bfloat16()
    assert retrieval_metrics(image_embeds, text_embeds, image_ids) == retrieval_metrics(
        image_embeds.float(), text_embeds.float(), image_ids
    )


def test_unnormalised_inputs_are_normalised():
    image_embeds, text_embeds, image_ids = random_pairs(seed=6)
    scale = torch.rand(len(image_ids), 1, dtype=torch.float64) * 10 + 0.1
    assert_metrics_equal(
        retrieval_metrics(image_embeds * scale, text_embeds / scale, image_ids),
        retrieval_metrics(image_embeds, text_embeds, image_ids),
    )


def test_image_id_types_are_interchangeable():
    image_embeds, text_embeds, image_ids = random_pairs(seed=7)
    expected = retrieval_metrics(image_embeds, text_embeds, image_ids)
    as_strings = [f"COCO_val2014_{image_id:012d}.jpg" for image_id in image_ids.tolist()]
    assert retrieval_metrics(image_embeds, text_embeds, as_strings) == expected
    assert retrieval_metrics(image_embeds, text_embeds, image_ids.numpy()) == expected
    assert retrieval_metrics(image_embeds, text_embeds, image_ids.tolist()) == expected


def test_no_image_ids_means_one_image_per_row():
    image_embeds, text_embeds, _ = random_pairs(seed=8)
    assert retrieval_metrics(image_embeds, text_embeds) == retrieval_metrics(
        image_embeds, text_embeds, list(range(len(image_embeds)))
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_embeds": torch.eye(3), "text_embeds": torch.eye(4)}, "same shape"),
        ({"image_embeds": torch.ones(3), "text_embeds": torch.ones(3)}, "shape"),
        ({"image_embeds": torch.eye(3), "text_embeds": torch.eye(3), "image_ids": [0, 1]}, "image_ids"),
        ({"image_embeds": torch.eye(3), "text_embeds": torch.eye(3), "ks": (0, 5)}, "ks"),
        ({"image_embeds": torch.eye(3), "text_embeds": torch.eye(3), "chunk_size": 0}, "chunk_size"),
        ({"image_embeds": torch.zeros(0, 3), "text_embeds": torch.zeros(0, 3)}, "empty"),
    ],
)
def test_retrieval_rejects_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Zero-shot classification.
# ---------------------------------------------------------------------------------------------------------------------


def test_build_zeroshot_classifier_normalises_each_prompt_before_averaging():
    vectors = {
        "a photo of a cat.": torch.tensor([10.0, 0.0, 0.0]),
        "a drawing of a cat.": torch.tensor([0.0, 1.0, 0.0]),
        "a photo of a dog.": torch.tensor([0.0, 0.0, 3.0]),
        "a drawing of a dog.": torch.tensor([0.0, 0.0, 0.5]),
    }
    calls = []

    def encode_text(prompts):
        calls.append(prompts)
        return torch.stack([vectors[prompt] for prompt in prompts])

    classifier = build_zeroshot_classifier(encode_text, ["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."])
    assert calls == [["a photo of a cat.", "a drawing of a cat."], ["a photo of a dog.", "a drawing of a dog."]]
    # Averaging raw embeddings would give mostly the first axis for "cat"; normalised ones weigh both prompts equally.
    expected = torch.tensor([[2**-0.5, 2**-0.5, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(classifier, expected)
    assert classifier.dtype == torch.float32


def test_default_templates_each_have_one_placeholder():
    assert 6 <= len(DEFAULT_ZEROSHOT_TEMPLATES) <= 10
    assert all(template.count("{}") == 1 for template in DEFAULT_ZEROSHOT_TEMPLATES)
    classifier = build_zeroshot_classifier(lambda prompts: torch.randn(len(prompts), 4), ["a", "b", "c"])
    assert classifier.shape == (3, 4)
    torch.testing.assert_close(classifier.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize(
    "templates, message", [(["a photo"], "placeholder"), ([], "templates"), (["{}"] * 2, None)], ids=str
)
def test_build_zeroshot_classifier_validates(templates, message):
    encode_text = lambda prompts: torch.ones(len(prompts), 2)  # noqa: E731
    if message is None:
        assert build_zeroshot_classifier(encode_text, ["x"], templates).shape == (1, 2)
    else:
        with pytest.raises(ValueError, match=message):
            build_zeroshot_classifier(encode_text, ["x"], templates)
    with pytest.raises(ValueError, match="class_names"):
        build_zeroshot_classifier(encode_text, [], ["{}"])
    with pytest.raises(ValueError, match="encode_text"):
        build_zeroshot_classifier(lambda prompts: torch.ones(1, 2), ["x"], ["{}", "a {}"])


def test_zeroshot_accuracy_known_ranks():
    # Classifier one-hot: image n's score for class c is its c-th coordinate. True class 0 scores 0, `rank - 1`
    # other classes 1, the rest -1.
    ranks = [1, 2, 5, 6, 7, 1]
    num_classes = 7
    labels = torch.tensor([0, 3, 6, 2, 1, 4])
    images = -torch.ones(len(ranks), num_classes)
    for image, (rank, label) in enumerate(zip(ranks, labels.tolist())):
        images[image, label] = 0.0
        others = [c for c in range(num_classes) if c != label][: rank - 1]
        images[image, others] = 1.0
    metrics = zeroshot_accuracy(images, labels, torch.eye(num_classes))
    # Six classes of seven occur, one image each: balanced accuracy is top-1 here; class 5 has no image.
    assert metrics == {
        "zeroshot_top1": 2 / 6,
        "zeroshot_top5": 4 / 6,
        "zeroshot_balanced_accuracy": 2 / 6,
        "zeroshot_majority_baseline": 1 / 6,
    }
    assert zeroshot_accuracy(images, labels.tolist(), torch.eye(num_classes), chunk_size=1) == metrics


def test_zeroshot_ties_count_against_and_top_k_caps_at_num_classes():
    classifier = torch.eye(3)
    images = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # image 0 ties classes 0 and 1
    metrics = zeroshot_accuracy(images, [0, 0, 2], classifier, ks=(1, 2, 5))
    assert metrics == {
        "zeroshot_top1": 2 / 3,
        "zeroshot_top2": 1.0,
        "zeroshot_top5": 1.0,
        "zeroshot_balanced_accuracy": (1 / 2 + 1) / 2,  # the tie is a miss for class 0; class 1 has no image
        "zeroshot_majority_baseline": 2 / 3,
    }
    with pytest.raises(ValueError, match="labels"):
        zeroshot_accuracy(images, [0, 3, 2], classifier)


def test_zeroshot_end_to_end_with_fake_text_encoder():
    # Each class name owns one axis; every template of it maps there (with prompt-specific scale and noise).
    class_names = ["cat", "dog", "car", "tree", "boat", "cup"]

    def encode_text(prompts):
        rows = []
        for prompt in prompts:
            name = next(name for name in class_names if f" {name}." in prompt)
            row = torch.zeros(len(class_names))
            row[class_names.index(name)] = 1.0 + len(prompt)
            rows.append(row)
        return torch.stack(rows)

    classifier = build_zeroshot_classifier(encode_text, class_names)
    torch.testing.assert_close(classifier, torch.eye(len(class_names)))
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    images = torch.eye(len(class_names))[labels] * 3.0
    images[6] = torch.tensor([0.5, 1.0, 0.0, 0.0, 0.0, 0.0])  # true class "cat" comes second
    images[7] = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])  # true class "dog" comes second
    assert zeroshot_accuracy(images, labels, classifier) == {
        "zeroshot_top1": 6 / 8,
        "zeroshot_top5": 1.0,
        "zeroshot_balanced_accuracy": (1 / 2 + 1 / 2 + 4) / 6,
        "zeroshot_majority_baseline": 2 / 8,
    }


def _balanced_and_majority_numpy(
    images: np.ndarray, labels: np.ndarray, classifier: np.ndarray
) -> tuple[float, float]:
    """Balanced accuracy and majority baseline written out in float64, class by class."""
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    classifier = classifier / np.linalg.norm(classifier, axis=1, keepdims=True)
    predicted = np.argmax(images @ classifier.T, axis=1)
    recalls = []
    for label in sorted(set(labels.tolist())):  # only the classes that occur among the rows
        rows = labels == label
        recalls.append(float(np.mean(predicted[rows] == label)))
    counts = np.bincount(labels)
    return float(np.mean(recalls)), float(counts.max() / len(labels))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zeroshot_balanced_accuracy_and_majority_baseline_match_numpy(seed):
    generator = np.random.default_rng(seed)
    num_classes, dim = 9, 16
    # Unbalanced, as real class labels are: class 0 has half the images, classes 7 and 8 none.
    labels = generator.choice(7, size=200, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.02])
    classifier = generator.standard_normal((num_classes, dim))
    images = classifier[labels] + 1.5 * generator.standard_normal((len(labels), dim))
    metrics = zeroshot_accuracy(torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(classifier))
    balanced, majority = _balanced_and_majority_numpy(images, labels, classifier)
    assert metrics["zeroshot_balanced_accuracy"] == pytest.approx(balanced, abs=1e-12)
    assert metrics["zeroshot_majority_baseline"] == pytest.approx(majority, abs=1e-12)
    assert 0 < balanced < 1 and balanced != pytest.approx(metrics["zeroshot_top1"])  # not top-1 under another name
    # Always answering the largest class: top-1 equals the baseline, balanced accuracy is 1 / classes present.
    constant = np.tile(classifier[np.bincount(labels).argmax()], (len(labels), 1))
    metrics = zeroshot_accuracy(torch.from_numpy(constant), torch.from_numpy(labels), torch.from_numpy(classifier))
    assert metrics["zeroshot_top1"] == metrics["zeroshot_majority_baseline"] == majority
    assert metrics["zeroshot_balanced_accuracy"] == pytest.approx(1 / len(set(labels.tolist())))


# ---------------------------------------------------------------------------------------------------------------------
# Distributed gathering: 2 processes on CPU with gloo.
# ---------------------------------------------------------------------------------------------------------------------

# (dataset size, per-process batch size): uneven last batches, a dataset smaller than one global batch, exact fits.
GATHER_CASES = [(23, 4), (3, 4), (16, 4), (9, 2), (1, 3)]
EMBED_DIM = 6


class _EvalRows(torch.utils.data.Dataset):
    """Rows whose embeddings are a deterministic function of the row index: 3 captions per image, and every 7th row
    unusable (kept in its batch with `valid=False`, as a collator must do for the gather to stay aligned)."""

    def __init__(self, size: int):
        generator = torch.Generator().manual_seed(size)
        self.image_table = torch.randn(size, EMBED_DIM, generator=generator)
        self.text_table = torch.randn(size, EMBED_DIM, generator=generator)
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        image_id = index // 3
        return {
            "index": torch.tensor(index),
            "image_ids": torch.tensor(image_id),
            "image_embeds": self.image_table[image_id],
            "text_embeds": self.image_table[image_id] + self.text_table[index],
            "valid": torch.tensor(index % 7 != 5),
        }


def _metrics_of(rows: dict[str, torch.Tensor]) -> dict[str, float]:
    valid = rows["valid"]
    return retrieval_metrics(rows["image_embeds"][valid], rows["text_embeds"][valid], rows["image_ids"][valid])


def _gather_worker(rank: int, world_size: int, port: int, output_path: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    from accelerate import Accelerator, InitProcessGroupKwargs

    # cpu=True selects gloo even where CUDA is present; the timeout turns a mismatched collective into an error.
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))])
    assert accelerator.num_processes == world_size
    results = {}
    for size, batch_size in GATHER_CASES:
        dataloader = accelerator.prepare(torch.utils.data.DataLoader(_EvalRows(size), batch_size=batch_size))
        # Gather each batch inside the loop: that is where gather_for_metrics knows which rows are padding.
        batches = [accelerator.gather_for_metrics(batch) for batch in dataloader]
        gathered = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
        results[(size, batch_size)] = (gathered, _metrics_of(gathered))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(results, output_path)
    # Destroys the process group: a process that exits with gloo's threads running can abort in their destructors
    # after its work is done.
    accelerator.end_training()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Spawns processes (slow on 2 cores): the slow tier; the default suite keeps one exact two-process test (test_loss.py).
@pytest.mark.slow
def test_two_process_gather_matches_single_process(tmp_path):
    output_path = str(tmp_path / "gathered.pt")
    mp.spawn(_gather_worker, args=(2, _free_port(), output_path), nprocs=2, join=True)
    results = torch.load(output_path)

    for size, batch_size in GATHER_CASES:
        gathered, rank0_metrics = results[(size, batch_size)]
        # Every sample exactly once, in dataset order.
        assert torch.equal(gathered["index"], torch.arange(size)), (size, batch_size)
        dataset = _EvalRows(size)
        single = torch.utils.data.default_collate([dataset[index] for index in range(size)])
        for key in single:
            assert torch.equal(gathered[key], single[key]), (size, batch_size, key)
        assert rank0_metrics == _metrics_of(single), (size, batch_size)
