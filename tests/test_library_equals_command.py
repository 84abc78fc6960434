"""The trainer is the product: built directly, as the README's library example builds it, with the same settings as a
`run_clip.py` run (a SigLIP model, LoRA, WiSE-FT, ONNX export), it writes the same files with the same numbers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from clip_trainer import run

SETTINGS = {
    "max_steps": 4,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
    "learning_rate": 3e-3,
    "warmup_steps": 0,
    "eval_strategy": "steps",
    "eval_steps": 2,
    "save_strategy": "no",
    "logging_steps": 2,
    "report_to": "none",
    "dataloader_num_workers": 0,
    "use_cpu": True,
    "seed": 3,
    "lora_rank": 4,
    "wise_ft_alphas": [0.5],
    "export_onnx": True,
}


def _flags(settings: dict) -> list[str]:
    argv = []
    for key, value in settings.items():
        argv += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value).lower()
                                                                             if isinstance(value, bool) else str(value)])]  # fmt: skip
    return argv


@pytest.mark.slow
def test_the_trainer_built_directly_equals_the_command(tiny_siglip_run, shapes_csv, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    command_results = run.main(["--model_name_or_path", str(tiny_siglip_run), "--train_file", str(shapes_csv),
                                "--output_dir", "by-command", *_flags(SETTINGS)])  # fmt: skip

    # The library, as the README shows it.
    from transformers import AutoModel, AutoProcessor

    from clip_trainer import CLIPContrastiveTrainer, CLIPTrainingArguments, DataArguments, load_image_text_data

    args = CLIPTrainingArguments(output_dir="by-library", **SETTINGS)
    data_args = DataArguments(train_file=str(shapes_csv))
    data = load_image_text_data(data_args, seed=args.seed)
    trainer = CLIPContrastiveTrainer(
        model=AutoModel.from_pretrained(tiny_siglip_run),
        args=args,
        data_args=data_args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        processing_class=AutoProcessor.from_pretrained(tiny_siglip_run),
    )
    trainer.train()
    library_metrics = trainer.evaluate()
    trainer.save_model()

    command, library = tmp_path / "by-command", tmp_path / "by-library"
    expected = {"model.safetensors", "config.json", "README.md", "wise_ft_results.json",
                "adapter/adapter_model.safetensors", "onnx/vision_model.onnx", "onnx/text_model.onnx",
                "training_curves.png", "retrieval_examples.png"}  # fmt: skip
    for name in expected:
        assert (command / name).is_file() and (library / name).is_file(), name
    # The same weights, the same WiSE-FT choice and the same final evaluation.
    weights_by_command, weights_by_library = (
        load_file(str(command / "model.safetensors")),
        load_file(str(library / "model.safetensors")),
    )
    assert weights_by_command.keys() == weights_by_library.keys()
    for key in weights_by_command:
        torch.testing.assert_close(weights_by_library[key], weights_by_command[key], rtol=0, atol=1e-6)
    wise_command = json.loads((command / "wise_ft_results.json").read_text())
    wise_library = json.loads((library / "wise_ft_results.json").read_text())
    assert wise_command["alpha"] == wise_library["alpha"] and wise_command["rows"] == wise_library["rows"]
    for key in ("eval_t2i_recall@1", "eval_i2t_recall@5", "eval_loss"):
        assert library_metrics[key] == pytest.approx(command_results[key], abs=1e-6), key
    # The model was trained with SigLIP's own padding in both.
    assert trainer.data_collator.padding == "max_length"


def test_a_plain_training_arguments_is_converted(tiny_siglip_run, shapes_csv, tmp_path):
    from transformers import AutoModel, AutoProcessor, TrainingArguments

    from clip_trainer import CLIPContrastiveTrainer, CLIPTrainingArguments

    plain = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=1e-4, use_cpu=True, report_to="none",
                              per_device_train_batch_size=4)  # fmt: skip
    trainer = CLIPContrastiveTrainer(
        model=AutoModel.from_pretrained(tiny_siglip_run), args=plain,
        processing_class=AutoProcessor.from_pretrained(tiny_siglip_run),
    )  # fmt: skip
    assert isinstance(trainer.args, CLIPTrainingArguments)
    assert (trainer.args.learning_rate, trainer.args.per_device_train_batch_size) == (1e-4, 4)
    # clip-trainer's own defaults where the user left transformers' ones: its collator needs the raw columns.
    assert trainer.args.remove_unused_columns is False
