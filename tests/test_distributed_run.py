"""`torchrun --nproc_per_node 2` runs of run_clip.py on the CPU (gloo): DDP with global negatives and cached
accumulation, from a file and from a stream, trains and saves a model that reloads.

These start two fresh Python processes each and take tens of seconds, so they are `slow`; the default suite checks
the same maths in two processes with `mp.spawn` (tests/test_gradient_cache.py, tests/test_loss.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import drop_option, set_option, write_shapes_csv
from test_streaming import write_parquet_shards
from transformers import CLIPModel

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], timeout: int = 300, **environment: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(REPO / "run_clip.py"), *args,
    ]  # fmt: skip
    # One thread per process: two processes on a small machine would otherwise fight over every core.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **environment}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def check_run(result: subprocess.CompletedProcess, out: Path, steps: int) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses and all(loss == loss for loss in losses)  # logged, and not NaN
    CLIPModel.from_pretrained(out)


DISTRIBUTED_ARGS = [
    "--max_steps", "4",
    "--per_device_train_batch_size", "4",
    "--gradient_accumulation_steps", "2",  # cached accumulation under DDP: no_sync, then one synchronised backward
    "--logging_steps", "1",
    "--ddp_backend", "gloo",
]  # fmt: skip


@pytest.mark.slow
def test_torchrun_two_processes_train_and_save(base_args, tmp_path):
    out = tmp_path / "out"
    result = torchrun([*base_args, *DISTRIBUTED_ARGS, "--eval_strategy", "steps", "--eval_steps", "2"])
    check_run(result, out, steps=4)
    # One copy of each message and metrics block, not one per process; no DDP warning about unused parameters.
    output = result.stdout + result.stderr
    assert output.count("***** train metrics *****") == 1 and output.count("***** eval metrics *****") == 1
    assert output.count("training pairs: ") == 1
    assert "find_unused_parameters=True was specified" not in output


@pytest.mark.slow
def test_torchrun_on_a_machine_without_an_accelerator_needs_no_cpu_flags(base_args, tmp_path):
    """`torchrun --nproc_per_node 2 run_clip.py ...` as the docs give it, without `--use_cpu` or `--ddp_backend`:
    the two processes know each other (one folder lock, one save, half the steps of one process)."""
    import math

    out = tmp_path / "out"
    args = drop_option(set_option(base_args, "num_train_epochs", "1"), "use_cpu")
    # On a machine with GPUs, the processes are shown none: the case is the machine without.
    result = torchrun([*args, "--per_device_train_batch_size", "4", "--logging_steps", "1"], CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    pairs = json.loads((out / "all_results.json").read_text())["train_samples"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == math.ceil(pairs / (2 * 4))
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in result.stderr
    CLIPModel.from_pretrained(out)


@pytest.mark.slow
def test_torchrun_two_processes_stream_and_save(base_args, tmp_path):
    shards = write_parquet_shards(tmp_path / "shards", shards=3)
    out = tmp_path / "out"
    args = [
        *drop_option(base_args, "train_file"), *DISTRIBUTED_ARGS,
        "--dataset_name", str(shards), "--streaming", "true", "--max_eval_samples", "8",
        "--shuffle_buffer_size", "64",
    ]  # fmt: skip
    result = torchrun(args)
    check_run(result, out, steps=4)


@pytest.mark.slow
def test_torchrun_two_processes_evaluate_without_training_data(base_args, tmp_path):
    """An evaluation of a model on a validation file, nothing else, in 2 processes, equals the 1-process one."""
    from clip_trainer.run import main

    # A model trained a little, so that its embeddings are apart: a random one's near-ties would flip ranks on the
    # last bit of float noise between the two runs' batchings.
    main([*base_args, "--max_steps", "30", "--output_dir", str(tmp_path / "trained")])
    # One caption per image: identical captions of several images would tie exactly, and ties flip on float noise.
    validation = write_shapes_csv(tmp_path / "val", repeats=1)
    common = ["--model_name_or_path", str(tmp_path / "trained"), "--validation_file", str(validation), "--do_eval",
              "--per_device_eval_batch_size", "7", "--report_to", "none", "--dataloader_num_workers", "0",
              "--use_cpu", "true"]  # fmt: skip
    result = torchrun([*common, "--output_dir", str(tmp_path / "two"), "--ddp_backend", "gloo"])
    assert result.returncode == 0, result.stderr[-4000:]
    single = main([*common, "--output_dir", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert two["eval_samples"] == single["eval_samples"] == 24
    for key, value in single.items():
        if "recall" in key or "rank" in key:
            assert two[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["false", "true"], ids=["plain", "augmented"])
def test_an_uneven_last_batch_trains_as_in_one_process(base_args, tmp_path, augment):
    """22 pairs at an effective batch of 8: one process takes 8, 8 and 6; two processes of 4 take the same rows, and
    in the last round accelerate fills the second process's batch with 2 rows from the start of the epoch. Those are
    masked, so every step's loss and the trained weights equal the one process's. Augmented too: each row's crop is
    drawn from its own seed (the run's, the epoch, the row), whichever process takes it."""
    import torch
    from safetensors.torch import load_file

    from clip_trainer.run import main

    common = [*drop_option(drop_option(base_args, "num_train_epochs"), "logging_steps"), "--num_train_epochs", "1",
              "--max_train_samples", "22", "--logging_steps", "1", "--lr_scheduler_type", "constant",
              "--augment", augment]  # fmt: skip
    one = tmp_path / "one"
    main([*set_option(common, "output_dir", str(one)), "--per_device_train_batch_size", "8"])
    two = tmp_path / "two"
    result = torchrun([*set_option(common, "output_dir", str(two)), "--per_device_train_batch_size", "4",
                       "--ddp_backend", "gloo"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]

    def losses(folder: Path) -> list[float]:
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    assert len(losses(one)) == 3
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    assert "skipped_samples" not in (two / "trainer_state.json").read_text()  # the filled rows are not data faults


@pytest.mark.slow
def test_two_processes_evaluate_to_the_same_loss_as_one(base_args, tmp_path):
    """24 validation pairs at a global evaluation batch of 10 (one process of 10, two of 5): batches of 10, 10 and 4,
    and in the last round accelerate repeats 6 rows to give both processes a full batch. `eval_loss` is the one
    process's: the repeated rows are masked and each batch weighs by its pairs."""
    from clip_trainer.run import main

    main([*base_args, "--max_steps", "10", "--output_dir", str(tmp_path / "trained")])
    validation = write_shapes_csv(tmp_path / "val", repeats=1)
    common = ["--model_name_or_path", str(tmp_path / "trained"), "--validation_file", str(validation), "--do_eval",
              "--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu", "true"]  # fmt: skip
    result = torchrun([*common, "--per_device_eval_batch_size", "5", "--output_dir", str(tmp_path / "two"),
                       "--ddp_backend", "gloo"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    single = main([*common, "--per_device_eval_batch_size", "10", "--output_dir", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert two["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_accelerate_launch_multi_gpu_starts_cpu_processes_that_train_as_torchrun(base_args, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs, as the docs give it: two CPU
    processes that know each other (it launches them as torchrun does), training to the losses of a torchrun run."""
    common = [*drop_option(base_args, "logging_steps"), "--max_steps", "3", "--logging_steps", "1",
              "--per_device_train_batch_size", "4"]  # fmt: skip
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()), str(REPO / "run_clip.py"),
         *set_option(common, "output_dir", str(tmp_path / "accelerate"))],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    check_run(launched, tmp_path / "accelerate", steps=3)
    result = torchrun([*set_option(common, "output_dir", str(tmp_path / "torchrun")), "--ddp_backend", "gloo"])
    check_run(result, tmp_path / "torchrun", steps=3)

    def losses(folder: Path) -> list[float]:
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    assert losses(tmp_path / "accelerate") == pytest.approx(losses(tmp_path / "torchrun"), rel=1e-5)
