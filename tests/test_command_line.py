"""The command line answers before torch is imported: a mistyped flag or key, and `--help`, grouped and named for
the command that prints it. The options it knows are exactly the argument classes' fields."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from clip_trainer.command_line import OPTION_GROUPS, option_table

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`args` in a fresh interpreter with `-X importtime`: its stderr lists every module imported."""
    return subprocess.run([sys.executable, "-X", "importtime", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})  # fmt: skip


def _imported(stderr: str) -> set[str]:
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_a_mistyped_flag_answers_without_importing_torch(tmp_path):
    result = _run([str(REPO / "run_clip.py"), "--learning_rat", "1"], tmp_path)
    assert result.returncode == 2
    assert "run_clip.py: error: Unknown option `--learning_rat`. Did you mean `learning_rate`?" in result.stderr
    imported = _imported(result.stderr)
    assert "clip_trainer.command_line" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "transformers", "datasets")}


def test_a_mistyped_key_in_a_config_file_answers_without_importing_torch(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"dataset_name": "emoji", "lerning_rate": 1e-3}))
    result = _run([str(REPO / "run_clip.py"), "run.json"], tmp_path)
    assert result.returncode == 2 and "Unknown key `lerning_rate` in run.json. Did you mean `learning_rate`?" in (
        result.stderr
    )
    assert not {name for name in _imported(result.stderr) if name.split(".")[0] == "torch"}


def test_help_is_grouped_named_for_its_command_and_imports_no_torch(tmp_path):
    for args, prog in (([str(REPO / "run_clip.py"), "--help"], "run_clip.py"),
                       (["-m", "clip_trainer.cli", "train", "--help"], "clip-trainer train"),
                       (["-m", "clip_trainer.cli", "eval", "--help"], "clip-trainer eval")):  # fmt: skip
        result = _run(args, tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.startswith(f"usage: {prog} [CONFIG.json ...]"), result.stdout[:200]
        titles = [title for _, title in OPTION_GROUPS]
        positions = [result.stdout.index(f"\n{title}:") for title in titles]
        assert positions == sorted(positions)  # the project's options first, then data, then transformers'
        assert "--learning_rate" in result.stdout and "--lora_rank" in result.stdout
        assert "One of: auto, softmax, sigmoid." in " ".join(result.stdout.split())  # loss_type's choices
        assert not {name for name in _imported(result.stderr) if name.split(".")[0] == "torch"}


def test_the_options_read_from_source_are_the_argument_classes_fields():
    """An independent check of the source reading: every init field of the three classes (transformers' included)
    is an option, in the group of the class that declares it, and nothing else is."""
    from transformers import TrainingArguments

    from clip_trainer.arguments import CLIPTrainingArguments, DataArguments, ModelArguments

    table = {option.name: option.group for option in option_table()}
    groups = dict(OPTION_GROUPS)
    expected = {}
    for cls in (ModelArguments, DataArguments):
        expected.update({f.name: groups[cls.__name__] for f in fields(cls) if f.init})
    own = set(CLIPTrainingArguments.__annotations__)
    for f in fields(CLIPTrainingArguments):
        if f.init:
            expected[f.name] = groups["CLIPTrainingArguments" if f.name in own else "TrainingArguments"]
    assert table == expected
    assert {f.name for f in fields(TrainingArguments) if f.init} <= set(table)
    options = {option.name: option for option in option_table()}
    assert options["loss_type"].choices == ("auto", "softmax", "sigmoid")
    assert options["learning_rate"].help and options["do_eval"].is_bool


def test_a_python_without_transformers_is_told_which_environment_to_use(tmp_path):
    """`python run_clip.py ...` with a Python that lacks the install (here the interpreter without its site-packages)
    answers in one line, before any import fails with a traceback."""
    result = subprocess.run([sys.executable, "-S", str(REPO / "run_clip.py"), "configs/demo.json", "--max_steps", "3"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                 "CLIP_TRAINER_RERUN_IN_PROJECT_ENVIRONMENT": "1"})  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"run_clip.py: error: this Python ({sys.executable}) has no transformers")


def test_another_python_runs_the_command_with_the_projects_environment(tmp_path):
    """From another working folder, with a Python that has no transformers, in a clone whose `.venv` is made: the
    command runs again with that environment's Python (one line says so), where the install is."""
    venv = tmp_path / "clone" / ".venv"
    (venv / "bin").mkdir(parents=True)
    # The project environment: a Python with the install (this one), under the folder's name.
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    script = (
        "import sys; from pathlib import Path; from clip_trainer.command_line import rerun_in_project_environment;"
        f"rerun_in_project_environment(sys.argv, Path({str(venv)!r}));"
        "import transformers; print('installed here:', transformers.__name__)"
    )
    (tmp_path / "command.py").write_text(script)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, "-S", str(tmp_path / "command.py"), "--flag"], cwd=work,
                            capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"running with the project's environment, {venv}/bin/python" in result.stderr
    assert result.stdout.strip() == "installed here: transformers"


def test_the_message_names_the_project_environment_when_there_is_one(tmp_path):
    from clip_trainer.command_line import missing_install_message

    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    message = missing_install_message("/usr/bin/python3", venv)
    assert f"source {venv}/bin/activate" in message and f"{venv}/bin/python" in message
    assert "pip install" in missing_install_message(str(venv / "bin" / "python"), venv)
    assert "pip install" in missing_install_message("/usr/bin/python3", tmp_path / "none")
