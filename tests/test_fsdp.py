"""FSDP and DeepSpeed through the Trainer's options: what clip-trainer refuses up front, in one line.

accelerate turns FSDP on for GPUs (and other accelerators) only: on the CPU it leaves the FSDP plugin unused and wraps
the model in DDP, so a CPU run with `fsdp` would train whole copies of the model while its user believes it sharded.
clip-trainer refuses it before any data is read. (FSDP itself runs on the CPU with gloo, but not through accelerate.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clip_trainer import CLIPTrainingArguments, DataArguments, run
from clip_trainer.errors import ConfigError
from clip_trainer.validation import check_training_arguments

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs" / "fsdp.json"


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    # `TrainingArguments` with `fsdp` sets FSDP_CPU_RAM_EFFICIENT_LOADING for transformers' loaders to read.
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")


def test_the_fsdp_config_file_holds_full_sharding_with_sharded_checkpoints():
    config = json.loads(FSDP_CONFIG.read_text())
    args = CLIPTrainingArguments(output_dir="unused", fsdp=config["fsdp"], fsdp_config=config["fsdp_config"])
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True  # FSDP2, full sharding
    assert plugin["state_dict_type"] == "SHARDED_STATE_DICT"
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # each family's encoder layers (`_no_split_modules`)


def test_fsdp_on_the_cpu_is_refused(tmp_path):
    config = json.loads(FSDP_CONFIG.read_text())
    args = CLIPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **config)
    with pytest.raises(ConfigError, match=r"`fsdp` is set, but this run is on the CPU.* drop `fsdp`"):
        check_training_arguments(DataArguments(), args)


def test_command_with_the_fsdp_config_on_the_cpu_stops_before_the_data(base_args, tmp_path, monkeypatch):
    """`run_clip.py configs/fsdp.json ...` on a CPU: one line, before the output folder is claimed or data is read."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="this run is on the CPU"):
        run.main([str(FSDP_CONFIG), *base_args])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_final_save_of_a_sharded_fsdp_run_is_a_full_model(base_args, tiny_clip_dir, tmp_path):
    """With sharded checkpoints, transformers' final save would write shards again; clip-trainer gathers the full
    state dict for the final folder. FSDP itself cannot run on the CPU (accelerate falls back to DDP), so the plugin is
    set on a trainer of one process, where `get_state_dict` returns the whole model as FSDP2's full gather does."""
    from types import SimpleNamespace

    from conftest import build_trainer
    from transformers import CLIPModel

    csv = Path(base_args[base_args.index("--train_file") + 1])
    trainer = build_trainer(tmp_path, tiny_clip_dir, csv)
    trainer.is_fsdp_enabled = True
    trainer.accelerator.state.fsdp_plugin = SimpleNamespace(state_dict_type="StateDictType.SHARDED_STATE_DICT")
    try:
        with torch.no_grad():
            trainer.model.logit_scale.fill_(1.25)  # a change that the saved folder must hold
        trainer.save_model()
    finally:
        trainer.accelerator.state.fsdp_plugin = None
    saved = CLIPModel.from_pretrained(tmp_path / "out")
    assert saved.logit_scale.item() == pytest.approx(1.25)
    assert not any(path.name.startswith("pytorch_model_fsdp") for path in (tmp_path / "out").iterdir())
