"""The `clip-trainer` command: each subcommand's help, dispatch, and the one-line error for an unknown one."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from clip_trainer.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("command", "usage", "option"),
    [
        ("train", "usage:", "--learning_rate"),
        ("eval", "usage:", "--per_device_eval_batch_size"),
        ("export-onnx", "usage: clip-trainer export-onnx", "--opset"),
        ("import-open-clip", "usage: clip-trainer import-open-clip", "--force_quick_gelu"),
    ],
)
def test_each_command_has_help(command, usage, option, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(usage) and option in out


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: clip-trainer {train,eval,export-onnx,import-open-clip,export-open-clip}")
    assert all(f"  {name} " in out for name in COMMANDS)


def test_unknown_command_is_a_one_line_error(capsys):
    assert main(["trian", "--learning_rate", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "clip-trainer: error: unknown command 'trian'; choose from train, eval, export-onnx, import-open-clip, export-open-clip.\n"
    )


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("usage: clip-trainer")


def test_a_subcommand_usage_error_returns_its_status(capsys):
    assert main(["export-onnx"]) == 2  # the model folder is missing
    assert "the following arguments are required: model_dir" in capsys.readouterr().err


def test_eval_evaluates_only(base_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", *base_args]) == 0
    output_dir = Path(base_args[base_args.index("--output_dir") + 1])
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert "eval_t2i_recall@1" in results
    assert not (output_dir / "train_results.json").exists()


def test_console_script_points_at_main():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["clip-trainer"].partition(":")
    assert getattr(importlib.import_module(module), function) is main


def test_eval_help_says_it_evaluates(capsys):
    assert main(["eval", "--help"]) == 0
    assert "Evaluate a CLIP-style model" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    assert "Train or fine-tune a CLIP-style model" in capsys.readouterr().out
