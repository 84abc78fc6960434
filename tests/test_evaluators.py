"""`RetrievalEvaluator`: one evaluation set scored by any model alone, equal to what the command and the trainer
report; and the metric registry, which every key an evaluation reports is in and which the manual's table lists."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_TRAINING, TINY_TEXT, TINY_VISION, shape_rows, write_shapes_csv
from datasets import Dataset
from PIL import Image
from transformers import (
    AutoModel,
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
)

from clip_trainer import (
    CLIPContrastiveTrainer,
    CLIPTrainingArguments,
    DataArguments,
    RetrievalEvaluator,
    load_image_text_data,
)
from clip_trainer.metrics import (
    METRICS,
    METRICS_BY_NAME,
    RETRIEVAL_METRIC_NAMES,
    render_metric_table,
    split_metric_key,
)
from clip_trainer.run import main
from clip_trainer.tokenization import text_config_token_ids, train_caption_tokenizer

REPO = Path(__file__).resolve().parent.parent
QUIET = ["--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu", "true"]
EVAL_BATCH = 16
# What an evaluation reports besides metrics: the Trainer's timings and the run's sample counts.
BOOKKEEPING = ("_runtime", "_samples_per_second", "_steps_per_second", "_samples", "_model_preparation_time")
# Text positions of each family's tiny model: SigLIP pads every caption to its one length.
POSITIONS = {"clip": 16, "siglip": 64}


def _tokenizer(max_length: int):
    return train_caption_tokenizer([c for *_, c in shape_rows()] * 4, vocab_size=300, model_max_length=max_length)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny random CLIP and a tiny random SigLIP, each saved with its processor as a Hub model is."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family in ("clip", "siglip"):
        tokenizer = _tokenizer(POSITIONS[family])
        text = {**TINY_TEXT, "max_position_embeddings": POSITIONS[family], **text_config_token_ids(tokenizer)}
        torch.manual_seed(0)
        if family == "clip":
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=16))
            image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
            processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
        else:
            model = SiglipModel(SiglipConfig(text_config=text, vision_config=TINY_VISION))
            image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
            processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
        dirs[family] = root / family
        model.save_pretrained(dirs[family])
        processor.save_pretrained(dirs[family])
    return dirs


def write_pairs(folder: Path) -> Path:
    """The 24 shapes with their captions, and 6 of the images again with a second caption: 30 pairs of 24 images, so
    that retrieval has to count rows of one image as one."""
    path = write_shapes_csv(folder, repeats=1)
    rows = list(csv.DictReader(path.open()))
    extra = [{**row, "caption": f"the {row['caption'].split()[1]} one, a {row['shape']}"} for row in rows[::4]]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "shape"])
        writer.writeheader()
        writer.writerows(rows + extra)
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def command_results(model_dirs, pairs, tmp_path_factory) -> dict[str, dict[str, float]]:
    """`run_clip.py --do_eval` on each model, driven from a working folder of its own, with labels and an extra set."""
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        for family, model_dir in model_dirs.items():
            work = tmp_path_factory.mktemp(f"run-{family}")
            patch.chdir(work)
            extra = json.dumps({"ref": {"path": str(pairs), "label_column": "shape"}})
            main(["--model_name_or_path", str(model_dir), "--validation_file", str(pairs), "--label_column", "shape",
                  "--do_eval", "--output_dir", "out", "--per_device_eval_batch_size", str(EVAL_BATCH),
                  "--extra_eval_sets", extra, *QUIET])  # fmt: skip
            results[family] = json.loads((work / "out" / "eval_results.json").read_text())
    return results


def load(model_dir: Path):
    return AutoModel.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir, backend="pil")


def validation_split(csv_path: Path) -> Dataset:
    data_args = DataArguments(validation_file=str(csv_path), label_column="shape")
    return load_image_text_data(data_args, seed=42, train=False).validation


# --------------------------------------------------------------------------------------------------------------
# The evaluator alone against the command, the trainer, and a computation of its own
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_evaluator_alone_reports_what_the_command_reports(family, model_dirs, pairs, command_results):
    model, processor = load(model_dirs[family])
    evaluator = RetrievalEvaluator(validation_split(pairs), batch_size=EVAL_BATCH)
    alone = evaluator(model, processor)
    # With labels and without hard negatives: retrieval and zero-shot.
    expected = {f"eval_{m.name}" for m in METRICS if m.by_evaluator and not m.needs_hard_negatives}
    assert set(alone) == expected
    assert alone == {key: command_results[family][key] for key in expected}
    # A named set reports under its name, as the command's extra set does.
    named = RetrievalEvaluator(validation_split(pairs), "ref", batch_size=EVAL_BATCH)(model, processor)
    assert named == {key: command_results[family][key] for key in named} and "eval_ref_zeroshot_top1" in named
    # The embeddings it scored stay with it (the gallery's input): one row per usable pair, normalised.
    kept = evaluator.last_embeddings
    assert kept["image_embeds"].shape[0] == kept["text_embeds"].shape[0] == 30 and kept["rows"].tolist() == [
        *range(30)
    ]
    assert torch.allclose(kept["text_embeds"].norm(dim=-1), torch.ones(30), atol=1e-5)
    assert kept["classifier"].shape[0] == 3  # circle, square, triangle


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_raw_dataset_with_its_id_and_label_columns_named_scores_as_the_command(
    family, model_dirs, pairs, command_results, monkeypatch
):
    # The user's own rows, read as they are, image paths relative to the working folder.
    monkeypatch.chdir(pairs.parent)
    rows = Dataset.from_list(list(csv.DictReader(pairs.open())))
    evaluator = RetrievalEvaluator(rows, image_id_column="image", label_column="shape", batch_size=EVAL_BATCH)
    alone = evaluator(*load(model_dirs[family]))
    assert alone == {key: command_results[family][key] for key in alone}
    # Without them every row is its own image, and there are no classes to score.
    apart = RetrievalEvaluator(rows, batch_size=EVAL_BATCH)
    assert set(apart(*load(model_dirs[family]))) == {f"eval_{name}" for name in RETRIEVAL_METRIC_NAMES}
    assert "image_ids" not in apart.last_embeddings


def independent_recalls(model, processor, pairs: Path, family: str) -> dict[str, float]:
    """t2i and i2t recall@k computed in float64 from the transformers processor's own inputs, with numpy ranking:
    rows of one image file are one image; a tie counts against the positive."""
    rows = list(csv.DictReader(pairs.open()))
    images = [Image.open(pairs.parent / row["image"]).convert("RGB") for row in rows]
    model = model.double().eval()
    # SigLIP's text tower reads captions padded to its one length; CLIP's to the longest caption.
    padding = {"clip": "longest", "siglip": "max_length"}[family]
    tokens = processor.tokenizer([row["caption"] for row in rows], padding=padding, max_length=POSITIONS[family],
                                 truncation=True, return_tensors="pt")  # fmt: skip
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"].double()
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=pixels)
        text_features = model.get_text_features(**tokens)
    image_features = getattr(image_features, "pooler_output", image_features).numpy()
    text_features = getattr(text_features, "pooler_output", text_features).numpy()
    image_features /= np.linalg.norm(image_features, axis=1, keepdims=True)
    text_features /= np.linalg.norm(text_features, axis=1, keepdims=True)

    files = list(dict.fromkeys(row["image"] for row in rows))
    image_of_row = np.array([files.index(row["image"]) for row in rows])
    gallery = np.stack([image_features[image_of_row.tolist().index(i)] for i in range(len(files))])
    scores = text_features @ gallery.T  # (captions, images)
    t2i_ranks = []
    for caption, image in enumerate(image_of_row):
        others = np.delete(scores[caption], image)
        t2i_ranks.append(1 + int(np.sum(others >= scores[caption, image])))
    i2t_ranks = []
    for image in range(len(files)):
        positives = image_of_row == image
        best = scores[positives, image].max()
        i2t_ranks.append(1 + int(np.sum(scores[~positives, image] >= best)))
    recalls = {}
    for direction, ranks in (("t2i", np.array(t2i_ranks)), ("i2t", np.array(i2t_ranks))):
        for k in (1, 5, 10):
            recalls[f"eval_{direction}_recall@{k}"] = float(np.mean(ranks <= k))
    return recalls


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_evaluator_equals_a_float64_computation_of_its_own(family, model_dirs, pairs):
    model, processor = load(model_dirs[family])
    metrics = RetrievalEvaluator(validation_split(pairs), batch_size=EVAL_BATCH)(model, processor)
    expected = independent_recalls(model, processor, pairs, family)
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-12)
    # Not a vacuous match: the random model ranks some positives first and misses others.
    assert 0 < metrics["eval_t2i_recall@10"] < 1 or 0 < metrics["eval_i2t_recall@10"] < 1


def test_the_trainers_metrics_of_an_extra_set_are_its_evaluators(model_dirs, pairs, tmp_path):
    other = write_shapes_csv(tmp_path / "other", repeats=2)
    model, processor = load(model_dirs["clip"])
    reference = validation_split(other)
    trainer = CLIPContrastiveTrainer(
        model=model,
        args=CLIPTrainingArguments(output_dir=str(tmp_path / "out"), **FAST_TRAINING),
        eval_dataset=validation_split(pairs),
        extra_eval_datasets={"ref": reference},
        processing_class=processor,
    )
    assert set(trainer.evaluators) == {"eval", "eval_ref"}
    assert trainer.evaluators["eval_ref"].dataset is reference
    together = trainer.evaluate()
    alone = RetrievalEvaluator(reference, "ref", batch_size=EVAL_BATCH)(model, processor)
    assert alone == {key: together[key] for key in alone}
    # The trainer handed the set's gathered embeddings to its evaluator, which keeps them.
    assert trainer.evaluators["eval_ref"].last_embeddings["image_embeds"].shape[0] == len(reference)
    # One log entry for the round, with every set's metrics in it.
    rounds = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(rounds) == 1 and "eval_ref_t2i_recall@1" in rounds[0] and "eval_t2i_recall@1" in rounds[0]


def test_unusable_rows_are_left_out_alike(model_dirs, pairs, tmp_path, monkeypatch):
    """A corrupt image never stops the evaluator: its row is left out, as if it were not in the set."""
    monkeypatch.chdir(pairs.parent)
    rows = list(csv.DictReader(pairs.open()))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with_broken = Dataset.from_list([*rows[:3], {**rows[3], "image": str(tmp_path / "broken.png")}, *rows[4:24]])
    without = Dataset.from_list([*rows[:3], *rows[4:24]])
    model, processor = load(model_dirs["clip"])
    evaluator = RetrievalEvaluator(with_broken, label_column="shape", batch_size=EVAL_BATCH)
    metrics = evaluator(model, processor)
    assert metrics.pop("eval_unusable_pairs") == 1  # said beside the metrics, which are over the 23 others
    assert metrics == RetrievalEvaluator(without, label_column="shape", batch_size=EVAL_BATCH)(model, processor)
    assert 3 not in evaluator.last_embeddings["rows"].tolist() and len(evaluator.last_embeddings["rows"]) == 23
    single = Dataset.from_list([rows[0], {**rows[1], "image": str(tmp_path / "broken.png")}])
    with pytest.raises(ValueError, match="1 usable pair"):
        RetrievalEvaluator(single)(model, processor)


# --------------------------------------------------------------------------------------------------------------
# The metric registry
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_registry_names_every_metric_an_evaluation_reports(family, command_results):
    results = command_results[family]
    metrics = {key: value for key, value in results.items() if not key.endswith(BOOKKEEPING)}
    by_set: dict[str | None, set[str]] = {}
    for key in metrics:
        split = split_metric_key(key)
        assert split is not None, f"{key} is reported but not in the metric registry"
        by_set.setdefault(split[0], set()).add(split[1].name)
    # Both sets have labels and no hard negatives; only the sigmoid loss has a bias to report.
    expected = {m.name for m in METRICS if (family == "siglip" or not m.sigmoid_only) and not m.needs_hard_negatives}
    assert by_set == {None: expected, "ref": expected}
    for key, value in metrics.items():
        info = split_metric_key(key)[1]
        if info.is_fraction:
            assert 0 <= value <= 1, key
        elif info.kind == "rank":
            assert value >= 1, key


def test_the_manual_lists_exactly_the_registry(tmp_path):
    text = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
    table = render_metric_table()
    assert table in text, "docs/evaluation.md's metric table is out of date: paste render_metric_table()'s output."
    start = text.index("<!-- The table is generated")
    section = text[start : text.index("<!-- End of the generated metric table. -->")]
    listed = re.findall(r"^\| `eval_([^`]+)` \|", section, flags=re.MULTILINE)
    assert listed == [m.name for m in METRICS]


def test_the_registrys_direction_is_the_one_checkpoint_selection_follows(tmp_path):
    for metric in METRICS:
        if metric.greater_is_better is None:
            continue
        args = CLIPTrainingArguments(
            output_dir=str(tmp_path), metric_for_best_model=f"eval_{metric.name}", report_to="none", use_cpu=True
        )
        assert args.greater_is_better is metric.greater_is_better, metric.name
    assert METRICS_BY_NAME["t2i_median_rank"].greater_is_better is False
