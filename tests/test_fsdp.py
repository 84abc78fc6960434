"""FSDP through the Trainer's options, run on the CPU.

accelerate (1.16) turns FSDP on for GPUs and other accelerators only: on the CPU it leaves the FSDP plugin unused and
wraps the model in DDP, so a CPU run with `fsdp` would train whole copies of the model while its user believes it
sharded. clip-trainer refuses that run before any data is read. `torch.distributed.fsdp.fully_shard` itself runs on the
CPU with gloo, so the slow tests below launch `tests/fsdp_on_cpu.py` under `torchrun`: `run_clip.py` with accelerate
taught to take the plugin on the CPU too. Everything else (accelerate's FSDP2 wrapping, the sharded checkpoints, the
gathered final save) is what a GPU run goes through; each FSDP run is checked against the same run under DDP, step
by step, and in the weights it saves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import set_option
from sharded_runs import (
    assert_resumes_where_the_whole_run_ends,
    assert_same_weights,
    logged,
    torchrun,
    two_process_args,
)

from clip_trainer import CLIPTrainingArguments, DataArguments, run
from clip_trainer.callbacks import all_finite
from clip_trainer.checkpoints import checkpoint_problems
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


def test_an_export_under_fsdp_is_refused_with_the_command_that_exports_afterwards(base_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"`export_onnx` exports the model from one process.*clip-trainer export-onnx"
    ):
        run.main([str(FSDP_CONFIG), *base_args, "--export_onnx", "true"])
    with pytest.raises(ConfigError, match=r"`save_open_clip`.*clip-trainer export-open-clip"):
        run.main([str(FSDP_CONFIG), *base_args, "--save_open_clip", "true"])


def test_a_model_prepared_for_fsdp2_computes_what_it_did():
    """`fully_shard` refuses CLIP's 0-dimensional `logit_scale`: it becomes `(1,)` in place (the same parameter, so the
    optimizer groups and the towers' locks still hold it), and the model's logits do not change."""
    from transformers import CLIPConfig, CLIPModel

    from clip_trainer.trainer import _prepare_for_sharding

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8,
    )  # fmt: skip
    model = CLIPModel(config).eval()
    inputs = dict(input_ids=torch.randint(0, 50, (3, 8)), pixel_values=torch.randn(2, 3, 16, 16))
    before = model(**inputs).logits_per_image
    scale = model.logit_scale
    assert _prepare_for_sharding(model, fsdp=True) == ["logit_scale"]
    assert model.logit_scale is scale and scale.shape == (1,) and scale.requires_grad
    assert model.get_input_embeddings() is None  # each tower's embeddings stay in its tower's sharding units
    assert torch.equal(model(**inputs).logits_per_image, before)


# ---------------------------------------------------------------------------------------------------------------------
# Two processes under torchrun: FSDP against DDP
# ---------------------------------------------------------------------------------------------------------------------


def _fsdp(args: list[str], config: Path = FSDP_CONFIG) -> None:
    torchrun(sys.executable, REPO / "tests" / "fsdp_on_cpu.py", [str(config), *args])


def _ddp(args: list[str]) -> None:
    torchrun(sys.executable, REPO / "run_clip.py", args)


# What each case adds to a 4-step run of two processes with 4 pairs each.
FSDP_CASES = {
    # Cached accumulation, partial locking, evaluation gathered across processes, sharded checkpoints.
    "accumulated_locked_evaluated": [
        "--gradient_accumulation_steps", "2", "--vision_trainable_layers", "1",
        "--validation_split_percentage", "25", "--eval_strategy", "steps", "--eval_steps", "2",
        "--save_strategy", "steps", "--save_steps", "2",
    ],
    # A frozen tower unfrozen mid-run, activation checkpointing, layer-wise learning rates; the weights loaded by
    # the main process only and sent to the other (`cpu_ram_efficient_loading`).
    "unfrozen_checkpointed_layerwise": [
        "--freeze_vision_model", "true", "--unfreeze_after_steps", "2", "--gradient_checkpointing", "true",
        "--layerwise_lr_decay", "0.8",
    ],
    # LoRA: evaluated with its adapters, saved merged (from the gathered weights) and as an adapter.
    "lora": ["--lora_rank", "4", "--validation_split_percentage", "25"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", [*FSDP_CASES, "siglip"])
def test_fsdp_trains_evaluates_and_saves_as_ddp_does(case, base_args, tiny_siglip_run, tmp_path):
    from transformers import AutoModel

    extra = FSDP_CASES.get(case, [])
    if case == "siglip":  # the sigmoid loss, with its learned `logit_bias`
        base_args = set_option(base_args, "model_name_or_path", str(tiny_siglip_run))
    config = FSDP_CONFIG
    if case == "unfrozen_checkpointed_layerwise":
        settings = json.loads(FSDP_CONFIG.read_text())
        settings["fsdp_config"]["cpu_ram_efficient_loading"] = True
        config = tmp_path / "fsdp-loaded-once.json"
        config.write_text(json.dumps(settings))
    _fsdp(two_process_args(base_args, tmp_path / "fsdp", *extra), config)
    _ddp(two_process_args(base_args, tmp_path / "ddp", *extra))

    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    assert logged(fsdp, "loss") == pytest.approx(logged(ddp, "loss"), rel=1e-4)
    assert len(logged(fsdp, "loss")) == 4
    for key in ("eval_loss", "eval_t2i_recall@1", "eval_i2t_recall@5"):
        assert logged(fsdp, key) == pytest.approx(logged(ddp, key), rel=1e-4, abs=1e-6), key
    assert_same_weights(fsdp / "model.safetensors", ddp / "model.safetensors", atol=1e-5)
    AutoModel.from_pretrained(fsdp)  # a folder `from_pretrained` loads, not shards
    if case == "lora":
        assert_same_weights(fsdp / "adapter" / "adapter_model.safetensors",
                             ddp / "adapter" / "adapter_model.safetensors", atol=1e-5)  # fmt: skip
    if "--save_steps" in extra:
        for step in (2, 4):
            checkpoint = fsdp / f"checkpoint-{step}"
            assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()  # sharded, one shard per process
            assert checkpoint_problems(str(checkpoint)) == []


@pytest.mark.slow
def test_fsdp_resumes_from_a_sharded_checkpoint_where_the_uninterrupted_run_ends(base_args, tmp_path):
    assert_resumes_where_the_whole_run_ends(_fsdp, base_args, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# The pieces FSDP changes: sharded checkpoints, empty gradient shards, replaced parameter objects
# ---------------------------------------------------------------------------------------------------------------------


def _sharded_checkpoint(folder: Path) -> Path:
    """A checkpoint folder in the layout an FSDP run with SHARDED_STATE_DICT writes (one process's worth)."""
    import torch.distributed.checkpoint as dcp

    folder.mkdir()
    dcp.save(
        {"weight": torch.arange(4000.0), "bias": torch.ones(3)}, checkpoint_id=str(folder / "pytorch_model_fsdp_0")
    )
    dcp.save({"state": {"weight": torch.zeros(4000)}}, checkpoint_id=str(folder / "optimizer_0"))
    torch.save({"last_epoch": 2}, folder / "scheduler.pt")
    torch.save({"python": 0}, folder / "rng_state_0.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    return folder


def test_a_sharded_checkpoint_is_complete_until_a_shard_is_cut_short_or_its_metadata_is_missing(tmp_path):
    checkpoint = _sharded_checkpoint(tmp_path / "checkpoint-2")
    assert checkpoint_problems(str(checkpoint)) == []

    shard = next((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # a process killed while writing its shard
    assert checkpoint_problems(str(checkpoint)) == [f"pytorch_model_fsdp_0/{shard.name} is missing or cut short"]

    (checkpoint / "optimizer_0" / ".metadata").unlink()  # written last: the save never finished
    assert "optimizer_0/.metadata is missing" in checkpoint_problems(str(checkpoint))


def test_an_empty_gradient_shard_is_finite():
    """FSDP2 leaves a process an empty shard of a parameter with fewer elements than processes (`logit_scale`)."""
    assert all_finite([torch.ones(3), torch.empty(0)]).item()
    assert not all_finite([torch.tensor([1.0, float("nan")]), torch.empty(0)]).item()
    assert all_finite([torch.empty(0)]).item()


def test_the_trainable_parameter_policy_holds_for_the_parameters_fsdp2_puts_in_place(tiny_clip_dir):
    """FSDP2 replaces every parameter object with a sharded one and keeps the names: the policy (partial locking,
    frozen towers) must apply to the new objects as to the old."""
    from transformers import CLIPModel

    from clip_trainer.trainable import TrainableParameters

    model = CLIPModel.from_pretrained(tiny_clip_dir)
    policy = TrainableParameters(model, frozen_towers=["text"], unfreeze_after_steps=3, trainable_layers={"vision": 1})
    for module in model.modules():  # what `fully_shard` does: new parameter objects under the same names
        for name, parameter in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(parameter.detach().clone()))
    policy.apply(model, step=0)
    trains = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert "vision_model.encoder.layers.1.mlp.fc1.weight" in trains  # the top layer of the locked tower trains
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" not in trains  # the layers below it do not
    assert not any(name.startswith("text_model.") for name in trains)  # the frozen tower
    policy.apply(model, step=3)
    trains = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert "text_model.encoder.layers.0.mlp.fc1.weight" in trains  # unfrozen at its step
