"""The collator's tensors: uint8 pixels of the model's size, dynamically padded and truncated captions, unusable
rows kept as flagged placeholders."""

from __future__ import annotations

import io

import torch
from conftest import draw_shape
from transformers import AutoProcessor

from clip_trainer.collator import ImageTextCollator
from clip_trainer.data import IMAGE_ID_COLUMN, LABEL_COLUMN


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_collator(tiny_clip_dir, **kwargs) -> tuple[ImageTextCollator, object]:
    processor = AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    return ImageTextCollator.from_processor(processor, max_seq_length=8, **kwargs), processor


def test_batch_tensors(tiny_clip_dir, tmp_path):
    collator, processor = make_collator(tiny_clip_dir)
    path = tmp_path / "a.png"
    draw_shape("red", "circle", size=50).save(path)
    rows = [
        {"image": str(path), "caption": "a red circle"},  # a path
        {
            "image": {"bytes": png_bytes(draw_shape("blue", "square", size=64)), "path": None},
            "caption": "a blue square",
        },
        {"image": draw_shape("green", "triangle", size=20), "caption": "a green triangle on white " * 10},  # PIL
    ]
    batch = collator(rows)
    assert batch["pixel_values"].dtype == torch.uint8
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    # Dynamic padding to the longest caption, truncated at max_seq_length, ending with the end token.
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 8)
    assert batch["attention_mask"][0].sum() < 8
    assert batch["input_ids"][2, -1].item() == processor.tokenizer.eos_token_id
    assert batch["valid"].tolist() == [True, True, True]
    # Pixels equal the image processor's after normalisation (the trainer normalises on the device).
    expected = processor.image_processor(draw_shape("red", "circle", size=50), return_tensors="pt").pixel_values[0]
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    torch.testing.assert_close((batch["pixel_values"][0].float() / 255 - mean) / std, expected, atol=1e-5, rtol=0)


def test_short_batch_pads_less(tiny_clip_dir):
    collator, _ = make_collator(tiny_clip_dir)
    batch = collator([{"image": draw_shape("red", "circle"), "caption": "red"}])
    assert batch["input_ids"].shape[1] < 8


def test_padding_to_max_length_gives_one_shape(tiny_clip_dir):
    collator, _ = make_collator(tiny_clip_dir, padding="max_length")
    batch = collator([{"image": draw_shape("red", "circle"), "caption": "red"}])
    assert batch["input_ids"].shape[1] == 8


def test_unusable_rows_are_flagged_placeholders(tiny_clip_dir, tmp_path):
    collator, _ = make_collator(tiny_clip_dir)
    rows = [
        {"image": draw_shape("red", "circle"), "caption": "a red circle"},
        {"image": str(tmp_path / "missing.png"), "caption": "gone"},
        {"image": {"bytes": b"not an image", "path": None}, "caption": "junk"},
        {"image": draw_shape("red", "square"), "caption": "   "},
    ]
    batch = collator(rows)
    # Every row keeps its place, so a batch of only bad samples is still a batch the model can take.
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == 4
    assert batch["valid"].tolist() == [True, False, False, False]
    assert batch["pixel_values"][1:].sum() == 0
    all_bad = collator(rows[1:2])
    assert all_bad["pixel_values"].shape == (1, 3, 32, 32) and all_bad["valid"].tolist() == [False]


def test_a_bad_tar_sample_is_named_by_its_key_and_shard(tiny_clip_dir, caplog):
    """A stream's samples reach no up-front check: the collator's warning names the sample, not only the fault."""
    import logging

    collator, _ = make_collator(tiny_clip_dir)
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    collator([{"image": draw_shape("red", "circle"), "caption": "a", "__key__": "s0_000", "__url__": "a/00000.tar"},
              {"image": {"bytes": b"junk", "path": None}, "caption": "b", "__key__": "s0_001",
               "__url__": "a/00000.tar"}])  # fmt: skip
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Leaving out")]
    assert said == [said[0]] and said[0].startswith("Leaving out a sample s0_001 of a/00000.tar that cannot be used")


def test_evaluation_rows_carry_ids_labels_and_placeholders(tiny_clip_dir):
    collator, _ = make_collator(tiny_clip_dir)
    rows = [
        {"image": draw_shape("red", "circle"), "caption": "a", IMAGE_ID_COLUMN: 0, LABEL_COLUMN: 2},
        {"image": {"bytes": b"", "path": None}, "caption": "b", IMAGE_ID_COLUMN: 1, LABEL_COLUMN: 0},
    ]
    batch = collator(rows)
    assert batch["pixel_values"].shape[0] == 2  # the bad row stays as a placeholder...
    assert batch["valid"].tolist() == [True, False]  # ...flagged, so it is left out of the metrics
    assert batch["image_ids"].tolist() == [0, 1]
    assert batch["class_labels"].tolist() == [2, 0]
