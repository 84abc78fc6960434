"""The model card of a run, read where users read it: the usage code loads the model from where the card says, the
pair counts agree with the run's own files, "held out" means held out, the settings are the user's, and the zero-shot
numbers come with the prompts, the balanced accuracy and the majority-class baseline, equal to an independent
computation from the saved model."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_shapes_csv
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from clip_trainer.preprocessing import ImagePreprocessor
from clip_trainer.run import main

QUIET = ["--report_to", "none", "--dataloader_num_workers", "0", "--dataloader_persistent_workers", "false"]
TEMPLATES = ["a {} on white", "a {}"]


def run_args(tiny_clip_dir: Path, train: str, out: str) -> list[str]:
    return ["--model_name_or_path", str(tiny_clip_dir), "--train_file", train, "--output_dir", out,
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64", "--learning_rate", "3e-3",
            "--num_train_epochs", "1", "--eval_strategy", "epoch", "--save_strategy", "no", "--use_cpu", "true",
            "--seed", "1", *QUIET]  # fmt: skip


def section(text: str, header: str) -> str:
    return text.split(f"\n## {header}\n", 1)[1].split("\n## ", 1)[0]


def table(text: str, header: str) -> dict[str, list[str]]:
    rows = [line for line in section(text, header).splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]
    return {row[0]: row[1:] for row in cells}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_card_of_a_run_loads_from_where_it_says_and_counts_agree(tiny_clip_dir, tmp_path, monkeypatch):
    user = tmp_path / "user"
    csv_path = write_shapes_csv(user / "data", repeats=3)
    monkeypatch.chdir(user)
    main([*run_args(tiny_clip_dir, "data/pairs.csv", "outputs/card"), "--label_column", "shape",
          "--zeroshot_templates", *TEMPLATES, "--augment", "true", "--color_jitter", "0.2",
          "--logging_steps", "5"])  # fmt: skip
    out = user / "outputs" / "card"
    text = (out / "README.md").read_text()
    train_samples = json.loads((out / "train_results.json").read_text())["train_samples"]
    eval_samples = json.loads((out / "eval_results.json").read_text())["eval_samples"]
    with csv_path.open() as handle:
        rows = len(list(csv.DictReader(handle)))

    # The usage code names the output folder as the user gave it, and explains it; run from the working folder
    # (where the card says to run it), it loads the model.
    assert 'from_pretrained("outputs/card")' in text and 'model="card"' not in text
    assert "`outputs/card` is the folder this card was written into" in text and "relative to the folder" in text
    Image.new("RGB", (40, 40), (220, 30, 30)).save("cat.jpg")
    Image.new("RGB", (40, 40), (30, 60, 220)).save("dog.jpg")
    namespace: dict = {}
    exec(python_blocks(text)[1].replace('"a photo of a cat"', repr("a red circle on white " * 8)), namespace)
    assert tuple(namespace["similarity"].shape) == (2, 2)
    # It truncates to the model's 16 positions, and says so.
    assert "The text tower has 16 positions" in text
    assert all("truncation=True, max_length=16" in block for block in python_blocks(text))

    # Pair counts: those of the run's own files, and they add up to the CSV (15% held out of it).
    assert f"It was trained on {train_samples:,} image-caption pairs" in text
    assert f"It was evaluated on {eval_samples:,} pairs held out of the training data (15% of it)" in text
    assert train_samples + eval_samples == rows and eval_samples > 0
    assert re.findall(r"\b(\d[\d,]*) (?:train|validation) pairs", text) == []  # no counts of the raw files

    # Zero-shot: the prompts actually used, on the labelled images.
    assert f"each of the {eval_samples} labelled evaluation images into one of 3 classes" in text
    assert "each of the 2 prompt templates `a {} on white`, `a {}`" in text
    assert "a photo of a {}." not in section(text, "Evaluation")  # the default templates were not used

    # The settings the user gave, data and model ones included; nothing derived or internal, no local path.
    settings = table(text, "Training hyperparameters")
    assert settings["`train_file`"] == ["pairs.csv"] and settings["`model_name_or_path`"] == [tiny_clip_dir.name]
    assert settings["`augment`"] == ["True"] and settings["`color_jitter`"] == ["0.2"]
    assert settings["`label_column`"] == ["shape"] and settings["`zeroshot_templates`"] == ["a {} on white, a {}"]
    assert settings["`learning_rate`"] == ["0.003"] and settings["`eval_strategy`"] == ["epoch"]
    assert settings["`logging_steps`"] == ["5"]  # a count the Trainer stores as a float, shown as given
    for internal in ("accelerator_config", "do_train", "do_eval", "greater_is_better", "output_dir", "logging_dir"):
        assert f"`{internal}`" not in settings, internal
    assert str(tmp_path) not in text

    # The model's size, as its saved config has it.
    config = json.loads((out / "config.json").read_text())
    model = table(text, "Model")
    assert model["Embedding dimension"] == [str(config["projection_dim"])]
    assert model["Image tower"][0].startswith(
        f"{config['vision_config']['image_size']}x{config['vision_config']['image_size']} px images, "
        f"{config['vision_config']['patch_size']} px patches, {config['vision_config']['num_hidden_layers']} layers"
    )
    assert model["Text tower"][0].startswith(
        f"{config['text_config']['max_position_embeddings']} positions, "
        f"vocabulary {config['text_config']['vocab_size']}"
    )
    assert model["Tokenizer"] == [f"{len(AutoProcessor.from_pretrained(out).tokenizer):,} tokens"]


def test_settings_a_config_unsets_are_not_listed_as_none(tiny_clip_dir, tmp_path, monkeypatch):
    # A config copied from another run, with the values it does not want set to null: the card lists what was set.
    user = tmp_path / "user"
    write_shapes_csv(user / "data", repeats=1)
    monkeypatch.chdir(user)
    config = {"zeroshot_templates": None, "label_column": "shape", "max_steps": 2, "eval_strategy": "no"}
    Path("mine.json").write_text(json.dumps(config))
    main(["mine.json", *run_args(tiny_clip_dir, "data/pairs.csv", "outputs/unset")])
    settings = table((user / "outputs" / "unset" / "README.md").read_text(), "Training hyperparameters")
    assert "`zeroshot_templates`" not in settings and settings["`label_column`"] == ["shape"]
    assert ["None"] not in settings.values()


def unbalanced_validation_csv(folder: Path) -> tuple[Path, list[str]]:
    """A validation file of the shapes: every circle, two squares, one triangle and one row without a label."""
    source = write_shapes_csv(folder, repeats=1, name="source.csv")
    with source.open() as handle:
        rows = list(csv.DictReader(handle))
    kept = [row for row in rows if row["shape"] == "circle"]
    kept += [row for row in rows if row["shape"] == "square"][:2] + [
        row for row in rows if row["shape"] == "triangle"
    ][:2]
    kept[-1] = {**kept[-1], "shape": ""}  # a blank label: scored for retrieval, not for zero-shot
    path = folder / "val.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "shape"])
        writer.writeheader()
        writer.writerows(kept)
    return path, [row["shape"] for row in kept]


@torch.no_grad()
def zeroshot_from_saved_model(out: Path, folder: Path, rows: list[dict], templates: list[str]) -> np.ndarray:
    """Top-1 class of each row's image, from the saved model: images preprocessed as evaluation does, classes as
    the mean of their prompts' normalised embeddings, in float64 numpy."""
    model = CLIPModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    preprocess = ImagePreprocessor.from_image_processor(processor.image_processor)
    pixels = preprocess.collate([preprocess(Image.open(folder / row["image"]).convert("RGB")) for row in rows])
    images = model.get_image_features(pixel_values=preprocess.normalize(pixels["pixel_values"])).pooler_output
    images = images.double().numpy()
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    names = sorted({row["shape"] for row in rows if row["shape"]})
    classes = []
    for name in names:
        tokens = processor.tokenizer(
            [template.format(name) for template in templates], padding=True, truncation=True, max_length=16,
            return_tensors="pt",
        )  # fmt: skip
        prompts = model.get_text_features(**tokens).pooler_output.double().numpy()
        mean = (prompts / np.linalg.norm(prompts, axis=1, keepdims=True)).mean(axis=0)
        classes.append(mean / np.linalg.norm(mean))
    scores = images @ np.stack(classes).T
    return np.array(names)[scores.argmax(axis=1)]


def test_zeroshot_balanced_accuracy_and_baseline_of_a_run(tiny_clip_dir, tmp_path, monkeypatch):
    user = tmp_path / "user"
    write_shapes_csv(user / "data", repeats=2)
    validation, labels = unbalanced_validation_csv(user / "data")
    monkeypatch.chdir(user)
    results = main([*run_args(tiny_clip_dir, "data/pairs.csv", "out"), "--validation_file", "data/val.csv",
                    "--label_column", "shape", "--zeroshot_templates", *TEMPLATES])  # fmt: skip
    out = user / "out"
    written = json.loads((out / "eval_results.json").read_text())

    # The majority baseline from the labels alone; the balanced accuracy from the saved model's embeddings.
    labelled = [label for label in labels if label]
    counts = {name: labelled.count(name) for name in set(labelled)}
    majority = max(counts, key=counts.get)
    assert written["eval_zeroshot_majority_baseline"] == pytest.approx(counts[majority] / len(labelled), abs=1e-12)
    with validation.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["shape"]]
    predicted = zeroshot_from_saved_model(out, user / "data", rows, TEMPLATES)
    truth = np.array([row["shape"] for row in rows])
    recalls = [float(np.mean(predicted[truth == name] == name)) for name in sorted(counts)]
    assert written["eval_zeroshot_top1"] == pytest.approx(float(np.mean(predicted == truth)), abs=1e-12)
    assert written["eval_zeroshot_balanced_accuracy"] == pytest.approx(float(np.mean(recalls)), abs=1e-12)
    for key in ("eval_zeroshot_balanced_accuracy", "eval_zeroshot_majority_baseline"):
        assert results[key] == written[key]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("eval_zeroshot_balanced_accuracy" in entry for entry in history)  # logged with the others

    # The card: both numbers in the table, the baseline's class and how they are computed in words; a separate
    # validation file is named as such, never as held out.
    text = (out / "README.md").read_text()
    evaluation = table(text, "Evaluation")
    assert evaluation["Zero-shot balanced accuracy (mean per-class recall)"] == [
        f"{100 * written['eval_zeroshot_balanced_accuracy']:.1f}%"
    ]
    assert evaluation["Zero-shot majority-class baseline (top-1)"] == [
        f"{100 * written['eval_zeroshot_majority_baseline']:.1f}%"
    ]
    assert f"always answering the most frequent class (`{majority}`)" in text
    assert f"each of the {len(labelled)} labelled evaluation images into one of 3 classes" in text
    assert f"It was evaluated on {len(labels)} pairs from a separate validation file, `val.csv`." in text
    assert "held out" not in text


def test_a_library_user_without_card_data_gets_a_correct_card(tiny_clip_dir, shapes_csv, tmp_path, monkeypatch):
    from conftest import build_trainer

    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(tmp_path, tiny_clip_dir, shapes_csv, eval_strategy="epoch", num_train_epochs=1)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    out = tmp_path / "out"
    text = (out / "README.md").read_text()
    location = trainer.args.output_dir
    assert f"from_pretrained({json.dumps(location)})" in text and 'model="out"' not in text
    assert CLIPModel.from_pretrained(location) is not None
    assert f"It was trained on {len(trainer.train_dataset):,} image-caption pairs" in text
    # Nothing tells the trainer how its evaluation pairs were chosen: they are counted, not called held out.
    assert f"It was evaluated on {len(trainer.eval_dataset):,} pairs." in text and "held out" not in text
    settings = table(text, "Training hyperparameters")
    assert settings["`learning_rate`"] == ["0.003"] and settings["`num_train_epochs`"] == ["1"]
    assert not {"`accelerator_config`", "`do_eval`", "`dataloader_persistent_workers`"} & set(settings)
    assert "max_length=16" in text
