"""open_clip files out: `clip-trainer export-open-clip` and `--save_open_clip true` write `open_clip_config.json` and
`open_clip_model.safetensors`, which open_clip's `local-dir:` loader builds into the same model.

The round trips run real open_clip code (model, `HFTokenizer`, torchvision preprocessing) and need the `open-clip`
extra (`.ci/run` builds its environment); the refusals and the files' layout are checked without open_clip.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_TEXT, TINY_VISION, draw_shape, shape_rows
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPConfig, CLIPImageProcessorPil, CLIPModel, SiglipConfig, SiglipModel

from clip_trainer import run
from clip_trainer.cli import main as cli
from clip_trainer.converters.to_open_clip import (
    OPEN_CLIP_CONFIG_NAME,
    OPEN_CLIP_WEIGHTS_NAME,
    check_open_clip_files,
    open_clip_config,
    open_clip_preprocess_config,
)
from clip_trainer.errors import ConfigError, OpenCLIPConversionError

# No runs of spaces: open_clip collapses them before its tokenizer runs, which changes the ids of a byte-level BPE
# (clip-trainer's own tokenizer) but not of CLIP's BPE, whose normaliser collapses them too (see the docs).
CAPTIONS = [caption for *_, caption in shape_rows()[:6]] + ["Red circle!", "", "a blue square on white " * 10]


@pytest.fixture
def open_clip():
    try:
        return pytest.importorskip(
            "open_clip", reason='open_clip is not installed: pip install "clip-trainer[open-clip]"'
        )
    except RuntimeError as error:  # torchvision's C++ ops do not register beside a torch they were not built for
        pytest.skip(f"open_clip is installed but does not import here (torchvision): {error}")


def make_images() -> list[Image.Image]:
    """Drawn shapes and random pixels, of sizes whose centre crops torchvision and transformers place alike."""
    images = [draw_shape("red", "circle", size=40), draw_shape("blue", "triangle", "black", size=48)]
    generator = torch.Generator().manual_seed(1)
    for width, height in ((48, 40), (32, 32), (45, 60), (100, 33)):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy()))
    return images


def open_clip_outputs(folder_or_name, open_clip, images, captions, model=None, preprocess=None, tokenizer=None):
    """Image and text embeddings and zero-shot logits the open_clip way, with its own preprocessing and tokenizer."""
    if model is None:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder_or_name}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder_or_name}")
    model.eval()
    with torch.no_grad():
        image_embeds = model.encode_image(torch.stack([preprocess(image) for image in images]))
        text_embeds = model.encode_text(tokenizer(captions))
        logits, _ = model.get_logits(torch.stack([preprocess(image) for image in images]), tokenizer(captions))
    return image_embeds, text_embeds, logits


def hf_embeddings(folder, images, captions):
    """The same, the transformers way: the folder's processor and `CLIPModel`."""
    model = CLIPModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    inputs = processor(text=captions, images=images, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_embeds = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
        logits = model(**inputs).logits_per_image
    return image_embeds, text_embeds, logits


def assert_close(ours, theirs, atol=1e-4):
    for name, a, b in zip(("image embeddings", "text embeddings", "zero-shot logits"), ours, theirs, strict=True):
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() <= atol, f"{name} differ by {(a - b).abs().max().item()}"


# --------------------------------------------------------------------------------------------------------------------
# Round trips through open_clip
# --------------------------------------------------------------------------------------------------------------------


def test_a_trained_model_loads_in_open_clip_and_embeds_as_transformers(
    open_clip, base_args, tiny_clip_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    run.main([*base_args, "--output_dir", "out", "--save_open_clip", "true"])
    out = tmp_path / "out"
    assert (out / OPEN_CLIP_CONFIG_NAME).is_file() and (out / OPEN_CLIP_WEIGHTS_NAME).is_file()
    images, captions = make_images(), CAPTIONS
    expected = hf_embeddings(out, images, captions)
    got = open_clip_outputs(out, open_clip, images, captions)
    assert_close(got, expected)
    # The same predictions for zero-shot classification, and embeddings that differ from input to input.
    assert torch.equal(got[2].argmax(-1), expected[2].argmax(-1))
    assert (got[0][0] - got[0][1]).abs().max() > 1e-2 and (got[1][0] - got[1][1]).abs().max() > 1e-2
    # The files are those of the trained weights: open_clip's logit scale is the trained one, not the initial one.
    trained = CLIPModel.from_pretrained(out)
    model = open_clip.create_model(f"local-dir:{out}")
    assert torch.equal(model.logit_scale.detach(), trained.logit_scale.detach())
    assert not torch.equal(trained.logit_scale, CLIPModel.from_pretrained(tiny_clip_dir).logit_scale)


def tiny_open_clip_config(**model_cfg) -> dict:
    vision = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    return {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text, **model_cfg}


@pytest.mark.parametrize(
    "model_cfg",
    [
        {},
        {"quick_gelu": True},
        {"vision_cfg": {**tiny_open_clip_config()["vision_cfg"], "act_kwargs": {"approximate": "tanh"}}},
    ],
    ids=["gelu", "quick_gelu", "tanh_gelu"],
)
def test_open_clip_to_clip_trainer_and_back_is_the_same_model(open_clip, tmp_path, monkeypatch, model_cfg):
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    # An open_clip model as a user's open_clip run leaves it: a registered config and a checkpoint file.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-vit.json").write_text(json.dumps(tiny_open_clip_config(**model_cfg)))
    open_clip.add_model_config(tmp_path / "configs")
    source, _, preprocess = open_clip.create_model_and_transforms("tiny-vit", pretrained=None)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every weight perturbed, LayerNorms and zero biases included, so a swapped tensor shows
        for parameter in source.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, "tiny.safetensors")

    assert cli(["import-open-clip", "tiny-vit", "--checkpoint", "tiny.safetensors", "--output_dir", "imported"]) == 0
    assert cli(["export-open-clip", "imported"]) == 0

    images = make_images()
    tokenizer = open_clip.get_tokenizer("tiny-vit")
    expected = open_clip_outputs(None, open_clip, images, CAPTIONS, source, preprocess, tokenizer)
    assert_close(open_clip_outputs("imported", open_clip, images, CAPTIONS), expected)
    # The weights themselves come back unchanged, under the same names.
    back = open_clip.create_model("local-dir:imported").state_dict()
    original = source.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)


def test_the_check_fails_files_that_do_not_reproduce_the_model(open_clip, tiny_clip_dir, tmp_path):
    folder = shutil.copytree(tiny_clip_dir, tmp_path / "model")
    assert cli(["export-open-clip", str(folder)]) == 0
    config_path = folder / OPEN_CLIP_CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["model_cfg"]["quick_gelu"] = not config["model_cfg"]["quick_gelu"]  # another activation, same weights
    config_path.write_text(json.dumps(config))
    with pytest.raises(OpenCLIPConversionError, match="do not reproduce the model: image embeddings differ"):
        check_open_clip_files(str(folder), CLIPModel.from_pretrained(folder))


# --------------------------------------------------------------------------------------------------------------------
# The files and the refusals, without open_clip
# --------------------------------------------------------------------------------------------------------------------


def test_written_files_hold_open_clips_config_and_weight_names(tiny_clip_dir, tmp_path, capsys):
    folder = shutil.copytree(tiny_clip_dir, tmp_path / "model")
    assert cli(["export-open-clip", str(folder), "--no_check", "--hf_tokenizer_name", "me/tiny-clip"]) == 0
    assert "(not checked: --no_check)" in capsys.readouterr().out  # the command says when nothing was compared
    written = json.loads((folder / OPEN_CLIP_CONFIG_NAME).read_text())
    assert set(written) == {"model_cfg", "preprocess_cfg"}
    model_cfg = written["model_cfg"]
    assert set(model_cfg) == {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
    model = CLIPModel.from_pretrained(folder)
    vision, text = model.config.vision_config, model.config.text_config
    assert model_cfg["embed_dim"] == 16 and model_cfg["quick_gelu"] is True  # CLIPConfig's default activation
    assert model_cfg["vision_cfg"] == {
        "image_size": 32,
        "patch_size": 8,
        "head_width": 16,
        "width": 32,
        "layers": 2,
        "mlp_ratio": 2.0,
        "norm_kwargs": {"eps": 1e-5},
    }
    assert model_cfg["text_cfg"] == {
        "context_length": 16,
        "vocab_size": 300,
        "heads": 2,
        "width": 32,
        "layers": 2,
        "mlp_ratio": 2.0,
        "norm_kwargs": {"eps": 1e-5},
        "hf_tokenizer_name": "me/tiny-clip",
        "pool_type": "eos",
        "eos_id": text.eos_token_id,
    }
    # open_clip's PreprocessCfg fields, from the folder's CLIPImageProcessorPil.
    assert written["preprocess_cfg"] == {
        "size": 32,
        "mode": "RGB",
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }
    weights = load_file(folder / OPEN_CLIP_WEIGHTS_NAME)
    # One open_clip tensor per CLIPModel tensor, but the q/k/v triples are one in-projection each.
    layers = vision.num_hidden_layers + text.num_hidden_layers
    assert len(weights) == len(dict(model.named_parameters())) - 4 * layers
    hf = model.state_dict()
    assert torch.equal(weights["visual.proj"], hf["visual_projection.weight"].T)
    assert torch.equal(weights["text_projection"], hf["text_projection.weight"].T)
    assert torch.equal(weights["visual.class_embedding"], hf["vision_model.embeddings.class_embedding"])
    layer = "text_model.encoder.layers.1.self_attn"
    assert torch.equal(
        weights["transformer.resblocks.1.attn.in_proj_weight"],
        torch.cat([hf[f"{layer}.{name}_proj.weight"] for name in "qkv"]),
    )
    assert torch.equal(
        weights["visual.transformer.resblocks.0.mlp.c_fc.bias"], hf["vision_model.encoder.layers.0.mlp.fc1.bias"]
    )
    assert weights["logit_scale"].shape == () and weights["logit_scale"] == hf["logit_scale"]


def test_export_refuses_a_siglip_by_name(tmp_path, capsys):
    config = SiglipConfig(text_config={**TINY_TEXT, "max_position_embeddings": 16}, vision_config=TINY_VISION)
    SiglipModel(config).save_pretrained(tmp_path / "siglip")
    capsys.readouterr()
    assert cli(["export-open-clip", str(tmp_path / "siglip")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "open_clip files are written for CLIP models only, and this is SigLIP" in error
    assert not (tmp_path / "siglip" / OPEN_CLIP_CONFIG_NAME).exists()


def test_save_open_clip_is_refused_before_a_siglip_run_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = SiglipConfig(text_config={**TINY_TEXT, "max_position_embeddings": 16}, vision_config=TINY_VISION)
    (tmp_path / "siglip.json").write_text(config.to_json_string())
    (tmp_path / "pairs.csv").write_text("image,caption\nnot-read.png,a caption\n")  # refused before it is read
    argv = ["--config_name", "siglip.json", "--train_file", "pairs.csv", "--output_dir", "out",
            "--save_open_clip", "true", "--use_cpu", "true", "--report_to", "none"]  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"^`save_open_clip` cannot be honoured: .* this is SigLIP .*--save_open_clip"
    ):
        run.main(argv)
    assert not (tmp_path / "out").exists()


def test_clip_settings_open_clip_cannot_build_are_refused_by_name(tiny_clip_dir, tmp_path, capsys):
    folder = shutil.copytree(tiny_clip_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(config))
    assert cli(["export-open-clip", str(folder)]) == 2
    assert "text hidden_act 'relu'" in capsys.readouterr().err
    assert not (folder / OPEN_CLIP_CONFIG_NAME).exists()


def test_preprocessing_open_clip_cannot_follow_is_refused():
    resize_then_crop = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    with pytest.raises(ConfigError, match="size {'shortest_edge': 40}, crop_size {'height': 32, 'width': 32}"):
        open_clip_preprocess_config(resize_then_crop, 32)
    nearest = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=0)
    with pytest.raises(ConfigError, match="resample"):
        open_clip_preprocess_config(nearest, 32)
    squash = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    assert open_clip_preprocess_config(squash, 32)["resize_mode"] == "squash"
    with pytest.raises(ConfigError, match="makes 32x32 images but the image tower takes 64x64"):
        open_clip_preprocess_config(squash, 64)


def test_mlp_ratio_gives_open_clips_mlp_width_back():
    # ViT-bigG's 1664-wide blocks with 8192-wide MLPs: 8192 / 1664 * 1664 is 8191.99... in floating point.
    config = CLIPConfig(
        vision_config={"hidden_size": 1664, "intermediate_size": 8192, "num_attention_heads": 16},
        text_config={"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20},
    )
    model_cfg = open_clip_config(config, "tokenizer")
    # open_clip sizes its MLPs as int(width * mlp_ratio).
    assert int(1664 * model_cfg["vision_cfg"]["mlp_ratio"]) == 8192
    assert int(1280 * model_cfg["text_cfg"]["mlp_ratio"]) == 5120


def test_a_preprocessing_open_clip_cannot_follow_stops_the_trainer_before_training(
    tiny_clip_dir, shapes_csv, tmp_path
):
    from conftest import build_trainer

    folder = shutil.copytree(tiny_clip_dir, tmp_path / "model")
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    processor.image_processor.size = {"shortest_edge": 40}  # resize to 40, then crop 32: no open_clip form
    processor.save_pretrained(folder)
    with pytest.raises(
        ConfigError, match=r"^`save_open_clip` cannot be honoured: .*shortest_edge.*Drop --save_open_clip"
    ):
        build_trainer(tmp_path, folder, shapes_csv, save_open_clip=True)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_run_writes_the_trained_weights_without_open_clip(base_args, tiny_clip_dir, tmp_path, monkeypatch, lora):
    monkeypatch.chdir(tmp_path)
    extra = ["--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2"] if lora else []
    run.main([*base_args, "--output_dir", "out", "--save_open_clip", "true", "--num_train_epochs", "1", *extra])
    weights = load_file(tmp_path / "out" / OPEN_CLIP_WEIGHTS_NAME)
    trained, initial = CLIPModel.from_pretrained(tmp_path / "out"), CLIPModel.from_pretrained(tiny_clip_dir)
    # The saved model's weights (merged, after LoRA), not the starting ones.
    attention = "vision_model.encoder.layers.1.self_attn"
    for model, same in ((trained, True), (initial, False)):
        state = model.state_dict()
        in_proj = torch.cat([state[f"{attention}.{name}_proj.weight"] for name in "qkv"])
        assert torch.equal(weights["visual.transformer.resblocks.1.attn.in_proj_weight"], in_proj) is same
    assert torch.equal(weights["visual.proj"], trained.visual_projection.weight.detach().T)
    assert torch.equal(
        weights["token_embedding.weight"], trained.text_model.embeddings.token_embedding.weight.detach()
    )
    config = json.loads((tmp_path / "out" / OPEN_CLIP_CONFIG_NAME).read_text())
    assert config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == "out"
