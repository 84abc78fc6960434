"""DeepSpeed ZeRO stage 2 through the Trainer's `deepspeed` option, run on the CPU against DDP.

DeepSpeed lives in an environment of its own (`.venv-deepspeed`, made by `.ci/run`: torch 2.13.0, clip-trainer and
DeepSpeed 0.19.8), so that the main suite runs without it. The slow tests launch `tests/deepspeed_on_cpu.py` with that
environment's Python under `torchrun` and `DS_ACCELERATOR=cpu`: `run_clip.py` with accelerate shown the CPU processes
`torchrun` started (it counts one on a machine without an accelerator). The DeepSpeed engine, its checkpoints and the
final save are the code a GPU run goes through; each run is compared with the same run under DDP, step by step and in
the weights it saves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import set_option

from clip_trainer import CLIPTrainingArguments, DataArguments
from clip_trainer.checkpoints import checkpoint_problems
from clip_trainer.errors import ConfigError
from clip_trainer.validation import check_training_arguments

REPO = Path(__file__).resolve().parents[1]
ZERO2_CONFIG = REPO / "configs" / "deepspeed_zero2.json"
DEEPSPEED_PYTHON = REPO / ".venv-deepspeed" / "bin" / "python"


def test_deepspeed_on_the_cpu_a_tower_unfrozen_later_and_zero3_are_refused(tmp_path, monkeypatch):
    """Checked from the arguments, in one line each; `deepspeed` itself is not needed by the checks."""
    import clip_trainer.validation

    args = CLIPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    args.deepspeed = str(ZERO2_CONFIG)  # set after construction: building DeepSpeed's plugin needs DeepSpeed
    with pytest.raises(ConfigError, match=r"`deepspeed` is set, but this run is on the CPU.* drop `deepspeed`"):
        check_training_arguments(DataArguments(), args)
    monkeypatch.setattr(clip_trainer.validation, "accelerate_shards_on", lambda device: True)  # as on GPUs
    check_training_arguments(DataArguments(), args)
    args.unfreeze_after_steps = 5
    with pytest.raises(ConfigError, match=r"`unfreeze_after_steps` unfreezes a tower mid-run, but DeepSpeed"):
        check_training_arguments(DataArguments(), args)
    args.unfreeze_after_steps = None
    # What transformers makes of a config with `"zero_optimization": {"stage": 3}`.
    args.hf_deepspeed_config = SimpleNamespace(is_zero3=lambda: True)
    with pytest.raises(ConfigError, match=r"ZeRO stage 3, which clip-trainer does not support.* use ZeRO stage 2"):
        check_training_arguments(DataArguments(), args)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(python: Path, script: Path, args: list[str]) -> None:
    command = [
        str(python), "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), *args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["DS_ACCELERATOR"] = "cpu"
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"


def _deepspeed(args: list[str]) -> None:
    if not DEEPSPEED_PYTHON.exists():
        pytest.skip("no .venv-deepspeed (made by .ci/run: torch==2.13.0, clip-trainer's [dev,lora,deepspeed] extras)")
    _torchrun(DEEPSPEED_PYTHON, REPO / "tests" / "deepspeed_on_cpu.py", [*args, "--deepspeed", str(ZERO2_CONFIG)])


def _ddp(args: list[str]) -> None:
    _torchrun(Path(sys.executable), REPO / "run_clip.py", [*args, "--use_cpu", "true"])


def _logged(out: Path, key: str) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


def _assert_same_weights(path: Path, reference: Path, atol: float) -> None:
    from safetensors.torch import load_file

    weights, expected = load_file(path), load_file(reference)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert weights[name].shape == tensor.shape, name  # `logit_scale` back to a scalar
        torch.testing.assert_close(weights[name], tensor, atol=atol, rtol=0, msg=name)


def _two_process_args(base_args: list[str], out: Path, *extra: str) -> list[str]:
    args = set_option(base_args, "output_dir", str(out))
    for name, value in (("per_device_train_batch_size", "4"), ("max_steps", "4"), ("logging_steps", "1")):
        args = set_option(args, name, value)
    args = [arg for arg in args if arg not in ("--use_cpu", "true")]  # DeepSpeed's run finds the CPU itself
    return [*args, "--ddp_backend", "gloo", *extra]


DEEPSPEED_CASES = {
    # Cached accumulation, partial locking with weight decay (a locked weight must not decay), evaluation gathered
    # across processes, the engine's checkpoints.
    "accumulated_locked_decayed": [
        "--gradient_accumulation_steps", "2", "--vision_trainable_layers", "1", "--weight_decay", "0.1",
        "--validation_split_percentage", "25", "--eval_strategy", "steps", "--eval_steps", "2",
        "--save_strategy", "steps", "--save_steps", "2",
    ],
    # LoRA: evaluated with its adapters, saved merged (from the engine's weights) and as an adapter.
    "lora": ["--lora_rank", "4", "--validation_split_percentage", "25"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", DEEPSPEED_CASES)
def test_deepspeed_zero2_trains_evaluates_and_saves_as_ddp_does(case, base_args, tmp_path):
    from transformers import AutoModel

    extra = DEEPSPEED_CASES[case]
    deepspeed, ddp = tmp_path / "deepspeed", tmp_path / "ddp"
    _deepspeed(_two_process_args(base_args, deepspeed, *extra))
    _ddp(_two_process_args(base_args, ddp, *extra))

    assert len(_logged(deepspeed, "loss")) == 4
    assert _logged(deepspeed, "loss") == pytest.approx(_logged(ddp, "loss"), rel=1e-4)
    for key in ("eval_loss", "eval_t2i_recall@1", "eval_i2t_recall@5"):
        assert _logged(deepspeed, key) == pytest.approx(_logged(ddp, key), rel=1e-4, abs=1e-6), key
    _assert_same_weights(deepspeed / "model.safetensors", ddp / "model.safetensors", atol=1e-5)
    AutoModel.from_pretrained(deepspeed)
    if case == "lora":
        _assert_same_weights(deepspeed / "adapter" / "adapter_model.safetensors",
                             ddp / "adapter" / "adapter_model.safetensors", atol=1e-5)  # fmt: skip
    if "--save_steps" in extra:
        for step in (2, 4):
            checkpoint = deepspeed / f"checkpoint-{step}"
            assert (checkpoint / "latest").is_file()  # the engine's own checkpoint
            assert checkpoint_problems(str(checkpoint)) == []


@pytest.mark.slow
def test_deepspeed_resumes_from_its_checkpoint_where_the_uninterrupted_run_ends(base_args, tmp_path):
    extra = ["--save_strategy", "steps", "--save_steps", "2", "--gradient_accumulation_steps", "2"]
    _deepspeed(_two_process_args(base_args, tmp_path / "whole", *extra))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", resumed / "checkpoint-2")
    _deepspeed(_two_process_args(base_args, resumed, *extra, "--resume_from_checkpoint", "true"))
    assert _logged(resumed, "loss")[-2:] == pytest.approx(_logged(tmp_path / "whole", "loss")[-2:], rel=1e-5)
    _assert_same_weights(resumed / "model.safetensors", tmp_path / "whole" / "model.safetensors", atol=1e-6)


def test_an_engine_checkpoint_missing_a_process_optimizer_states_is_incomplete(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    engine = checkpoint / "global_step2"
    engine.mkdir(parents=True)
    (checkpoint / "latest").write_text("global_step2")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"):  # fmt: skip
        torch.save({"step": 2}, engine / name)
    for name in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        torch.save({}, checkpoint / name)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert checkpoint_problems(str(checkpoint)) == []

    (engine / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint_problems(str(checkpoint)) == ["global_step2/ holds the optimizer states of 1 of 2 processes"]
    (checkpoint / "latest").write_text("global_step9")
    assert checkpoint_problems(str(checkpoint)) == ["latest names 'global_step9', which is missing"]
