"""Converting open_clip ViTs: a small random open_clip model, converted, embeds images and captions as open_clip does.

Every comparison runs real open_clip code (model, tokenizer and preprocessing) on the same images and captions. These
tests need the `open-clip` extra; see `.ci/run` for the environment they run in on a CPU-only machine.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

try:
    open_clip = pytest.importorskip(
        "open_clip", reason='open_clip is not installed: pip install "clip-trainer[open-clip]"'
    )
except RuntimeError as error:  # torchvision's C++ ops do not register beside a torch they were not built for
    pytest.skip(f"open_clip is installed but does not import here (torchvision): {error}", allow_module_level=True)

from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel  # noqa: E402

from clip_trainer.converters.from_open_clip import (  # noqa: E402
    OpenCLIPConversionError,
    clip_bpe_tokenizer,
    convert_open_clip,
    image_processor_from_preprocess,
    main,
    save_converted,
)

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
CAPTIONS = [
    "a photo of a cat.",
    "Hello, World!!  two   spaces, a dog's toys and 3.14 apples",
    "naïve café — émoji 🐈",
    "don't stop!",
    "",
    "a long caption " * 30,  # truncated to 77 tokens with the end token kept
]


def tiny_model_config(**vision_overrides) -> dict:
    return {"embed_dim": 16, "vision_cfg": {**VISION, **vision_overrides}, "text_cfg": dict(TEXT)}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturbs every weight, LayerNorm scales and zero-initialised biases included, so a swapped tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def make_images() -> list[Image.Image]:
    """RGB images with structure everywhere, of sizes whose centre crops torchvision and transformers place alike."""
    generator = torch.Generator().manual_seed(1)
    images = []
    for width, height in ((48, 40), (32, 32), (45, 60), (100, 33)):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy()))
    return images


@pytest.fixture(scope="module")
def tiny_open_clip():
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, **tiny_model_config())
    return randomize(model), preprocess, open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def converted(tiny_open_clip):
    model, preprocess, tokenizer = tiny_open_clip
    return convert_open_clip(model=model, preprocess=preprocess, tokenizer=tokenizer)


def open_clip_embeddings(model, preprocess, tokenizer, images, captions):
    pixel_values = torch.stack([preprocess(image) for image in images])
    with torch.no_grad():
        return model.encode_image(pixel_values), model.encode_text(tokenizer(captions))


def hf_embeddings(clip_model, processor, images, captions):
    inputs = processor(text=captions, images=images, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = clip_model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_embeds = clip_model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
    return image_embeds, text_embeds


def test_embeddings_equal_open_clip_with_each_ones_preprocessing_and_tokenizer(tiny_open_clip, converted):
    model, preprocess, tokenizer = tiny_open_clip
    clip_model, processor = converted
    images = make_images()
    expected_images, expected_texts = open_clip_embeddings(model, preprocess, tokenizer, images, CAPTIONS)
    image_embeds, text_embeds = hf_embeddings(clip_model, processor, images, CAPTIONS)
    assert image_embeds.dtype == text_embeds.dtype == torch.float32
    assert (image_embeds - expected_images).abs().max() <= 1e-4
    assert (text_embeds - expected_texts).abs().max() <= 1e-4
    # The model is not trivially constant: different inputs get clearly different embeddings.
    assert (expected_images[0] - expected_images[1]).abs().max() > 1e-2
    assert (expected_texts[0] - expected_texts[1]).abs().max() > 1e-2


def test_token_ids_equal_open_clip_up_to_the_end_token_then_padding(converted):
    reference = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)
    encoded = converted[1].tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    eot = reference.max()
    assert eot == 49407 == converted[1].tokenizer.eos_token_id
    assert ids.shape == reference.shape == (len(CAPTIONS), 77)
    for row in range(len(CAPTIONS)):
        end = int((reference[row] == eot).nonzero()[0])
        assert torch.equal(ids[row, : end + 1], reference[row, : end + 1])
        # Past the end token open_clip pads with 0 and the HF tokenizer with <|endoftext|>, masked out.
        assert torch.equal(reference[row, end + 1 :], torch.zeros(76 - end, dtype=torch.long))
        assert torch.equal(ids[row, end + 1 :], torch.full((76 - end,), 49407))
        assert mask[row].tolist() == [1] * (end + 1) + [0] * (76 - end)
    # The long caption is truncated to 77 tokens and still ends with the end token, which text pooling uses.
    assert ids[-1, -1] == eot and mask[-1].all()


def test_padding_value_does_not_change_text_embeddings(tiny_open_clip, converted):
    clip_model = converted[0]
    assert clip_model.config.text_config.eos_token_id == 49407
    ids = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)
    repadded = torch.where(torch.arange(77) > (ids == 49407).int().argmax(-1, keepdim=True), 49407, ids)
    with torch.no_grad():
        expected = tiny_open_clip[0].encode_text(ids)
        assert (clip_model.get_text_features(input_ids=ids).pooler_output - expected).abs().max() <= 1e-4
        assert (clip_model.get_text_features(input_ids=repadded).pooler_output - expected).abs().max() <= 1e-4


def test_vocabulary_is_open_clips(converted):
    tokenizer = converted[1].tokenizer
    reference = open_clip.get_tokenizer("ViT-B-32")
    vocab = tokenizer.get_vocab()
    assert len(vocab) == len(reference.encoder) == 49408
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert {renamed.get(token, token): index for token, index in reference.encoder.items()} == vocab


def test_pixel_values_match_open_clip_preprocess(tiny_open_clip, converted):
    preprocess = tiny_open_clip[1]
    image_processor = converted[1].image_processor
    for image in make_images():
        expected = preprocess(image)
        pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert pixel_values.shape == expected.shape == (3, 32, 32)
        assert (pixel_values - expected).abs().max() <= 1e-5


def test_squash_preprocessing_maps_to_a_resize_without_crop():
    _, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, image_resize_mode="squash", **tiny_model_config()
    )
    image_processor = image_processor_from_preprocess(preprocess)
    assert not image_processor.do_center_crop
    image = make_images()[3]
    pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert (pixel_values - preprocess(image)).abs().max() <= 1e-5


def test_padding_and_training_transforms_are_refused():
    _, train, longest = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, image_resize_mode="longest", **tiny_model_config()
    )
    with pytest.raises(OpenCLIPConversionError, match="ResizeKeepRatio"):
        image_processor_from_preprocess(longest)
    with pytest.raises(OpenCLIPConversionError, match="RandomResizedCrop"):
        image_processor_from_preprocess(train)


def test_saved_folder_reloads_and_embeds_the_same(tmp_path, tiny_open_clip, converted):
    folder = save_converted(*converted, str(tmp_path / "converted"))
    clip_model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    assert type(image_processor).__name__ == "CLIPImageProcessorPil"
    # The reloaded tokenizer still tokenizes "!" as a character, not as padding.
    assert tokenizer("wow!")["input_ids"] == open_clip.get_tokenizer("ViT-B-32")("wow!")[0, :4].tolist()
    images = make_images()
    model, preprocess, reference_tokenizer = tiny_open_clip
    expected_images, expected_texts = open_clip_embeddings(model, preprocess, reference_tokenizer, images, CAPTIONS)
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    encoded = tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        assert (
            clip_model.get_image_features(pixel_values=pixel_values).pooler_output - expected_images
        ).abs().max() <= 1e-4
        assert (clip_model.get_text_features(**encoded).pooler_output - expected_texts).abs().max() <= 1e-4


def test_checkpoint_files_convert_through_the_cli(tmp_path, tiny_open_clip):
    from safetensors.torch import save_file

    # A registered config and a checkpoint file, the way a user's own open_clip training run leaves them.
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "tiny-vit-quickgelu.json").write_text(json.dumps({**tiny_model_config(), "quick_gelu": True}))
    open_clip.add_model_config(config_dir)
    source = randomize(open_clip.create_model("tiny-vit-quickgelu", pretrained=None), seed=3)
    state_dict = {key: value.contiguous() for key, value in source.state_dict().items()}
    torch.save({"state_dict": {f"module.{key}": value for key, value in state_dict.items()}}, tmp_path / "tiny.pt")
    save_file(state_dict, tmp_path / "tiny.safetensors")

    for name in ("tiny.pt", "tiny.safetensors"):
        output_dir = tmp_path / f"out-{name}"
        code = main(["tiny-vit-quickgelu", "--checkpoint", str(tmp_path / name), "--output_dir", str(output_dir)])
        assert code == 0
        clip_model = CLIPModel.from_pretrained(output_dir).eval()
        assert clip_model.config.vision_config.hidden_act == clip_model.config.text_config.hidden_act == "quick_gelu"
        pixel_values = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = source.encode_image(pixel_values)
            assert (
                clip_model.get_image_features(pixel_values=pixel_values).pooler_output - expected
            ).abs().max() <= 1e-4


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    code = main(["ViT-B-32", "--checkpoint", str(tmp_path / "missing.pt"), "--output_dir", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "missing.pt does not exist" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"vision_cfg": {**VISION, "attentional_pool": True}}, "attentional pooling"),
        ({"vision_cfg": {**VISION, "pool_type": "avg"}}, "pool_type='avg'"),
        ({"vision_cfg": {**VISION, "qk_norm": True}}, "qk_norm=True"),
        ({"vision_cfg": {**VISION, "ls_init_value": 0.1}}, "layer scale"),
        ({"vision_cfg": {**VISION, "no_ln_pre": True}}, "no_ln_pre"),
        ({"text_cfg": {**TEXT, "pool_type": "last"}}, "pool_type='last'"),
        ({"text_cfg": {**TEXT, "no_causal_mask": True}}, "not causal"),
        ({"text_cfg": {**TEXT, "proj_bias": True}}, "proj_bias"),
        ({"text_cfg": {**TEXT, "embed_cls": True}, "custom_text": True}, "embed_cls"),
        ({"text_cfg": {**TEXT, "pool_type": "eos", "eos_id": 2}, "custom_text": True}, "eos pooling at token 2"),
        ({"init_logit_bias": -10.0}, "logit bias"),
    ],
)
def test_unmappable_architectures_are_refused_naming_the_feature(overrides, named):
    overrides = dict(overrides)
    custom_text = overrides.pop("custom_text", False)
    model = open_clip.create_model(
        "ViT-B-32", pretrained=None, force_custom_text=custom_text, **{**tiny_model_config(), **overrides}
    )
    with pytest.raises(OpenCLIPConversionError, match="Cannot convert") as error:
        convert_open_clip(model=model)
    assert named in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "custom_text"),
    [
        ({}, True),  # CustomTextCLIP keeps the text tower under `.text`
        ({"text_cfg": {**TEXT, "pool_type": "eos", "eos_id": 49407}}, True),
        ({"vision_cfg": {**VISION, "block_type": "custom"}, "text_cfg": {**TEXT, "block_type": "custom"}}, False),
        ({"vision_cfg": {**VISION, "final_ln_after_pool": True, "pos_embed_type": "sin_cos_2d"}}, False),
        ({"vision_cfg": {**VISION, "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}}}, False),
    ],
)
def test_mappable_variants_convert_exactly(overrides, custom_text):
    model = open_clip.create_model(
        "ViT-B-32", pretrained=None, force_custom_text=custom_text, **{**tiny_model_config(), **overrides}
    )
    model = randomize(model, seed=5)
    clip_model, processor = convert_open_clip(model=model, check=False)
    images = make_images()
    preprocess = open_clip.image_transform(32, is_train=False)
    expected_images, expected_texts = open_clip_embeddings(
        model, preprocess, open_clip.get_tokenizer("ViT-B-32"), images, CAPTIONS
    )
    image_embeds, text_embeds = hf_embeddings(clip_model, processor, images, CAPTIONS)
    assert (image_embeds - expected_images).abs().max() <= 1e-4
    assert (text_embeds - expected_texts).abs().max() <= 1e-4


def test_timm_and_resnet_towers_are_refused():
    resnet = open_clip.create_model(
        "RN50",
        pretrained=None,
        embed_dim=16,
        vision_cfg={"layers": [1, 1, 1, 1], "width": 8, "image_size": 32},
        text_cfg=dict(TEXT),
    )
    with pytest.raises(OpenCLIPConversionError, match="a ResNet image tower"):
        convert_open_clip(model=resnet)


def test_a_mismatched_activation_fails_the_embedding_check(tiny_open_clip):
    """The check is real: a model whose blocks are swapped to QuickGELU after conversion no longer matches."""
    model = tiny_open_clip[0]
    clip_model, _ = convert_open_clip(model=model)
    from clip_trainer.converters.from_open_clip import _check_embeddings

    clip_model.config.vision_config.hidden_act = "quick_gelu"
    broken = CLIPModel(clip_model.config)
    broken.load_state_dict(clip_model.state_dict())
    with pytest.raises(OpenCLIPConversionError, match="image embeddings differ"):
        _check_embeddings(model, broken, open_clip.get_tokenizer("ViT-B-32")(CAPTIONS), atol=1e-4)


def test_other_tokenizers_are_refused(tiny_open_clip):
    model = tiny_open_clip[0]
    with pytest.raises(OpenCLIPConversionError, match="clean='lower'"):
        convert_open_clip(model=model, tokenizer=open_clip.SimpleTokenizer(clean="canonicalize"))
    with pytest.raises(OpenCLIPConversionError, match="vocabulary other than"):
        convert_open_clip(model=model, tokenizer=open_clip.SimpleTokenizer(additional_special_tokens=["<x>"]))


def test_clip_bpe_tokenizer_matches_open_clip_on_captions():
    tokenizer = clip_bpe_tokenizer(context_length=77)
    reference = open_clip.get_tokenizer("ViT-B-32")
    for caption in CAPTIONS:
        expected = reference([caption])[0]
        ids = tokenizer(caption, truncation=True)["input_ids"]
        assert ids == expected[: len(ids)].tolist() and expected[len(ids) :].eq(0).all()
