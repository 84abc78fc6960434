"""Several captions per image: read from lists (or their JSON text in a CSV), from rows sharing an image, or from
several weighted columns; one drawn per image and epoch with the run's seed (the same with DataLoader workers, and
again in a rerun); every caption scored at evaluation."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import COLORS, FAST_TRAINING, draw_shape, shape_rows

from clip_trainer import CLIPContrastiveTrainer, CLIPTrainingArguments, DataArguments, load_image_text_data
from clip_trainer.captions import (
    CaptionSampledDataset,
    caption_list,
    choose_caption,
    key_to_id,
)
from clip_trainer.data import IMAGE_ID_COLUMN
from clip_trainer.errors import ConfigError


def write_multi_caption_csv(folder: Path, rows: int = 24, shared_rows: bool = False) -> Path:
    """Shapes with two captions each: a JSON list in the `caption` cell (or, with `shared_rows`, two rows of the same
    image file), a `keywords` column of two more, and a JSON list of one hard negative (another colour)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / "multi.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "keywords", "negatives"])
        for color, shape, background, caption in shape_rows()[:rows]:
            file = f"images/{color}_{shape}_{background}.png"
            draw_shape(color, shape, background).save(folder / file)
            other = next(name for name in COLORS if name != color)
            negatives = json.dumps([f"a {other} {shape} on {background}"])
            keywords = json.dumps([color, shape])
            second = f"{shape}, {color}, {background} background"
            if shared_rows:
                writer.writerow([file, caption, keywords, negatives])
                writer.writerow([file, second, keywords, negatives])
            else:
                writer.writerow([file, json.dumps([caption, second]), keywords, negatives])
    return path


# --------------------------------------------------------------------------------------------------------------
# Reading and drawing captions
# --------------------------------------------------------------------------------------------------------------


def test_caption_lists_are_read_from_lists_json_text_and_single_captions():
    assert caption_list('["a cat", " ", "a cat on a mat"]') == ["a cat", "a cat on a mat"]
    assert caption_list(["a dog", None, float("nan"), 7]) == ["a dog", "7"]
    assert caption_list("  a bird ") == ["a bird"]
    assert caption_list("[draft] a cat [v2]") == ["[draft] a cat [v2]"]  # looks like a list, is a caption
    assert caption_list(None) == [] and caption_list("   ") == [] and caption_list("[]") == []


def test_the_draw_is_seeded_by_run_epoch_and_image_and_follows_the_weights():
    captions = [["a", "b", "c"], ["x"]]
    draws = [choose_caption(captions, [3.0, 1.0], seed=1, draw=epoch, image=5) for epoch in range(400)]
    assert draws == [choose_caption(captions, [3.0, 1.0], seed=1, draw=epoch, image=5) for epoch in range(400)]
    assert draws != [choose_caption(captions, [3.0, 1.0], seed=2, draw=epoch, image=5) for epoch in range(400)]
    counts = Counter(draws)
    # Column weights 3:1, then uniform within the column: a, b, c 1/4 each and x 1/4.
    assert set(counts) == {"a", "b", "c", "x"} and all(abs(n / 400 - 0.25) < 0.07 for n in counts.values())
    # A column the image has no caption in is not drawn, whatever its weight.
    assert {choose_caption([[], ["x", "y"]], [100.0, 1.0], 0, epoch, 1) for epoch in range(50)} == {"x", "y"}
    assert choose_caption([[], []], None, 0, 0, 1) is None
    assert key_to_id("path:/a.png") == key_to_id("path:/a.png") != key_to_id("path:/b.png")


# --------------------------------------------------------------------------------------------------------------
# Loading: training merges an image's captions, evaluation spreads them
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_rows", [False, True], ids=["json-list-cells", "rows-sharing-an-image"])
def test_training_has_one_row_per_image_and_evaluation_one_row_per_caption(tmp_path, shared_rows):
    csv_path = write_multi_caption_csv(tmp_path, rows=12, shared_rows=shared_rows)
    train = load_image_text_data(DataArguments(train_file=str(csv_path)), seed=0, evaluate=False).train
    assert len(train) == 12
    assert all(len(captions) == 2 for captions in train["caption"])
    # Evaluation: every caption a row, the two rows of an image sharing its id.
    validation = load_image_text_data(DataArguments(validation_file=str(csv_path)), seed=0, train=False).validation
    assert len(validation) == 24 and all(isinstance(caption, str) for caption in validation["caption"])
    ids = Counter(validation[IMAGE_ID_COLUMN])
    assert len(ids) == 12 and set(ids.values()) == {2}
    # `all`: every caption a training pair every epoch.
    spread = load_image_text_data(
        DataArguments(train_file=str(csv_path), caption_sampling="all"), seed=0, evaluate=False
    ).train
    assert len(spread) == 24 and all(isinstance(caption, str) for caption in spread["caption"])


def test_weighted_columns_are_kept_for_training_and_scored_at_evaluation(tmp_path):
    csv_path = write_multi_caption_csv(tmp_path, rows=6)
    args = DataArguments(train_file=str(csv_path), caption_sampling='{"caption": 2, "keywords": 1}')
    assert args.caption_sampling == {"caption": 2.0, "keywords": 1.0}
    train = load_image_text_data(args, seed=0, evaluate=False).train
    assert len(train) == 6 and train[0]["keywords"] == ["red", "circle"]
    validation = load_image_text_data(
        DataArguments(validation_file=str(csv_path), caption_sampling={"caption": 2, "keywords": 1}),
        seed=0,
        train=False,
    ).validation
    assert len(validation) == 6 * 4 and "circle" in validation["caption"]
    with pytest.raises(ConfigError, match="`caption_sampling`.*'titles'.*no such column"):
        load_image_text_data(
            DataArguments(train_file=str(csv_path), caption_sampling={"caption": 1, "titles": 1}), seed=0
        )


def test_one_caption_per_image_is_left_as_it_is(shapes_csv):
    train = load_image_text_data(DataArguments(train_file=str(shapes_csv)), seed=0, evaluate=False).train
    assert len(train) == 72 and isinstance(train[0]["caption"], str)


@pytest.mark.parametrize(
    "value, message",
    [
        ("uniformly", "set it to uniform, all, or a JSON object.*Did you mean"),
        ('{"caption": 1', "not valid JSON"),
        ('{"caption": 0, "keywords": 1}', "the weight 0; each key must be a caption column"),
        ('{"keywords": 1}', "but not `caption_column` \\('caption'\\)"),
        ('{"caption": 1, "caption": 2}', "the key 'caption' twice"),
    ],
)
def test_bad_caption_sampling_is_one_line_with_the_fix(value, message):
    with pytest.raises(ConfigError, match=message) as error:
        DataArguments(caption_sampling=value)
    assert "\n" not in str(error.value)


def test_a_hard_negative_column_cannot_be_a_caption_column():
    with pytest.raises(ConfigError, match="`hard_negative_column` is 'caption'"):
        DataArguments(hard_negative_column="caption")


# --------------------------------------------------------------------------------------------------------------
# Drawing per epoch, through the DataLoader and the Trainer
# --------------------------------------------------------------------------------------------------------------


def _epoch_captions(dataset: CaptionSampledDataset, epochs: int, workers: int) -> list[dict[str, str]]:
    sampler = dataset.sampler()
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=5,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=lambda rows: [(str(row["image"]), row["caption"]) for row in rows],
    )
    seen = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        seen.append(dict(pair for batch in loader for pair in batch))
    return seen


def test_each_epoch_draws_one_caption_per_image_and_workers_see_the_epoch(tmp_path):
    csv_path = write_multi_caption_csv(tmp_path, rows=12)
    args = DataArguments(train_file=str(csv_path))
    train = load_image_text_data(args, seed=0, evaluate=False).train
    dataset = CaptionSampledDataset.from_arguments(train, args, seed=3)
    in_process = _epoch_captions(dataset, epochs=3, workers=0)
    options = {str(row["image"]): set(row["caption"]) for row in train}
    for epoch in in_process:
        assert len(epoch) == 12 and all(caption in options[image] for image, caption in epoch.items())
    assert in_process[0] != in_process[1] != in_process[2]
    # Persistent workers live across epochs: the epoch reaches them with the indices, so they draw the same captions.
    assert _epoch_captions(dataset, epochs=3, workers=1) == in_process


class _RecordingCollator:
    def __init__(self, collator) -> None:
        self.collator = collator
        self.captions: list[str] = []

    def __call__(self, rows):
        self.captions.extend(row["caption"] for row in rows)
        return self.collator(rows)


def _train_and_record(tmp_path: Path, model_dir: Path, csv_path: Path, name: str) -> list[str]:
    from transformers import AutoModel, AutoProcessor

    args = CLIPTrainingArguments(output_dir=str(tmp_path / name), **{**FAST_TRAINING, "num_train_epochs": 3})
    data_args = DataArguments(train_file=str(csv_path))
    data = load_image_text_data(data_args, seed=args.seed, evaluate=False)
    trainer = CLIPContrastiveTrainer(
        model=AutoModel.from_pretrained(model_dir),
        args=args,
        data_args=data_args,
        train_dataset=data.train,
        processing_class=AutoProcessor.from_pretrained(model_dir, backend="pil"),
    )
    assert isinstance(trainer.train_dataset, CaptionSampledDataset)
    trainer.data_collator = recorder = _RecordingCollator(trainer.data_collator)
    trainer.train()
    return recorder.captions


def _image_of(caption: str) -> tuple[str, str, str]:
    """(colour, shape, background) of either caption `write_multi_caption_csv` writes."""
    if caption.startswith("a "):
        _, color, shape, _, background = caption.split()
        return color, shape, background
    shape, color, background = caption.removesuffix(" background").split(", ")
    return color, shape, background


def test_the_trainer_draws_a_caption_per_image_each_epoch_and_repeats_the_draw(tmp_path, tiny_clip_dir):
    csv_path = write_multi_caption_csv(tmp_path, rows=12)
    first = _train_and_record(tmp_path, tiny_clip_dir, csv_path, "first")
    assert len(first) == 3 * 12  # three epochs of the 12 images, one caption each
    epochs = [first[12 * epoch : 12 * (epoch + 1)] for epoch in range(3)]
    assert all(len({_image_of(caption) for caption in epoch}) == 12 for epoch in epochs)
    # Both captions of the images come up over the epochs, and the run's seed repeats the draw exactly.
    assert len(set(first)) > 12
    assert _train_and_record(tmp_path, tiny_clip_dir, csv_path, "again") == first


def test_a_stream_draws_one_caption_per_row_and_pass(tmp_path):
    csv_path = write_multi_caption_csv(tmp_path, rows=12)
    args = DataArguments(train_file=str(csv_path), streaming=True, shuffle_buffer_size=4)
    rows = list(load_image_text_data(args, seed=0, evaluate=False).train.take(12 * 4))
    assert all(isinstance(row["caption"], str) for row in rows)
    by_image: dict[tuple, set[str]] = {}
    for row in rows:
        by_image.setdefault(_image_of(row["caption"]), set()).add(row["caption"])
    # Four passes over 12 images: every image drawn 4 times, and most of them show both captions.
    assert len(by_image) == 12 and sum(len(captions) == 2 for captions in by_image.values()) >= 6
    again = list(load_image_text_data(args, seed=0, evaluate=False).train.take(12 * 4))
    assert [row["caption"] for row in again] == [row["caption"] for row in rows]


# --------------------------------------------------------------------------------------------------------------
# The collator: image ids for training rows, hard negatives after the captions
# --------------------------------------------------------------------------------------------------------------


def _collator(tiny_clip_dir, **kwargs):
    from transformers import AutoProcessor

    from clip_trainer.collator import ImageTextCollator

    processor = AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    return ImageTextCollator.from_processor(processor, max_seq_length=12, **kwargs)


def test_training_rows_carry_image_ids_and_the_same_image_gets_the_same_id(tiny_clip_dir, tmp_path):
    import io

    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    draw_shape("red", "circle").save(red)
    draw_shape("blue", "square").save(blue)
    buffer = io.BytesIO()
    draw_shape("green", "triangle").save(buffer, format="PNG")
    data = {"bytes": buffer.getvalue(), "path": None}
    rows = [
        {"image": str(red), "caption": "a red circle"},
        {"image": str(blue), "caption": "a blue square"},
        {"image": str(red), "caption": "red, round"},  # the first row's image again
        {"image": data, "caption": "a green triangle"},
        {"image": dict(data), "caption": "green, pointed"},  # the same bytes again
    ]
    ids = _collator(tiny_clip_dir)(rows)["image_ids"].tolist()
    assert ids[0] == ids[2] and ids[3] == ids[4] and len(set(ids)) == 3
    # `image_id_column` decides when given: other files, one id.
    named = [{**row, "item": "sku-1" if index < 2 else f"sku-{index}"} for index, row in enumerate(rows)]
    ids = _collator(tiny_clip_dir, image_id_column="item")(named)["image_ids"].tolist()
    assert ids[0] == ids[1] and len(set(ids)) == 4
    # Validation rows keep their `_image_id`; an evaluation collator gives rows without one none.
    assert _collator(tiny_clip_dir)([{**rows[0], IMAGE_ID_COLUMN: 7}])["image_ids"].tolist() == [7]
    assert "image_ids" not in _collator(tiny_clip_dir, row_image_ids=False)(rows)


def test_hard_negatives_are_tokenized_after_the_captions_with_their_rows_slots(tiny_clip_dir):
    collator = _collator(tiny_clip_dir, hard_negative_column="negatives")
    rows = [
        {
            "image": draw_shape("red", "circle"),
            "caption": "a red circle",
            "negatives": '["a blue circle", "a red square"]',
        },
        {"image": draw_shape("blue", "square"), "caption": "a blue square", "negatives": None},
        {"image": draw_shape("green", "triangle"), "caption": "a green triangle", "negatives": "a green circle"},
        {"image": None, "caption": "unusable", "negatives": ["a thing"]},  # left out: no negatives either
    ]
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == 4 + 3
    assert batch["hard_negative_index"].tolist() == [[0, 1], [-1, -1], [2, -1], [-1, -1]]
    decoded = collator.tokenizer.batch_decode(batch["input_ids"][4:], skip_special_tokens=True)
    assert [text.replace(" ", "") for text in decoded] == ["abluecircle", "aredsquare", "agreencircle"]
    # A batch without any still says so (0 slots), so that every process passes the loss the same inputs.
    none = collator([{**row, "negatives": None} for row in rows[:2]])
    assert none["hard_negative_index"].shape == (2, 0) and none["input_ids"].shape[0] == 2
    assert "hard_negative_index" not in _collator(tiny_clip_dir, hard_negative_column="negatives")(
        [{"image": draw_shape("red", "circle"), "caption": "a red circle"}]
    )


def test_a_dataset_given_to_the_trainer_directly_draws_from_its_weighted_columns():
    from datasets import Dataset

    from clip_trainer.captions import needs_caption_sampling

    dataset = Dataset.from_dict(
        {"image": ["a.png", "b.png"], "caption": ["a cat", "a dog"], "keywords": ["cat", "dog"]}
    )
    args = DataArguments(caption_sampling={"caption": 1, "keywords": 1})
    assert needs_caption_sampling(dataset, args) and not needs_caption_sampling(dataset, DataArguments())
    sampled = CaptionSampledDataset.from_arguments(dataset, args, seed=0)
    drawn = {sampled[epoch * 2]["caption"] for epoch in range(40)}
    assert drawn == {"a cat", "cat"}


def test_another_sampling_strategy_is_refused_for_images_with_several_captions(tmp_path, tiny_clip_dir):
    from transformers import AutoModel, AutoProcessor

    data_args = DataArguments(train_file=str(write_multi_caption_csv(tmp_path, rows=4)))
    train = load_image_text_data(data_args, seed=0, evaluate=False).train
    args = CLIPTrainingArguments(
        output_dir=str(tmp_path / "out"), train_sampling_strategy="sequential", **FAST_TRAINING
    )
    with pytest.raises(ConfigError, match="`train_sampling_strategy` is sequential.*use random"):
        CLIPContrastiveTrainer(
            model=AutoModel.from_pretrained(tiny_clip_dir),
            args=args,
            data_args=data_args,
            train_dataset=train,
            processing_class=AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil"),
        )
