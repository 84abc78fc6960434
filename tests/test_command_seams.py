"""Where the command and the library meet: what independent runs of the command found, each driven as a user runs it
(`run.main` / `run.cli` / `run_clip.py` from a temporary working folder) and checked against an independent
computation where there are numbers."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SLOWED_CLI, drop_option, set_option
from PIL import Image
from transformers import AutoModel, AutoProcessor

from clip_trainer import checkpoints, run
from clip_trainer.checkpoints import LOCK_FILE_NAME, checkpoint_problems

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# SigLIP through the command: captions padded to the length it pools at
# --------------------------------------------------------------------------------------------------------------


def _reference_t2i_recall_at_1(model_dir: Path, csv: Path) -> float:
    """t2i recall@1 of the saved model as transformers computes embeddings itself: its processor, captions padded to
    `max_length` (what the pipeline, ONNX and sentence-transformers do for SigLIP), ranks in float64."""
    import csv as csv_module

    with open(csv, newline="") as handle:
        rows = list(csv_module.DictReader(handle))
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    model = AutoModel.from_pretrained(model_dir).eval()
    images = [Image.open(csv.parent / row["image"]).convert("RGB") for row in rows]
    captions = [row["caption"] for row in rows]
    positions = model.config.text_config.max_position_embeddings
    with torch.no_grad():
        text = processor.tokenizer(
            captions, padding="max_length", truncation=True, max_length=positions, return_tensors="pt"
        )
        text_features = model.get_text_features(**text)
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        image_features = model.get_image_features(pixel_values=pixels)
    text_embeds = getattr(text_features, "pooler_output", text_features).double().numpy()
    image_embeds = getattr(image_features, "pooler_output", image_features).double().numpy()
    text_embeds /= np.linalg.norm(text_embeds, axis=1, keepdims=True)
    image_embeds /= np.linalg.norm(image_embeds, axis=1, keepdims=True)
    scores = text_embeds @ image_embeds.T  # every row is its own image (one file per row)
    hits = [scores[i, i] > np.delete(scores[i], i).max() for i in range(len(rows))]
    return float(np.mean(hits))


def test_siglip_evaluates_with_max_length_padding_whatever_the_batch_size(tiny_siglip_run, shapes_csv, tmp_path):
    recalls = []
    for batch in (3, 16, 72):
        results = run.main(["--model_name_or_path", str(tiny_siglip_run), "--validation_file", str(shapes_csv),
                            "--do_eval", "--output_dir", str(tmp_path / f"eval-{batch}"), "--use_cpu", "true",
                            "--report_to", "none", "--dataloader_num_workers", "0",
                            "--per_device_eval_batch_size", str(batch)])  # fmt: skip
        recalls.append(results["eval_t2i_recall@1"])
    assert recalls[0] == recalls[1] == recalls[2]
    assert recalls[0] == pytest.approx(_reference_t2i_recall_at_1(tiny_siglip_run, shapes_csv), abs=1e-9)


def test_the_trainer_builds_the_familys_collator_from_the_data_arguments(tiny_siglip_run, shapes_csv, tmp_path):
    """A library user passing `data_args` gets the collator the command builds: SigLIP's padding, the columns,
    the caption length and the augmentation of training batches only."""
    from clip_trainer import CLIPContrastiveTrainer, CLIPTrainingArguments, DataArguments

    data_args = DataArguments(train_file=str(shapes_csv), max_seq_length=12, augment=True, jpeg_draft=True)
    trainer = CLIPContrastiveTrainer(
        model=AutoModel.from_pretrained(tiny_siglip_run),
        args=CLIPTrainingArguments(
            output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", eval_strategy="no"
        ),
        data_args=data_args,
        processing_class=AutoProcessor.from_pretrained(tiny_siglip_run, backend="pil"),
    )
    collator = trainer.data_collator
    assert (collator.padding, collator.max_seq_length, collator.jpeg_draft) == ("max_length", 12, True)
    assert collator.augmentation is not None and trainer.eval_data_collator.augmentation is None


# --------------------------------------------------------------------------------------------------------------
# The output folder is held for the whole run
# --------------------------------------------------------------------------------------------------------------


def _start_slowed_run(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-c", SLOWED_CLI, *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


@pytest.mark.slow
def test_a_running_run_holds_its_output_folder(base_args, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*base_args, "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "2"]
    process = _start_slowed_run(argv, tmp_path)
    try:
        deadline = time.monotonic() + 240
        while (not (out / "checkpoint-4").is_dir() or checkpoint_problems(str(out / "checkpoint-4"))) and (
            process.poll() is None
        ):
            assert time.monotonic() < deadline, "checkpoint-4 never appeared"
            time.sleep(0.05)
        assert process.poll() is None, "the first run ended before the second could start"
        # While it runs: a second run may neither delete its checkpoints nor resume from them.
        for extra in (["--overwrite_output_dir", "true"], ["--resume_from_checkpoint", "true"], ["--do_eval"]):
            status = run.cli([*argv, *extra])
            err = capsys.readouterr().err
            assert status == 2 and "Another run (pid" in err and "Traceback" not in err, (extra, err)
        assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)


def test_the_lock_is_held_while_training_and_is_not_uploaded(base_args, tmp_path, fake_hub):
    """In the same process: from a callback during training, claiming the folder fails; the push leaves it out."""
    from clip_trainer.checkpoints import OutputDirLock
    from clip_trainer.errors import ConfigError
    from clip_trainer.trainer import CLIPContrastiveTrainer

    seen = []
    original = CLIPContrastiveTrainer.training_step

    def step_and_try_to_lock(self, *args, **kwargs):
        try:
            OutputDirLock(self.args.output_dir).release()
            seen.append("free")
        except ConfigError:
            seen.append("held")
        return original(self, *args, **kwargs)

    CLIPContrastiveTrainer.training_step = step_and_try_to_lock
    try:
        run.main([*base_args, "--max_steps", "2", "--push_to_hub", "true", "--hub_token", "hf_test",
                  "--hub_model_id", "lock-test"])  # fmt: skip
    finally:
        CLIPContrastiveTrainer.training_step = original
    assert seen == ["held", "held"]
    files = fake_hub.files("user/lock-test")
    assert "model.safetensors" in files and LOCK_FILE_NAME not in files
    # Released at the end of the run, its file removed: the finished folder holds only what the run wrote for users.
    assert not (tmp_path / "out" / LOCK_FILE_NAME).exists()
    OutputDirLock(str(tmp_path / "out")).release()
    assert not (tmp_path / "out" / LOCK_FILE_NAME).exists()


def test_a_released_lock_leaves_no_file_and_the_next_run_locks_a_new_one(tmp_path):
    """The holder removes the file when it ends; a handle opened on the old file before then does not stand in the
    way, the next run writes its pid into a new file, and a third is refused."""
    from clip_trainer.checkpoints import OutputDirLock
    from clip_trainer.errors import ConfigError

    first = OutputDirLock(str(tmp_path))
    stale = open(tmp_path / LOCK_FILE_NAME)  # noqa: SIM115 - opened "just before" the release
    first.release()
    second = OutputDirLock(str(tmp_path))
    assert (tmp_path / LOCK_FILE_NAME).read_text() == f"pid {os.getpid()}"
    with pytest.raises(ConfigError, match="Another run"):
        OutputDirLock(str(tmp_path))
    second.release()
    stale.close()


# --------------------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------------------


def test_a_lora_run_resumes_from_its_adapter_checkpoint(base_args, tmp_path):
    pytest.importorskip("peft")
    argv = [*base_args, "--lora_rank", "4", "--save_strategy", "steps", "--save_steps", "2"]
    out = tmp_path / "out"
    run.main([*argv, "--max_steps", "2"])
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert checkpoint_problems(str(out / "checkpoint-2")) == []
    results = run.main([*argv, "--max_steps", "4", "--resume_from_checkpoint", "true"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and results["train_samples"] == 72
    # The resumed run started at step 2: its logs have no step-1 or step-2 entry of its own.
    assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file()


def test_changing_the_layerwise_decay_on_resume_is_refused(base_args, tmp_path, capsys):
    argv = [*base_args, "--save_strategy", "steps", "--save_steps", "2", "--layerwise_lr_decay", "0.8"]
    run.main([*argv, "--max_steps", "2"])
    status = run.cli([*set_option(argv, "layerwise_lr_decay", "0.5"), "--max_steps", "4",
                      "--resume_from_checkpoint", "true"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "trained with `layerwise_lr_decay` 0.8, and this run sets 0.5" in err


def test_layerwise_rates_are_logged_per_group(base_args, caplog):
    caplog.set_level(logging.INFO, logger="clip_trainer")
    run.main([*base_args, "--max_steps", "1", "--layerwise_lr_decay", "0.5"])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Layer-wise learning rates"))
    # The tiny towers have 2 layers: rates lr, lr/2, lr/4 and lr/8 (the embeddings).
    for rate in ("0.003 for", "0.0015 for", "0.00075 for", "0.000375 for"):
        assert rate in line, line


# --------------------------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------------------------


def test_a_full_disk_at_the_final_save_is_one_line_naming_the_checkpoint(base_args, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError
    from transformers import modeling_utils

    out = tmp_path / "out"
    save = modeling_utils.safe_save_file

    def full_disk_for_the_final_model(tensors, filename, *args, **kwargs):
        if Path(filename).parent == out:
            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            )
        return save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk_for_the_final_model)
    status = run.cli([*base_args, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert f"The disk is full: saving into {str(out)!r} failed. The newest complete checkpoint is " in err
    assert str(out / "checkpoint-4") in err and "--resume_from_checkpoint true" in err
    # Resuming that checkpoint, once there is space, trains nothing more and writes the final model.
    monkeypatch.setattr(modeling_utils, "safe_save_file", save)
    run.main([*base_args, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
              "--resume_from_checkpoint", "true"])  # fmt: skip
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "model.safetensors").is_file()


def test_a_full_disk_in_torch_save_is_one_line(base_args, tmp_path, monkeypatch, capsys):
    import transformers.trainer as trainer_module

    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 3990")

    monkeypatch.setattr(trainer_module.torch, "save", failing_save)
    # torch's writer says no errno: the free space tells a full disk from a limit on a file's size.
    monkeypatch.setattr(checkpoints, "_free_bytes", lambda folder: 10 * 2**20)
    status = run.cli([*base_args, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert "The disk is full" in err and "No complete checkpoint was written, so there is nothing to resume" in err
    assert "start over with --overwrite_output_dir true" in err and "--resume_from_checkpoint true" not in err

    monkeypatch.setattr(checkpoints, "_free_bytes", lambda folder: 50 * 2**30)
    status = run.cli([*base_args, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
                      "--overwrite_output_dir", "true"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1 and "The disk is full" not in err
    assert "although the disk has 50.0 GiB free: a limit on the size of a file (`ulimit -f`" in err


# --------------------------------------------------------------------------------------------------------------
# Evaluation sets without a usable image
# --------------------------------------------------------------------------------------------------------------


def _corrupt_set(folder: Path) -> Path:
    folder.mkdir()
    for index in range(4):
        (folder / f"{index}.png").write_bytes(b"not a png at all")
    (folder / "pairs.csv").write_text("image,caption\n" + "".join(f"{i}.png,caption {i}\n" for i in range(4)))
    return folder / "pairs.csv"


def test_an_evaluation_set_without_a_usable_image(base_args, tmp_path, capsys):
    """An extra evaluation set whose files are all corrupt: one line naming the set, the first bad row and the fix,
    before anything trains (it used to be found at the first evaluation, a NaN loss and no metrics)."""
    broken = _corrupt_set(tmp_path / "broken")
    argv = [*base_args, "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
            "--extra_eval_sets", json.dumps({"ref": str(broken)}), "--on_bad_rows", "skip"]  # fmt: skip
    for extra in ([], ["--metric_for_best_model", "eval_ref_t2i_recall@1", "--load_best_model_at_end", "true",
                       "--save_strategy", "steps", "--save_steps", "2"]):  # fmt: skip
        out = tmp_path / f"out{len(extra)}"
        status = run.cli([*set_option(argv, "output_dir", str(out)), *extra])
        err = capsys.readouterr().err
        assert status == 2 and "Traceback" not in err and "KeyError" not in err
        assert "`extra_eval_sets` entry 'ref': The validation data has 4 pair(s), and 0 of their images decode" in err
        assert "row 0: not an image" in err and "fix or replace those files" in err
        assert not (out / "trainer_state.json").exists()  # nothing trained


# --------------------------------------------------------------------------------------------------------------
# Quiet, documented output
# --------------------------------------------------------------------------------------------------------------


def test_no_pin_memory_warning_on_the_cpu(base_args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.main([*drop_option(base_args, "use_cpu"), "--max_steps", "2", "--eval_strategy", "steps",
                  "--eval_steps", "2"])  # fmt: skip
    assert not [w for w in caught if "pin_memory" in str(w.message)]


def test_an_evaluation_only_run_writes_its_events_into_its_output_folder(tiny_clip_dir, shapes_csv, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    run.main(["--model_name_or_path", str(tiny_clip_dir), "--validation_file", str(shapes_csv), "--do_eval",
              "--output_dir", "evaluation", "--report_to", "tensorboard", "--dataloader_num_workers", "0"])  # fmt: skip
    assert not (tmp_path / "runs").exists()
    events = list((tmp_path / "evaluation" / "runs").rglob("events.out.tfevents.*"))
    assert events and (tmp_path / "evaluation" / "eval_results.json").is_file()


def test_write_checks_come_before_the_work(tiny_clip_dir, shapes_csv, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for extra in (["--do_eval", "--validation_file", str(shapes_csv)],
                  ["--prepare_only", "true", "--train_file", str(shapes_csv)]):  # fmt: skip
        status = run.cli(["--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(blocker / "out"),
                          "--report_to", "none", *extra])  # fmt: skip
        err = capsys.readouterr().err
        assert status == 2 and "Cannot write into `output_dir`" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------------------------------------------
# Preparing data needs no model
# --------------------------------------------------------------------------------------------------------------


def test_prepare_only_needs_no_model_and_its_folder_trains(tiny_clip_dir, shapes_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run.cli(["--train_file", str(shapes_csv), "--prepare_only", "true", "--output_dir", "prepared",
                    "--report_to", "none"]) == 0  # fmt: skip
    from datasets import load_from_disk

    prepared = load_from_disk("prepared")
    assert sum(len(split) for split in prepared.values()) == 72  # every pair of the CSV, checked and stored
    results = run.main(["--model_name_or_path", str(tiny_clip_dir), "--dataset_name", "prepared", "--output_dir",
                        "trained", "--max_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0"])  # fmt: skip
    assert results["train_samples"] == len(prepared["train"])
    # Streaming cannot be prepared: one line, before any data is read.
    status = run.cli(["--train_file", str(shapes_csv), "--prepare_only", "true", "--streaming", "true",
                      "--output_dir", "p2", "--max_steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and "Drop --streaming to prepare the data" in err
    assert not (tmp_path / "p2").exists()


@pytest.mark.slow  # a Python that imports transformers: about 6 s here
def test_the_forked_workers_of_a_killed_run_do_not_keep_its_folder_locked(tmp_path):
    """A run killed with SIGKILL leaves its DataLoader workers behind for a few seconds; the folder is free at once
    all the same (a requeued run resumes instead of being told that the dead run still writes there)."""
    from clip_trainer.checkpoints import OutputDirLock
    from clip_trainer.errors import ConfigError

    script = (
        "import os, sys, time\n"
        "from clip_trainer.checkpoints import OutputDirLock\n"
        f"lock = OutputDirLock({str(tmp_path)!r})\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(60)\n"  # a worker that has not noticed yet that its parent is gone
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "time.sleep(60)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(run.stdout.readline())
    try:
        with pytest.raises(ConfigError, match="Another run"):
            OutputDirLock(str(tmp_path))
        run.kill()
        run.wait()
        os.kill(worker, 0)  # the worker still lives
        OutputDirLock(str(tmp_path)).release()
    finally:
        run.kill()
        os.kill(worker, signal.SIGKILL)
