"""No secret reaches the disk or the logs, weights are safetensors only, and no remote code runs unless asked."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch
from fake_hub import FakeHub

from clip_trainer.arguments import ModelArguments
from clip_trainer.command_line import parse_arguments
from clip_trainer.run import main

TOKEN = "hf_SECRETtoken123"


def contains(data: bytes, secret: bytes) -> bool:
    """Whether `secret` is in `data`, or in any member of `data` read as a zip archive (torch.save files)."""
    if secret in data:
        return True
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any(secret in archive.read(name) for name in archive.namelist())
    return False


def test_hub_token_reaches_no_file_and_no_log(base_args, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    argv = [*base_args, "--hub_token", TOKEN, "--report_to", "tensorboard", "--max_steps", "4",
            "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2",
            "--eval_strategy", "steps", "--eval_steps", "2", "--do_train", "--do_eval"]  # fmt: skip
    main(argv)
    captured = capfd.readouterr()

    files = [path for path in out.rglob("*") if path.is_file()]
    names = {path.name for path in files}
    # Everything worth searching was written: weights, arguments, state, TensorBoard events, model card.
    assert {"training_args.bin", "trainer_state.json", "model.safetensors", "README.md"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names)
    assert len(list(out.glob("checkpoint-*"))) == 2
    leaking = [str(path.relative_to(out)) for path in files if contains(path.read_bytes(), TOKEN.encode())]
    assert leaking == []
    assert TOKEN not in captured.out and TOKEN not in captured.err

    # The saved arguments still describe the run; only the secret is gone.
    saved = torch.load(out / "training_args.bin", weights_only=False)
    assert saved.hub_token is None
    assert saved.learning_rate == 3e-3 and saved.max_steps == 4


def test_weights_are_safetensors_only(base_args, tmp_path):
    out = tmp_path / "out"
    main([*base_args, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "5"])
    folders = [out, *sorted(out.glob("checkpoint-*"))]
    assert len(folders) == 3
    for folder in folders:
        assert (folder / "model.safetensors").is_file()
    pickled_weights = [p for p in out.rglob("*") if p.name.startswith("pytorch_model") or p.suffix == ".bin"]
    assert [p.name for p in pickled_weights] == ["training_args.bin"] * len(folders)


def test_remote_code_is_off_by_default(base_args):
    assert ModelArguments(model_name_or_path="some/model").trust_remote_code is False
    model_args, _, _ = parse_arguments(base_args)
    assert model_args.trust_remote_code is False


def test_a_model_with_only_pickled_weights_is_refused(tiny_clip_dir, tmp_path):
    # A pickle can run code when loaded; the project loads weights with `use_safetensors=True` only.
    from safetensors.torch import load_file

    from clip_trainer.arguments import ConfigError
    from clip_trainer.modeling import load_model_config

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_clip_dir / "config.json").read_bytes())
    torch.save(load_file(str(tiny_clip_dir / "model.safetensors")), folder / "pytorch_model.bin")
    model_args = ModelArguments(model_name_or_path=str(folder))
    with pytest.raises(ConfigError, match="has no model.safetensors .it has pytorch_model.bin: pickled weights"):
        load_model_config(model_args)  # refused with the config, before any data or weights are read


def test_hub_token_is_not_pushed(base_args, tmp_path, monkeypatch):
    # `Trainer._push_from_checkpoint` writes training_args.bin into output_dir and uploads it with the checkpoint.
    with FakeHub(tokens={TOKEN: "user"}) as hub:
        hub.patch(monkeypatch, cache_dir=tmp_path / "hf_cache")
        main([*base_args, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
              "--push_to_hub", "true", "--hub_token", TOKEN, "--hub_model_id", "secret-test",
              "--hub_strategy", "checkpoint"])  # fmt: skip
        files = hub.files("user/secret-test")
    assert "training_args.bin" in files and "last-checkpoint/training_args.bin" in files
    assert [name for name, data in files.items() if contains(data, TOKEN.encode())] == []
