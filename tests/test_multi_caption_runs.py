"""Several captions per image and hard negatives through `run_clip.py` as a user runs it: a CSV of JSON lists in a
temporary folder. The loss logged at step 1 is the masked loss computed here from the model's own embeddings, and
the options train with both loss families, LoRA, partial locking, WiSE-FT, streaming, cached accumulation and
torchrun."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_evaluators import model_dirs  # noqa: F401 - the fixture: a tiny CLIP and a tiny SigLIP
from test_multi_caption import write_multi_caption_csv
from test_multi_caption_loss import reference_clip
from transformers import AutoModel, AutoProcessor

from clip_trainer import run
from clip_trainer.images import load_image

RUN = [
    "--train_file", "data/multi.csv",
    "--output_dir", "out",
    "--learning_rate", "1e-3",
    "--weight_decay", "0.0",
    "--warmup_steps", "0",
    "--lr_scheduler_type", "constant",
    "--logging_steps", "1",
    "--report_to", "none",
    "--dataloader_num_workers", "0",
    "--save_strategy", "no",
    "--use_cpu", "true",
    "--seed", "1",
    "--hard_negative_column", "negatives",
]  # fmt: skip


def _features(output) -> torch.Tensor:
    return F.normalize(getattr(output, "pooler_output", output).double(), dim=-1)


def test_the_loss_at_step_1_is_the_masked_loss_of_the_models_embeddings(tmp_path, monkeypatch, tiny_clip_dir):
    """One step over a batch of all 12 rows (6 images, two captions each, `caption_sampling all`): the logged loss
    is CLIP's loss with each image's second caption out of its candidates and its hard negative in them."""
    write_multi_caption_csv(tmp_path / "data", rows=6)
    monkeypatch.chdir(tmp_path)
    results = run.main(
        ["--model_name_or_path", str(tiny_clip_dir), *RUN, "--caption_sampling", "all", "--max_steps", "1",
         "--per_device_train_batch_size", "12", "--validation_split_percentage", "0", "--eval_strategy", "no"]
    )  # fmt: skip
    assert results["train_samples"] == 12

    # Independently, from the saved starting model: each row's image, caption and hard negative.
    model = AutoModel.from_pretrained(tiny_clip_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    images, texts, hard, ids = [], [], [], []
    with torch.no_grad(), (tmp_path / "data" / "multi.csv").open() as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            (negative,) = json.loads(row["negatives"])
            pixels = processor.image_processor(load_image(str(tmp_path / "data" / row["image"])), return_tensors="pt")
            features = _features(model.get_image_features(pixel_values=pixels.pixel_values))[0]
            for caption in json.loads(row["caption"]):
                tokens = processor.tokenizer(
                    [caption, negative], padding=True, truncation=True, max_length=16, return_tensors="pt"
                )
                caption_features, negative_features = _features(model.get_text_features(**tokens))
                images.append(features.tolist())
                texts.append(caption_features.tolist())
                hard.append([negative_features.tolist()])
                ids.append(index)
    scale = model.logit_scale.exp().item()
    masked = reference_clip(images, texts, scale, ids, hard=hard, hard_valid=[[True]] * len(ids))
    assert len(ids) == 12 and results["train_loss"] == pytest.approx(masked, rel=1e-4)
    # Without the mask and the hard negatives the loss is another: the test tells them apart.
    plain = reference_clip(images, texts, scale, list(range(12)))
    assert abs(plain - masked) > 0.05


def _run(tmp_path: Path, monkeypatch, model_dir: Path, *extra: str) -> dict:
    write_multi_caption_csv(tmp_path / "data", rows=24)
    monkeypatch.chdir(tmp_path)
    return run.main(
        ["--model_name_or_path", str(model_dir), *RUN, "--per_device_train_batch_size", "8",
         "--per_device_eval_batch_size", "16", "--num_train_epochs", "1", "--eval_strategy", "epoch", *extra]
    )  # fmt: skip


def _check(results: dict, images: int = 18) -> None:
    assert results["train_samples"] == images  # one training row per image: 24 less the 25% held out
    assert results["eval_samples"] == 12  # every caption of the 6 held-out images
    assert 0 <= results["eval_hard_negative_accuracy"] <= 1 and results["train_loss"] == results["train_loss"]


def test_a_multi_caption_run_with_hard_negatives_trains_and_evaluates(tmp_path, monkeypatch, tiny_clip_dir):
    _check(_run(tmp_path, monkeypatch, tiny_clip_dir, "--validation_split_percentage", "25"))


@pytest.mark.slow
def test_a_prepared_folder_draws_the_captions_its_files_draw(tmp_path, monkeypatch, tiny_clip_dir):
    # The folder a preparation run writes holds the images' bytes where the CSV held their paths: the caption drawn
    # for an image each epoch must not depend on how the image is stored, or the two runs train different models.
    first = _run(
        tmp_path, monkeypatch, tiny_clip_dir, "--validation_split_percentage", "25", "--num_train_epochs", "3"
    )
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    prepare = ["--model_name_or_path", str(tiny_clip_dir), *RUN, "--validation_split_percentage", "25"]
    prepare[prepare.index("--output_dir") + 1] = "prepared"
    run.main([*prepare, "--prepare_only", "true"])
    again = list(RUN)
    again[again.index("--train_file") : again.index("--train_file") + 2] = ["--dataset_name", "prepared"]
    again[again.index("--output_dir") + 1] = "out-prepared"
    second = run.main(["--model_name_or_path", str(tiny_clip_dir), *again, "--per_device_train_batch_size", "8",
                       "--per_device_eval_batch_size", "16", "--num_train_epochs", "3", "--eval_strategy", "epoch"])  # fmt: skip
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    prepared = json.loads((tmp_path / "out-prepared" / "trainer_state.json").read_text())
    assert [entry["loss"] for entry in prepared["log_history"] if "loss" in entry] == losses
    assert second["train_loss"] == first["train_loss"] and second["eval_loss"] == first["eval_loss"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--lora_rank", "2"],
        ["--vision_trainable_layers", "1", "--text_trainable_layers", "1"],
        ["--wise_ft_alpha", "0.5"],
        ["--gradient_accumulation_steps", "2", "--accumulation_mode", "cached"],
        ["--caption_sampling", '{"caption": 2, "keywords": 1}'],
    ],
    ids=["lora", "partial-locking", "wise-ft", "cached-accumulation", "weighted-columns"],
)
def test_the_options_train_together(tmp_path, monkeypatch, tiny_clip_dir, extra):
    results = _run(tmp_path, monkeypatch, tiny_clip_dir, "--validation_split_percentage", "25", *extra)
    if "keywords" in extra[-1]:
        assert results["eval_samples"] == 6 * 4  # both caption columns scored
    else:
        _check(results)


def test_the_sigmoid_loss_trains_with_several_captions_and_hard_negatives(tmp_path, monkeypatch, model_dirs):  # noqa: F811
    _check(_run(tmp_path, monkeypatch, model_dirs["siglip"], "--validation_split_percentage", "25"))


@pytest.mark.slow
def test_a_stream_with_several_captions_and_hard_negatives(tmp_path, monkeypatch, tiny_clip_dir):
    results = _run(
        tmp_path, monkeypatch, tiny_clip_dir, "--streaming", "true", "--max_steps", "3", "--max_eval_samples", "6",
        "--eval_strategy", "steps", "--eval_steps", "3", "--shuffle_buffer_size", "8",
    )  # fmt: skip
    assert results["eval_samples"] == 12 and 0 <= results["eval_hard_negative_accuracy"] <= 1


@pytest.mark.slow
def test_torchrun_with_several_captions_and_hard_negatives(tmp_path, tiny_clip_dir):
    from test_distributed_run import check_run, torchrun

    write_multi_caption_csv(tmp_path / "data", rows=24, shared_rows=True)
    args = [
        "--model_name_or_path", str(tiny_clip_dir), *RUN, "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--max_steps", "3", "--ddp_backend", "gloo",
        "--validation_split_percentage", "25", "--eval_strategy", "steps", "--eval_steps", "3",
    ]  # fmt: skip
    args = [str(tmp_path / arg) if arg in ("data/multi.csv", "out") else arg for arg in args]
    result = torchrun(args)
    check_run(result, tmp_path / "out", steps=3)
    metrics = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert 0 <= metrics["eval_hard_negative_accuracy"] <= 1
