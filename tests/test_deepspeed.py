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
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import drop_option
from sharded_runs import (
    assert_resumes_where_the_whole_run_ends,
    assert_same_weights,
    logged,
    torchrun,
    two_process_args,
)

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


def _deepspeed(args: list[str]) -> None:
    if not DEEPSPEED_PYTHON.exists():
        pytest.skip("no .venv-deepspeed (made by .ci/run: torch==2.13.0, clip-trainer's [dev,lora,deepspeed] extras)")
    args = [*drop_option(args, "use_cpu"), "--deepspeed", str(ZERO2_CONFIG)]  # DeepSpeed's run finds the CPU itself
    torchrun(DEEPSPEED_PYTHON, REPO / "tests" / "deepspeed_on_cpu.py", args, DS_ACCELERATOR="cpu")


def _ddp(args: list[str]) -> None:
    torchrun(sys.executable, REPO / "run_clip.py", args)


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
    _deepspeed(two_process_args(base_args, deepspeed, *extra))
    _ddp(two_process_args(base_args, ddp, *extra))

    assert len(logged(deepspeed, "loss")) == 4
    assert logged(deepspeed, "loss") == pytest.approx(logged(ddp, "loss"), rel=1e-4)
    for key in ("eval_loss", "eval_t2i_recall@1", "eval_i2t_recall@5"):
        assert logged(deepspeed, key) == pytest.approx(logged(ddp, key), rel=1e-4, abs=1e-6), key
    assert_same_weights(deepspeed / "model.safetensors", ddp / "model.safetensors", atol=1e-5)
    AutoModel.from_pretrained(deepspeed)
    if case == "lora":
        assert_same_weights(deepspeed / "adapter" / "adapter_model.safetensors",
                             ddp / "adapter" / "adapter_model.safetensors", atol=1e-5)  # fmt: skip
    if "--save_steps" in extra:
        for step in (2, 4):
            checkpoint = deepspeed / f"checkpoint-{step}"
            assert (checkpoint / "latest").is_file()  # the engine's own checkpoint
            assert checkpoint_problems(str(checkpoint)) == []


@pytest.mark.slow
def test_deepspeed_resumes_from_its_checkpoint_where_the_uninterrupted_run_ends(base_args, tmp_path):
    assert_resumes_where_the_whole_run_ends(_deepspeed, base_args, tmp_path)


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


def test_deepspeed_asked_for_where_it_is_not_installed_is_one_line(base_args, tmp_path, monkeypatch):
    import importlib.util

    from clip_trainer import run

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"`deepspeed` is set .*DeepSpeed is not installed.*\.\[deepspeed\]"):
        run.main([*base_args, "--deepspeed", str(ZERO2_CONFIG)])
    assert not (tmp_path / "out").exists()
