"""Runs as users run them: the documented command, from their own working folder, with only the files they have.

- an evaluation with a model and a validation file, and no training data;
- a config file whose relative paths are read beside it, whatever the working folder;
- one seed, one run: a model trained from scratch twice gives the same step-0 evaluation and the same weights;
- the model card of a run, as the Hub shows it: pictures next to it, no claim of a Hub dataset that does not exist;
- the files a run writes are as readable as the user's umask makes new files (a teammate or a container can load them).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_shapes_csv
from safetensors.torch import load_file

from clip_trainer.command_line import parse_arguments
from clip_trainer.evaluation import RETRIEVAL_METRIC_NAMES
from clip_trainer.run import main

REPO = Path(__file__).resolve().parent.parent
QUIET = ["--report_to", "none", "--dataloader_num_workers", "0", "--dataloader_persistent_workers", "false"]


def validation_csv(folder: Path) -> Path:
    """A user's validation file, with its own column names: `image_path`, `caption`."""
    source = write_shapes_csv(folder, repeats=1, name="source.csv")
    path = folder / "val.csv"
    with source.open() as handle, path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["image_path", "caption"])
        for row in list(csv.DictReader(handle)):
            writer.writerow([row["image"], row["caption"]])
    source.unlink()
    return path


def test_evaluation_with_a_model_and_a_validation_file_only(tiny_clip_dir, tmp_path, monkeypatch):
    user = tmp_path / "user"
    val = validation_csv(user / "data")
    monkeypatch.chdir(user)
    results = main(["--model_name_or_path", str(tiny_clip_dir), "--validation_file", "data/val.csv",
                    "--image_column", "image_path", "--caption_column", "caption", "--do_eval",
                    "--output_dir", "eval-out", "--use_cpu", "true", *QUIET])  # fmt: skip
    written = json.loads((user / "eval-out" / "eval_results.json").read_text())
    assert written["eval_samples"] == 24 == len(list(csv.reader(val.open()))) - 1
    for name in RETRIEVAL_METRIC_NAMES:
        assert f"eval_{name}" in written and written[f"eval_{name}"] == results[f"eval_{name}"]
    assert not (user / "eval-out" / "model.safetensors").exists()


def test_config_paths_are_read_beside_the_config_file(tiny_clip_dir, tmp_path, monkeypatch):
    project = tmp_path / "project"
    write_shapes_csv(project / "data", repeats=1)
    (project / "configs").mkdir()
    shutil.copytree(tiny_clip_dir, project / "models" / "tiny")
    config = project / "configs" / "run.json"
    config.write_text(json.dumps({
        "model_name_or_path": "../models/tiny",  # beside the config file
        "train_file": "../data/pairs.csv",
        "tokenizer_name": "tokenizer-in-cwd",  # not beside it: read from the working folder, as given
        "output_dir": "outputs/run",  # what the run writes stays relative to the working folder
    }))  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "tokenizer-in-cwd").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    model_args, data_args, training_args = parse_arguments([str(config)])
    assert model_args.model_name_or_path == str(project / "configs" / ".." / "models" / "tiny")
    assert Path(data_args.train_file).resolve() == (project / "data" / "pairs.csv").resolve()
    assert model_args.tokenizer_name == "tokenizer-in-cwd"
    assert training_args.output_dir == "outputs/run"
    # On the command line, paths are the user's own: relative to the working folder.
    model_args, _, _ = parse_arguments([str(config), "--tokenizer_name", "my/hub-tokenizer"])
    assert model_args.tokenizer_name == "my/hub-tokenizer"


@pytest.mark.parametrize("demo", ["demo.json", "demo-siglip.json"])
def test_the_demo_runs_from_any_folder(tmp_path, monkeypatch, demo):
    monkeypatch.chdir(tmp_path)
    results = main([str(REPO / "configs" / demo), "--output_dir", "demo", "--max_steps", "3",
                    "--eval_on_start", "false", "--max_eval_samples", "64", *QUIET])  # fmt: skip
    assert "eval_t2i_recall@10" in results and "eval_zeroshot_top1" in results
    assert (tmp_path / "demo" / "model.safetensors").exists() and (tmp_path / "demo" / "tokenizer.json").exists()


def from_scratch(tmp_path: Path, shapes_csv: Path, out: str) -> list[str]:
    return ["--config_name", str(REPO / "configs" / "models" / "clip-tiny-64px.json"), "--tokenizer_vocab_size",
            "300", "--train_file", str(shapes_csv), "--output_dir", str(tmp_path / out), "--max_steps", "4",
            "--per_device_train_batch_size", "8", "--eval_strategy", "steps", "--eval_steps", "4",
            "--eval_on_start", "true", "--save_strategy", "no", "--dropout", "0.1", "--use_cpu", "true",
            "--seed", "7", *QUIET]  # fmt: skip


def test_one_seed_one_run(tmp_path, shapes_csv):
    runs = []
    for out in ("first", "second"):
        main(from_scratch(tmp_path, shapes_csv, out))
        state = json.loads((tmp_path / out / "trainer_state.json").read_text())
        start = next(entry for entry in state["log_history"] if entry.get("step") == 0 and "eval_loss" in entry)
        runs.append((start, load_file(str(tmp_path / out / "model.safetensors"))))
    (start_a, weights_a), (start_b, weights_b) = runs
    assert start_a["eval_loss"] == start_b["eval_loss"]  # the same initial weights, tokenizer and split
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=1e-6, msg=name)
    # Not vacuous: another seed gives another model.
    main([*from_scratch(tmp_path, shapes_csv, "other"), "--seed", "8"])
    other = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert any(not torch.equal(other[name], weights_a[name]) for name in weights_a)


def test_the_model_card_as_the_hub_shows_it(base_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = list(base_args)
    argv[argv.index("--output_dir") + 1] = "outputs/card"  # relative, as users write it
    main([*argv, "--eval_strategy", "epoch", "--eval_on_start", "true", "--num_train_epochs", "1"])
    out = tmp_path / "outputs" / "card"
    text = (out / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---\n", 2)[1])
    # The picture is linked relative to the card, and is there.
    assert "![Training curves](training_curves.png)" in text and (out / "training_curves.png").is_file()
    # No path of the author's machine; the output folder is named only in the usage code, as the user gave it.
    assert str(tmp_path) not in text and "outputs/" not in text.split("## Usage", 1)[0]
    # Local data is described in words, with its size; no Hub dataset is claimed for it.
    assert "datasets" not in metadata and "huggingface.co/datasets" not in text
    assert "local data `pairs.csv`" in text and "It was trained on 61 image-caption pairs" in text
    # Only metrics in the evaluation table, and readable values in the hyperparameters.
    evaluation = text.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    assert "samples" not in evaluation and "runtime" not in evaluation
    assert "AcceleratorConfig(" not in text and "<" not in text.split("## Training hyperparameters", 1)[1]


@pytest.mark.parametrize("source", ["emoji"])
def test_bundled_data_is_described_not_linked(tmp_path, source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([str(REPO / "configs" / "demo.json"), "--output_dir", "demo", "--max_steps", "2", "--eval_strategy", "no",
          "--save_strategy", "no", "--load_best_model_at_end", "false", "--eval_on_start", "false", *QUIET])  # fmt: skip
    text = (tmp_path / "demo" / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---\n", 2)[1])
    assert "datasets" not in metadata and "huggingface.co/datasets" not in text
    assert "the emoji demo data bundled with clip-trainer" in text


def test_a_run_ends_with_retrieval_examples_in_the_card_and_an_onnx_export(base_args, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'clip-trainer[onnx]') is not installed")
    out = tmp_path / "out"
    main([*base_args, "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "4", "--label_column", "shape",
          "--export_onnx", "true"])  # fmt: skip
    from PIL import Image

    with Image.open(out / "retrieval_examples.png") as image:
        assert image.format == "PNG" and image.width > 400
    card = (out / "README.md").read_text()
    assert "![Retrieval examples](retrieval_examples.png)" in card
    assert (out / "onnx" / "vision_model.onnx").is_file() and (out / "onnx" / "text_model.onnx").is_file()


def test_the_weights_a_run_writes_are_as_readable_as_its_other_files(base_args, tmp_path, monkeypatch):
    # safetensors 0.8 writes through a temporary file of mode 0600: a model only its owner could load.
    out = tmp_path / "out"
    argv = [*base_args, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--ema_decay", "0.9",
            "--save_open_clip", "true"]  # fmt: skip
    argv[argv.index("--output_dir") + 1] = str(out)
    umask = os.umask(0o027)  # group-readable: neither safetensors' 0600 nor the usual 0644
    try:
        main(argv)
    finally:
        os.umask(umask)
    weights = sorted(out.rglob("*.safetensors"))
    names = {path.relative_to(out).as_posix() for path in weights}
    assert {"model.safetensors", "open_clip_model.safetensors", "checkpoint-4/model.safetensors",
            "checkpoint-4/ema.safetensors"} <= names  # fmt: skip
    assert {path.relative_to(out).as_posix(): oct(path.stat().st_mode & 0o777) for path in weights} == {
        name: oct(0o640) for name in names
    }
    assert (out / "config.json").stat().st_mode & 0o777 == 0o640
