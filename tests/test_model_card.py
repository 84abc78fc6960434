"""The model card: Hub metadata that parses, a metrics table equal to the evaluation, no token, curves, usage code."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from transformers import TrainingArguments

from clip_trainer.model_card import CLIPModelCardData, non_default_training_arguments, write_model_card
from clip_trainer.plots import TRAINING_CURVES_FILENAME, save_training_plots

SECRET = "hf_" + "a1B2c3D4e5" * 4  # shaped like a real token, so that the pattern redaction is exercised too

EVAL_BEFORE = {
    "eval_loss": 2.7726,
    "eval_t2i_recall@1": 0.0625,
    "eval_t2i_recall@5": 0.3125,
    "eval_t2i_recall@10": 0.625,
    "eval_i2t_recall@1": 0.05,
    "eval_i2t_recall@5": 0.3,
    "eval_i2t_recall@10": 0.6,
    "eval_mean_recall": 0.3242,
    "eval_t2i_median_rank": 8.5,
    "eval_i2t_median_rank": 9.0,
    "eval_zeroshot_top1": 0.3333,
    "eval_zeroshot_top5": 1.0,
    "eval_runtime": 0.52,
    "eval_samples_per_second": 92.1,
    "eval_samples": 56,  # what the run adds to the metrics files: a count, no metric
    "eval_inverse_temperature": 14.3,
    "epoch": 0.0,
}
EVAL_AFTER = {
    "eval_loss": 0.9132,
    "eval_t2i_recall@1": 0.5,
    "eval_t2i_recall@5": 0.9375,
    "eval_t2i_recall@10": 1.0,
    "eval_i2t_recall@1": 0.4567,
    "eval_i2t_recall@5": 0.95,
    "eval_i2t_recall@10": 1.0,
    "eval_mean_recall": 0.8074,
    "eval_t2i_median_rank": 1.5,
    "eval_i2t_median_rank": 2.0,
    "eval_zeroshot_top1": 0.8333,
    "eval_zeroshot_top5": 1.0,
    "eval_runtime": 0.48,
    "epoch": 3.0,
}
TABLE_LABELS = {
    "Text-to-image recall@1": "eval_t2i_recall@1",
    "Text-to-image recall@5": "eval_t2i_recall@5",
    "Text-to-image recall@10": "eval_t2i_recall@10",
    "Image-to-text recall@1": "eval_i2t_recall@1",
    "Image-to-text recall@5": "eval_i2t_recall@5",
    "Image-to-text recall@10": "eval_i2t_recall@10",
    "Mean recall": "eval_mean_recall",
    "Text-to-image median rank": "eval_t2i_median_rank",
    "Image-to-text median rank": "eval_i2t_median_rank",
    "Zero-shot top-1 accuracy": "eval_zeroshot_top1",
    "Zero-shot top-5 accuracy": "eval_zeroshot_top5",
    "Contrastive loss": "eval_loss",
}


def _log_history() -> list[dict]:
    history: list[dict] = []
    for step in range(1, 31):
        history.append(
            {"loss": 3.0 / step**0.5, "grad_norm": 1.0, "learning_rate": 1e-4 * (1 - step / 30), "logit_scale": 2.66}
            | {"epoch": step / 10, "step": step}
        )
        if step % 10 == 0:
            history.append(
                {key: value for key, value in EVAL_AFTER.items() if key != "epoch"}
                | {"epoch": step / 10, "step": step}
            )
    history.append({"train_runtime": 12.0, "train_loss": 1.2, "total_flos": 0.0, "epoch": 3.0, "step": 30})
    return history


def _write(output_dir: Path, **overrides) -> Path:
    card = dict(
        model_name="clip-shapes",
        base_model="openai/clip-vit-base-patch32",
        dataset_id="user/shapes-captions",
        num_train_pairs=1234,
        num_eval_pairs=56,
        license="apache-2.0",
        repo_id="user/clip-shapes",
    )
    run = dict(
        eval_before=EVAL_BEFORE,
        eval_after=EVAL_AFTER,
        hyperparameters={"learning_rate": "0.0003", "num_train_epochs": "3"},
        plots=[],
    )
    card.update({key: value for key, value in overrides.items() if key not in run})
    run.update({key: value for key, value in overrides.items() if key in run})
    return Path(write_model_card(str(output_dir), CLIPModelCardData(**card), **run))


def _table(text: str, header: str) -> dict[str, list[str]]:
    """Rows of the markdown table under `## {header}`, first cell to the other cells."""
    section = text.split(f"## {header}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]
    return {row[0]: row[1:] for row in cells}


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_card_metadata_parses(tmp_path: Path) -> None:
    path = _write(tmp_path)

    metadata = ModelCard.load(path).data.to_dict()
    text = path.read_text()

    assert path == tmp_path / "README.md"
    assert _front_matter(text) == metadata
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "zero-shot-image-classification"
    assert {"clip", "clip-trainer", "contrastive-learning"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["user/shapes-captions"]
    assert metadata["base_model"] == "openai/clip-vit-base-patch32"
    assert metadata["license"] == "apache-2.0"
    [index] = metadata["model-index"]
    reported = {metric["type"]: metric["value"] for result in index["results"] for metric in result["metrics"]}
    assert index["name"] == "clip-shapes"
    assert reported["t2i_recall@1"] == EVAL_AFTER["eval_t2i_recall@1"]
    assert reported["zeroshot_top1"] == EVAL_AFTER["eval_zeroshot_top1"]
    assert "loss" not in reported and "runtime" not in reported


def test_evaluation_table_equals_the_metrics(tmp_path: Path) -> None:
    text = _write(tmp_path).read_text()

    table = _table(text, "Evaluation")

    assert list(table) == list(TABLE_LABELS)
    for label, key in TABLE_LABELS.items():
        before, after = table[label]
        for cell, value in ((before, EVAL_BEFORE[key]), (after, EVAL_AFTER[key])):
            if "recall" in key or "zeroshot" in key:
                assert cell == f"{100 * value:.1f}%", label
            else:
                assert float(cell) == pytest.approx(value, abs=1e-4), label
    assert "| Metric | Before training | After training |" in text
    assert "runtime" not in text and "samples_per_second" not in text
    assert "| samples |" not in text and "inverse_temperature" not in text  # counts and scales are no metric rows


def test_only_known_columns_and_local_sources_stay_out_of_metadata(tmp_path: Path) -> None:
    local_model = tmp_path / "checkpoints" / "my-base"
    local_model.mkdir(parents=True)
    path = _write(
        tmp_path / "out",
        base_model=str(local_model),
        dataset_id=None,
        dataset_description="local data `captions.csv` (1,234 train pairs)",
        eval_before=None,
        license=None,
    )

    text = path.read_text()
    metadata = ModelCard.load(path).data.to_dict()

    assert "| Metric | After training |" in text and "Before training" not in text
    assert _table(text, "Evaluation")["Text-to-image recall@5"] == ["93.8%"]
    # A local path is no Hub id: the Hub would reject it as metadata, and it would publish the author's file system.
    assert not {"base_model", "datasets", "license", "model-index"} & set(metadata)
    assert str(tmp_path) not in text
    assert "`my-base`" in text and "`captions.csv`" in text


def test_model_trained_from_scratch_without_evaluation(tmp_path: Path) -> None:
    path = _write(tmp_path, base_model=None, dataset_id=None, eval_before=None, eval_after=None, hyperparameters={})

    text = path.read_text()

    assert "trained from scratch" in text
    assert "## Evaluation" not in text
    assert "left at their defaults" in text
    assert ModelCard.load(path).data.to_dict()["pipeline_tag"] == "zero-shot-image-classification"


def test_no_token_anywhere_in_the_card(tmp_path: Path) -> None:
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), learning_rate=3e-4, hub_token=SECRET, push_to_hub=True, report_to="none"
    )
    hyperparameters = non_default_training_arguments(args) | {"hub_token": SECRET, "note": f"pushed with {SECRET}"}
    eval_after = EVAL_AFTER | {"eval_token": SECRET}

    text = _write(tmp_path, hyperparameters=hyperparameters, eval_after=eval_after).read_text()

    assert SECRET not in text
    assert "hub_token" not in text
    assert "learning_rate" in text


@dataclass
class _OurArguments(TrainingArguments):
    # A subclass that changes a parent default and adds its own option, as CLIPTrainingArguments does.
    weight_decay: float = field(default=0.2)
    max_logit_scale: float = field(default=100.0)


@dataclass
class _NeedsAValue:
    name: str
    steps: int = 10
    tags: list[str] = field(default_factory=list)


def test_non_default_training_arguments(tmp_path: Path) -> None:
    args = _OurArguments(
        output_dir=str(tmp_path / "run"),
        learning_rate=3e-4,
        weight_decay=0.2,
        max_logit_scale=50.0,
        eval_strategy="epoch",
        metric_for_best_model="eval_mean_recall",
        accelerator_config={"split_batches": True, "non_blocking": True},
        report_to="none",
        hub_token=SECRET,
        hub_model_id="user/m",
        push_to_hub=True,
    )

    changed = non_default_training_arguments(args)

    # eval_strategy is compared after __post_init__ made it an enum; do_eval, which __post_init__ sets from it, is
    # no setting of the user, nor is greater_is_better (from metric_for_best_model); weight_decay is the subclass's
    # own default; how batches reach the device (non_blocking) is no hyperparameter, how they are split is; the hub
    # settings and token are no hyperparameters.
    assert changed == {
        "learning_rate": "0.0003",
        "eval_strategy": "epoch",
        "metric_for_best_model": "eval_mean_recall",
        "accelerator_config": "split_batches=True",
        "max_logit_scale": "50",
    }
    # A setting given explicitly that differs from what would be derived stays.
    explicit = non_default_training_arguments(dataclasses.replace(args, greater_is_better=False))
    assert explicit["greater_is_better"] == "False"
    # A dataclass that cannot be built without arguments is compared with its declared defaults.
    assert non_default_training_arguments(_NeedsAValue(name="x", tags=["a", "b"])) == {"name": "x", "tags": "a, b"}
    with pytest.raises(TypeError):
        non_default_training_arguments({"learning_rate": 1.0})


def test_training_plots_are_pngs_and_linked_from_the_card(tmp_path: Path) -> None:
    paths = save_training_plots(_log_history(), str(tmp_path))

    assert paths == [str(tmp_path / TRAINING_CURVES_FILENAME)]
    with Image.open(paths[0]) as image:
        image.verify()
        assert image.format == "PNG" and image.width > 300 and image.height > 300
    outside = tmp_path.parent / "elsewhere.png"
    text = _write(tmp_path, plots=[*paths, str(outside)]).read_text()
    assert f"![Training curves]({TRAINING_CURVES_FILENAME})" in text
    assert "elsewhere.png" not in text


@pytest.mark.parametrize(
    "history",
    [[], [{"train_runtime": 1.0, "train_loss": 0.5, "epoch": 1.0, "step": 3}], [{"epoch": 1.0, "step": 1}]],
    ids=["empty", "summary-only", "no-curves"],
)
def test_nothing_to_plot_writes_nothing(tmp_path: Path, history: list[dict]) -> None:
    assert save_training_plots(history, str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_a_single_evaluation_is_plotted(tmp_path: Path) -> None:
    history = [{"eval_loss": 1.0, "eval_t2i_recall@1": 0.5, "step": 0}, {"temperature": float("nan"), "step": 1}]

    [path] = save_training_plots(history, str(tmp_path / "new"))

    with Image.open(path) as image:
        assert image.format == "PNG"


LONG_CAPTION = "a red circle on white " * 8  # 40 tokens for a text tower of 16 positions


def test_usage_snippet_runs_and_truncates(
    tmp_path: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _write(
        tmp_path / "card",
        repo_id="user/clip-shapes",
        text_positions=16,
        max_text_length=16,
        zeroshot_templates=["a {} on white", "a photo of a {}"],
    ).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 40), (220, 30, 30)).save("cat.jpg")
    Image.new("RGB", (40, 40), (30, 60, 220)).save("dog.jpg")

    assert "The text tower has 16 positions" in text and "`truncation=True, max_length=16`" in text
    assert "made with `a {} on white`, the first of the 2 templates" in text
    assert len(blocks) == 2 and all('"user/clip-shapes"' in block for block in blocks)
    # Captions longer than the tiny model's 16 positions: the snippets cut them, as the card says.
    replacements = {
        '"user/clip-shapes"': repr(str(tiny_clip_dir)),
        '"a photo of a cat"': repr(LONG_CAPTION),
        '["cat", "dog"]': repr(["red circle " * 10, "blue square"]),
    }
    results = []
    for block in blocks:
        assert "truncation=True, max_length=16" in block
        for old, new in replacements.items():
            block = block.replace(old, new)
        namespace: dict = {}
        exec(block, namespace)
        results.append(namespace)
        # Without the truncation the same code fails: the test exercises it.
        with pytest.raises(ValueError, match="max_position_embeddings"):
            exec(block.replace(", truncation=True, max_length=16", ""), {})

    scores = results[0]["scores"]
    assert scores.shape == (2,) and float(scores.sum()) == pytest.approx(1.0, abs=1e-5)
    assert tuple(results[1]["similarity"].shape) == (2, 2)
    assert results[1]["similarity"].abs().max() <= 1 + 1e-5


def test_siglip_usage_pads_to_its_length_and_scores_with_sigmoids(tmp_path: Path) -> None:
    text = _write(tmp_path, family="SigLIP", loss="sigmoid", text_positions=64, max_text_length=48).read_text()

    assert text.count('padding="max_length", truncation=True, max_length=48') == 2
    assert "scores = logits.sigmoid()" in text and "softmax" not in text
    assert "The text tower has 64 positions and was trained on captions of up to 48 tokens" in text
    assert "padded and cut to 64 tokens, not the 48 this model was trained with" in text


ZEROSHOT_AFTER = EVAL_AFTER | {
    "eval_zeroshot_top1": 0.222,
    "eval_zeroshot_balanced_accuracy": 0.18,
    "eval_zeroshot_majority_baseline": 0.59,
}


def test_zeroshot_sentence_states_prompts_classes_and_the_baseline(tmp_path: Path) -> None:
    text = _write(
        tmp_path,
        eval_after=ZEROSHOT_AFTER,
        zeroshot_templates=["{}", "an emoji of {}"],
        num_classes=9,
        num_classes_present=8,
        num_zeroshot_images=549,
        majority_class="Smileys & Emotion",
    ).read_text()

    evaluation = text.split("## Evaluation\n", 1)[1].split("\n## ", 1)[0]
    assert "each of the 549 labelled evaluation images into one of 9 classes" in evaluation
    assert "each of the 2 prompt templates `{}`, `an emoji of {}`" in evaluation
    assert "always answering the most frequent class (`Smileys & Emotion`)" in evaluation
    # Top-1 below the baseline is said in so many words, with balanced accuracy against a constant answer (1/8).
    assert "top-1 (22.2%) does not beat the 59.0% of always answering the most frequent class" in evaluation
    assert "balanced accuracy (18.0%) with the 12.5% (1/8) that a constant answer scores" in evaluation
    table = _table(text, "Evaluation")
    assert table["Zero-shot balanced accuracy (mean per-class recall)"] == ["–", "18.0%"]  # none before
    assert table["Zero-shot majority-class baseline (top-1)"][-1] == "59.0%"
    # The baseline describes the labels, not the model: it is no model-index result.
    reported = [metric["type"] for result in _front_matter(text)["model-index"][0]["results"] for metric in
                result["metrics"]]  # fmt: skip
    assert "zeroshot_balanced_accuracy" in reported and "zeroshot_majority_baseline" not in reported
    # A model above its baseline gets no such warning.
    above = _write(tmp_path / "above", eval_after=EVAL_AFTER | {"eval_zeroshot_majority_baseline": 0.5}).read_text()
    assert "does not beat" not in above
