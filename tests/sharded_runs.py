"""Two-process runs of the command under `torchrun`, for the tests that compare a sharded run (FSDP, DeepSpeed) with
the same run under DDP: the launch, the arguments both get, and what is compared (the logged values, the weights)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import set_option

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(python: str | Path, script: Path, args: list[str], **env: str) -> None:
    """`script args` in two processes (gloo, one thread each); fails the test with the output's end if it fails."""
    command = [
        str(python), "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"


def two_process_args(base_args: list[str], out: Path, *extra: str) -> list[str]:
    """`base_args` for 4 steps of two processes with 4 pairs each, every step logged, into `out`."""
    args = set_option(base_args, "output_dir", str(out))
    for name, value in (("per_device_train_batch_size", "4"), ("max_steps", "4"), ("logging_steps", "1")):
        args = set_option(args, name, value)
    return [*args, "--ddp_backend", "gloo", *extra]


def logged(out: Path, key: str) -> list[float]:
    """Every value of `key` in a finished run's log history, in order."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


def assert_same_weights(path: Path, reference: Path, atol: float) -> None:
    """Two safetensors files hold the same tensors, shapes included (`logit_scale` back to a scalar), within `atol`."""
    from safetensors.torch import load_file

    weights, expected = load_file(path), load_file(reference)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert weights[name].shape == tensor.shape, name
        torch.testing.assert_close(weights[name], tensor, atol=atol, rtol=0, msg=name)


def assert_resumes_where_the_whole_run_ends(launch, base_args: list[str], folder: Path) -> None:
    """`launch(args)` runs 4 steps with checkpoints at 2 and 4 into `folder/whole`, then again into `folder/resumed`
    from a copy of its step-2 checkpoint: the last two losses and the saved weights must be those of the whole run."""
    import shutil

    extra = ["--save_strategy", "steps", "--save_steps", "2", "--gradient_accumulation_steps", "2"]
    whole, resumed = folder / "whole", folder / "resumed"
    launch(two_process_args(base_args, whole, *extra))
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    launch(two_process_args(base_args, resumed, *extra, "--resume_from_checkpoint", "true"))
    assert logged(resumed, "loss")[-2:] == pytest.approx(logged(whole, "loss")[-2:], rel=1e-5)
    assert_same_weights(resumed / "model.safetensors", whole / "model.safetensors", atol=1e-6)
