"""A run stopped from outside, or pointed at a folder it does not own: SIGTERM (a cluster's preemption notice) and
Ctrl-C save a complete checkpoint and exit without a traceback, and the run resumes from it to the same end; a
second run does not write over a first run's checkpoints, nor into a folder another run is writing; resuming a
finished run trains no extra step; a full disk is one line that says what was kept."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import drop_option, set_option
from safetensors.torch import load_file

from clip_trainer import run
from clip_trainer.checkpoints import OutputDirLock, checkpoint_problems
from clip_trainer.trainer import CLIPContrastiveTrainer

REPO = Path(__file__).resolve().parent.parent

# The run in its own process, each step after the first slowed down by `seconds` (the numbers are not changed; 600:
# a step that never ends, as when a DataLoader worker died) and announced in a file, so that the test can send its
# signal mid-run.
SLOWED_RUN = """
import sys, time
from pathlib import Path
from clip_trainer.trainer import CLIPContrastiveTrainer as T
step = T.training_step
def slow(self, *args, **kwargs):
    Path(sys.argv[1]).write_text(str(self.state.global_step))
    if self.state.global_step >= 2:
        time.sleep({seconds})
    return step(self, *args, **kwargs)
T.training_step = slow
from clip_trainer.run import cli
sys.exit(cli(sys.argv[2:]))
"""


def checkpoint_args(base_args: list[str], output_dir: Path) -> list[str]:
    argv = list(base_args)
    argv[argv.index("--output_dir") + 1] = str(output_dir)
    return [*argv, "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "1"]


def run_to_step_2(base_args: list[str], out: Path, marker: Path, seconds: float, group: bool) -> subprocess.Popen:
    """Starts the run in its own process (in a session of its own with `group`), each step from the third on slowed
    by `seconds`, and returns it once it reached step 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOWED_RUN.format(seconds=seconds), str(marker), *checkpoint_args(base_args, out)],
        cwd=marker.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=group,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (marker.exists() and marker.read_text() == "2"):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached step 2"
        time.sleep(0.05)
    return process


def interrupt(
    base_args: list[str], out: Path, signal_number: int, tmp_path: Path, group: bool = False
) -> subprocess.CompletedProcess:
    """Runs to step 2, then sends `signal_number` to the run, or with `group` to its whole process group (as a
    scheduler, `timeout` or a terminal does: DataLoader workers included)."""
    process = run_to_step_2(base_args, out, tmp_path / f"step-{signal_number}", seconds=1.5, group=group)
    if group:
        os.killpg(process.pid, signal_number)
    else:
        process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize(
    "signal_number",
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],  # the same path; CI runs both
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_saves_a_checkpoint_and_the_run_resumes_to_the_same_end(base_args, tmp_path, signal_number):
    reference = tmp_path / "reference"
    run.main(checkpoint_args(base_args, reference))

    stopped = tmp_path / "stopped"
    result = interrupt(base_args, stopped, signal_number, tmp_path)
    assert result.returncode == 128 + signal_number, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    name = signal.Signals(signal_number).name
    message = next(line for line in result.stderr.splitlines() if line.startswith("run_clip.py:"))
    assert f"Stopped by {name} at step 3" in message and "--resume_from_checkpoint true" in message
    assert checkpoint_problems(str(stopped / "checkpoint-3")) == []  # complete, though 3 is no save step
    assert not (stopped / "model.safetensors").exists()  # no final model for a run that did not finish

    run.main([*checkpoint_args(base_args, stopped), "--resume_from_checkpoint", "true"])
    expected, got = load_file(str(reference / "model.safetensors")), load_file(str(stopped / "model.safetensors"))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["loaded", "streamed"])
def test_sigterm_to_the_process_group_with_dataloader_workers_saves_a_checkpoint(base_args, tmp_path, data):
    """Workers got the group's SIGTERM too and died of it (torch's own handler in each worker), which took the run
    down with "DataLoader worker is killed by signal" before its checkpoint; they now leave it to the main process.
    Streamed, the workers start earlier (accelerate asks the stream's loader for its state when it wraps it)."""
    argv = [*base_args, "--dataloader_num_workers", "1"]
    if data == "streamed":
        from test_streaming import write_parquet_shards

        shards = write_parquet_shards(tmp_path / "shards", shards=2)
        argv = [*drop_option(argv, "train_file"), "--dataset_name", str(shards), "--streaming", "true",
                "--shuffle_buffer_size", "64", "--max_eval_samples", "8"]  # fmt: skip
    stopped = tmp_path / "stopped"
    result = interrupt(argv, stopped, signal.SIGTERM, tmp_path, group=True)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "killed by signal" not in result.stderr
    message = next(line for line in result.stderr.splitlines() if line.startswith("run_clip.py:"))
    assert "Stopped by SIGTERM at step 3" in message
    assert checkpoint_problems(str(stopped / "checkpoint-3")) == []


def test_a_second_run_does_not_write_over_the_first_runs_checkpoints(base_args, tmp_path, capsys):
    out = tmp_path / "out"
    run.main(checkpoint_args(base_args, out))
    before = sorted(path.name for path in out.iterdir())
    status = run.cli(checkpoint_args(base_args, out))
    message = capsys.readouterr().err
    assert status == 2 and "holds checkpoints of an earlier run (checkpoint-4, checkpoint-8)" in message
    assert "--resume_from_checkpoint true" in message and "--overwrite_output_dir true" in message
    assert sorted(path.name for path in out.iterdir()) == before

    # Asked for explicitly, the earlier checkpoints go and the run starts over.
    run.main([*checkpoint_args(base_args, out), "--overwrite_output_dir", "true", "--max_steps", "4"])
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-4"]


def test_a_training_run_does_not_replace_a_saved_model_without_being_asked(
    base_args, tmp_path, tiny_clip_dir, monkeypatch, capsys
):
    """A folder with a finished model and no checkpoint (a run with `save_strategy no`; the model a run starts
    from): a training run into it stops with one line and the model stays; `--overwrite_output_dir true` replaces it."""
    import shutil

    monkeypatch.chdir(tmp_path)
    argv = list(base_args)
    argv[argv.index("--output_dir") + 1] = "out"
    no_checkpoints = [*argv, "--max_steps", "2", "--save_strategy", "no"]
    run.main(no_checkpoints)
    weights = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert run.cli(no_checkpoints) == 2
    message = capsys.readouterr().err
    assert "`output_dir` 'out' holds a saved model, which this run's final save would replace" in message
    assert "--overwrite_output_dir true" in message
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == weights

    # Training into the folder of the model it starts from: the same stop, the model kept.
    shutil.copytree(tiny_clip_dir, tmp_path / "start")
    start = (tmp_path / "start" / "model.safetensors").read_bytes()
    from_start = [*no_checkpoints, "--model_name_or_path", "start", "--output_dir", "start"]
    assert run.cli(from_start) == 2
    assert "`output_dir` 'start' holds a saved model" in capsys.readouterr().err
    assert (tmp_path / "start" / "model.safetensors").read_bytes() == start

    # Asked for: replaced, and what the earlier run wrote that this one does not (an ONNX export, an adapter, its
    # dropped rows, sharded weights) is gone, so that it never passes for this run's; the user's own files stay.
    out = tmp_path / "out"
    for folder in ("onnx", "adapter"):
        (out / folder).mkdir()
        (out / folder / "vision_model.onnx").write_bytes(b"an earlier model")
    for name in ("dropped_rows.jsonl", "wise_ft_results.json", "model-00001-of-00002.safetensors", "notes.txt"):
        (out / name).write_text("earlier")
    run.main([*no_checkpoints, "--overwrite_output_dir", "true", "--seed", "7"])
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != weights
    left = sorted(path.name for path in out.iterdir())
    assert not {"onnx", "adapter", "dropped_rows.jsonl", "wise_ft_results.json"} & set(left), left
    assert "model-00001-of-00002.safetensors" not in left and (out / "notes.txt").read_text() == "earlier"


def test_two_runs_cannot_write_into_one_folder_at_once(base_args, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = OutputDirLock(str(out))  # another run, holding the folder
    try:
        status = run.cli(checkpoint_args(base_args, out))
    finally:
        lock.release()
    message = capsys.readouterr().err
    assert status == 2 and f"Another run (pid {os.getpid()}) is writing into" in message
    assert run.cli([*checkpoint_args(base_args, out), "--max_steps", "1"]) == 0  # free once it is done


@pytest.mark.slow
def test_a_resumed_run_counts_the_samples_left_out_before_its_checkpoint(base_args, tmp_path):
    """`skipped_samples` (train_results.json, the model card) counted only what the resumed part left out."""
    import csv
    import shutil

    csv_path = Path(base_args[base_args.index("--train_file") + 1])
    rows = list(csv.DictReader(csv_path.open()))
    for name in ("broken-1.png", "broken-2.png"):  # two pictures (not one, whose rows would be one image)
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode() * 20)
    with open(tmp_path / "pairs.csv", "w", newline="") as handle:  # two undecodable images among the pairs
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "image": str(csv_path.parent / row["image"])})
        writer.writerow({**rows[0], "image": str(tmp_path / "broken-1.png"), "caption": "a broken picture"})
        writer.writerow({**rows[1], "image": str(tmp_path / "broken-2.png"), "caption": "another broken one"})
    argv = [*base_args, "--train_file", str(tmp_path / "pairs.csv"), "--max_steps", "20", "--save_strategy", "steps",
            "--save_steps", "10", "--save_total_limit", "3"]  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run.main(set_option(argv, "output_dir", str(whole)))
    expected = json.loads((whole / "train_results.json").read_text())["skipped_samples"]
    assert expected == 4  # each broken row drawn once in each of the two epochs (74 pairs, 10 steps of 8)
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-10", resumed / "checkpoint-10")
    run.main([*set_option(argv, "output_dir", str(resumed)), "--resume_from_checkpoint", "true"])
    assert json.loads((resumed / "train_results.json").read_text())["skipped_samples"] == expected


@pytest.mark.parametrize("length", [["--max_steps", "4"], ["--max_steps", "-1"]], ids=["steps", "epochs"])
def test_resuming_a_finished_run_trains_no_extra_step(base_args, tmp_path, length):
    out = tmp_path / "out"
    # Epochs: 2 of 9 steps (72 pairs, batch 8), saved every 6 steps and at the end.
    # Evaluated at each epoch's end, after that step's checkpoint was saved: the checkpoint's state lacks it.
    argv = [*checkpoint_args(base_args, out), *length, "--save_steps", "6" if length[1] == "-1" else "2",
            "--eval_strategy", "epoch"]  # fmt: skip
    run.main(argv)
    finished = json.loads((out / "trainer_state.json").read_text())
    trained = json.loads((out / "train_results.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    run.main([*argv, "--resume_from_checkpoint", "true"])
    resumed = json.loads((out / "trainer_state.json").read_text())
    assert resumed["global_step"] == finished["global_step"]

    # The training figures stay those of the training that made the model (they were a NaN train_loss, no JSON).
    def no_nan(value):
        raise AssertionError(f"{value} in train_results.json")

    again_trained = json.loads((out / "train_results.json").read_text(), parse_constant=no_nan)
    for key in ("train_loss", "train_runtime", "total_flos"):
        assert again_trained[key] == trained[key], key
    assert [e["step"] for e in resumed["log_history"] if "loss" in e] == [
        e["step"] for e in finished["log_history"] if "loss" in e
    ]
    again = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(again[key], weights[key]) for key in weights)
    # Every evaluation of the run is still in its state, the last one included (the curves and the best model's
    # choice read them).
    evaluated = [(e["step"], e["eval_loss"]) for e in finished["log_history"] if "eval_loss" in e]
    assert evaluated[-1][0] == finished["global_step"]
    assert [(e["step"], e["eval_loss"]) for e in resumed["log_history"] if "eval_loss" in e][: len(evaluated)] == (
        evaluated
    )
    assert resumed["best_global_step"] == finished["best_global_step"]


def test_a_full_disk_while_saving_is_one_line_that_says_what_was_kept(base_args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    original = CLIPContrastiveTrainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if self.state.global_step >= 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, _internal_call)

    monkeypatch.setattr(CLIPContrastiveTrainer, "save_model", save_model)
    status = run.cli(checkpoint_args(base_args, out))
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    message = next(line for line in err.splitlines() if "run_clip.py: error:" in line)
    assert "The disk is full" in message and f"{out / 'checkpoint-4'}" in message
    assert "--resume_from_checkpoint true" in message


def test_ctrl_c_after_training_says_whether_the_trained_model_is_saved(base_args, tmp_path, monkeypatch, capsys):
    # Training ended, the weights are written, Ctrl-C lands while the card is drawn: the model is there to use.
    out = tmp_path / "out"
    argv = checkpoint_args(base_args, out)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CLIPContrastiveTrainer, "create_model_card", interrupted)
    assert run.cli(argv) == 130
    err = capsys.readouterr().err
    assert f"interrupted (Ctrl-C); training had ended, and the trained model is saved in {out}" in err
    assert "Traceback" not in err and "nothing was saved" not in err
    assert torch.equal(load_file(out / "model.safetensors")["logit_scale"], load_file(
        out / "checkpoint-8" / "model.safetensors")["logit_scale"])  # fmt: skip


def test_ctrl_c_while_the_trained_model_is_written_points_to_its_checkpoint(base_args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = checkpoint_args(base_args, out)
    original = CLIPContrastiveTrainer.save_model

    def cut_short(self, output_dir=None, _internal_call=False):
        original(self, output_dir, _internal_call)
        if not _internal_call:  # the final save: Ctrl-C while model.safetensors is half written
            weights = out / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(CLIPContrastiveTrainer, "save_model", cut_short)
    assert run.cli(argv) == 130
    err = capsys.readouterr().err
    assert f"training had ended, but the trained model in {out} is not whole (model.safetensors is unreadable" in err
    assert f"{out / 'checkpoint-8'} holds the weights saved last: `--resume_from_checkpoint true`" in err
    monkeypatch.setattr(CLIPContrastiveTrainer, "save_model", original)
    # What the message says works: the run finishes from the checkpoint, and its model is the checkpoint's weights.
    assert run.cli([*argv, "--resume_from_checkpoint", "true"]) == 0
    saved, checkpoint = load_file(out / "model.safetensors"), load_file(out / "checkpoint-8" / "model.safetensors")
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[k], checkpoint[k]) for k in saved)


def test_a_saved_model_from_an_earlier_run_does_not_count_as_this_runs(tmp_path):
    from safetensors.torch import save_file

    from clip_trainer.checkpoints import saved_model_problems

    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert saved_model_problems(str(tmp_path), since=time.time()) == []
    assert saved_model_problems(str(tmp_path), since=time.time() + 60) == [
        "model.safetensors is older than this run's training"
    ]
    (tmp_path / "config.json").write_text("{")
    assert saved_model_problems(str(tmp_path), since=0)[0].startswith("config.json is unreadable")


@pytest.mark.slow
def test_a_second_sigterm_stops_a_run_whose_step_never_ends(base_args, tmp_path):
    # The first SIGTERM waits for the step to end, to save there; a scheduler's second one must not wait for ever.
    process = run_to_step_2(base_args, tmp_path / "out", tmp_path / "step", seconds=600, group=False)
    process.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert process.poll() is None  # waiting for the step to end
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM); nothing was saved since the last checkpoint" in stderr
    assert "Traceback" not in stderr


def test_ctrl_c_while_the_command_starts_is_one_line(monkeypatch, capsys):
    from clip_trainer import cli, command_line

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C lands in the seconds of importing torch and transformers

    monkeypatch.setattr(command_line, "check_command_line", interrupted)
    assert cli.run_command(["configs/demo.json"]) == 130
    err = capsys.readouterr().err
    assert "run_clip.py: interrupted (Ctrl-C) while starting; nothing was written." in err and "Traceback" not in err


def test_a_shared_memory_too_small_for_the_workers_batches_is_warned_of(base_args, tmp_path, monkeypatch, caplog):
    # DataLoader workers pass batches through /dev/shm; one that does not fit stalls the run without an error.
    import collections
    import logging

    import clip_trainer.trainer as trainer_module

    usage = collections.namedtuple("usage", "total used free")
    caplog.set_level(logging.WARNING, logger="clip_trainer")
    argv = [*set_option(base_args, "dataloader_num_workers", "1"), "--max_steps", "1"]
    monkeypatch.setattr(trainer_module.shutil, "disk_usage", lambda path: usage(64 * 2**20, 0, 2**15))
    run.main(set_option(argv, "output_dir", str(tmp_path / "small")))
    [said] = [r.getMessage() for r in caplog.records if "Shared memory (/dev/shm)" in r.getMessage()]
    # 1 worker x 2 batches prefetched x (8 + 16 pairs) x the model's uint8 pixels, against 32 KiB free.
    from transformers import AutoImageProcessor

    crop = AutoImageProcessor.from_pretrained(base_args[base_args.index("--model_name_or_path") + 1]).crop_size
    in_flight = 1 * 2 * (8 + 16) * 3 * crop["height"] * crop["width"]
    assert f"has 0.0 MiB free, and 1 DataLoader worker(s) can hold about {in_flight / 2**20:,.1f} MiB" in said
    assert "--shm-size" in said and "--dataloader_num_workers 0" in said
    caplog.clear()
    monkeypatch.setattr(trainer_module.shutil, "disk_usage", lambda path: usage(2**31, 0, 2**31))
    run.main(set_option(argv, "output_dir", str(tmp_path / "roomy")))
    assert "Shared memory" not in caplog.text
