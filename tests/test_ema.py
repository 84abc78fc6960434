"""The exponential moving average of the weights (`ema_decay`): its update against a float64 reference, checkpoints
and an exact resume, its evaluation beside the weights, the choice of the weights saved (and the card), and the
combinations: LoRA, partial locking, WiSE-FT, the sigmoid loss, streaming and torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_trainer, drop_option, set_option
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import TrainerCallback

from clip_trainer import run
from clip_trainer.arguments import CLIPTrainingArguments, ConfigError, DataArguments
from clip_trainer.checkpoints import EMA_WEIGHTS_NAME, checkpoint_problems
from clip_trainer.ema import ExponentialMovingAverage, ema_parameter_names
from clip_trainer.metrics import ema_metric_name, split_metric_key

REPO = Path(__file__).resolve().parents[1]


def ema_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / EMA_WEIGHTS_NAME))


def state_of(out: Path) -> dict:
    return json.loads((out / "trainer_state.json").read_text())


# --------------------------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------------------------


def test_the_update_equals_a_float64_reference():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    decay = 0.9
    ema = ExponentialMovingAverage([("a", weights[0]), ("b", weights[1])], decay)
    reference = [w.detach().double().clone() for w in weights]
    for _ in range(7):
        with torch.no_grad():  # an optimizer step's change
            for w in weights:
                w.add_(torch.randn_like(w))
        ema.update()
        reference = [decay * r + (1 - decay) * w.detach().double() for r, w in zip(reference, weights)]
    for average, expected in zip(ema.averages, reference):
        assert average.dtype == torch.float32
        torch.testing.assert_close(average.double(), expected, rtol=0, atol=1e-6)
    # Far from the weights themselves: the average did average.
    assert (ema.averages[0] - weights[0]).abs().max() > 0.1


def test_a_bfloat16_model_is_averaged_in_float32():
    weight = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    ema = ExponentialMovingAverage([("w", weight)], 0.999)
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update()
    # 0.001 is below bfloat16's resolution at 1 but kept in float32.
    torch.testing.assert_close(ema.averages[0], torch.full((3,), 0.001), rtol=1e-6, atol=0)


# GPU tier (`-m gpu`): host synchronisation is observable on CUDA only; deselected by default, not silently skipped.
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="-m gpu was asked for, but this machine has no CUDA device")
def test_the_update_reads_nothing_back_from_the_device():
    weights = [torch.nn.Parameter(torch.randn(64, 64, device="cuda")), torch.nn.Parameter(torch.randn(64).cuda())]
    ema = ExponentialMovingAverage([("a", weights[0]), ("b", weights[1])], 0.999)
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        for _ in range(3):
            ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ema.averages[0].device.type == "cuda"


class RecordWeights(TrainerCallback):
    """The weights when training begins and after every step (the clamp and the average done), in float64."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.steps: list[dict[str, torch.Tensor]] = []
        self.final_ema: dict[str, torch.Tensor] | None = None
        self.trainer = None

    def _weights(self, model) -> dict[str, torch.Tensor]:
        parameters = dict(model.named_parameters())
        return {name: parameters[name].detach().double().clone() for name in self.names}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.steps.append(self._weights(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(self._weights(model))

    def on_train_end(self, args, state, control, **kwargs):
        ema = self.trainer.ema_callback.ema
        self.final_ema = {name: value.detach().clone() for name, value in ema.state_dict().items()}


def test_a_run_averages_the_weights_after_every_optimizer_step(tiny_clip_dir, shapes_csv, tmp_path):
    decay = 0.7
    trainer = build_trainer(tmp_path, tiny_clip_dir, shapes_csv, ema_decay=decay, max_steps=5)
    names = trainer.ema_callback.names
    assert "logit_scale" in names and len(names) == len(list(trainer.model.parameters()))
    recorder = RecordWeights(names)
    recorder.trainer = trainer
    trainer.add_callback(recorder)
    trainer.train()
    assert len(recorder.steps) == 6
    expected = recorder.steps[0]
    for weights in recorder.steps[1:]:
        expected = {name: decay * expected[name] + (1 - decay) * weights[name] for name in names}
    moved = 0.0
    for name in names:
        torch.testing.assert_close(recorder.final_ema[name].double(), expected[name], rtol=0, atol=1e-6)
        moved = max(moved, (expected[name] - recorder.steps[-1][name]).abs().max().item())
    assert moved > 1e-3  # the average is not the last weights
    # The run's metric is not an EMA one: the weights saved are the trained ones, and the average is over.
    assert trainer.ema_callback.ema is None
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter.detach().double(), recorder.steps[-1][name])


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and resuming
# --------------------------------------------------------------------------------------------------------------


def test_the_average_resumes_exactly(base_args, tmp_path):
    common = [*base_args, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3",
              "--save_total_limit", "5", "--ema_decay", "0.8"]  # fmt: skip
    reference = tmp_path / "reference"
    run.main([*common, "--output_dir", str(reference)])
    resumed = tmp_path / "resumed"
    run.main([*common, "--output_dir", str(resumed)])
    # As after a crash at step 4: the final state gone, the run resumed from checkpoint-3.
    shutil.rmtree(resumed / "checkpoint-6")
    (resumed / "model.safetensors").unlink()
    run.main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "true"])
    for step in (3, 6):
        assert checkpoint_problems(str(resumed / f"checkpoint-{step}")) == []
    expected, got = ema_of(reference / "checkpoint-6"), ema_of(resumed / "checkpoint-6")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-7)
    # The average at step 6 is not the one of step 3 carried over, nor the weights.
    weights = load_file(str(reference / "checkpoint-6" / "model.safetensors"))
    at_3 = ema_of(reference / "checkpoint-3")
    assert any(not torch.equal(expected[n], at_3[n]) for n in expected)
    assert any(not torch.equal(expected[n], weights[n]) for n in expected)


def test_a_resume_with_another_decay_is_refused(base_args, tmp_path, capsys):
    argv = [*base_args, "--save_strategy", "steps", "--save_steps", "2", "--ema_decay", "0.9"]
    run.main([*argv, "--max_steps", "2"])
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    status = run.cli([*set_option(argv, "ema_decay", "0.5"), "--max_steps", "4", "--resume_from_checkpoint", "true"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"run_clip.py: error: {checkpoint} was trained with `ema_decay`")
    assert f"{checkpoint} was trained with `ema_decay` 0.9, and this run sets 0.5" in err
    status = run.cli([*drop_option(argv, "ema_decay"), "--max_steps", "4", "--resume_from_checkpoint", "true"])
    err = capsys.readouterr().err
    assert status == 2 and "was trained with `ema_decay` 0.9, and this run sets none" in err


def test_a_library_resume_from_the_latest_checkpoint_is_checked_too(tiny_clip_dir, shapes_csv, tmp_path):
    trainer = build_trainer(tmp_path, tiny_clip_dir, shapes_csv, ema_decay=0.9, max_steps=2, save_strategy="steps",
                            save_steps=2)  # fmt: skip
    trainer.train()
    resumed = build_trainer(tmp_path, tiny_clip_dir, shapes_csv, ema_decay=0.7, max_steps=4)
    with pytest.raises(ConfigError, match="was trained with `ema_decay` 0.9, and this run sets 0.7"):
        resumed.train(resume_from_checkpoint=True)


def test_a_resume_with_an_average_from_a_checkpoint_without_one_is_refused(base_args, tmp_path, capsys):
    argv = [*base_args, "--save_strategy", "steps", "--save_steps", "2"]
    run.main([*argv, "--max_steps", "2"])
    status = run.cli([*argv, "--max_steps", "4", "--resume_from_checkpoint", "true", "--ema_decay", "0.9"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "has no moving average (ema.safetensors; it was trained without `ema_decay`)" in err


def test_a_damaged_average_makes_the_checkpoint_incomplete(base_args, tmp_path):
    run.main([*base_args, "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "2", "--ema_decay", "0.9"])
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert checkpoint_problems(str(checkpoint)) == []
    path = checkpoint / EMA_WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-10])
    assert any(problem.startswith("ema.safetensors is unreadable") for problem in checkpoint_problems(str(checkpoint)))


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def test_evaluation_reports_the_average_and_restores_the_weights_bit_for_bit(tiny_clip_dir, shapes_csv, tmp_path):
    trainer = build_trainer(
        tmp_path, tiny_clip_dir, shapes_csv, ema_decay=0.5, max_steps=3, eval_strategy="steps", eval_steps=3,
        save_strategy="steps", save_steps=3,
    )  # fmt: skip
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_ema_mean_recall" in entry]
    assert len(logged) == 1 and "eval_mean_recall" in logged[0] and "eval_ema_t2i_recall@10" in logged[0]
    # Evaluate again with the average of step 3 (the average after training is over).
    callback = trainer.ema_callback
    callback.ema = callback.build(trainer.model)
    callback.ema.load(str(tmp_path / "out" / "checkpoint-3" / EMA_WEIGHTS_NAME))
    raw = {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()}
    metrics = trainer.evaluate()
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, raw[name]), name
    assert metrics["eval_ema_loss"] != metrics["eval_loss"]
    # The average's metrics are those of a model that holds the average.
    callback.ema.copy_to_model()
    callback.ema = None
    alone = trainer.evaluate()
    assert "eval_ema_loss" not in alone
    for key in ("loss", "mean_recall", "t2i_recall@1", "i2t_median_rank"):
        assert alone[f"eval_{key}"] == pytest.approx(metrics[f"eval_ema_{key}"], abs=1e-6), key


def test_a_failing_evaluation_of_the_average_still_restores_the_weights(tiny_clip_dir, shapes_csv, tmp_path):
    trainer = build_trainer(tmp_path, tiny_clip_dir, shapes_csv, ema_decay=0.5, max_steps=1, eval_strategy="steps")
    trainer.train()
    callback = trainer.ema_callback
    callback.ema = callback.build(trainer.model)
    for average in callback.ema.averages:
        average.add_(1.0)
    raw = {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()}
    loop = trainer.evaluation_loop

    def failing(loader, description, *args, metric_key_prefix="eval", **kwargs):
        if metric_key_prefix == "eval_ema":
            raise RuntimeError("out of memory")
        return loop(loader, description, *args, metric_key_prefix=metric_key_prefix, **kwargs)

    trainer.evaluation_loop = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.evaluate()
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, raw[name]), name


def test_the_metric_registry_reads_the_average_s_keys():
    assert ema_metric_name("eval_ema_mean_recall") == "mean_recall"
    assert ema_metric_name("ema_t2i_recall@10") == "t2i_recall@10"
    assert ema_metric_name("eval_mean_recall") is None
    assert ema_metric_name("eval_ema_runtime") is None
    assert ema_metric_name(None) is None
    set_name, info = split_metric_key("eval_ema_t2i_recall@1")
    assert set_name == "ema" and info.name == "t2i_recall@1"


def test_the_options_are_checked(base_args):
    with pytest.raises(ConfigError, match=r"`ema_decay` is 1(\.0)?; it must be in \(0, 1\)"):
        CLIPTrainingArguments(output_dir="x", ema_decay=1.0)
    with pytest.raises(ConfigError, match="set `ema_decay`"):
        run.main([*base_args, "--eval_strategy", "epoch", "--metric_for_best_model", "eval_ema_mean_recall"])
    with pytest.raises(ConfigError, match="collides"):
        DataArguments(train_file="x.csv", extra_eval_sets={"ema": "y.csv"})
    args = CLIPTrainingArguments(output_dir="x", ema_decay=0.99)
    args.fsdp = ["full_shard"]
    from clip_trainer.validation import _check_fine_tuning

    with pytest.raises(ConfigError, match="`ema_decay` .* FSDP and DeepSpeed"):
        _check_fine_tuning(None, args, None)


# --------------------------------------------------------------------------------------------------------------
# Which weights are saved
# --------------------------------------------------------------------------------------------------------------

EVALUATED = ["--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
             "--save_steps", "2", "--ema_decay", "0.6"]  # fmt: skip


def test_an_ema_metric_saves_the_average_of_the_best_checkpoint(base_args, tmp_path):
    out = tmp_path / "out"
    run.main([*base_args, *EVALUATED, "--metric_for_best_model", "eval_ema_mean_recall",
              "--load_best_model_at_end", "true"])  # fmt: skip
    state = state_of(out)
    best = Path(state["best_model_checkpoint"])
    scores = {e["step"]: e["eval_ema_mean_recall"] for e in state["log_history"] if "eval_ema_mean_recall" in e}
    assert state["best_metric"] == max(scores.values()) and best.name == f"checkpoint-{max(scores, key=scores.get)}"
    saved, average = load_file(str(out / "model.safetensors")), ema_of(best)
    for name, value in average.items():
        assert torch.equal(saved[name], value), name
    # Not the best checkpoint's weights themselves.
    raw = load_file(str(best / "model.safetensors"))
    assert any(not torch.equal(saved[name], raw[name]) for name in average)
    card = (out / "README.md").read_text()
    assert "**Weights saved.** These are the exponential moving average (decay 0.6) of the trained weights of " in card
    assert f"of {best.name}, not the weights themselves: `metric_for_best_model` is `eval_ema_mean_recall`" in card


def test_a_metric_of_the_weights_saves_the_weights(base_args, tmp_path):
    out = tmp_path / "out"
    run.main([*base_args, *EVALUATED, "--metric_for_best_model", "eval_mean_recall"])
    saved, raw = load_file(str(out / "model.safetensors")), load_file(str(out / "checkpoint-4" / "model.safetensors"))
    for name in raw:
        assert torch.equal(saved[name], raw[name]), name
    card = (out / "README.md").read_text()
    assert "**Weights saved.** These are the trained weights themselves" in card
    assert "(`eval_mean_recall`) is not one of its metrics, so it was not saved." in card
    # The final evaluation scores the saved model alone.
    final = json.loads((out / "eval_results.json").read_text())
    assert "eval_mean_recall" in final and not any(key.startswith("eval_ema_") for key in final)


def test_wise_ft_interpolates_from_the_average(base_args, tiny_clip_dir, tmp_path):
    out = tmp_path / "out"
    run.main([*base_args, *EVALUATED, "--metric_for_best_model", "eval_ema_t2i_recall@10", "--wise_ft_alpha", "0.5"])
    # The rule's metric is the EMA metric's own (the interpolations have no `eval_ema_*`).
    assert json.loads((out / "wise_ft_results.json").read_text())["metric"] == "t2i_recall@10"
    pretrained = load_file(str(tiny_clip_dir / "model.safetensors"))
    average, saved = ema_of(out / "checkpoint-4"), load_file(str(out / "model.safetensors"))
    for name, value in average.items():
        expected = (0.5 * pretrained[name].double() + 0.5 * value.double()).float()
        torch.testing.assert_close(saved[name], expected, rtol=0, atol=1e-6)
    card = (out / "README.md").read_text()
    assert "WiSE-FT then interpolated between the pretrained weights and these (below)." in card


# --------------------------------------------------------------------------------------------------------------
# With LoRA, partial locking, the sigmoid loss, streaming and torchrun
# --------------------------------------------------------------------------------------------------------------


def test_lora_averages_the_adapters_and_saves_their_average(base_args, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "out"
    run.main([*base_args, *EVALUATED, "--lora_rank", "4", "--metric_for_best_model", "eval_ema_mean_recall"])
    average = ema_of(out / "checkpoint-4")
    assert average and all(".lora_A." in name or ".lora_B." in name for name in average)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {name.replace(".default", "") for name in average} == set(adapter)
    for name, value in average.items():
        assert torch.equal(adapter[name.replace(".default", "")], value), name


def test_partial_locking_averages_only_what_trains(tiny_clip_dir, shapes_csv, tmp_path):
    trainer = build_trainer(tmp_path, tiny_clip_dir, shapes_csv, ema_decay=0.9, vision_trainable_layers=0)
    names = set(trainer.ema_callback.names)
    assert "visual_projection.weight" in names and "vision_model.post_layernorm.weight" in names
    assert not any(name.startswith(("vision_model.encoder.", "vision_model.embeddings.")) for name in names)
    assert any(name.startswith("text_model.encoder.layers.0.") for name in names)
    # A tower frozen until a step is averaged (constant until then); one frozen for the run is not.
    trainer = build_trainer(tmp_path, tiny_clip_dir, shapes_csv, ema_decay=0.9, freeze_vision_model=True,
                            unfreeze_after_steps=2)  # fmt: skip
    assert any(name.startswith("vision_model.encoder.") for name in trainer.ema_callback.names)
    frozen = ema_parameter_names(trainer.model, trainer.trainable_parameters.__class__(trainer.model, ["vision"]))
    assert not any(name.startswith("vision_model.") for name in frozen) and "text_projection.weight" in frozen


def test_a_siglip_model_s_sigmoid_loss_with_an_average(base_args, tmp_path):
    from conftest import TINY_TEXT, TINY_VISION
    from transformers import SiglipConfig

    config = tmp_path / "siglip-tiny.json"
    config.write_text(SiglipConfig(text_config=TINY_TEXT, vision_config=TINY_VISION).to_json_string())
    scratch = [*drop_option(base_args, "model_name_or_path"), "--config_name", str(config),
               "--tokenizer_vocab_size", "300"]  # fmt: skip
    out = tmp_path / "out"
    run.main([*scratch, *EVALUATED, "--metric_for_best_model", "eval_ema_loss"])
    state = state_of(out)
    entry = next(e for e in state["log_history"] if "eval_ema_loss" in e)
    assert "eval_ema_logit_bias" in entry and entry["eval_ema_logit_bias"] != entry["eval_logit_bias"]
    saved, average = load_file(str(out / "model.safetensors")), ema_of(out / "checkpoint-4")
    assert "logit_bias" in average
    for name, value in average.items():
        assert torch.equal(saved[name], value), name


def test_a_streamed_run_keeps_and_evaluates_an_average(base_args, tmp_path):
    from test_streaming import write_parquet_shards

    shards = write_parquet_shards(tmp_path / "shards", shards=2)
    out = tmp_path / "out"
    run.main([*drop_option(base_args, "train_file"), *EVALUATED, "--dataset_name", str(shards),
              "--streaming", "true", "--max_eval_samples", "8", "--shuffle_buffer_size", "16"])  # fmt: skip
    assert any("eval_ema_mean_recall" in entry for entry in state_of(out)["log_history"])
    assert checkpoint_problems(str(out / "checkpoint-4")) == [] and (out / "checkpoint-4" / EMA_WEIGHTS_NAME).is_file()


# Each process writes the average it holds at the end of training, by rank.
_TORCHRUN_SCRIPT = """
import os, sys
from safetensors.torch import save_file
from clip_trainer.ema import EMACallback

def on_train_end(self, args, state, control, **kwargs):
    tensors = {name: value.cpu() for name, value in self.ema.state_dict().items()}
    save_file(tensors, os.path.join(args.output_dir, f"ema_rank{args.process_index}.safetensors"))

EMACallback.on_train_end = on_train_end
from clip_trainer.run import cli
sys.exit(cli(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_processes_hold_the_same_average(base_args, tmp_path):
    from test_distributed_run import _free_port

    script = tmp_path / "run_with_ema_dump.py"
    script.write_text(_TORCHRUN_SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
        *base_args, *EVALUATED, "--per_device_train_batch_size", "4", "--ddp_backend", "gloo",
        "--metric_for_best_model", "eval_ema_mean_recall",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    first, second = (load_file(str(out / f"ema_rank{rank}.safetensors")) for rank in (0, 1))
    for name in first:
        assert torch.equal(first[name], second[name]), name
    saved = load_file(str(out / "model.safetensors"))
    for name, value in first.items():
        assert torch.equal(saved[name], value), name
    with safe_open(str(out / "checkpoint-4" / EMA_WEIGHTS_NAME), framework="pt") as handle:
        assert handle.metadata()["ema_decay"] == "0.6"
