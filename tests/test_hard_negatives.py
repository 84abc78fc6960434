"""Hard negatives at evaluation (`eval_hard_negative_accuracy`, against the model's own embeddings computed here),
and the combinations that are refused in one line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST_TRAINING
from PIL import Image
from test_multi_caption import write_multi_caption_csv
from transformers import AutoModel, AutoProcessor

from clip_trainer import CLIPContrastiveTrainer, CLIPTrainingArguments, DataArguments, load_image_text_data
from clip_trainer.captions import caption_list
from clip_trainer.errors import ConfigError
from clip_trainer.evaluation import RetrievalEvaluator, hard_negative_accuracy
from clip_trainer.images import load_image
from clip_trainer.run import main
from clip_trainer.validation import check_training_arguments


def test_hard_negative_accuracy_counts_ties_and_nan_against_the_caption():
    images = torch.eye(4)
    texts = torch.eye(4)  # each caption scores 1 with its image
    best = torch.tensor([0.5, 1.0, float("nan"), 2.0])  # below, a tie, NaN, above
    present = torch.tensor([True, True, True, False])  # the last has none: not counted
    assert hard_negative_accuracy(images, texts, best, present) == pytest.approx(1 / 3)
    assert math.isnan(hard_negative_accuracy(images, texts, best, torch.zeros(4, dtype=torch.bool)))


def _features(output) -> torch.Tensor:
    return F.normalize(getattr(output, "pooler_output", output).double(), dim=-1)


@pytest.fixture
def evaluated(tmp_path, tiny_clip_dir):
    csv_path = write_multi_caption_csv(tmp_path, rows=12)
    data_args = DataArguments(validation_file=str(csv_path), hard_negative_column="negatives")
    validation = load_image_text_data(data_args, seed=0, train=False).validation
    model = AutoModel.from_pretrained(tiny_clip_dir)
    processor = AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    args = CLIPTrainingArguments(output_dir=str(tmp_path / "out"), **FAST_TRAINING)
    trainer = CLIPContrastiveTrainer(
        model=model, args=args, data_args=data_args, eval_dataset=validation, processing_class=processor
    )
    return trainer, validation, model, processor


def test_the_evaluation_reports_hard_negative_accuracy_from_the_models_embeddings(evaluated):
    trainer, validation, model, processor = evaluated
    metrics = trainer.evaluate()

    # Independently: the processor's own preprocessing and the towers' features, row by row.
    model.eval()
    wins, margins = [], []
    with torch.no_grad():
        for row in validation:
            pixels = processor.image_processor(load_image(row["image"]), return_tensors="pt").pixel_values
            image = _features(model.get_image_features(pixel_values=pixels))
            texts = [row["caption"], *caption_list(row["negatives"])]
            tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
            scores = (image @ _features(model.get_text_features(**tokens)).T)[0]
            wins.append(bool(scores[0] > scores[1:].max()))
            margins.append(abs(float(scores[0] - scores[1:].max())))
    assert len(wins) == 24 and 0 < sum(wins) < 24 and min(margins) > 1e-4  # no near-tie for float paths to flip
    assert metrics["eval_hard_negative_accuracy"] == pytest.approx(sum(wins) / len(wins), abs=1e-12)
    # The evaluator alone reports the same, and so does any set without the column: nothing.
    alone = RetrievalEvaluator(validation, hard_negative_column="negatives")(model, processor)
    assert alone["eval_hard_negative_accuracy"] == metrics["eval_hard_negative_accuracy"]
    assert "eval_hard_negative_accuracy" not in RetrievalEvaluator(validation)(model, processor)


def test_hard_negatives_enter_the_evaluation_loss(evaluated, tmp_path, tiny_clip_dir):
    trainer, validation, model, processor = evaluated
    with_negatives = trainer.evaluate()["eval_loss"]
    plain = CLIPContrastiveTrainer(
        model=model,
        args=CLIPTrainingArguments(output_dir=str(tmp_path / "plain"), **FAST_TRAINING),
        eval_dataset=validation,
        processing_class=processor,
    ).evaluate()["eval_loss"]
    assert with_negatives > plain  # more candidates for every image, never a positive


def test_choosing_the_best_model_by_hard_negative_accuracy_needs_the_column():
    args = CLIPTrainingArguments(
        output_dir="out", metric_for_best_model="eval_hard_negative_accuracy", **FAST_TRAINING
    )
    with pytest.raises(ConfigError, match="Hard-negative accuracy needs `hard_negative_column`"):
        check_training_arguments(DataArguments(), args)
    check_training_arguments(DataArguments(hard_negative_column="negatives"), args)


def test_a_mixture_refuses_hard_negatives_and_caption_columns(shapes_csv):
    args = CLIPTrainingArguments(output_dir="out", **FAST_TRAINING)
    mixture = {str(shapes_csv): 1}
    for extra, message in (
        ({"hard_negative_column": "negatives"}, "`hard_negative_column` is set, but a `train_mixture`"),
        ({"caption_sampling": {"caption": 1, "shape": 1}}, "`caption_sampling` draws from several caption columns"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_training_arguments(DataArguments(train_mixture=mixture, **extra), args)


def test_a_loss_without_hard_negatives_is_refused_and_one_without_ids_still_trains(
    tmp_path, tiny_clip_dir, shapes_csv, monkeypatch
):
    from clip_trainer.losses import ContrastiveLoss

    monkeypatch.setattr(ContrastiveLoss, "registry", dict(ContrastiveLoss.registry))

    class OldStyleLoss(ContrastiveLoss):  # written before image ids and hard negatives existed
        name = "old-style"
        card_text = "an old-style loss"

        def __call__(self, image_embeds, text_embeds, *scalars, pad_to=None, valid=None):
            return (scalars[0] * image_embeds @ text_embeds.T).logsumexp(1).mean()

    def build(data_args):
        return CLIPContrastiveTrainer(
            model=AutoModel.from_pretrained(tiny_clip_dir),
            args=CLIPTrainingArguments(output_dir=str(tmp_path / "out"), loss_type="old-style", **FAST_TRAINING),
            data_args=data_args,
            train_dataset=load_image_text_data(DataArguments(train_file=str(shapes_csv)), 0, evaluate=False).train,
            processing_class=AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil"),
        )

    with pytest.raises(ConfigError, match="the loss OldStyleLoss takes no `hard_negatives`"):
        build(DataArguments(hard_negative_column="negatives"))
    trainer = build(DataArguments())
    assert trainer._loss_relations == set()
    trainer.args.max_steps = 1
    trainer.train()  # called as it always was: no image ids passed


def test_the_collator_flags_hard_negatives_with_the_captions_tokens(tiny_clip_dir):
    from clip_trainer.collator import ImageTextCollator

    processor = AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    collator = ImageTextCollator.from_processor(processor, max_seq_length=16, hard_negative_column="negatives")
    picture = Image.new("RGB", (8, 8))
    rows = [
        {"image": picture, "caption": "a red square", "negatives": ["a blue square", "a red square"]},
        {"image": picture, "caption": "a long caption about a green circle", "negatives": "a red square"},
        {"image": picture, "caption": "a cat", "negatives": []},
    ]
    batch = collator(rows)
    # Row 1's negative is row 0's caption, not its own; row 0's second slot is its own caption; empty slots are not.
    assert batch["hard_negative_is_caption"].tolist() == [[False, True], [False, False], [False, False]]


@pytest.mark.slow
def test_a_hard_negative_with_the_captions_tokens_ties_at_every_evaluation_batch_size(
    tmp_path, tiny_clip_dir, monkeypatch
):
    """A hard negative whose tokens are its row's caption's (the same text, or text the tokenizer reads alike) is a
    tie, and a tie counts against the caption; scored from its own embedding it won or lost by float noise that
    changes with the batch it was embedded in, so the metric changed with `per_device_eval_batch_size`."""
    import csv
    import json

    from clip_trainer.cli import main

    monkeypatch.chdir(tmp_path)
    source = write_multi_caption_csv(tmp_path / "data", rows=12)
    rows = list(csv.DictReader(source.open()))
    with open("eval.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "negatives"])
        writer.writeheader()
        for number, row in enumerate(rows):
            caption = json.loads(row["caption"])[0]
            negatives = json.loads(row["negatives"])
            if number % 3 == 0:  # the caption itself among the hard negatives
                negatives = [*negatives, caption]
            writer.writerow(
                {
                    "image": str(tmp_path / "data" / row["image"]),
                    "caption": caption,
                    "negatives": json.dumps(negatives),
                }
            )

    # Independently, in float64: a row wins when its caption scores strictly above every hard negative that is not
    # its caption; a row whose negatives hold its caption cannot win.
    model = AutoModel.from_pretrained(tiny_clip_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    wins = []
    with torch.no_grad():
        for row in csv.DictReader(open("eval.csv")):
            negatives = json.loads(row["negatives"])
            if row["caption"] in negatives:
                wins.append(False)
                continue
            pixels = processor.image_processor(load_image(row["image"]), return_tensors="pt").pixel_values
            image = _features(model.get_image_features(pixel_values=pixels))
            tokens = processor.tokenizer([row["caption"], *negatives], padding=True, return_tensors="pt")
            scores = (image @ _features(model.get_text_features(**tokens)).T)[0]
            wins.append(bool(scores[0] > scores[1:].max()))
    expected = sum(wins) / len(wins)
    assert 0 < sum(wins) < 8  # four rows tie; some of the others win

    for batch_size in (1, 3, 5, 12):
        output = tmp_path / f"batch-{batch_size}"
        argv = [
            "eval",
            "--model_name_or_path",
            str(tiny_clip_dir),
            "--validation_file",
            "eval.csv",
            "--hard_negative_column",
            "negatives",
            "--per_device_eval_batch_size",
            str(batch_size),
            "--output_dir",
            str(output),
            "--report_to",
            "none",
            "--use_cpu",
            "true",
        ]
        assert main(argv) == 0
        results = json.loads((output / "eval_results.json").read_text())
        assert results["eval_hard_negative_accuracy"] == pytest.approx(expected, abs=1e-12), batch_size


def _write_shard_with_negatives(path, rows) -> list[tuple[Image.Image, str, list[str]]]:
    """A WebDataset shard whose json member holds each sample's caption and its hard negatives (the same shape in
    another colour)."""
    import io
    import json
    import tarfile

    from conftest import draw_shape, shape_rows
    from test_webdataset import _add_member

    samples = []
    with tarfile.open(path, "w") as tar:
        for index, (color, shape, background, caption) in enumerate(shape_rows()[:rows]):
            picture = draw_shape(color, shape, background, size=40 + index)
            negatives = [caption.replace(color, other) for other in ("red", "green") if other != color][:1]
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            _add_member(tar, f"k{index:03d}.png", buffer.getvalue())
            _add_member(tar, f"k{index:03d}.json", json.dumps({"caption": caption, "negatives": negatives}).encode())
            samples.append((picture, caption, negatives))
    return samples


def test_tar_shards_carry_hard_negatives_in_their_json(base_args, tmp_path, monkeypatch):
    # `hard_negative_column` names a json key of the samples, as `caption_column` and `label_column` may.
    monkeypatch.chdir(tmp_path)
    _write_shard_with_negatives(tmp_path / "train.tar", rows=16)
    validation = _write_shard_with_negatives(tmp_path / "val.tar", rows=12)
    argv = list(base_args)
    argv[argv.index("--train_file") + 1] = "train.tar"
    argv[argv.index("--output_dir") + 1] = "out"
    for spelling in ("negatives", "json.negatives"):
        data = load_image_text_data(
            DataArguments(train_file="train.tar", validation_file="val.tar", hard_negative_column=spelling), seed=0
        )
        assert caption_list(data.validation[0][spelling]) == validation[0][2]
    metrics = main([*argv, "--validation_file", "val.tar", "--hard_negative_column", "negatives", "--max_steps", "2",
                    "--do_train", "--do_eval"])  # fmt: skip

    # Independently, from the saved model in float64: each image against its caption and its hard negatives.
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "out", backend="pil")
    wins = []
    with torch.no_grad():
        for picture, caption, negatives in validation:
            image = _features(model.get_image_features(**processor.image_processor(picture, return_tensors="pt")))
            tokens = processor.tokenizer([caption, *negatives], padding=True, return_tensors="pt")
            scores = (image @ _features(model.get_text_features(**tokens)).T)[0]
            wins.append(bool(scores[0] > scores[1:].max()))
    assert metrics["eval_hard_negative_accuracy"] == pytest.approx(sum(wins) / len(wins), abs=1e-12)
