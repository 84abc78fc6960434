"""MetaCLIP 2, Chinese-CLIP and AltCLIP: tiny models saved from configs with tokenizers of their own kind built offline
(XLM-R's Unigram for MetaCLIP 2 and AltCLIP, a BERT WordPiece for Chinese-CLIP) load, train and evaluate by the
command, lock and adapt the right parameters of each tower, write a card whose code runs, and export to ONNX graphs
that give the model's embeddings."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, TINY_VISION, build_trainer, draw_shape, shape_rows, write_shapes_csv
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AltCLIPConfig,
    AltCLIPModel,
    AltCLIPProcessor,
    AutoModel,
    AutoProcessor,
    BertTokenizer,
    ChineseCLIPConfig,
    ChineseCLIPImageProcessorPil,
    ChineseCLIPModel,
    ChineseCLIPProcessor,
    CLIPImageProcessorPil,
    CLIPProcessor,
    MetaClip2Config,
    MetaClip2Model,
    XLMRobertaTokenizer,
    pipeline,
)

from clip_trainer.arguments import CLIPTrainingArguments, ModelArguments
from clip_trainer.modeling import load_model, load_model_config, load_processor, max_text_positions, model_family
from clip_trainer.run import main
from clip_trainer.trainable import TrainableParameters, layerwise_lr_scales

FAMILIES = ("metaclip_2", "chinese_clip", "altclip")
QUIET = ["--report_to", "none", "--dataloader_num_workers", "0", "--dataloader_persistent_workers", "false"]
WORDS = sorted({word for *_, caption in shape_rows() for word in caption.split()})
LETTERS = "abcdefghijklmnopqrstuvwxyz"
POSITIONS = 16  # the tokens each tiny text tower reads
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def xlm_r_tokenizer() -> XLMRobertaTokenizer:
    """XLM-R's tokenizer (a Unigram model; MetaCLIP 2's and AltCLIP's kind) over the captions' words, with letters so
    that other words still tokenize; XLM-R's special ids: <s> 0, <pad> 1, </s> 2, <unk> 3."""
    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    pieces = [(f"▁{word}", -1.0) for word in WORDS] + [("▁", -3.0)] + [(letter, -5.0) for letter in LETTERS]
    return XLMRobertaTokenizer(vocab=specials + pieces, model_max_length=POSITIONS)


def bert_tokenizer() -> BertTokenizer:
    """Chinese-CLIP's kind: a WordPiece vocabulary of the captions' words, letters and `##` letters."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *LETTERS, *(f"##{letter}" for letter in LETTERS)]
    return BertTokenizer(vocab={token: index for index, token in enumerate(dict.fromkeys(tokens))},
                         model_max_length=POSITIONS)  # fmt: skip


def clip_image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def build_family(family: str, folder: Path) -> Path:
    """A tiny random model of `family` with its tokenizer and processor, saved like a Hub checkpoint."""
    if family == "chinese_clip":
        tokenizer = bert_tokenizer()
        text = {**TINY_TEXT, **NO_DROPOUT, "vocab_size": len(tokenizer), "max_position_embeddings": POSITIONS}
        config = ChineseCLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=16)
        image_processor = ChineseCLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        processor = ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    elif family == "altclip":
        tokenizer = xlm_r_tokenizer()
        # XLM-R numbers positions from pad + 1 = 2: two more embeddings than tokens.
        text = {**TINY_TEXT, **NO_DROPOUT, "vocab_size": len(tokenizer), "max_position_embeddings": POSITIONS + 2,
                "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "project_dim": 16}  # fmt: skip
        config = AltCLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=16)
        processor = AltCLIPProcessor(image_processor=clip_image_processor(), tokenizer=tokenizer)
    else:
        tokenizer = xlm_r_tokenizer()
        # MetaCLIP 2 pools at the first `eos_token_id`: XLM-R's </s>.
        text = {**TINY_TEXT, "vocab_size": len(tokenizer), "max_position_embeddings": POSITIONS,
                "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}  # fmt: skip
        config = MetaClip2Config(text_config=text, vision_config=TINY_VISION, projection_dim=16)
        processor = CLIPProcessor(image_processor=clip_image_processor(), tokenizer=tokenizer)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_family(family, root / family) for family in FAMILIES}


MODEL_CLASSES = {"metaclip_2": MetaClip2Model, "chinese_clip": ChineseCLIPModel, "altclip": AltCLIPModel}
PROCESSOR_CLASSES = {"metaclip_2": CLIPProcessor, "chinese_clip": ChineseCLIPProcessor, "altclip": AltCLIPProcessor}
# Written out by hand from the models' parameter names, not from clip-trainer's registry: with 1 trainable layer of
# 2, what partial locking must hold fixed in each tower (the embeddings, the vision pre-norm and the bottom layer).
LOCKED = {
    "vision": ("vision_model.embeddings.", "vision_model.pre_layrnorm.", "vision_model.encoder.layers.0."),
    "text": {
        "metaclip_2": ("text_model.embeddings.", "text_model.encoder.layers.0."),
        "chinese_clip": ("text_model.embeddings.", "text_model.encoder.layer.0."),
        "altclip": ("text_model.roberta.embeddings.", "text_model.roberta.encoder.layers.0."),
    },
}
TOP_LAYER = {
    "vision": "vision_model.encoder.layers.1.",
    "text": {
        "metaclip_2": "text_model.encoder.layers.1.",
        "chinese_clip": "text_model.encoder.layer.1.",
        "altclip": "text_model.roberta.encoder.layers.1.",
    },
}
# The attention projections each tower's layers name (the default LoRA targets), per layer.
ATTENTION = {
    "clip": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
}


def locked_prefixes(family: str, tower: str) -> tuple[str, ...]:
    return LOCKED["vision"] if tower == "vision" else LOCKED["text"][family]


def top_layer(family: str, tower: str) -> str:
    return TOP_LAYER["vision"] if tower == "vision" else TOP_LAYER["text"][family]


def load(folder: Path):
    model_args = ModelArguments(model_name_or_path=str(folder))
    config = load_model_config(model_args)
    return config, load_processor(model_args, config), load_model(model_args, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_with_its_classes_softmax_loss_and_towers(family, family_dirs):
    config, processor, model = load(family_dirs[family])
    assert type(model) is MODEL_CLASSES[family] and type(processor) is PROCESSOR_CLASSES[family]
    assert model_family(config).loss == "softmax" and model_family(config).text_padding == "longest"
    # AltCLIP's 18 position embeddings read 16 tokens.
    assert max_text_positions(config) == POSITIONS

    # Partial locking: the embeddings and the bottom layer of each tower are locked, everything else trains.
    policy = TrainableParameters(model, trainable_layers={"vision": 1, "text": 1})
    trainable, total = policy.apply(model, step=0)
    for name, parameter in model.named_parameters():
        locked = name.startswith(locked_prefixes(family, "vision") + locked_prefixes(family, "text"))
        assert parameter.requires_grad is not locked, name
    assert 0 < trainable < total
    # Freezing a tower freezes all of it, its projection(s) included, and nothing of the other.
    TrainableParameters(model, frozen_towers=["text"]).apply(model, step=0)
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters() if name.startswith(("text_model.", "text_projection."))}
    assert "text_projection.weight" in frozen and ("text_model.transformation.weight" in frozen) == (family == "altclip")

    # Layer-wise rates: 1 above the layers, decay per layer below, decay^3 for the embeddings.
    scales = layerwise_lr_scales(model, 0.5)
    named = dict(model.named_parameters())
    for tower in ("vision", "text"):
        top = [n for n in named if n.startswith(top_layer(family, tower))]
        bottom = [n for n in named if n.startswith(locked_prefixes(family, tower)[-1])]
        embeddings = [n for n in named if n.startswith(locked_prefixes(family, tower)[0])]
        assert top and bottom and embeddings
        assert {scales[id(named[n])] for n in top} == {0.5} and {scales[id(named[n])] for n in bottom} == {0.25}
        assert {scales[id(named[n])] for n in embeddings} == {0.125}
    assert scales[id(named["text_projection.weight"])] == scales[id(named["logit_scale"])] == 1.0


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_lora_targets_are_the_attention_projections_of_both_towers(family, family_dirs, tmp_path):
    from clip_trainer.lora import apply_lora

    model = AutoModel.from_pretrained(family_dirs[family])
    wrapped = apply_lora(model, CLIPTrainingArguments(output_dir=str(tmp_path), lora_rank=2))
    adapted = {name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A")}
    text_layers = top_layer(family, "text").removesuffix("1.")
    text_attention = ATTENTION["clip" if family == "metaclip_2" else "bert"]
    expected = {f"vision_model.encoder.layers.{i}.{name}" for i in (0, 1) for name in ATTENTION["clip"]}
    expected |= {f"{text_layers}{i}.{name}" for i in (0, 1) for name in text_attention}
    assert adapted == expected
    assert all(("lora_" in name) == parameter.requires_grad for name, parameter in wrapped.named_parameters())
