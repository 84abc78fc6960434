"""Resuming with the checkpoint's own model: its caption tokenizer is loaded, never trained again; a run whose model,
LoRA rank or moving average cannot follow the checkpoint stops in one line that names the checkpoint and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_TEXT, TINY_VISION, drop_option, needs_peft, set_option

from clip_trainer import run
from clip_trainer.checkpoints import EMA_WEIGHTS_NAME


def _write_config(path: Path, hidden_size: int = 32) -> str:
    from transformers import CLIPConfig

    sizes = {**TINY_TEXT, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size}
    config = CLIPConfig(text_config={**sizes, "max_position_embeddings": 16}, vision_config={**TINY_VISION, **sizes})
    path.write_text(config.to_json_string())
    return str(path)


def _last_error(err: str) -> str:
    return err.strip().splitlines()[-1]


def _vocabulary(folder: Path) -> dict[str, int]:
    """Each token's id, read from the saved file itself (not through transformers): the model's vocabulary and the
    special tokens added to it."""
    saved = json.loads((folder / "tokenizer.json").read_text())
    return {**saved["model"]["vocab"], **{token["content"]: token["id"] for token in saved["added_tokens"]}}


# --------------------------------------------------------------------------------------------------------------
# The tokenizer of a run built from scratch
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_resumed_scratch_run_keeps_the_checkpoints_tokenizer(base_args, tmp_path, caplog):
    argv = [*drop_option(base_args, "model_name_or_path"), "--config_name", _write_config(tmp_path / "tiny.json"),
            "--tokenizer_vocab_size", "300", "--save_strategy", "steps", "--save_steps", "2"]  # fmt: skip
    run.main([*argv, "--max_steps", "2"])
    checkpoint = tmp_path / "out" / "checkpoint-2"
    saved = _vocabulary(checkpoint)
    # Fewer captions (and another seed): a tokenizer trained again on them has another vocabulary (the old behaviour
    # trained one and failed to load the weights, or remapped the ids silently).
    resumed = [*set_option(argv, "seed", "7"), "--max_train_samples", "6", "--max_steps", "4"]
    with caplog.at_level("INFO", logger="clip_trainer"):
        run.main([*resumed, "--resume_from_checkpoint", "true"])
    assert _vocabulary(tmp_path / "out") == saved
    assert _vocabulary(tmp_path / "out" / "checkpoint-4") == saved
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == len(saved)
    assert f"the caption tokenizer is {checkpoint}'s ({len(saved)} tokens), not trained again" in caplog.text
    assert "training one on the training captions" not in caplog.text.split("Resuming from")[-1]


# --------------------------------------------------------------------------------------------------------------
# Another model or LoRA rank
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_resume_with_another_model_config_is_refused(base_args, tiny_clip_dir, tmp_path, capsys):
    argv = [*base_args, "--save_strategy", "steps", "--save_steps", "2"]
    run.main([*argv, "--max_steps", "2"])
    checkpoint = tmp_path / "out" / "checkpoint-2"
    other = [*drop_option(argv, "model_name_or_path"), "--config_name", _write_config(tmp_path / "wide.json", 48),
             "--tokenizer_name", str(tiny_clip_dir)]  # fmt: skip
    status = run.cli([*other, "--max_steps", "4", "--resume_from_checkpoint", "true"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    line = _last_error(err)
    assert line.startswith(f"run_clip.py: error: {checkpoint} holds another model than this run builds")
    assert "text_config.hidden_size (32 -> 48)" in line and "vision_config.hidden_size (32 -> 48)" in line
    assert "new --output_dir" in line
    assert not (checkpoint.parent / "checkpoint-4").exists()


@needs_peft
@pytest.mark.slow
def test_a_lora_checkpoint_resumed_with_another_rank_or_none_is_refused(base_args, tmp_path, capsys):
    argv = [*base_args, "--save_strategy", "steps", "--save_steps", "2"]
    run.main([*argv, "--lora_rank", "4", "--max_steps", "2"])
    checkpoint = tmp_path / "out" / "checkpoint-2"
    status = run.cli([*argv, "--max_steps", "4", "--resume_from_checkpoint", "true"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert _last_error(err) == (
        f"run_clip.py: error: {checkpoint} holds a LoRA adapter (`lora_rank` 4), and this run sets no `lora_rank`: "
        "resume with --lora_rank 4, or start this run in a new --output_dir."
    )
    status = run.cli([*argv, "--lora_rank", "8", "--max_steps", "4", "--resume_from_checkpoint", "true"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"{checkpoint} holds a LoRA adapter of `lora_rank` 4, and this run sets 8: resume with --lora_rank 4" in (
        _last_error(err)
    )
    # And the whole model of a run without LoRA, resumed with it.
    plain = [*set_option(argv, "output_dir", str(tmp_path / "plain"))]
    run.main([*plain, "--max_steps", "2"])
    status = run.cli([*plain, "--lora_rank", "4", "--max_steps", "4", "--resume_from_checkpoint", "true"])
    err = capsys.readouterr().err
    assert status == 2 and "holds a whole model (trained without LoRA), and this run sets `lora_rank` 4" in err


# --------------------------------------------------------------------------------------------------------------
# Incomplete checkpoints: what the messages say
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_average_deleted_from_an_ema_checkpoint_makes_it_incomplete(base_args, tmp_path, capsys, caplog):
    argv = [*base_args, "--save_strategy", "steps", "--save_steps", "2", "--ema_decay", "0.9"]
    run.main([*argv, "--max_steps", "4"])
    newest, earlier = tmp_path / "out" / "checkpoint-4", tmp_path / "out" / "checkpoint-2"
    (newest / EMA_WEIGHTS_NAME).unlink()
    # Passed over like any incomplete checkpoint, named in a warning; the run resumes from the one before.
    shutil.rmtree(tmp_path / "out" / "runs", ignore_errors=True)
    with caplog.at_level("INFO", logger="clip_trainer"):
        run.main([*argv, "--max_steps", "6", "--resume_from_checkpoint", "true"])
    assert (
        f"Passing over incomplete checkpoint {newest}: ema.safetensors is missing (the run kept a moving average, "
        "`ema_decay` 0.9)." in caplog.text
    )
    assert f"Resuming from {earlier}." in caplog.text
    state = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # Named as incomplete, with the fix, when given as a path (not "trained without `ema_decay`"). (The resumed
    # run wrote checkpoint-4 again, whole.)
    (newest / EMA_WEIGHTS_NAME).unlink()
    status = run.cli([*argv, "--max_steps", "8", "--resume_from_checkpoint", str(newest)])
    err = capsys.readouterr().err
    assert status == 2 and "trained without" not in err
    assert f"`resume_from_checkpoint` is {str(newest)!r}, which is incomplete (ema.safetensors is missing" in err
    assert "Resume from an earlier checkpoint" in err


def test_a_truncated_checkpoint_given_as_a_path_says_the_fix(tmp_path, monkeypatch, capsys):
    from clip_trainer.checkpoints import resolve_resume_checkpoint
    from clip_trainer.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    # A checkpoint whose files are all there and readable but the optimizer state, cut short by a crash.
    folder = tmp_path / "out" / "checkpoint-4"
    folder.mkdir(parents=True)
    _complete_but_optimizer(folder)
    with pytest.raises(ConfigError) as error:
        resolve_resume_checkpoint("out/checkpoint-4", "elsewhere")
    assert str(error.value) == (
        "`resume_from_checkpoint` is 'out/checkpoint-4', which is incomplete (optimizer.pt is unreadable (File is not "
        "a zip file)). Resume from an earlier checkpoint, or pass --resume_from_checkpoint true to take the newest "
        "complete one in `output_dir`."
    )


def _complete_but_optimizer(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    for name in ("scheduler.pt", "rng_state.pth", "optimizer.pt"):
        torch.save({}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    with open(folder / "optimizer.pt", "r+b") as handle:
        handle.truncate(20)


def test_resume_true_without_checkpoints_mentions_no_warnings(base_args, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    status = run.cli([*base_args, "--output_dir", "empty", "--resume_from_checkpoint", "true"])
    err = capsys.readouterr().err
    assert status == 2
    assert _last_error(err) == (
        "run_clip.py: error: `resume_from_checkpoint` is true but 'empty' holds no checkpoint-* folder; start without "
        "it, or give a checkpoint path."
    )
    # With one passed over, the message points at its warning.
    (tmp_path / "empty" / "checkpoint-4").mkdir(parents=True)
    _complete_but_optimizer(tmp_path / "empty" / "checkpoint-4")
    status = run.cli([*base_args, "--output_dir", "empty", "--resume_from_checkpoint", "true"])
    err = capsys.readouterr().err
    assert status == 2
    assert "Passing over incomplete checkpoint empty/checkpoint-4: optimizer.pt is unreadable" in caplog.text
    assert "holds only incomplete checkpoints (1, named in the warnings above" in _last_error(err)
    # The way out it names works: the same folder without --resume_from_checkpoint is refused, and says to
    # overwrite, which then trains (a run stopped while saving its first checkpoint, not a loop of messages).
    assert "Start over with --overwrite_output_dir true" in _last_error(err)
    status = run.cli([*base_args, "--output_dir", "empty"])
    err = capsys.readouterr().err
    assert status == 2
    assert "holds only incomplete checkpoints of an earlier run (checkpoint-4, stopped while saving)" in err
    assert "--resume_from_checkpoint" not in _last_error(err)
    assert run.cli([*base_args, "--output_dir", "empty", "--overwrite_output_dir", "true"]) == 0
