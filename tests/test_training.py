"""Short CPU runs of the whole pipeline: loss falls, output reloads, freezing, early stopping, resume, schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPModel

from clip_trainer.evaluation import RETRIEVAL_METRIC_NAMES
from clip_trainer.run import main
from clip_trainer.trainer import no_weight_decay_parameter_names, step_schedule


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def train_losses(output_dir) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_training_lowers_the_loss_and_the_output_reloads(base_args, tmp_path, tiny_clip_dir):
    out = tmp_path / "out"
    results = main([*base_args, "--num_train_epochs", "6", "--eval_strategy", "epoch"])
    losses = train_losses(out)
    assert len(losses) >= 4
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses

    # The result is a plain transformers model: safetensors, config and processor.
    model = CLIPModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert not list(out.glob("*.bin")) or (out / "training_args.bin").exists()
    assert not (out / "pytorch_model.bin").exists()
    before = weights(tiny_clip_dir)
    after = weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    inputs = processor(text=["a red circle on white"], images=[__import__("conftest").draw_shape("red", "circle")],
                       return_tensors="pt", padding=True)  # fmt: skip
    assert model(**inputs).logits_per_image.shape == (1, 1)

    # Metrics files as in the Hugging Face examples, with the retrieval metrics in them.
    eval_results = json.loads((out / "eval_results.json").read_text())
    for name in RETRIEVAL_METRIC_NAMES:
        assert 0 <= eval_results[f"eval_{name}"] <= (1 if "recall" in name else 1e9)
    assert "eval_loss" in eval_results
    assert "train_loss" in json.loads((out / "train_results.json").read_text())
    all_results = json.loads((out / "all_results.json").read_text())
    assert "train_loss" in all_results and "eval_loss" in all_results
    assert results["eval_loss"] == eval_results["eval_loss"]
    # The temperature and throughput are logged while training.
    state = json.loads((out / "trainer_state.json").read_text())
    train_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert all("temperature" in entry and "inverse_temperature" in entry for entry in train_logs)
    assert all(
        entry["temperature"] == pytest.approx(1 / entry["inverse_temperature"], rel=1e-3) for entry in train_logs
    )
    assert any("samples_per_second" in entry for entry in train_logs)


def test_frozen_tower_is_bit_identical_and_the_other_trains(base_args, tmp_path, tiny_clip_dir):
    main([*base_args, "--freeze_vision_model", "true", "--num_train_epochs", "1"])
    before, after = weights(tiny_clip_dir), weights(tmp_path / "out")
    vision = [k for k in before if k.startswith(("vision_model.", "visual_projection."))]
    text = [k for k in before if k.startswith(("text_model.", "text_projection."))]
    assert vision and text
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in text)


def test_unfreeze_after_steps_trains_the_tower_later(base_args, tmp_path, tiny_clip_dir):
    main([*base_args, "--freeze_vision_model", "true", "--unfreeze_after_steps", "3", "--max_steps", "5"])
    before, after = weights(tiny_clip_dir), weights(tmp_path / "out")
    vision = [k for k in before if k.startswith("vision_model.encoder")]
    assert any(not torch.equal(before[k], after[k]) for k in vision)


def test_early_stopping_stops_the_run(base_args, tmp_path):
    out = tmp_path / "out"
    main([*base_args, "--learning_rate", "0", "--num_train_epochs", "20", "--eval_strategy", "epoch",
          "--save_strategy", "epoch", "--early_stopping_patience", "2", "--early_stopping_threshold", "0.01"])  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_loss" in entry and "epoch" in entry]
    # Nothing improves with a zero learning rate: best at the first evaluation, then 2 without improvement.
    assert state["epoch"] == pytest.approx(3, abs=0.01)
    assert len(evaluations) >= 3


def test_a_resumed_run_stops_early_where_the_uninterrupted_one_stops(base_args, tmp_path):
    """The checkpoint's count of evaluations without improvement goes on in the resumed run (it started from 0, so
    the resumed run trained past the step where the uninterrupted one stopped)."""
    import shutil

    common = [*base_args, "--learning_rate", "0", "--max_steps", "40", "--eval_strategy", "steps", "--eval_steps", "2",
              "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "10",
              "--early_stopping_patience", "3", "--early_stopping_threshold", "0.01"]  # fmt: skip
    main([*common, "--output_dir", str(tmp_path / "whole")])
    whole = json.loads((tmp_path / "whole" / "trainer_state.json").read_text())
    # Nothing improves with a zero learning rate: best at step 2, then 3 evaluations without improvement.
    assert whole["global_step"] == 8
    # The card says which step's weights were kept: the run's step count alone would suggest the last.
    card = (tmp_path / "whole" / "README.md").read_text()
    assert "The weights kept are those of step 2, the best evaluation by `eval_loss`" in card
    assert "training went on to step 8." in card
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    shutil.copytree(
        tmp_path / "whole" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6"
    )  # 2 without improvement
    main([*common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "true"])
    resumed = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert resumed["global_step"] == whole["global_step"]


def test_resume_from_checkpoint_reaches_the_same_end(base_args, tmp_path):
    common = [*base_args, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3",
              "--save_total_limit", "5", "--lr_scheduler_type", "cosine"]  # fmt: skip
    reference = tmp_path / "reference"
    main([*common, "--output_dir", str(reference)])
    resumed = tmp_path / "resumed"
    main([*common, "--output_dir", str(resumed), "--max_steps", "6"])
    # Drop the final state and resume from the middle checkpoint, as after a crash at step 4.
    import shutil

    shutil.rmtree(resumed / "checkpoint-6")
    (resumed / "model.safetensors").unlink()
    main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "true"])
    expected, got = weights(reference), weights(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


def test_resume_true_without_checkpoint_is_a_clear_error(base_args):
    from clip_trainer.arguments import ConfigError

    with pytest.raises(ConfigError, match="holds no checkpoint"):
        main([*base_args, "--resume_from_checkpoint", "true"])


def test_step_scheduler_learning_rates(base_args, tmp_path):
    out = tmp_path / "out"
    main([*base_args, "--lr_scheduler_type", "step", "--lr_step_size", "2", "--lr_step_gamma", "0.5",
          "--warmup_steps", "2", "--learning_rate", "0.01", "--max_steps", "8", "--logging_steps", "1",
          "--optim", "adam"])  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    # Rate used at steps 1..8: warmup 1/3, 2/3 of the peak, then halved every 2 steps.
    expected = [0.01 / 3, 0.02 / 3, 0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025]
    assert rates == pytest.approx(expected, rel=1e-6)
    factor = step_schedule(warmup_steps=0, step_size=3, gamma=0.1)
    assert [factor(s) for s in range(7)] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])


def test_no_weight_decay_on_biases_norms_embeddings_and_logit_scale(tiny_clip_dir):
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    names = no_weight_decay_parameter_names(model)
    assert "logit_scale" in names
    assert "text_model.embeddings.token_embedding.weight" in names
    assert "text_model.embeddings.position_embedding.weight" in names
    assert "vision_model.embeddings.class_embedding" in names
    assert "text_model.final_layer_norm.weight" in names
    assert "text_model.encoder.layers.0.self_attn.q_proj.bias" in names
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" not in names
    assert "visual_projection.weight" not in names


def test_logit_scale_is_clamped_at_log_100(base_args, tmp_path, tiny_clip_dir):
    # Start beyond CLIP's bound (e^6 > 100): after one step (which moves it by about lr) it sits at the bound.
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        model.logit_scale.fill_(6.0)
    start = tmp_path / "start"
    model.save_pretrained(start)
    AutoProcessor.from_pretrained(tiny_clip_dir).save_pretrained(start)
    main([*base_args, "--model_name_or_path", str(start), "--max_steps", "1"])
    assert weights(tmp_path / "out")["logit_scale"].item() == pytest.approx(math.log(100), abs=1e-6)


def test_mfu_is_logged_when_the_peak_is_known(base_args, tmp_path):
    out = tmp_path / "out"
    main([*base_args, "--max_steps", "4", "--logging_steps", "2", "--peak_tflops", "0.05"])
    state = json.loads((out / "trainer_state.json").read_text())
    mfus = [entry["mfu"] for entry in state["log_history"] if "mfu" in entry]
    assert mfus and all(0 < value < 10 for value in mfus)


def test_prepare_only_writes_splits_that_a_later_run_trains_from(base_args, tmp_path, shapes_csv):
    import datasets
    from conftest import write_shapes_csv

    own_csv = write_shapes_csv(tmp_path / "own", repeats=3)  # its images are deleted below
    base_args = [str(own_csv) if a == str(shapes_csv) else a for a in base_args]
    prepared = tmp_path / "prepared"
    assert main([*base_args, "--prepare_only", "true", "--output_dir", str(prepared)]) == {}
    splits = datasets.load_from_disk(str(prepared))
    assert set(splits) == {"train", "validation"}
    assert len(splits["train"]) == 61 and len(splits["validation"]) == 11  # the 85/15 split of 72 pairs
    row = splits["train"].cast_column("image", datasets.Image(decode=False))[0]
    assert (
        row["image"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n" and row["image"]["path"] is None
    )  # compact, self-contained
    assert (prepared / "train").is_dir() and not (prepared / "model.safetensors").exists()

    # Train from the folder alone: the image files are no longer needed.
    import shutil

    shutil.rmtree(own_csv.parent / "images")
    args = [a for a in base_args if a != str(own_csv)]
    args.remove("--train_file")
    out = tmp_path / "from-prepared"
    main([*args, "--dataset_name", str(prepared), "--output_dir", str(out), "--max_steps", "2"])
    assert (out / "model.safetensors").exists()
