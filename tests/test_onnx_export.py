"""ONNX export: one graph per tower, dynamic batch and sequence length, checked against PyTorch with ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason='onnx is not installed: pip install "clip-trainer[onnx]"')
onnxruntime = pytest.importorskip(
    "onnxruntime", reason='onnxruntime is not installed: pip install "clip-trainer[onnx]"'
)
pytest.importorskip(
    "onnxscript", reason='onnxscript (torch.onnx exporter) is not installed: pip install "clip-trainer[onnx]"'
)

from conftest import draw_shape  # noqa: E402
from remote_code import custom_code_model, record_prompts  # noqa: E402
from transformers import AutoProcessor, CLIPModel  # noqa: E402

from clip_trainer.converters.to_onnx import ONNXExportError, check_onnx, export_onnx, main  # noqa: E402


@pytest.fixture(scope="module")
def exported_with_warnings(tiny_clip_dir, tmp_path_factory):
    import warnings

    output_dir = tmp_path_factory.mktemp("onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_onnx(tiny_clip_dir, output_dir)
    return output_dir, result, [str(warning.message) for warning in caught]


@pytest.fixture(scope="module")
def exported(exported_with_warnings):
    output_dir, result, _ = exported_with_warnings
    return output_dir, result


def test_the_export_does_not_warn_that_the_model_trains(exported_with_warnings):
    """torch's exporter warns of a module in training mode; the graphs embed with the model in evaluation mode, and a
    warning saying otherwise made users doubt correct graphs."""
    *_, messages = exported_with_warnings
    assert not [message for message in messages if "training mode" in message]


def graph_signature(path) -> dict[str, list]:
    """Each input and output name with its dimensions: symbolic names for dynamic axes, numbers for fixed ones."""
    graph = onnx.load(path, load_external_data=False).graph
    signature = {}
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        signature[value.name] = [dim.dim_param or dim.dim_value for dim in dims]
    return signature


def test_writes_one_graph_per_tower_with_the_serving_files(exported):
    output_dir, result = exported
    names = sorted(path.name for path in output_dir.iterdir())
    assert {"vision_model.onnx", "text_model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        names
    )
    # transformers.js reads the image processor from preprocessor_config.json only, and transformers 4.x knows no
    # `TokenizersBackend` (see clip_trainer/consumers.py; tests/test_consumers.py loads the folders with both).
    assert "preprocessor_config.json" in names
    assert (
        json.loads((output_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    )
    assert not any(name.endswith((".safetensors", ".bin")) for name in names)
    assert result["vision_model"] == str(output_dir / "vision_model.onnx")
    assert sorted(result["files"]) == sorted(str(output_dir / name) for name in names)
    assert result["max_abs_diff"]["image_embeds"] <= 1e-4 and result["max_abs_diff"]["text_embeds"] <= 1e-4
    assert isinstance(result["opset"], int) and result["opset"] >= 17


def test_graph_inputs_outputs_and_dynamic_axes(exported):
    output_dir, _ = exported
    assert graph_signature(output_dir / "vision_model.onnx") == {
        "pixel_values": ["batch_size", 3, 32, 32],
        "image_embeds": ["batch_size", 16],
    }
    assert graph_signature(output_dir / "text_model.onnx") == {
        "input_ids": ["text_batch_size", "sequence_length"],
        "attention_mask": ["text_batch_size", "sequence_length"],
        "text_embeds": ["text_batch_size", 16],
    }


@pytest.mark.parametrize("batch_size", [1, 5])
def test_served_from_the_exported_folder_alone_embeddings_match_pytorch(exported, tiny_clip_dir, batch_size):
    output_dir, _ = exported
    processor = AutoProcessor.from_pretrained(output_dir)
    captions = ["a red circle on white", "a blue square", "a green triangle on black", "yellow", "a red square"]
    images = [
        draw_shape(color, shape)
        for color, shape in zip(
            ["red", "blue", "green", "yellow", "red"], ["circle", "square", "triangle", "circle", "square"]
        )
    ]
    inputs = processor(text=captions[:batch_size], images=images[:batch_size], padding=True, return_tensors="np")
    vision = onnxruntime.InferenceSession(str(output_dir / "vision_model.onnx"), providers=["CPUExecutionProvider"])
    text = onnxruntime.InferenceSession(str(output_dir / "text_model.onnx"), providers=["CPUExecutionProvider"])
    (image_embeds,) = vision.run(None, {"pixel_values": inputs["pixel_values"].astype(np.float32)})
    (text_embeds,) = text.run(
        None,
        {
            "input_ids": inputs["input_ids"].astype(np.int64),
            "attention_mask": inputs["attention_mask"].astype(np.int64),
        },
    )
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    with torch.no_grad():
        expected_images = model.get_image_features(pixel_values=torch.from_numpy(inputs["pixel_values"])).pooler_output
        expected_texts = model.get_text_features(
            input_ids=torch.from_numpy(inputs["input_ids"]), attention_mask=torch.from_numpy(inputs["attention_mask"])
        ).pooler_output
    assert image_embeds.shape == (batch_size, 16) and text_embeds.shape == (batch_size, 16)
    assert np.abs(image_embeds - expected_images.numpy()).max() <= 1e-4
    assert np.abs(text_embeds - expected_texts.numpy()).max() <= 1e-4
    if batch_size > 1:  # distinct inputs give distinct rows, so the comparison is not between constants
        assert np.abs(image_embeds[0] - image_embeds[1]).max() > 1e-3


def test_check_detects_graphs_that_do_not_match_the_model(exported, tiny_clip_dir):
    output_dir, _ = exported
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    assert max(check_onnx(model, str(output_dir)).values()) <= 1e-4
    with torch.no_grad():
        model.visual_projection.weight.mul_(1.01)  # a 1% change of the image projection only
    with pytest.raises(ONNXExportError, match="vision_model.onnx at batch size 1") as error:
        check_onnx(model, str(output_dir))
    assert "text_model.onnx" not in str(error.value)


@pytest.mark.slow  # a second export, about 10 s on 2 cores
def test_cli_fails_with_one_line_when_the_check_cannot_pass(tiny_clip_dir, tmp_path, capsys):
    # A negative tolerance no graph can meet: the export runs, the check must refuse to report success.
    code = main([str(tiny_clip_dir), "--output_dir", str(tmp_path / "out"), "--atol", "-1"], prog="export-onnx")
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("export-onnx: error:")]
    assert len(errors) == 1 and "do not reproduce the PyTorch embeddings within atol=-1.0" in errors[0]
    assert "Wrote" not in captured.out


def test_cli_missing_model_folder(tmp_path, capsys):
    code = main([str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "out")], prog="export-onnx")
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"export-onnx: error: {tmp_path / 'nothing'} has no config.json; pass a folder written by save_pretrained."
    )


@pytest.mark.slow  # a second export, about 10 s on 2 cores
def test_a_model_object_exports_with_its_processor(tiny_clip_dir, tmp_path):
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    model.train()
    processor = AutoProcessor.from_pretrained(tiny_clip_dir)
    result = export_onnx(model, tmp_path / "out", processor=processor)
    assert model.training  # the caller's model is handed back as it came
    names = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"vision_model.onnx", "text_model.onnx", "config.json", "tokenizer.json"} <= names
    assert sorted(result["files"]) == sorted(str(tmp_path / "out" / name) for name in names)
    reloaded = AutoProcessor.from_pretrained(tmp_path / "out")
    assert reloaded.tokenizer("a red circle")["input_ids"] == processor.tokenizer("a red circle")["input_ids"]


def test_a_model_that_needs_its_own_code_is_refused_without_asking(tmp_path, monkeypatch, capsys):
    """`clip-trainer export-onnx` with stdin closed: one line, status 2, no prompt, the model's code never run."""
    from clip_trainer.cli import main as cli_main

    asked = record_prompts(monkeypatch)
    custom = custom_code_model(tmp_path / "custom")
    code = cli_main(["export-onnx", str(custom), "--output_dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2 and asked == [] and "Do you wish to run the custom code" not in captured.out + captured.err
    assert captured.err.splitlines() == [
        f"clip-trainer export-onnx: error: Cannot load {str(custom)!r}: it needs its own Python code (`auto_map` in "
        "its config.json), which clip-trainer never runs; use a model that transformers implements itself (CLIP, "
        "SigLIP, SigLIP 2, a vision-text dual encoder)."
    ]
    assert not (custom / "RAN").exists() and not (tmp_path / "out").exists()
