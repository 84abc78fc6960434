"""Evaluation metrics that depend on the data and the model only: equal captions and equal images score exactly alike
(not with the float noise of the batch they were embedded in), and zero-shot accuracy counts images, not captions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_shape

from clip_trainer.evaluation import DEFAULT_ZEROSHOT_TEMPLATES, RetrievalEvaluator
from clip_trainer.run import main

KS = (1, 5, 10)


def _eval_args(model: Path, csv_name: str, batch_size: int, output_dir: str) -> list[str]:
    return [
        "--model_name_or_path", str(model),
        "--validation_file", csv_name,
        "--do_eval",
        "--output_dir", output_dir,
        "--per_device_eval_batch_size", str(batch_size),
        "--report_to", "none",
        "--dataloader_num_workers", "0",
        "--use_cpu", "true",
    ]  # fmt: skip


def _write_shared_captions(folder: Path) -> list[tuple[str, str]]:
    """24 different images; most share a caption with other images ("a red shape" for every red one), a few have
    their own, and some images have two rows. Returns the (image, caption) rows."""
    (folder / "images").mkdir()
    rows = []
    for index, (color, shape, background) in enumerate(
        (c, s, b)
        for c in ("red", "green", "blue", "yellow")
        for s in ("circle", "square", "triangle")
        for b in ("white", "black")
    ):
        file = f"images/{color}_{shape}_{background}.png"
        draw_shape(color, shape, background, size=40).save(folder / file)
        rows.append((file, f"a {color} shape"))
        if index % 5 == 0:  # a second caption of its own
            rows.append((file, f"a {color} {shape} on {background}"))
        if index % 7 == 0:  # and a third, shared by every black-or-white image of that shape
            rows.append((file, f"a {shape}"))
    with (folder / "pairs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return rows


def _float64_embeddings(model_dir: Path, folder: Path, files: list[str], texts: list[str], prompts=()):
    """The saved model's normalised embeddings in float64, each distinct image and text on its own (no padding)."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).double().eval()
    processor = CLIPProcessor.from_pretrained(model_dir)

    def text_embeds(strings):
        if not strings:
            return None
        out = []
        for text in strings:
            tokens = processor.tokenizer([text], return_tensors="pt", truncation=True, max_length=16)
            out.append(model.get_text_features(**tokens).pooler_output[0])
        return torch.nn.functional.normalize(torch.stack(out), dim=-1).numpy()

    with torch.no_grad():
        pixels = processor.image_processor(
            [Image.open(folder / file).convert("RGB") for file in files], return_tensors="pt"
        )["pixel_values"].double()
        images = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        return images.numpy(), text_embeds(texts), [text_embeds(group) for group in prompts]


def _retrieval_in_float64(image_of_row: list[int], images: np.ndarray, row_texts: np.ndarray) -> dict[str, float]:
    """Ranks as docs/evaluation.md defines them: 1 + the non-positives scoring greater than or equal to the positive."""
    image_of_row = np.array(image_of_row)
    t2i = []
    for row, text in enumerate(row_texts):
        scores = images @ text
        positive = image_of_row[row]
        others = np.delete(scores, positive)
        t2i.append(1 + int((others >= scores[positive]).sum()))
    i2t = []
    for image_index, image in enumerate(images):
        scores = row_texts @ image
        mine = image_of_row == image_index
        best = scores[mine].max()
        i2t.append(1 + int((scores[~mine] >= best).sum()))
    metrics = {}
    for direction, ranks in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        for k in KS:
            metrics[f"eval_{direction}_recall@{k}"] = float((ranks <= k).mean())
        metrics[f"eval_{direction}_median_rank"] = float(np.median(ranks))
    metrics["eval_mean_recall"] = float(np.mean([v for key, v in metrics.items() if "recall@" in key]))
    return metrics


@pytest.mark.slow
def test_shared_captions_score_alike_at_every_eval_batch_size(tiny_clip_dir, tmp_path, monkeypatch):
    """Different images sharing captions: the same metrics at eval batch sizes 3, 7 and 64, equal to a float64
    computation in which equal captions have one embedding and ties count against the positive."""
    monkeypatch.chdir(tmp_path)
    rows = _write_shared_captions(tmp_path)
    results = {}
    for batch_size in (3, 7, 64):
        main(_eval_args(tiny_clip_dir, "pairs.csv", batch_size, f"out-{batch_size}"))
        written = json.loads((tmp_path / f"out-{batch_size}" / "eval_results.json").read_text())
        results[batch_size] = {key: value for key, value in written.items() if "recall" in key or "rank" in key}
    assert results[3] == results[7] == results[64]

    files = list(dict.fromkeys(file for file, _ in rows))
    captions = list(dict.fromkeys(caption for _, caption in rows))
    images, texts, _ = _float64_embeddings(tiny_clip_dir, tmp_path, files, captions)
    row_texts = texts[[captions.index(caption) for _, caption in rows]]
    expected = _retrieval_in_float64([files.index(file) for file, _ in rows], images, row_texts)
    assert results[64] == pytest.approx(expected, abs=1e-12)
    # The data is one where the tie rule matters: the red images' shared caption ties with itself across images.
    assert expected["eval_i2t_recall@1"] < 1 and expected["eval_i2t_recall@10"] > expected["eval_i2t_recall@1"]


@pytest.mark.slow
def test_zero_shot_counts_each_image_once(tiny_clip_dir, tmp_path, monkeypatch):
    """One red image with 20 captions and 20 blue images with one each, trained one step and evaluated: the majority
    baseline is 20/21 (per image, not 0.5 per row), top-1, top-5 and balanced accuracy equal a per-image float64
    computation from the saved model, and the model card counts 21 labelled images."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    draw_shape("red", "circle", size=40).save(tmp_path / "images" / "red.png")
    rows = [("images/red.png", f"red caption number {i}", "red") for i in range(20)]
    for i in range(20):
        file = f"images/blue_{i}.png"
        shape, background = ("circle", "square", "triangle")[i % 3], ("white", "black")[i % 2]
        draw_shape("blue", shape, background, size=40 + i).save(tmp_path / file)
        rows.append((file, f"blue caption {i}", "blue"))
    with (tmp_path / "pairs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "label"])
        writer.writerows(rows)
    argv = _eval_args(tiny_clip_dir, "pairs.csv", 8, "out")
    results = main([*argv, "--label_column", "label", "--train_file", "pairs.csv", "--do_train", "--max_steps", "1",
                    "--per_device_train_batch_size", "8", "--save_strategy", "no"])  # fmt: skip

    assert results["eval_zeroshot_majority_baseline"] == pytest.approx(20 / 21, abs=1e-12)
    files = list(dict.fromkeys(file for file, *_ in rows))
    names = ["blue", "red"]  # the classes, sorted
    truth = np.array([names.index("red" if file == "images/red.png" else "blue") for file in files])
    prompts = [[template.format(name) for template in DEFAULT_ZEROSHOT_TEMPLATES] for name in names]
    images, _, classes = _float64_embeddings(tmp_path / "out", tmp_path, files, [], prompts)
    classifier = np.stack([group.mean(axis=0) / np.linalg.norm(group.mean(axis=0)) for group in classes])
    scores = images @ classifier.T
    everyone = np.arange(len(files))
    hit = scores[everyone, truth] > scores[everyone, 1 - truth]  # a tie counts against the true class
    assert results["eval_zeroshot_top1"] == pytest.approx(hit.mean(), abs=1e-12)
    assert results["eval_zeroshot_top5"] == 1.0  # two classes: every image's class is among the best five
    balanced = np.mean([hit[truth == label].mean() for label in (0, 1)])
    assert results["eval_zeroshot_balanced_accuracy"] == pytest.approx(balanced, abs=1e-12)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "classifies each of the 21 labelled evaluation images into one of 2 classes" in card
    assert "the most frequent class (`blue`)" in card


def test_equal_captions_in_different_batches_tie_exactly():
    """The evaluator's metrics from embeddings as a batched evaluation gathers them: a caption shared by two images,
    embedded in two batches, differs by a rounding. Scored with one embedding per caption text and per image, the result
    is the tie rule's, and the same whichever copy came out larger."""
    from datasets import Dataset

    dataset = Dataset.from_dict(
        {
            "image": ["a.png", "b.png", "a.png"],
            "caption": ["a shape", "a shape ", "the first image"],
            "_image_id": [0, 1, 0],
        }
    )
    evaluator = RetrievalEvaluator(dataset)
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    shared = torch.tensor([0.6, 0.8])
    for noise in (1e-6, -1e-6):
        texts = torch.stack([shared, shared + torch.tensor([noise, 0.0]), torch.tensor([0.0, 1.0])])
        embeddings = {
            "image_embeds": images, "text_embeds": texts, "image_ids": torch.tensor([0, 1, 0]),
            "rows": torch.arange(3),
        }  # fmt: skip
        metrics = evaluator.compute_metrics(embeddings)
        # Image 1's caption ("a shape", stripped as the collator does) is image 0's too: a tie, which counts against
        # the positive. Image 0: its best caption "a shape" (0.6) ties with image 1's: rank 2. Image 1: its caption
        # (0.8) ties with image 0's "a shape" and loses to "the first image" (1.0): rank 3.
        assert metrics["eval_i2t_recall@1"] == 0.0
        assert metrics["eval_i2t_median_rank"] == 2.5
        # Captions: "a shape" ranks image 1 (0.8) above its image 0 (0.6); the copy for image 1 finds it first.
        assert metrics["eval_t2i_recall@1"] == pytest.approx(1 / 3)


def test_zero_shot_scores_each_image_once_with_its_first_labelled_rows_class(caplog):
    """Zero-shot from the evaluator's embeddings: image 0 on three rows (one unlabelled, then two different classes),
    image 1 and image 2 on one row each. Each image counts once, with the class of its first labelled row, and the
    conflict is named in a warning."""
    from datasets import Dataset

    dataset = Dataset.from_dict(
        {
            "image": ["a.png", "a.png", "a.png", "b.png", "c.png"],
            "caption": ["one", "two", "three", "four", "five"],
            "label": ["", "cat", "dog", "dog", "dog"],
        }
    )
    evaluator = RetrievalEvaluator(dataset, image_id_column="image", label_column="label")
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    prompts = {"a photo of a cat.": [1.0, 0.0], "a photo of a dog.": [0.0, 1.0]}
    evaluator.zeroshot_templates = ["a photo of a {}."]
    embeddings = {
        "image_embeds": images, "text_embeds": images.clone(), "image_ids": torch.tensor([0, 0, 0, 1, 2]),
        "class_labels": torch.tensor(evaluator.dataset.with_format(None)["_label"]), "rows": torch.arange(5),
    }  # fmt: skip
    with caplog.at_level("WARNING"):
        metrics = evaluator.compute_metrics(
            embeddings, encode_text=lambda texts: torch.tensor([prompts[t] for t in texts])
        )
    # Images: 0 is a cat (first labelled row) and classified cat; 1 is a dog, classified dog; 2 a dog, classified cat.
    assert metrics["eval_zeroshot_top1"] == pytest.approx(2 / 3)
    assert metrics["eval_zeroshot_majority_baseline"] == pytest.approx(2 / 3)  # dogs: 2 of the 3 images
    assert metrics["eval_zeroshot_balanced_accuracy"] == pytest.approx((1 + 1 / 2) / 2)
    assert "1 image(s) of the evaluation set have rows with different classes" in caplog.text
