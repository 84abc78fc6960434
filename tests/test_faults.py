"""Faults during training: non-finite losses are skipped, counted and, when they persist, stop the run; a run killed
mid-training resumes from its newest complete checkpoint, passing over one a kill left half-written, and ends where an
uninterrupted run ends."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SLOWED_CLI
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from clip_trainer import run
from clip_trainer.callbacks import NonFiniteLossCallback, NonFiniteTrainingError, all_finite
from clip_trainer.checkpoints import checkpoint_problems, latest_complete_checkpoint
from clip_trainer.trainer import CLIPContrastiveTrainer

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------------------
# The callback on its own
# --------------------------------------------------------------------------------------------------------------


def test_all_finite_is_one_device_flag():
    finite = [torch.ones(3), torch.zeros(2, 2, dtype=torch.bfloat16)]
    assert all_finite(finite).item() is True
    assert all_finite([*finite, torch.tensor([1.0, math.nan])]).item() is False
    assert all_finite([torch.tensor([-math.inf]), *finite]).item() is False
    assert all_finite([torch.full((4,), 3e38)]).item() is True  # a 2-norm would overflow; the max-norm does not
    # An overflowing 2-norm beside a NaN, and an inf among bfloat16 values: the max-norm still finds them.
    assert all_finite([torch.full((4,), 3e38), torch.tensor([0.0, math.nan])]).item() is False
    assert all_finite([torch.tensor([1.0, math.inf, 2.0], dtype=torch.bfloat16), *finite]).item() is False
    assert all_finite([]).item() is True


def _step(callback, model, optimizer, inputs, state, args) -> TrainerControl:
    """One optimizer step as the Trainer takes it: backward, the callback's check, the optimizer."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(inputs).square().mean()
    loss.backward()
    callback.observe_loss(loss)
    control = callback.on_pre_optimizer_step(args, state, TrainerControl(), model=model) or TrainerControl()
    optimizer.step()
    state.global_step += 1
    return control


@pytest.mark.parametrize("implementation", ["foreach", "fused", "for-loop"])
def test_a_non_finite_step_leaves_weights_and_optimizer_state_untouched(tmp_path, implementation):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    options = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[implementation]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.2, **options)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", save_strategy="no")
    callback, state = NonFiniteLossCallback(max_consecutive=3), TrainerState()
    callback.on_train_begin(args, state, TrainerControl())

    _step(callback, model, optimizer, torch.randn(2, 4), state, args)
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    moments = {key: value.clone() for key, value in optimizer.state[model.weight].items()}
    control = _step(callback, model, optimizer, torch.tensor([[math.nan, 0.0, 0.0, 0.0]]), state, args)
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    assert all(torch.equal(moments[key], value) for key, value in optimizer.state[model.weight].items())
    assert all(parameter.grad is None for parameter in model.parameters())
    assert (callback.skipped_steps, callback.consecutive) == (1, 1)
    assert not control.should_training_stop

    _step(callback, model, optimizer, torch.randn(2, 4), state, args)  # a good step trains and resets the streak
    assert not torch.equal(weights["weight"], model.weight)
    assert (callback.skipped_steps, callback.consecutive) == (1, 0)


def test_a_non_finite_loss_with_finite_gradients_is_skipped_too(tmp_path):
    model = torch.nn.Linear(2, 1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", save_strategy="no")
    callback = NonFiniteLossCallback()
    model(torch.ones(1, 2)).sum().backward()
    callback.observe_loss(torch.tensor(math.inf))  # e.g. a logged term that does not reach the gradients
    callback.on_pre_optimizer_step(args, TrainerState(), TrainerControl(), model=model)
    assert callback.skipped_steps == 1 and model.weight.grad is None


def test_the_streak_limit_stops_saves_and_raises_at_the_end(tmp_path):
    model = torch.nn.Linear(2, 1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", save_strategy="steps")
    callback, state = NonFiniteLossCallback(max_consecutive=2), TrainerState(global_step=6)
    controls = []
    for _ in range(2):
        model(torch.tensor([[math.nan, 1.0]])).sum().backward()
        controls.append(callback.on_pre_optimizer_step(args, state, TrainerControl(), model=model))
        state.global_step += 1
    assert not (controls[0].should_training_stop or controls[0].should_save)  # the first is only skipped
    assert controls[1].should_training_stop and controls[1].should_save and controls[1].should_log
    with pytest.raises(NonFiniteTrainingError, match=r"2 optimizer steps in a row \(steps 7-8;.*after step 6"):
        callback.on_train_end(args, state, TrainerControl())


def test_zero_means_never_stop(tmp_path):
    model = torch.nn.Linear(2, 1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    callback = NonFiniteLossCallback(max_consecutive=0)
    for _ in range(20):
        model(torch.tensor([[math.nan, 1.0]])).sum().backward()
        control = callback.on_pre_optimizer_step(args, TrainerState(), TrainerControl(), model=model)
        assert not control.should_training_stop
    callback.on_train_end(args, TrainerState(), TrainerControl())  # no error
    assert callback.skipped_steps == 20


# --------------------------------------------------------------------------------------------------------------
# Non-finite losses in a real run
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def poisoned_loss(monkeypatch) -> tuple[set[int], dict[int, dict[str, torch.Tensor]]]:
    """Makes the training loss NaN at the steps put in the returned set (1-based); records the weights before each step."""
    poisoned_steps: set[int] = set()
    weights_before: dict[int, dict[str, torch.Tensor]] = {}
    compute_loss = CLIPContrastiveTrainer.compute_loss

    def poisoning_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return result
        step = self.state.global_step + 1
        weights_before[step] = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        # NaN times the loss: the gradients are NaN too, as when a forward pass overflows.
        return result * math.nan if step in poisoned_steps else result

    monkeypatch.setattr(CLIPContrastiveTrainer, "compute_loss", poisoning_compute_loss)
    return poisoned_steps, weights_before


def _log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def test_a_nan_step_is_skipped_counted_and_training_goes_on(base_args, tmp_path, poisoned_loss, caplog):
    poisoned_steps, weights_before = poisoned_loss
    poisoned_steps.add(3)
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    run.main([*base_args, "--max_steps", "6", "--logging_steps", "1"])

    # The update of step 3 was skipped: the weights after it are bit-identical to those before it.
    before, after = weights_before[3], weights_before[4]
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert any(not torch.equal(weights_before[2][name], before[name]) for name in before)  # step 2 trained
    final = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(final[name], after[name]) for name in after)  # and so did steps 4-6

    history = [entry for entry in _log_history(out) if "loss" in entry]
    assert [entry["step"] for entry in history] == [1, 2, 3, 4, 5, 6]
    assert [entry.get("nonfinite_steps_skipped", 0) for entry in history] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(entry["loss"]) for entry in history)  # the logged loss is filtered on the device
    warnings = [r.getMessage() for r in caplog.records if r.name == "clip_trainer.callbacks"]
    assert len(warnings) == 1 and warnings[0].startswith("Step 3: the loss or the gradients are NaN or inf")


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_last_good_weights(base_args, tmp_path, poisoned_loss, capsys):
    poisoned_steps, weights_before = poisoned_loss
    poisoned_steps.update(range(3, 100))
    out = tmp_path / "out"
    argv = [*base_args, "--max_steps", "20", "--max_nonfinite_steps", "3", "--logging_steps", "10",
            "--save_strategy", "steps", "--save_steps", "10"]  # fmt: skip
    status = run.cli(argv)
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback" not in err
    message = next(line for line in err.splitlines() if line.startswith("run_clip.py: error:"))
    assert "NaN or inf for 3 optimizer steps in a row (steps 3-5; `max_nonfinite_steps` is 3)" in message
    assert "the weights are those after step 2" in message
    assert f"saved in {out / 'checkpoint-5'}" in message

    # The run stopped at step 5 and saved the untouched weights; it wrote no final model, as it did not succeed.
    assert max(weights_before) == 5
    assert latest_complete_checkpoint(str(out)) == str(out / "checkpoint-5")
    saved = load_file(str(out / "checkpoint-5" / "model.safetensors"))
    assert all(torch.equal(saved[name], weights_before[3][name]) for name in weights_before[3])
    assert not (out / "model.safetensors").exists()
    logged = [entry for entry in _log_history(out / "checkpoint-5") if "nonfinite_steps_skipped" in entry]
    assert logged[-1]["nonfinite_steps_skipped"] == 3 and logged[-1]["step"] == 5


def test_max_nonfinite_steps_must_not_be_negative(base_args, capsys):
    assert run.cli([*base_args, "--max_nonfinite_steps", "-1"]) == 2
    assert "`max_nonfinite_steps` is -1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Checkpoints a crash left incomplete
# --------------------------------------------------------------------------------------------------------------


def _checkpoint_args(base_args: list[str], output_dir: Path) -> list[str]:
    argv = list(base_args)
    argv[argv.index("--output_dir") + 1] = str(output_dir)
    return [
        *argv,
        "--max_steps",
        "8",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--lr_scheduler_type",
        "cosine",
    ]


def _plant_half_written(checkpoint: Path, step: int) -> Path:
    """A copy of `checkpoint` renamed to step `step`, as a kill during its save would leave it: weights cut short."""
    planted = checkpoint.parent / f"checkpoint-{step}"
    shutil.copytree(checkpoint, planted)
    state = json.loads((planted / "trainer_state.json").read_text())
    state["global_step"] = step
    (planted / "trainer_state.json").write_text(json.dumps(state))
    weights = planted / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return planted


@pytest.fixture
def finished_run(base_args, tmp_path) -> Path:
    """A run that kept checkpoints 2 and 4."""
    out = tmp_path / "finished"
    run.main([*_checkpoint_args(base_args, out), "--max_steps", "4", "--save_total_limit", "5"])
    return out


def _zero_inside(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start : start + 256] = bytes(256)
    path.write_bytes(bytes(data))


def _damaged_copies(source: Path, root: Path) -> dict[str, Path]:
    """Copies of a complete checkpoint, each broken the way a kill at some point of `_save_checkpoint` breaks it."""
    damage = {
        "weights cut short": lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:100]
        ),
        "weights empty": lambda f: (f / "model.safetensors").write_bytes(b""),
        "no trainer_state.json": lambda f: (f / "trainer_state.json").unlink(),
        "trainer_state.json cut short": lambda f: (f / "trainer_state.json").write_text('{"global_step": 4, "log_hi'),
        "no optimizer.pt": lambda f: (f / "optimizer.pt").unlink(),
        "optimizer.pt cut short": lambda f: (f / "optimizer.pt").write_bytes((f / "optimizer.pt").read_bytes()[:-50]),
        "no scheduler.pt": lambda f: (f / "scheduler.pt").unlink(),
        "no rng state": lambda f: (f / "rng_state.pth").unlink(),
        "rng state empty": lambda f: (f / "rng_state.pth").write_bytes(b""),
        # Full length, a block of zeros inside (an unsynced write after a power loss): torch.load reads the zeros.
        "optimizer.pt zeroed inside": lambda f: _zero_inside(f / "optimizer.pt"),
        "rng state zeroed inside": lambda f: _zero_inside(f / "rng_state.pth"),
        "config.json not JSON": lambda f: (f / "config.json").write_text('{"model_type": "clip", "proj'),
        "tokenizer.json missing": lambda f: (f / "tokenizer.json").unlink(),
        "tokenizer.json not JSON": lambda f: (f / "tokenizer.json").write_text("{"),
    }
    copies = {}
    for name, breaking in damage.items():
        folder = root / name.replace(" ", "_") / "checkpoint-4"
        shutil.copytree(source, folder)
        breaking(folder)
        copies[name] = folder
    return copies


def test_incomplete_checkpoints_are_found_and_passed_over(finished_run, tmp_path, caplog):
    assert checkpoint_problems(str(finished_run / "checkpoint-4")) == []
    for name, folder in _damaged_copies(finished_run / "checkpoint-4", tmp_path / "damaged").items():
        assert checkpoint_problems(str(folder)), name

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    _plant_half_written(out / "checkpoint-4", 6)
    (out / "checkpoint-9").write_text("a file, not a folder")
    (out / "checkpoint-10").mkdir()  # a kill before anything was written into it
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-10")  # what transformers would resume from
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    assert latest_complete_checkpoint(str(out)) == str(out / "checkpoint-4")
    warned = " ".join(r.getMessage() for r in caplog.records if r.name == "clip_trainer.checkpoints")
    assert "checkpoint-6: model.safetensors is unreadable" in warned and "checkpoint-10" in warned
    assert latest_complete_checkpoint(str(tmp_path / "nowhere")) is None


def test_a_checkpoint_damaged_inside_is_passed_over_by_the_command(finished_run, base_args, tmp_path, capsys, caplog):
    # Its newest checkpoint's optimizer state has zeros inside, its config is cut: resuming takes checkpoint-2,
    # with a warning naming both, and ends where the run was asked to end (no traceback from torch.load).
    _zero_inside(finished_run / "checkpoint-4" / "optimizer.pt")
    (finished_run / "checkpoint-4" / "config.json").write_text('{"model_type": "clip", "proj')
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    status = run.cli([*_checkpoint_args(base_args, finished_run), "--max_steps", "4", "--save_total_limit", "5",
                      "--resume_from_checkpoint", "true"])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    warned = caplog.text
    assert "Passing over incomplete checkpoint" in warned and "checkpoint-4" in warned
    assert "optimizer.pt is damaged (its entry" in warned and "config.json is unreadable" in warned
    assert json.loads((finished_run / "trainer_state.json").read_text())["global_step"] == 4


@pytest.mark.slow  # a run in its own process, killed and resumed: CI's slow tier
def test_resume_after_sigkill_ends_where_an_uninterrupted_run_ends(base_args, tmp_path, caplog, capsys):
    # The uninterrupted reference.
    reference = tmp_path / "reference"
    run.main(_checkpoint_args(base_args, reference))

    # The same run in its own process, killed with SIGKILL once checkpoint-4 is complete. Steps after the 4th are
    # slowed down (conftest's SLOWED_CLI) so that the kill lands before the end.
    crashed = tmp_path / "crashed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOWED_CLI, *_checkpoint_args(base_args, crashed)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while checkpoint_problems_or_missing(crashed / "checkpoint-4") and process.poll() is None:
            assert time.monotonic() < deadline, "checkpoint-4 never appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (crashed / "checkpoint-8").exists() and not (crashed / "model.safetensors").exists()

    # A kill during the next save would leave checkpoint-6 half-written; `get_last_checkpoint` would pick it.
    planted = _plant_half_written(crashed / "checkpoint-4", 6)
    assert get_last_checkpoint(str(crashed)) == str(crashed / "checkpoint-6")

    # Named explicitly, it is refused before anything is loaded, with the one to use instead.
    status = run.cli([*_checkpoint_args(base_args, crashed), "--resume_from_checkpoint", str(planted)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "which is incomplete (model.safetensors is unreadable" in err
    assert f"the newest complete one beside it is '{crashed / 'checkpoint-4'}'" in err

    caplog.set_level(logging.INFO, logger="clip_trainer")
    run.main([*_checkpoint_args(base_args, crashed), "--resume_from_checkpoint", "true"])
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith(f"Passing over incomplete checkpoint {crashed / 'checkpoint-6'}") for m in messages)
    assert f"Resuming from {crashed / 'checkpoint-4'}." in messages

    expected, got = load_file(str(reference / "model.safetensors")), load_file(str(crashed / "model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    steps = [entry["step"] for entry in _log_history(crashed) if "loss" in entry]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # no step logged twice, none missing at the end


def checkpoint_problems_or_missing(folder: Path) -> bool:
    return not folder.is_dir() or bool(checkpoint_problems(str(folder)))
