"""LoRA through peft: only the adapters train, the output is a plain merged CLIPModel with the adapter beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import draw_shape, needs_peft
from transformers import AutoProcessor, CLIPModel, pipeline

from clip_trainer.arguments import ConfigError
from clip_trainer.run import main


def embeddings(model, processor) -> tuple[torch.Tensor, torch.Tensor]:
    images = [draw_shape("red", "circle"), draw_shape("blue", "square", "black")]
    inputs = processor(
        images=images, text=["a red circle on white", "a blue square"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        outputs = model(**inputs)
    return outputs.image_embeds, outputs.text_embeds


@needs_peft
def test_a_lora_run_saves_a_merged_model_equal_to_the_adapter_model(base_args, tiny_clip_dir):
    from peft import PeftModel

    out = Path(base_args[base_args.index("--output_dir") + 1])
    main([*base_args, "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--num_train_epochs", "1", "--eval_strategy", "epoch",
          "--save_strategy", "epoch", "--load_best_model_at_end", "true", "--metric_for_best_model",
          "eval_mean_recall"])  # fmt: skip
    assert (out / "adapter" / "adapter_config.json").is_file() and (
        out / "adapter" / "adapter_model.safetensors"
    ).is_file()
    merged = CLIPModel.from_pretrained(out)  # a plain model, not an adapter
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    adapted = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_dir), out / "adapter")
    for merged_embeds, adapter_embeds in zip(embeddings(merged, processor), embeddings(adapted, processor)):
        torch.testing.assert_close(merged_embeds, adapter_embeds, atol=1e-5, rtol=0)
    # The adapters changed the model; logit_scale and everything outside the adapted projections did not.
    base = CLIPModel.from_pretrained(tiny_clip_dir).state_dict()
    weights = merged.state_dict()
    assert not torch.equal(weights["vision_model.encoder.layers.0.self_attn.q_proj.weight"],
                           base["vision_model.encoder.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    for name in ("logit_scale", "visual_projection.weight", "text_model.encoder.layers.1.mlp.fc2.weight"):
        assert torch.equal(weights[name], base[name]), name
    classifier = pipeline("zero-shot-image-classification", model=str(out))
    assert (
        len(
            classifier(
                draw_shape("red", "circle"),
                candidate_labels=["a red circle", "a blue square"],
                hypothesis_template="{}",
            )
        )
        == 2
    )


def test_lora_without_peft_names_the_extra(base_args, monkeypatch):
    monkeypatch.setattr("clip_trainer.arguments.is_peft_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'clip-trainer\[lora\]'"):
        main([*base_args, "--lora_rank", "4"])


@needs_peft
def test_lora_with_locks_is_refused(base_args):
    with pytest.raises(ConfigError, match="`lora_rank` trains adapters only"):
        main([*base_args, "--lora_rank", "4", "--freeze_vision_model", "true"])


@pytest.mark.parametrize(
    "given, named",
    [
        (["--lora_alpha", "16"], "`lora_alpha` is set"),
        (["--lora_dropout", "0.1"], "`lora_dropout` is set"),
        (["--lora_target_modules", "q_proj", "v_proj"], "`lora_target_modules` is set"),
        (["--lora_alpha", "16", "--lora_dropout", "0.1"], "`lora_alpha` and `lora_dropout` are set"),
        (["--wise_ft_min_retention", "0.95"], "`wise_ft_min_retention` is 0.95, but nothing is interpolated"),
    ],
)
def test_a_lora_or_wise_ft_setting_without_its_feature_is_refused_before_anything_trains(
    base_args, given, named, tmp_path
):
    """They were ignored without a word: a full fine-tune ran where the user meant LoRA, or no WiSE-FT table."""
    with pytest.raises(ConfigError, match=named):
        main([*base_args, *given])
    assert not (tmp_path / "out").exists()


def _front_matter(text: str) -> dict:
    import yaml

    return yaml.safe_load(text.split("---\n", 2)[1])


@needs_peft
def test_the_adapter_has_its_own_card(base_args, tiny_clip_dir, tmp_path, monkeypatch):
    import json
    import re

    monkeypatch.chdir(tmp_path)
    argv = list(base_args)
    argv[argv.index("--output_dir") + 1] = "outputs/lora"  # relative, as users write it
    main([*argv, "--lora_rank", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
          "--num_train_epochs", "1"])  # fmt: skip
    out = tmp_path / "outputs" / "lora"
    text = (out / "adapter" / "README.md").read_text()
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())

    # The project's card, not peft's template; no local path (peft's `base_model` metadata is the base's path).
    metadata = _front_matter(text)
    assert metadata["library_name"] == "peft" and "base_model" not in metadata
    assert "More Information Needed" not in text and "## Model Details" not in text
    assert str(tiny_clip_dir) not in text and str(tmp_path) not in text
    # What it is, its settings as saved, and where the merged model is.
    assert f"rank {saved['r']}, alpha {saved['lora_alpha']:g}" in text and saved["r"] == 4
    assert "on the modules `q_proj`, `v_proj`" in text and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    assert "The model with this adapter merged into its weights is the parent folder, `outputs/lora`" in text
    # The main card says it too, and links the adapter.
    card = (out / "README.md").read_text()
    assert "Only LoRA adapters of rank 4 (alpha 8, on `q_proj`, `v_proj`) were trained" in card
    assert "[`adapter/`](adapter/)" in card

    # Its loading code, with the base model's folder put in for the placeholder, gives the merged model's outputs.
    [block] = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert f'"path/to/{tiny_clip_dir.name}"' in block
    namespace: dict = {}
    exec(block.replace(f'"path/to/{tiny_clip_dir.name}"', repr(str(tiny_clip_dir))), namespace)
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    for adapter_embeds, merged_embeds in zip(
        embeddings(namespace["model"].eval(), processor), embeddings(CLIPModel.from_pretrained(out), processor)
    ):
        torch.testing.assert_close(adapter_embeds, merged_embeds, atol=1e-5, rtol=0)


@needs_peft
def test_with_wise_ft_the_adapter_is_scaled_to_the_interpolation_saved(base_args, tiny_clip_dir, tmp_path):
    """WiSE-FT at a of a LoRA fine-tune is the base model plus a x the adapter's update: the adapter saved beside the
    model, merged into the base model as its card says, gives the model saved (not the a = 1 fine-tune)."""
    from peft import PeftModel

    out = Path(base_args[base_args.index("--output_dir") + 1])
    main([*base_args, "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--num_train_epochs", "1",
          "--wise_ft_alphas", "0.5", "--wise_ft_alpha", "0.5", "--do_train", "--do_eval"])  # fmt: skip
    saved = CLIPModel.from_pretrained(out).state_dict()
    base = CLIPModel.from_pretrained(tiny_clip_dir).state_dict()
    merged = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_dir), out / "adapter").merge_and_unload()
    name = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[name], base[name])  # the update is there, at half its size
    for key, weight in merged.state_dict().items():
        torch.testing.assert_close(weight, saved[key], atol=1e-6, rtol=0, msg=key)
    assert "its update scaled by WiSE-FT's a = 0.5" in (out / "README.md").read_text()
    assert "Its update is scaled by WiSE-FT's a = 0.5" in (out / "adapter" / "README.md").read_text()


@needs_peft
def test_a_pushed_lora_run_names_its_hub_repository(base_args, tmp_path, fake_hub):
    main([*base_args, "--lora_rank", "4", "--max_steps", "2", "--push_to_hub", "true", "--hub_token", "hf_test",
          "--hub_model_id", "clip-lora"])  # fmt: skip
    files = fake_hub.files("user/clip-lora")
    card, adapter_card = files["README.md"].decode(), files["adapter/README.md"].decode()
    assert card.count('from_pretrained("user/clip-lora")') == 4  # model and processor, in both snippets
    assert 'PeftModel.from_pretrained(base, "user/clip-lora", subfolder="adapter")' in adapter_card
    assert "the Hub repository `user/clip-lora`" in adapter_card
    assert str(tmp_path) not in card and str(tmp_path) not in adapter_card


@needs_peft
def test_every_siglip_adapter_trains_and_none_sits_in_the_pooling_heads_torch_attention(
    tiny_siglip_run, shapes_csv, tmp_path, monkeypatch
):
    """SigLIP's attention-pooling head is a `torch.nn.MultiheadAttention`, which reads its `out_proj` weight itself:
    an adapter there never got a gradient, stayed zero, and was counted as trained. The default targets now adapt
    the encoders' attention projections only, and every adapter saved has trained."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    main(["--model_name_or_path", str(tiny_siglip_run), "--train_file", str(shapes_csv), "--output_dir", "lora",
          "--lora_rank", "4", "--learning_rate", "1e-2", "--max_steps", "3", "--per_device_train_batch_size", "8",
          "--report_to", "none", "--dataloader_num_workers", "0", "--eval_strategy", "no", "--save_strategy", "no",
          "--use_cpu", "true"])  # fmt: skip
    adapter = load_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors")
    lora_b = {name: tensor for name, tensor in adapter.items() if "lora_B" in name}
    assert lora_b and not [name for name in adapter if ".head." in name]
    untrained = [name for name, tensor in lora_b.items() if not tensor.abs().sum()]
    assert not untrained  # lora_B starts at zero: one that is still zero never trained
