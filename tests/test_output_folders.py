"""`import-open-clip` and `export-onnx` check their output folder before their work, as training checks its
`output_dir` (one function, `checkpoints.check_writable_folder`): one line naming the folder, status 2, nothing done.

The unwritable folder is one under a regular file, which no user can create, root included (permissions do not stop
root, so a chmod-based case runs only for other users).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clip_trainer.cli import main
from clip_trainer.converters import from_open_clip as open_clip_import
from clip_trainer.converters import to_onnx as onnx_export


def under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    return tmp_path / "notes.txt" / "out"


def the_work_must_not_start(*args, **kwargs):
    raise AssertionError("the command started its work before checking its output folder")


def unwritable_folders(tmp_path: Path) -> list[tuple[Path, str]]:
    folders = [
        (under_a_file(tmp_path), "Cannot write into `output_dir` {!r}: Not a directory; choose another folder."),
        (tmp_path / "notes.txt", "`output_dir` {!r} is a file; give a folder (it is created if missing)."),
    ]
    if os.geteuid() != 0:  # a folder this user may not write into
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        folders.append(
            (locked / "out", "Cannot write into `output_dir` {!r}: Permission denied; choose another folder.")
        )
    return folders


def test_import_open_clip_checks_its_output_folder_before_converting(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(open_clip_import, "convert_open_clip", the_work_must_not_start)
    for output_dir, message in unwritable_folders(tmp_path):
        code = main(["import-open-clip", "ViT-B-32", "--checkpoint", "model.pt", "--output_dir", str(output_dir)])
        captured = capsys.readouterr()
        assert code == 2
        assert captured.err.splitlines() == [
            f"clip-trainer import-open-clip: error: {message.format(str(output_dir))}"
        ]
        assert captured.out == ""


def test_import_open_clip_leaves_no_empty_folder_when_the_conversion_fails(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise open_clip_import.OpenCLIPConversionError("Cannot convert: a ResNet image tower.")

    monkeypatch.setattr(open_clip_import, "convert_open_clip", refuse)
    (tmp_path / "kept").mkdir()
    for output_dir in (tmp_path / "new", tmp_path / "kept"):
        assert main(["import-open-clip", "RN50", "--output_dir", str(output_dir)]) == 2
        assert "a ResNet image tower" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # made by the check, removed again
    assert (tmp_path / "kept").is_dir()  # the user's own folder stays


def test_export_onnx_checks_its_output_folder_before_exporting(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx", reason='onnx is not installed: pip install "clip-trainer[onnx]"')
    monkeypatch.setattr(onnx_export, "_export", the_work_must_not_start)
    for output_dir, message in unwritable_folders(tmp_path):
        code = main(["export-onnx", str(tiny_clip_dir), "--output_dir", str(output_dir)])
        captured = capsys.readouterr()
        assert code == 2
        errors = [line for line in captured.err.splitlines() if "error" in line]  # besides the loading bar
        assert errors == [f"clip-trainer export-onnx: error: {message.format(str(output_dir))}"]
        assert "Wrote" not in captured.out
