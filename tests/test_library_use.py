"""The trainer used from a script, with data built in memory: it prepares and checks what it is given as the command
prepares and checks what it loads (image ids and class labels of evaluation sets, the columns, a batch with
negatives), `predict` reports `evaluate`'s numbers, plain `TrainingArguments` keep a rank lower-better, a dict of
evaluation sets is checked by its names, and a script with DataLoader workers ends quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_shape, shape_rows
from datasets import Dataset
from transformers import AutoModel, AutoProcessor, TrainingArguments

from clip_trainer import CLIPContrastiveTrainer, CLIPTrainingArguments, DataArguments
from clip_trainer.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def photo_rows() -> Dataset:
    """12 pictures with two captions each, one row per caption: `photo` says which rows show one picture (the
    pictures are drawn twice, as separate objects: nothing but the column says they are one), `shape` is a class."""
    rows = []
    for index, (color, shape, background, caption) in enumerate(shape_rows()[:12]):
        for text in (caption, f"{shape} in {color}"):
            rows.append({"image": draw_shape(color, shape, background, size=40 + index), "caption": text,
                         "photo": f"p{index}", "shape": shape})  # fmt: skip
    return Dataset.from_list(rows)


def trainer_for(model_dir: Path, tmp_path: Path, **kwargs) -> CLIPContrastiveTrainer:
    arguments = {"output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none", "eval_strategy": "no",
                 "dataloader_num_workers": 0, "per_device_eval_batch_size": 7, **kwargs.pop("args", {})}  # fmt: skip
    return CLIPContrastiveTrainer(
        model=AutoModel.from_pretrained(model_dir),
        args=CLIPTrainingArguments(**arguments),
        processing_class=AutoProcessor.from_pretrained(model_dir, backend="pil"),
        **kwargs,
    )


def reference_t2i_recall_at_1(model_dir: Path, dataset: Dataset) -> float:
    """Written out in float64: each caption ranks the distinct pictures (rows of one `photo` are one picture)."""
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    model = AutoModel.from_pretrained(model_dir).eval()
    row_photos, captions = list(dataset["photo"]), list(dataset["caption"])
    photos = list(dict.fromkeys(row_photos))
    first_row = [row_photos.index(photo) for photo in photos]
    with torch.no_grad():
        text = processor.tokenizer(captions, padding=True, return_tensors="pt")
        text_embeds = model.get_text_features(**text)
        pixels = processor.image_processor([dataset[row]["image"] for row in first_row], return_tensors="pt")
        image_embeds = model.get_image_features(pixel_values=pixels["pixel_values"])
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds).double().numpy()
    image_embeds = getattr(image_embeds, "pooler_output", image_embeds).double().numpy()
    text_embeds /= np.linalg.norm(text_embeds, axis=1, keepdims=True)
    image_embeds /= np.linalg.norm(image_embeds, axis=1, keepdims=True)
    best = (text_embeds @ image_embeds.T).argmax(axis=1)
    return float(np.mean([photos[b] == photo for b, photo in zip(best, row_photos)]))


def test_an_evaluation_set_built_in_memory_is_scored_by_its_image_ids_and_labels(tiny_clip_dir, tmp_path):
    data = photo_rows()
    trainer = trainer_for(tiny_clip_dir, tmp_path, eval_dataset=data,
                          data_args=DataArguments(image_id_column="photo", label_column="shape"))  # fmt: skip
    metrics = trainer.evaluate()
    assert metrics["eval_t2i_recall@1"] == pytest.approx(reference_t2i_recall_at_1(tiny_clip_dir, data), abs=1e-9)
    assert "eval_zeroshot_top1" in metrics  # the classes of `label_column`
    # A set given to `evaluate` is prepared alike, and `predict` reports the same numbers.
    again = trainer.evaluate(data)
    predicted = trainer.predict(data).metrics
    for key in ("t2i_recall@1", "i2t_recall@1", "zeroshot_top1", "loss"):
        assert again[f"eval_{key}"] == pytest.approx(metrics[f"eval_{key}"], abs=1e-6), key
        assert predicted[f"test_{key}"] == pytest.approx(metrics[f"eval_{key}"], abs=1e-6), key


def test_predict_is_never_augmented_and_keeps_every_pair(tiny_clip_dir, tmp_path):
    data = photo_rows()
    trainer = trainer_for(tiny_clip_dir, tmp_path, eval_dataset=data, train_dataset=data,
                          data_args=DataArguments(image_id_column="photo", augment=True, color_jitter=0.4),
                          args={"dataloader_drop_last": True})  # fmt: skip
    evaluated = trainer.evaluate()
    first, second = trainer.predict(data).metrics, trainer.predict(data).metrics
    assert first["test_loss"] == second["test_loss"] == pytest.approx(evaluated["eval_loss"], abs=1e-6)
    assert first["test_t2i_recall@1"] == evaluated["eval_t2i_recall@1"]


def test_a_set_given_to_every_evaluate_call_is_prepared_once(tiny_clip_dir, tmp_path, monkeypatch):
    import clip_trainer.data as data_module

    prepared = []
    prepare = data_module.add_image_ids
    monkeypatch.setattr(data_module, "add_image_ids", lambda *a, **k: prepared.append(1) or prepare(*a, **k))
    data = photo_rows()
    trainer = trainer_for(tiny_clip_dir, tmp_path, data_args=DataArguments(image_id_column="photo"))
    first, again = trainer.evaluate(data), trainer.evaluate(data)
    assert again["eval_t2i_recall@1"] == first["eval_t2i_recall@1"]
    assert trainer.predict(data).metrics["test_loss"] == pytest.approx(first["eval_loss"], abs=1e-6)
    assert len(prepared) == 1
    trainer.evaluate(data.select(range(6)))  # another set is prepared for itself
    assert len(prepared) == 2


def test_plain_training_arguments_keep_a_median_rank_lower_better(tiny_clip_dir, tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none",
                              eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                              metric_for_best_model="eval_t2i_median_rank")  # fmt: skip
    assert plain.greater_is_better is True  # transformers' own rule, for any metric not ending in "loss"
    trainer = CLIPContrastiveTrainer(model=AutoModel.from_pretrained(tiny_clip_dir), args=plain,
                                     eval_dataset=photo_rows(),
                                     processing_class=AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil"))  # fmt: skip
    assert trainer.args.greater_is_better is False
    chosen = TrainingArguments(output_dir=str(tmp_path / "out2"), metric_for_best_model="eval_loss",
                               greater_is_better=True, use_cpu=True)  # fmt: skip
    from clip_trainer.trainer import clip_training_arguments

    assert clip_training_arguments(chosen).greater_is_better is True  # a choice transformers did not make is kept


def test_a_dict_of_evaluation_sets_is_checked_by_its_names(tiny_clip_dir, tmp_path):
    data = photo_rows()
    sets = {"a": data.select(range(12)), "b": data.select(range(12, 24))}
    best = {"eval_strategy": "epoch", "save_strategy": "epoch", "load_best_model_at_end": True}
    trainer = trainer_for(tiny_clip_dir, tmp_path, eval_dataset=sets, train_dataset=data,
                          args={**best, "metric_for_best_model": "eval_b_t2i_recall@5"})  # fmt: skip
    assert set(trainer.evaluators) == {"eval_a", "eval_b"}
    with pytest.raises(ConfigError, match="'eval_t2i_recall@5', which evaluation never computes"):
        trainer_for(tiny_clip_dir, tmp_path, eval_dataset=sets, train_dataset=data,
                    args={**best, "metric_for_best_model": "eval_t2i_recall@5"})  # fmt: skip


def test_a_training_batch_of_one_pair_is_refused_as_the_command_refuses_it(tiny_clip_dir, tmp_path):
    with pytest.raises(ConfigError, match="`per_device_train_batch_size` is 1"):
        trainer_for(tiny_clip_dir, tmp_path, train_dataset=photo_rows(), args={"per_device_train_batch_size": 1})


def test_a_dataset_without_the_caption_column_is_one_line_naming_it(tiny_clip_dir, tmp_path):
    data = photo_rows().rename_column("caption", "text")
    with pytest.raises(
        ConfigError,
        match=r"`caption_column` is 'caption', but the training data has no such column\. Its columns are: image, text, photo, shape\. Name its columns in `DataArguments\(caption_column=\.\.\.\)`",
    ):
        trainer_for(tiny_clip_dir, tmp_path, train_dataset=data)
    trainer = trainer_for(tiny_clip_dir, tmp_path, train_dataset=data, data_args=DataArguments(caption_column="text"))
    assert trainer.data_collator.caption_column == "text"


SCRIPT = """
import clip_trainer
from datasets import Dataset
from PIL import Image
from transformers import AutoModel, AutoProcessor
from clip_trainer import CLIPContrastiveTrainer, CLIPTrainingArguments
model_dir, out = {model_dir!r}, {out!r}
data = Dataset.from_list([{{"image": Image.new("RGB", (32, 32), (i * 9, 40, 200 - i * 9)), "caption": f"colour {{i}}"}}
                          for i in range(20)])
args = CLIPTrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=8, eval_strategy="steps",
                             eval_steps=2, save_strategy="no", report_to="none", use_cpu=True,
                             dataloader_num_workers=2, dataloader_persistent_workers=True)
trainer = CLIPContrastiveTrainer(model=AutoModel.from_pretrained(model_dir), args=args, train_dataset=data,
                                 eval_dataset=data, processing_class=AutoProcessor.from_pretrained(model_dir))
trainer.train()
print("trained")
"""


@pytest.mark.slow
def test_a_script_with_dataloader_workers_ends_without_a_traceback(tiny_clip_dir, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(model_dir=str(tiny_clip_dir), out=str(tmp_path / "out")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr and "killed by signal" not in done.stderr, done.stderr[-2000:]


def test_early_stopping_without_a_checkpoint_per_evaluation_names_its_own_option(base_args, capsys):
    from clip_trainer import run

    status = run.cli([*base_args, "--early_stopping_patience", "2", "--eval_strategy", "epoch",
                      "--save_strategy", "no"])  # fmt: skip
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_clip.py: error:")]
    assert status == 2 and "`early_stopping_patience` keeps the best checkpoint" in line
    assert "set --save_strategy epoch" in line


def test_early_stopping_from_the_arguments_and_from_callbacks_is_refused(tiny_clip_dir, tmp_path):
    from transformers import EarlyStoppingCallback

    best = {"eval_strategy": "epoch", "save_strategy": "epoch", "early_stopping_patience": 3}
    with pytest.raises(ConfigError, match="`callbacks` has one already"):
        trainer_for(tiny_clip_dir, tmp_path, train_dataset=photo_rows(), eval_dataset=photo_rows(), args=best,
                    callbacks=[EarlyStoppingCallback(1)])  # fmt: skip


def test_a_collator_of_the_callers_reads_columns_of_its_own(tiny_clip_dir, tmp_path):
    """The columns are checked against `data_args` when the trainer builds the collator; a caller's collator that
    reads other columns is trusted, as transformers' Trainer trusts it."""
    from clip_trainer import ImageTextCollator

    processor = AutoProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    data = photo_rows().rename_columns({"image": "picture", "caption": "text"})
    probe = trainer_for(tiny_clip_dir, tmp_path, train_dataset=photo_rows())
    collator = ImageTextCollator(tokenizer=processor.tokenizer, image_preprocessor=probe.image_preprocessor,
                                 max_seq_length=16, image_column="picture", caption_column="text")  # fmt: skip
    trainer = trainer_for(tiny_clip_dir, tmp_path, train_dataset=data, eval_dataset=data, data_collator=collator)
    assert trainer.train().training_loss > 0


def test_a_script_resuming_with_true_passes_over_a_half_written_checkpoint(base_args, tiny_clip_dir, tmp_path, caplog):
    # The newest checkpoint is what a kill during its save leaves: no trainer state, no optimizer. The command
    # passes it over; so does `trainer.train(resume_from_checkpoint=True)` (transformers' own rule takes the newest).
    import logging

    from clip_trainer.run import main

    out = tmp_path / "out"
    argv = [*base_args, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    argv[argv.index("--output_dir") + 1] = str(out)
    main(argv)
    for name in ("trainer_state.json", "optimizer.pt"):
        (out / "checkpoint-4" / name).unlink()
    data = Dataset.from_list(
        [{"image": draw_shape(c, s, b), "caption": caption} for c, s, b, caption in shape_rows()[:16]]
    )
    trainer = trainer_for(out / "checkpoint-2", tmp_path, train_dataset=data,
                          args={"output_dir": str(out), "max_steps": 6, "per_device_train_batch_size": 8,
                                "save_strategy": "no", "seed": 1})  # fmt: skip
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    trainer.train(resume_from_checkpoint=True)
    assert f"Passing over incomplete checkpoint {out / 'checkpoint-4'}" in caplog.text
    assert trainer.state.global_step == 6
