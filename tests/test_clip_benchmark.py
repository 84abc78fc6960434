"""CLIP_benchmark datasets (`--clip_benchmark_dataset`): the layout read as CLIP_benchmark reads it, the metrics checked
against an independent float64 computation from the model's embeddings (plain transformers), CLIP_benchmark's
results JSON, and the one-line errors for a broken dataset."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_shape

from clip_trainer import cli
from clip_trainer.clip_benchmark import read_clip_benchmark_set
from clip_trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# Six classes: colour and shape, each drawn on two backgrounds.
CLASSES = [("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "circle"), ("red", "square"),
           ("blue", "circle")]  # fmt: skip
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}", "{c}"]
FORMATS = {"webp": dict(format="webp", lossless=True), "png": dict(format="png"), "jpg": dict(format="jpeg")}


def encode(image, extension: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **FORMATS[extension])
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, samples: list, per_shard: int, split: str = "test", count_file: bool = True) -> None:
    shards = [samples[start : start + per_shard] for start in range(0, len(samples), per_shard)]
    for index, shard in enumerate(shards):
        write_tar(root / split / f"{index}.tar", shard)
    if count_file:
        (root / split / "nshards.txt").write_text(f"{len(shards)}\n")


def classification_set(root: Path, corrupt: bool = True) -> list[tuple[bytes, int]]:
    """Writes a 6-class set (12 images in webp, png and jpg over 3 shards; with `corrupt`, a 13th sample whose jpg is
    cut short); returns each usable sample's image bytes and class index."""
    samples, usable = [], []
    for index in range(12):
        label = index % len(CLASSES)
        color, shape = CLASSES[label]
        extension = list(FORMATS)[index % 3]
        data = encode(draw_shape(color, shape, "white" if index < 6 else "black", size=40 + 2 * index), extension)
        samples.append((f"s{index:07d}", {extension: data, "cls": f"{label}\n".encode()}))
        usable.append((data, label))
    if corrupt:
        samples.insert(5, ("s_corrupt", {"jpg": usable[2][0][:30], "cls": b"1"}))
    write_shards(root, samples, per_shard=5)
    (root / "classnames.txt").write_text("".join(f"{color} {shape}\n" for color, shape in CLASSES))
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return usable


def retrieval_set(root: Path) -> list[tuple[bytes, list[str]]]:
    """Writes an 8-image retrieval set, 1 to 3 captions each (one with a blank line among them), over 2 shards, without
    nshards.txt; returns each image's bytes and captions."""
    samples, expected = [], []
    for index in range(8):
        color, shape = CLASSES[index % len(CLASSES)]
        background = "white" if index < 4 else "black"
        data = encode(draw_shape(color, shape, background, size=36 + 3 * index), "png")
        captions = [f"a {color} {shape} on {background}", f"{shape} {color}", f"the {background} {shape}"]
        captions = captions[: 1 + index % 3]
        text = "\n".join(captions) if index != 4 else "\n\n".join(captions)
        samples.append((f"s{index:07d}", {"png": data, "txt": text.encode()}))
        expected.append((data, captions))
    write_shards(root, samples, per_shard=5, count_file=False)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return expected


# --------------------------------------------------------------------------------------------------------------
# The independent computation: plain transformers for the embeddings, numpy float64 for the metrics
# --------------------------------------------------------------------------------------------------------------


def reference_embeddings(model_dir: Path, images: list[bytes], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    with torch.no_grad():
        pixels = processor.image_processor(pictures, return_tensors="pt")["pixel_values"]
        image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
        tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        text_embeds = model.get_text_features(**tokens).pooler_output
    return image_embeds.double().numpy(), text_embeds.double().numpy()


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def reference_classification(model_dir: Path, usable: list[tuple[bytes, int]]) -> dict[str, float]:
    names = [f"{color} {shape}" for color, shape in CLASSES]
    prompts = [template.format(c=name) for name in names for template in TEMPLATES]
    images, texts = reference_embeddings(model_dir, [data for data, _ in usable], prompts)
    texts = unit(texts).reshape(len(names), len(TEMPLATES), -1)
    classifier = unit(texts.mean(axis=1))
    scores = unit(images) @ classifier.T
    labels = np.array([label for _, label in usable])
    predicted = scores.argmax(axis=1)
    top5 = np.argsort(-scores, axis=1)[:, :5]
    recalls = [np.mean(predicted[labels == c] == c) for c in np.unique(labels)]
    return {
        "acc1": float(np.mean(predicted == labels)),
        "acc5": float(np.mean([label in row for label, row in zip(labels, top5)])),
        "mean_per_class_recall": float(np.mean(recalls)),
    }


def reference_retrieval(model_dir: Path, expected: list[tuple[bytes, list[str]]], ks) -> dict[str, float]:
    captions = [caption for _, texts in expected for caption in texts]
    owner = np.array([image for image, (_, texts) in enumerate(expected) for _ in texts])
    images, texts = reference_embeddings(model_dir, [data for data, _ in expected], captions)
    scores = unit(texts) @ unit(images).T  # (captions, images)
    metrics = {}
    for k in ks:
        # A caption finds its image when the image is among its k best-scoring images.
        found = [owner[c] in np.argsort(-scores[c])[:k] for c in range(len(captions))]
        metrics[f"image_retrieval_recall@{k}"] = float(np.mean(found))
        # An image finds its text when ANY of its captions is among its k best-scoring captions.
        hits = [np.any(owner[np.argsort(-scores[:, i])[:k]] == i) for i in range(len(expected))]
        metrics[f"text_retrieval_recall@{k}"] = float(np.mean(hits))
    return metrics


def eval_command(model_dir: Path, dataset: Path, *extra: str) -> list[str]:
    return ["eval", "--model_name_or_path", str(model_dir), "--clip_benchmark_dataset", str(dataset),
            "--output_dir", "out", "--per_device_eval_batch_size", "4", "--dataloader_num_workers", "0",
            "--report_to", "none", "--use_cpu", "true", *extra]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_classification_run_matches_an_independent_computation(tiny_clip_dir, tmp_path, monkeypatch, caplog):
    dataset = tmp_path / "wds_shapes"
    usable = classification_set(dataset)
    monkeypatch.chdir(tmp_path)

    assert cli.main(eval_command(tiny_clip_dir, dataset)) == 0

    record = json.loads((tmp_path / "out" / "clip_benchmark_results.json").read_text())
    assert list(record) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert record["dataset"] == "wds/shapes" and record["task"] == "zeroshot_classification"
    assert record["model"] == "CLIPModel" and record["pretrained"] == str(tiny_clip_dir)
    assert record["language"] == "en"
    expected = reference_classification(tiny_clip_dir, usable)
    assert list(record["metrics"]) == ["acc1", "acc5", "mean_per_class_recall"]
    assert record["metrics"] == pytest.approx(expected, abs=1e-12)
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["eval_clip_benchmark_zeroshot_top1"] == pytest.approx(expected["acc1"])
    assert results["eval_clip_benchmark_zeroshot_top5"] == pytest.approx(expected["acc5"])
    assert results["eval_clip_benchmark_zeroshot_balanced_accuracy"] == pytest.approx(
        expected["mean_per_class_recall"]
    )
    # The cut-short jpg is left out, named and counted; the 12 others are scored.
    assert results["eval_clip_benchmark_samples"] == 12
    assert results["eval_clip_benchmark_skipped_samples"] == 1
    assert "'s_corrupt'" in caplog.text and "1.tar" in caplog.text


@pytest.mark.slow
def test_retrieval_run_matches_an_independent_computation(tiny_clip_dir, tmp_path, monkeypatch):
    dataset = tmp_path / "captions"
    expected = retrieval_set(dataset)
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "results" / "coco-like.json"

    argv = eval_command(tiny_clip_dir, dataset, "--clip_benchmark_recall_k", "1", "5",
                        "--clip_benchmark_output", str(output))  # fmt: skip
    assert cli.main(argv) == 0

    record = json.loads(output.read_text())
    assert record["dataset"] == "wds/captions" and record["task"] == "zeroshot_retrieval"
    reference = reference_retrieval(tiny_clip_dir, expected, ks=(1, 5))
    assert list(record["metrics"]) == list(reference)
    assert record["metrics"] == pytest.approx(reference, abs=1e-12)
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["eval_clip_benchmark_t2i_recall@5"] == pytest.approx(reference["image_retrieval_recall@5"])
    assert results["eval_clip_benchmark_i2t_recall@1"] == pytest.approx(reference["text_retrieval_recall@1"])
    # 8 images, 15 captions: the blank line between one image's captions is no caption.
    assert results["eval_clip_benchmark_samples"] == 8 and results["eval_clip_benchmark_captions"] == 15
    assert not (tmp_path / "out" / "clip_benchmark_results.json").exists()


@pytest.mark.slow
def test_a_training_run_scores_its_final_model_beside_the_validation_split(base_args, tmp_path, monkeypatch):
    from clip_trainer import run

    dataset = tmp_path / "wds_shapes"
    classification_set(dataset, corrupt=False)
    monkeypatch.chdir(tmp_path)

    results = run.main([*base_args, "--do_train", "--do_eval", "--clip_benchmark_dataset", str(dataset)])

    output = Path(base_args[base_args.index("--output_dir") + 1])
    record = json.loads((output / "clip_benchmark_results.json").read_text())
    assert record["pretrained"] == str(output) and record["task"] == "zeroshot_classification"
    saved = json.loads((output / "eval_results.json").read_text())
    # The validation split's metrics and the benchmark's, in one file; the benchmark scored the trained weights.
    assert "eval_t2i_recall@1" in saved and saved["eval_clip_benchmark_samples"] == 12
    assert saved["eval_clip_benchmark_zeroshot_top1"] == results["eval_clip_benchmark_zeroshot_top1"]
    usable = [(data, label) for data, label in classification_set(tmp_path / "again", corrupt=False)]
    assert record["metrics"] == pytest.approx(reference_classification(output, usable), abs=1e-12)


@pytest.mark.slow
def test_a_class_index_out_of_range_names_the_shard_the_sample_and_the_fix(
    tiny_clip_dir, tmp_path, monkeypatch, capsys
):
    dataset = tmp_path / "shapes"
    classification_set(dataset, corrupt=False)
    samples = [("s0000100", {"png": encode(draw_shape("red", "circle"), "png"), "cls": b"6"})]
    write_tar(dataset / "test" / "3.tar", samples)
    (dataset / "test" / "nshards.txt").write_text("4")
    monkeypatch.chdir(tmp_path)

    assert cli.main(eval_command(tiny_clip_dir, dataset)) == 2

    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
    assert error.startswith("clip-trainer eval: error: Sample 's0000100' of shard")
    assert "'s0000100'" in error and "3.tar" in error and "class index 6" in error
    assert "6 classes" in error and "classnames.txt" in error


@pytest.mark.slow
def test_the_demo_script_writes_the_held_out_pairs_in_a_set_the_command_evaluates(tiny_clip_dir, tmp_path,
                                                                                  monkeypatch):  # fmt: skip
    """scripts/clip_benchmark_data.py writes the demo's held-out pairs: one zero-shot sample per distinct image, 9
    classes, the demo's prompts, scored by the command exactly as the demo's own evaluation of its held-out split
    scores them; the retrieval set one sample per distinct image."""
    from clip_trainer import DataArguments, load_image_text_data

    spec = importlib.util.spec_from_file_location("clip_benchmark_data", ROOT / "scripts" / "clip_benchmark_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(tmp_path)
    script.main(["--output", "bench"])
    held_out = load_image_text_data(
        DataArguments(dataset_name="emoji", label_column="label", validation_split_percentage=15), seed=42
    ).validation

    groups = read_clip_benchmark_set("bench/emoji_groups")
    assert len(groups.class_names) == 9 and groups.templates == ["{c}", "an emoji of {c}", "a {c} emoji"]
    assert read_clip_benchmark_set("bench/emoji_captions").task == "zeroshot_retrieval"
    images = len(set(held_out["_image_id"]))
    assert images < len(held_out)  # some held-out emoji share a picture: each picture is one sample
    with tarfile.open(groups.shards[0]) as tar:
        assert len([name for name in tar.getnames() if name.endswith(".cls")]) == images
    assert cli.main(eval_command(tiny_clip_dir, Path("bench/emoji_groups"))) == 0
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["eval_clip_benchmark_samples"] == images
    assert results["eval_clip_benchmark_skipped_samples"] == 0
    # The demo's own evaluation of the same held-out split, with the same prompts: the same zero-shot figures.
    own = ["eval", "--model_name_or_path", str(tiny_clip_dir), "--dataset_name", "emoji", "--label_column", "label",
           "--validation_split_percentage", "15", "--seed", "42", "--zeroshot_templates", "{}", "an emoji of {}",
           "a {} emoji", "--output_dir", "own", "--per_device_eval_batch_size", "64", "--dataloader_num_workers", "0",
           "--report_to", "none", "--use_cpu", "true"]  # fmt: skip
    assert cli.main(own) == 0
    demo = json.loads((tmp_path / "own" / "eval_results.json").read_text())
    for name in ("top1", "top5", "balanced_accuracy"):
        assert results[f"eval_clip_benchmark_zeroshot_{name}"] == pytest.approx(
            demo[f"eval_zeroshot_{name}"], abs=1e-9
        )
    assert cli.main([*eval_command(tiny_clip_dir, Path("bench/emoji_captions")), "--output_dir", "out2"]) == 0
    captions = json.loads((tmp_path / "out2" / "eval_results.json").read_text())
    assert captions["eval_clip_benchmark_samples"] == len(set(held_out["_image_id"]))


# --------------------------------------------------------------------------------------------------------------
# The library function, and the dataset's mistakes (found before the model loads: fast)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fewer_than_five_classes_give_no_acc5_as_in_clip_benchmark(tiny_clip_dir, tmp_path):
    from transformers import AutoModel, AutoProcessor

    from clip_trainer.clip_benchmark import evaluate_clip_benchmark

    dataset = tmp_path / "four"
    samples = [(f"k{i}", {"png": encode(draw_shape(*CLASSES[i % 4]), "png"), "cls": str(i % 4).encode()})
               for i in range(6)]  # fmt: skip
    write_shards(dataset, samples, per_shard=6)
    (dataset / "classnames.txt").write_text("".join(f"{c} {s}\n" for c, s in CLASSES[:4]) + "\n\n")
    (dataset / "zeroshot_classification_templates.txt").write_text("{c}\n")
    benchmark = read_clip_benchmark_set(str(dataset))
    assert len(benchmark.class_names) == 4  # trailing blank lines name no class

    model = AutoModel.from_pretrained(tiny_clip_dir)
    result = evaluate_clip_benchmark(model, AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil"), benchmark)

    assert math.isnan(result.benchmark_metrics["acc5"])
    assert result.metrics["zeroshot_top5"] == 1.0  # clip-trainer's own key: every image is in the top 5 of 4
    assert result.benchmark_metrics["acc1"] == result.metrics["zeroshot_top1"] and result.samples == 6


def _run_error(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


def test_missing_class_names_stop_the_command_with_the_fix(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    dataset = tmp_path / "shapes"
    classification_set(dataset, corrupt=False)
    (dataset / "classnames.txt").unlink()
    monkeypatch.chdir(tmp_path)

    error = _run_error(eval_command(tiny_clip_dir, dataset), capsys)

    assert "classnames.txt" in error and "one class name per line" in error and "dataset_type.txt" in error


def test_missing_templates_stop_the_command_with_the_fix(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    dataset = tmp_path / "shapes"
    classification_set(dataset, corrupt=False)
    (dataset / "zeroshot_classification_templates.txt").unlink()
    monkeypatch.chdir(tmp_path)

    error = _run_error(eval_command(tiny_clip_dir, dataset), capsys)

    assert "zeroshot_classification_templates.txt" in error and "{c}" in error


def test_an_empty_split_folder_is_named(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    dataset = tmp_path / "shapes"
    classification_set(dataset, corrupt=False)
    (dataset / "validation").mkdir()
    monkeypatch.chdir(tmp_path)

    error = _run_error(eval_command(tiny_clip_dir, dataset, "--clip_benchmark_split", "validation"), capsys)

    assert "validation" in error and "holds no .tar shard" in error
    error = _run_error(eval_command(tiny_clip_dir, dataset, "--clip_benchmark_split", "train"), capsys)
    assert "no 'train' split folder" in error and "test, validation" in error


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda root: (root / "zeroshot_classification_templates.txt").write_text("a photo of a {}.\n"), "line 1"),
        (lambda root: (root / "zeroshot_classification_templates.txt").write_text("{c}\n{c} {x}\n"), "line 2"),
        (lambda root: (root / "classnames.txt").write_text("red circle\n\nblue\n"), "line 2 is blank"),
        (lambda root: (root / "test" / "nshards.txt").write_text("5\n"), "lacks 3.tar, 4.tar"),
        (lambda root: (root / "dataset_type.txt").write_text("multilabel\n"), "not supported"),
    ],
)
def test_a_broken_layout_is_one_line_naming_the_file(tmp_path, change, expected):
    dataset = tmp_path / "shapes"
    classification_set(dataset, corrupt=False)
    change(dataset)
    with pytest.raises(ConfigError, match=expected):
        read_clip_benchmark_set(str(dataset))


def test_a_task_that_contradicts_dataset_type_is_refused(tmp_path):
    dataset = tmp_path / "captions"
    retrieval_set(dataset)
    with pytest.raises(ConfigError, match="says 'retrieval'"):
        read_clip_benchmark_set(str(dataset), task="zeroshot_classification")
    found = read_clip_benchmark_set(str(dataset))
    assert found.task == "zeroshot_retrieval" and [Path(s).name for s in found.shards] == ["0.tar", "1.tar"]
