"""`--push_to_hub` end to end against a local stand-in for the Hub: files, card, reload, and clear failures."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import CLIPModel

from clip_trainer.arguments import ConfigError
from clip_trainer.run import cli, main


def test_push_uploads_model_processor_and_a_card_matching_the_metrics(base_args, tmp_path, fake_hub):
    out = tmp_path / "out"
    main([*base_args, "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2", "--eval_on_start", "true",
          "--push_to_hub", "true", "--hub_token", "hf_test", "--hub_model_id", "clip-shapes"])  # fmt: skip
    files = fake_hub.files("user/clip-shapes")
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "README.md",
                 "training_curves.png", "eval_results.json"):  # fmt: skip
        assert name in files, sorted(files)
    assert not any(name.endswith(".bin") and name != "training_args.bin" for name in files)
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()

    # The card: valid metadata, and the table shows exactly the evaluation that eval_results.json holds.
    card_path = tmp_path / "README.md"
    card_path.write_bytes(files["README.md"])
    card = ModelCard.load(card_path)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    eval_results = json.loads(files["eval_results.json"])
    recall = eval_results["eval_t2i_recall@5"]
    assert f"{100 * recall:.1f}%" in card.text
    assert "Before training" in card.text or "before training" in card.text.lower()
    assert "hf_test" not in card.content

    # The pushed model reloads from the Hub with the trained weights.
    model = CLIPModel.from_pretrained("user/clip-shapes")
    saved = load_file(str(out / "model.safetensors"))
    for key, value in model.state_dict().items():
        if key in saved:
            torch.testing.assert_close(value, saved[key])


def test_push_without_token_stops_before_loading_data(base_args, fake_hub, monkeypatch, capsys):
    monkeypatch.setattr("clip_trainer.run.load_image_text_data", lambda *a, **k: pytest.fail("data was loaded"))
    assert cli([*base_args, "--push_to_hub", "true"]) == 2
    error = capsys.readouterr().err
    assert "needs a Hugging Face token" in error and "HF_TOKEN" in error and "Traceback" not in error


def test_push_to_a_namespace_the_user_cannot_write_stops_before_training(base_args, fake_hub, monkeypatch):
    monkeypatch.setattr("clip_trainer.run.load_image_text_data", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(ConfigError, match="cannot write to the namespace 'someone-else'"):
        main([*base_args, "--push_to_hub", "true", "--hub_token", "hf_test", "--hub_model_id", "someone-else/m"])


def test_push_with_a_refused_token_is_explained(base_args, fake_hub):
    with pytest.raises(ConfigError, match="token was refused"):
        main([*base_args, "--push_to_hub", "true", "--hub_token", "hf_wrong"])


def test_unreachable_hub_is_explained(base_args, monkeypatch):
    # HF_HUB_OFFLINE=1 in the tests: exactly the "no network" case.
    with pytest.raises(ConfigError, match="Cannot reach the Hugging Face Hub"):
        main([*base_args, "--push_to_hub", "true", "--hub_token", "hf_test"])


def test_a_run_that_does_not_push_documents_itself(base_args, tmp_path):
    out = tmp_path / "out"
    main([*base_args, "--max_steps", "3", "--eval_strategy", "steps", "--eval_steps", "3"])
    card = ModelCard.load(out / "README.md")
    assert "clip-trainer" in card.data.tags
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
