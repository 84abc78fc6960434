"""The training step reads nothing back from the device, yet logs what transformers' own filters would."""

from __future__ import annotations

import json
import math

import pytest

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


def test_nan_loss_is_logged_as_transformers_filter_would(base_args, tmp_path, nan_valued_loss):
    nan_steps, losses = nan_valued_loss
    nan_steps.add(3)
    run.main([*base_args, "--max_steps", "4", "--logging_steps", "4"])
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    logged = next(entry["loss"] for entry in history if "loss" in entry)
    # transformers replaces a non-finite step loss by the mean of the losses since the last log.
    substitute = (losses[1] + losses[2]) / 3
    assert logged == pytest.approx((losses[1] + losses[2] + substitute + losses[4]) / 4, rel=1e-4)


def test_filter_off_logs_nan_and_evaluation_keeps_the_setting(base_args, tmp_path, nan_valued_loss):
    nan_steps, _ = nan_valued_loss
    nan_steps.add(2)
    run.main([*base_args, "--max_steps", "2", "--logging_steps", "2", "--logging_nan_inf_filter", "false"])
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert math.isnan(next(entry["loss"] for entry in history if "loss" in entry))


def test_default_arguments_copy_batches_without_blocking(tmp_path):
    from clip_trainer.arguments import CLIPTrainingArguments

    assert CLIPTrainingArguments(output_dir=str(tmp_path), report_to="none").accelerator_config.non_blocking
    given = CLIPTrainingArguments(
        output_dir=str(tmp_path), report_to="none", accelerator_config={"even_batches": True}
    )
    assert not given.accelerator_config.non_blocking  # a user's accelerator_config is kept as given
