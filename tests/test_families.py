"""Beyond CLIPModel: a tiny SigLIP, SigLIP 2 and vision-text dual encoder, built from configs with no network,
train with their own loss, their recall rises, their outputs reload and run in the zero-shot pipeline, and the
existing guarantees (freezing, evaluation-only runs, cached accumulation, bad rows) hold for them."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, TINY_VISION, draw_shape, drop_option, set_option, shape_rows
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoProcessor,
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    pipeline,
)

from clip_trainer import run
from clip_trainer.run import main
from clip_trainer.tokenization import text_config_token_ids, train_caption_tokenizer

QUIET = ["--report_to", "none", "--dataloader_num_workers", "0", "--dataloader_persistent_workers", "false"]
# SigLIP's zero-shot pipeline pads prompts to 64 tokens, so its text model needs 64 positions.
SIGLIP_TEXT = {**TINY_TEXT, "max_position_embeddings": 64}


def write_config(path: Path, config) -> Path:
    path.write_text(config.to_json_string())
    return path


@pytest.fixture(scope="module")
def siglip_config(tmp_path_factory) -> Path:
    config = SiglipConfig(text_config=SIGLIP_TEXT, vision_config=TINY_VISION)
    return write_config(tmp_path_factory.mktemp("siglip") / "siglip-tiny.json", config)


@pytest.fixture(scope="module")
def siglip2_config(tmp_path_factory) -> Path:
    from transformers import Siglip2Config

    vision = {key: value for key, value in TINY_VISION.items() if key != "image_size"}
    config = Siglip2Config(text_config=SIGLIP_TEXT, vision_config={**vision, "num_patches": 16})
    return write_config(tmp_path_factory.mktemp("siglip2") / "siglip2-tiny.json", config)


def scratch_args(base_args: list[str], config: Path) -> list[str]:
    argv = list(base_args)
    index = argv.index("--model_name_or_path")
    return [*argv[:index], *argv[index + 2 :], "--config_name", str(config), "--tokenizer_vocab_size", "300"]


def evaluations(out: Path) -> list[dict]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "eval_t2i_recall@5" in entry]


def test_siglip_from_scratch_trains_with_its_sigmoid_loss_and_runs_in_the_pipeline(base_args, siglip_config, tmp_path):
    out = tmp_path / "out"
    main([*scratch_args(base_args, siglip_config), "--num_train_epochs", "8", "--eval_strategy", "epoch",
          "--eval_on_start", "true", "--learning_rate", "5e-3"])  # fmt: skip
    history = evaluations(out)
    start, end = history[0], history[-1]
    # The paper's start: t = 10, b = -10.
    assert start["eval_inverse_temperature"] == pytest.approx(10.0) and start["eval_logit_bias"] == pytest.approx(-10)
    assert end["eval_t2i_recall@5"] > start["eval_t2i_recall@5"] + 0.1, (start, end)
    assert end["eval_loss"] < start["eval_loss"]

    model = AutoModel.from_pretrained(out)
    assert isinstance(model, SiglipModel)
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor.image_processor, SiglipImageProcessorPil)
    classifier = pipeline("zero-shot-image-classification", model=str(out))
    predictions = classifier(
        draw_shape("red", "circle"), candidate_labels=["a red circle on white", "a blue square on white"]
    )
    assert {p["label"] for p in predictions} == {"a red circle on white", "a blue square on white"}

    card = (out / "README.md").read_text()
    assert "[SigLIP](https://huggingface.co/docs/transformers/model_doc/siglip)" in card
    assert "SigLIP's sigmoid loss" in card and "siglip" in card.split("---", 2)[1]


def test_siglip_freezing_and_an_evaluation_only_run(base_args, siglip_config, tmp_path):
    trained = tmp_path / "trained"
    main([*scratch_args(base_args, siglip_config), "--output_dir", str(trained), "--max_steps", "3",
          "--freeze_vision_model", "true"])  # fmt: skip
    results = main(["--model_name_or_path", str(trained), "--validation_file", base_args[3], "--do_eval",
                    "--output_dir", str(tmp_path / "eval"), "--use_cpu", "true", *QUIET])  # fmt: skip
    assert results["eval_samples"] == 72 and "eval_t2i_recall@10" in results
    # Frozen: the vision tower, its attention-pooling head included, is bit-identical to the new model's (the same
    # seed with a zero learning rate gives the initial weights).
    main([*scratch_args(base_args, siglip_config), "--output_dir", str(tmp_path / "one"), "--max_steps", "1",
          "--learning_rate", "0"])  # fmt: skip
    initial, after = (
        load_file(str(tmp_path / "one" / "model.safetensors")),
        load_file(str(trained / "model.safetensors")),
    )
    vision = [key for key in initial if key.startswith("vision_model.")]
    text = [key for key in initial if key.startswith("text_model.")]
    assert any("head" in key for key in vision)
    assert all(torch.equal(initial[key], after[key]) for key in vision)
    assert any(not torch.equal(initial[key], after[key]) for key in text)


def test_siglip_sigmoid_loss_equals_the_models_own(base_args, siglip_config, tmp_path):
    """What SiglipModel(return_loss=True) computes on one process is the loss the trainer logs for the batch."""
    from conftest import build_trainer

    config = SiglipConfig.from_json_file(str(siglip_config))
    tokenizer = train_caption_tokenizer([c for *_, c in shape_rows()] * 4, vocab_size=300, model_max_length=64)
    for key, value in text_config_token_ids(tokenizer).items():
        setattr(config.text_config, key, value)
    folder = tmp_path / "siglip"
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(folder)
    from transformers import SiglipProcessor

    SiglipProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(folder)
    trainer = build_trainer(tmp_path, folder, Path(base_args[3]))
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, batch)
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        pixels = trainer.image_preprocessor.normalize(batch["pixel_values"])
        theirs = trainer.model(**inputs, pixel_values=pixels, return_loss=True).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.slow  # two runs, about 6 s
def test_siglip2_naflex_trains_and_reloads(base_args, siglip2_config, tmp_path):
    out = tmp_path / "out"
    main([*scratch_args(base_args, siglip2_config), "--max_steps", "3", "--eval_strategy", "steps",
          "--eval_steps", "3", "--do_train", "true", "--do_eval", "true"])  # fmt: skip
    from transformers import AutoTokenizer, Siglip2Model

    assert isinstance(AutoModel.from_pretrained(out), Siglip2Model)
    trained = json.loads((out / "eval_results.json").read_text())
    assert "eval_t2i_recall@1" in trained
    # transformers loads a SigLIP 2 folder's tokenizer as `Siglip2Tokenizer` whatever it was saved as: the caption
    # tokenizer trained for it is one, and encodes (a byte-level one could not encode a caption once reloaded).
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(tokenizer).__name__ == "Siglip2Tokenizer"
    ids = tokenizer("a red circle on white, café")["input_ids"]
    assert ids and tokenizer.unk_token_id not in ids
    # The folder evaluated on its own scores as the run did: the same tokens for the same captions.
    argv = drop_option(scratch_args(base_args, siglip2_config), "config_name")
    again = main([*set_option(argv, "output_dir", str(tmp_path / "again")), "--model_name_or_path", str(out),
                  "--do_eval"])  # fmt: skip
    for key in ("eval_t2i_recall@1", "eval_i2t_recall@5", "eval_loss"):
        assert again[key] == pytest.approx(trained[key], abs=1e-6), key


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny CLIP vision tower and a tiny BERT with the captions' tokenizer, saved as separate models."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    vision.save_pretrained(root / "vision")
    from transformers import CLIPImageProcessorPil

    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "vision"
    )
    tokenizer = train_caption_tokenizer([c for *_, c in shape_rows()] * 4, vocab_size=300, model_max_length=16)
    ids = text_config_token_ids(tokenizer)
    bert = BertModel(
        BertConfig(
            vocab_size=ids["vocab_size"], pad_token_id=ids["pad_token_id"], max_position_embeddings=16, **TINY_TEXT
        )
    )
    bert.save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    return root / "vision", root / "text"


def joined_towers_args(base_args: list[str], tower_dirs: tuple[Path, Path]) -> list[str]:
    """`base_args` with the two towers to join (new projections of 16) in place of `model_name_or_path`."""
    vision, text = tower_dirs
    index = base_args.index("--model_name_or_path")
    return [*base_args[:index], *base_args[index + 2 :], "--vision_model_name_or_path", str(vision),
            "--text_model_name_or_path", str(text), "--projection_dim", "16"]  # fmt: skip


def test_a_dual_encoder_from_two_towers_trains_reloads_and_classifies(base_args, tower_dirs, tmp_path):
    argv = joined_towers_args(base_args, tower_dirs)
    out = tmp_path / "out"
    main([*argv, "--num_train_epochs", "6", "--eval_strategy", "epoch", "--eval_on_start", "true"])
    history = evaluations(out)
    assert history[-1]["eval_t2i_recall@5"] > history[0]["eval_t2i_recall@5"] + 0.1
    from transformers import VisionTextDualEncoderModel

    model = VisionTextDualEncoderModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    # The zero-shot pipeline has no auto class for dual encoders: it takes the loaded model (documented).
    classifier = pipeline("zero-shot-image-classification", model=model, tokenizer=processor.tokenizer,
                          image_processor=processor.image_processor)  # fmt: skip
    predictions = classifier(draw_shape("red", "circle"), candidate_labels=["a red circle on white", "a blue square on white"],
                             hypothesis_template="{}")  # fmt: skip
    assert abs(sum(p["score"] for p in predictions) - 1) < 1e-4
    # Training the whole model from the saved dual encoder continues as it would for CLIP.
    main([*base_args[:1], str(out), *base_args[2:], "--max_steps", "2", "--output_dir", str(tmp_path / "again")])
    # LoRA's default targets are the attention projections of both towers, BERT's `query`, `key`, `value` and
    # attention output included.
    if importlib.util.find_spec("peft") is not None:
        main([*base_args[:1], str(out), *base_args[2:], "--max_steps", "2", "--output_dir", str(tmp_path / "lora"),
              "--lora_rank", "2"])  # fmt: skip
        from safetensors import safe_open

        with safe_open(str(tmp_path / "lora" / "adapter" / "adapter_model.safetensors"), "pt") as adapter:
            names = list(adapter.keys())
        for module in ("self_attn.q_proj", "self_attn.out_proj", "attention.self.query", "attention.self.value",
                       "attention.output.dense"):  # fmt: skip
            assert any(f"{module}.lora_A" in name for name in names), module
        in_the_mlp = [name for name in names if "intermediate.dense" in name
                      or ("output.dense" in name and "attention.output.dense" not in name)]  # fmt: skip
        assert in_the_mlp == []


def test_lora_and_wise_ft_on_two_towers_joined_in_the_run_are_refused(base_args, tower_dirs, capsys):
    # Their new projections start random: LoRA would keep them so, and there is no pretrained model to interpolate.
    argv = joined_towers_args(base_args, tower_dirs)
    assert run.cli([*argv, "--lora_rank", "4"]) == 2
    assert "two towers joined by new projections in this run, which LoRA would keep" in capsys.readouterr().err
    assert run.cli([*argv, "--wise_ft_alphas", "0.5", "--do_train", "--do_eval"]) == 2
    assert "two towers joined by new projections in this run, so there is no pretrained model" in (
        capsys.readouterr().err
    )


def test_a_sigmoid_loss_for_a_model_without_a_bias_is_refused(base_args, capsys):
    assert run.cli([*base_args, "--loss_type", "sigmoid"]) == 2
    message = capsys.readouterr().err
    assert "needs a learned `logit_bias`" in message and "CLIP model has none" in message


def test_a_whole_siglip_model_as_a_tower_is_refused(base_args, siglip_config, tower_dirs, tmp_path, capsys):
    folder = tmp_path / "siglip-model"
    SiglipModel(SiglipConfig.from_json_file(str(siglip_config))).save_pretrained(folder)
    argv = list(base_args)
    index = argv.index("--model_name_or_path")
    argv = [*argv[:index], *argv[index + 2 :], "--vision_model_name_or_path", str(folder),
            "--text_model_name_or_path", str(tower_dirs[1])]  # fmt: skip
    assert run.cli(argv) == 2
    assert "is a whole 'siglip' model" in capsys.readouterr().err


def test_the_sigmoid_inverse_temperature_is_not_clamped(base_args, siglip_config, tmp_path):
    """CLIP clamps t at 100; SigLIP checkpoints sit above it (t ~ 117), so the sigmoid loss leaves t alone."""
    from conftest import build_trainer

    main([*scratch_args(base_args, siglip_config), "--max_steps", "1", "--output_dir", str(tmp_path / "base")])
    model = SiglipModel.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(117.0))
    model.save_pretrained(tmp_path / "hot")
    AutoProcessor.from_pretrained(tmp_path / "base").save_pretrained(tmp_path / "hot")
    trainer = build_trainer(tmp_path, tmp_path / "hot", Path(base_args[3]), max_steps=1, learning_rate=1e-9)
    trainer.train()
    assert trainer.model.logit_scale.exp().item() == pytest.approx(117.0, rel=1e-4)
