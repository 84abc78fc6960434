"""The training step reads nothing back from the device, yet logs a finite loss when a step's is NaN."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clip_trainer import run
from clip_trainer.trainer import CLIPContrastiveTrainer


@pytest.fixture
def nan_valued_loss(monkeypatch) -> tuple[set[int], dict[int, float]]:
    """A NaN loss value at the chosen (1-based) steps, with the gradients of the real loss; records the real losses."""
    nan_steps: set[int] = set()
    losses: dict[int, float] = {}
    compute_loss = CLIPContrastiveTrainer.compute_loss

    def nan_valued_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return result
        step = self.state.global_step + 1
        losses[step] = float(result)
        return result + math.nan if step in nan_steps else result  # NaN value, finite gradients

    monkeypatch.setattr(CLIPContrastiveTrainer, "compute_loss", nan_valued_compute_loss)
    return nan_steps, losses


def test_nan_loss_is_logged_as_the_mean_of_the_finite_ones(base_args, tmp_path, nan_valued_loss):
    nan_steps, losses = nan_valued_loss
    nan_steps.add(3)
    run.main([*base_args, "--max_steps", "4", "--logging_steps", "4"])
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    logged = next(entry["loss"] for entry in history if "loss" in entry)
    # Step 3's loss counts as the mean of the finite losses since the last log (computed on the device).
    substitute = (losses[1] + losses[2]) / 2
    assert logged == pytest.approx((losses[1] + losses[2] + substitute + losses[4]) / 4, rel=1e-4)


def test_the_host_side_filter_is_a_changed_default_recorded_as_it_is(base_args, tmp_path, nan_valued_loss):
    """transformers' filter (a host read of every step's loss) is off by default, and the value every saved copy of
    the arguments records is the one the run used: nothing switches it on and off around training."""
    nan_steps, _ = nan_valued_loss
    nan_steps.add(2)
    out = tmp_path / "out"
    run.main([*base_args, "--max_steps", "4", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2"])
    for path in [out / "training_args.bin", out / "checkpoint-2" / "training_args.bin"]:
        assert torch.load(path, weights_only=False).logging_nan_inf_filter is False
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    assert all(math.isfinite(loss) for loss in steps.values())  # one NaN does not poison the later logs


def test_default_arguments_copy_batches_without_blocking(tmp_path):
    from clip_trainer.arguments import CLIPTrainingArguments

    assert CLIPTrainingArguments(output_dir=str(tmp_path), report_to="none").accelerator_config.non_blocking
    given = CLIPTrainingArguments(
        output_dir=str(tmp_path), report_to="none", accelerator_config={"even_batches": True}
    )
    assert not given.accelerator_config.non_blocking  # a user's accelerator_config is kept as given
