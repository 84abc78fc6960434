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
from conftest import TINY_TEXT, TINY_VISION, build_trainer, draw_shape, needs_peft, shape_rows, write_shapes_csv
from PIL import Image
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
from clip_trainer.errors import ConfigError
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


def varied_captions_csv(folder: Path) -> Path:
    """The 24 shapes, with captions of 5 to 7 words, so that batches are padded."""
    path = write_shapes_csv(folder, repeats=1)
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for index, row in enumerate(rows):
            writer.writerow({**row, "caption": row["caption"] + " and white" * (index % 3)})
    return path


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
    assert frozen == {
        name for name, _ in model.named_parameters() if name.startswith(("text_model.", "text_projection."))
    }
    assert "text_projection.weight" in frozen and ("text_model.transformation.weight" in frozen) == (
        family == "altclip"
    )

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


@needs_peft
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


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trainers_loss_is_the_models_own_clip_loss(family, family_dirs, tmp_path):
    """What `Model(return_loss=True)` computes from the batch (each family's own contrastive loss, with its own text
    inputs) is the loss the trainer trains with, on captions of several lengths (padded)."""
    trainer = build_trainer(tmp_path, family_dirs[family], varied_captions_csv(tmp_path / "data"))
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, batch)
        pixels = trainer.image_preprocessor.normalize(batch["pixel_values"])
        theirs = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels, return_loss=True
        ).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    # Not a vacuous match: the batch has captions of several lengths, padded with the tokenizer's pad id.
    assert (batch["attention_mask"] == 0).any()


@pytest.mark.parametrize("size", [{"shortest_edge": 40}, {"height": 36, "width": 44}])
def test_chinese_clips_image_processor_is_followed_pixel_for_pixel(size):
    from test_preprocessing import assert_same_as_processor

    assert_same_as_processor(ChineseCLIPImageProcessorPil(size=size, crop_size={"height": 32, "width": 32}))


# --- By the command, as a user runs it (slow: each trains) ------------------------------------------------------------


def user_folder(tmp_path: Path, monkeypatch, family_dir: Path) -> Path:
    """A user's working folder, the current one: the model in `model/`, 72 training pairs in `data/pairs.csv` and
    24 distinct pairs (one per caption) in `data/val.csv`."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(family_dir, tmp_path / "model")
    write_shapes_csv(tmp_path / "data", repeats=3)
    write_shapes_csv(tmp_path / "data", repeats=1, name="val.csv")
    return tmp_path


def run_args(*extra: str) -> list[str]:
    return ["--model_name_or_path", "model", "--train_file", "data/pairs.csv", "--output_dir", "out",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32", "--warmup_steps", "0",
            "--lr_scheduler_type", "constant", "--weight_decay", "0", "--save_strategy", "no", "--use_cpu", "true",
            "--seed", "1", *QUIET, *extra]  # fmt: skip


def independent_metrics(folder: str, pairs: Path) -> dict[str, float]:
    """The loss and recall@k of the saved model on `pairs` (one image per caption) in float64, from the processor's
    own inputs (not clip-trainer's uint8 path), ranked with numpy; a tie counts against the positive."""
    rows = list(csv.DictReader(pairs.open()))
    model = AutoModel.from_pretrained(folder).double().eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(images=[Image.open(pairs.parent / row["image"]) for row in rows],
                       text=[row["caption"] for row in rows], padding=True, return_tensors="pt")  # fmt: skip
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        outputs = model(**inputs, return_loss=True)
    scores = (outputs.text_embeds @ outputs.image_embeds.T).numpy()  # (captions, images), the diagonal positive
    positives = np.diag(scores)
    # Rank = how many scores reach the positive's, itself included (so a tie ranks it lower).
    t2i_ranks = (scores >= positives[:, None]).sum(axis=1)
    i2t_ranks = (scores >= positives[None, :]).sum(axis=0)
    metrics = {"eval_loss": outputs.loss.item()}
    for k in (1, 5, 10):
        metrics[f"eval_t2i_recall@{k}"] = float(np.mean(t2i_ranks <= k))
        metrics[f"eval_i2t_recall@{k}"] = float(np.mean(i2t_ranks <= k))
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_trains_evaluates_and_documents_itself_by_the_command(family, family_dirs, tmp_path, monkeypatch):
    user_folder(tmp_path, monkeypatch, family_dirs[family])
    main(run_args("--validation_file", "data/val.csv", "--learning_rate", "5e-3", "--num_train_epochs", "5",
                  "--eval_strategy", "epoch", "--eval_on_start", "true"))  # fmt: skip
    state = json.loads(Path("out/trainer_state.json").read_text())
    history = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"] - 0.3, history
    assert history[-1]["eval_mean_recall"] > history[0]["eval_mean_recall"], history

    # The saved folder is the family's model and processor; its final metrics are those of an independent
    # computation on the same 24 pairs (one batch, so the loss is the model's own over all of them).
    assert type(AutoModel.from_pretrained("out")) is MODEL_CLASSES[family]
    assert type(AutoProcessor.from_pretrained("out")) is PROCESSOR_CLASSES[family]
    results = json.loads(Path("out/eval_results.json").read_text())
    expected = independent_metrics("out", tmp_path / "data" / "val.csv")
    assert results["eval_loss"] == pytest.approx(expected.pop("eval_loss"), rel=1e-4)
    assert {key: results[key] for key in expected} == pytest.approx(expected, abs=1e-12)
    assert 0 < expected["eval_t2i_recall@1"] < 1  # not a vacuous match

    # The card names the family and its loss, and its usage code runs from the working folder.
    card = Path("out/README.md").read_text()
    name, docs = {"metaclip_2": ("MetaCLIP 2", "metaclip_2"), "chinese_clip": ("Chinese-CLIP", "chinese_clip"),
                  "altclip": ("AltCLIP", "altclip")}[family]  # fmt: skip
    assert f"[{name}](https://huggingface.co/docs/transformers/model_doc/{docs})" in card
    assert "CLIP's contrastive" in card or "softmax" in card
    draw_shape("red", "circle").save("cat.jpg")
    draw_shape("blue", "square").save("dog.jpg")
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    assert len(blocks) == 2 and all(f"max_length={POSITIONS}" in block for block in blocks)
    namespace: dict = {}
    exec(blocks[0], namespace)
    assert float(namespace["scores"].sum()) == pytest.approx(1.0, abs=1e-5)
    exec(blocks[1].replace('"a photo of a cat"', repr("a red circle on white " * 8)), namespace)
    assert tuple(namespace["similarity"].shape) == (2, 2)
    classifier = pipeline("zero-shot-image-classification", model="out")
    # (The pipeline does not truncate, as the card says: the bare labels fit the tiny tower's 16 positions.)
    predictions = classifier(
        draw_shape("red", "circle"), candidate_labels=["red circle", "blue square"], hypothesis_template="{}"
    )
    assert {p["label"] for p in predictions} == {"red circle", "blue square"}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_partial_locking_by_the_command_keeps_each_towers_lower_layers(family, family_dirs, tmp_path, monkeypatch):
    user_folder(tmp_path, monkeypatch, family_dirs[family])
    main(run_args("--learning_rate", "5e-3", "--max_steps", "3", "--vision_trainable_layers", "1",
                  "--text_trainable_layers", "1", "--eval_strategy", "no"))  # fmt: skip
    # Compared as loaded (transformers may save some families' weights under their checkpoints' older names).
    before, after = AutoModel.from_pretrained("model").state_dict(), AutoModel.from_pretrained("out").state_dict()
    assert before.keys() == after.keys()
    for tower in ("vision", "text"):
        locked = [key for key in before if key.startswith(locked_prefixes(family, tower))]
        top = [key for key in before if key.startswith(top_layer(family, tower)) and key.endswith(".weight")]
        assert locked and top
        assert all(torch.equal(before[key], after[key]) for key in locked), tower
        assert all(not torch.equal(before[key], after[key]) for key in top), tower
    assert not torch.equal(before["text_projection.weight"], after["text_projection.weight"])


@pytest.mark.slow
@needs_peft
def test_lora_by_the_command_adapts_chinese_clips_bert_text_tower(family_dirs, tmp_path, monkeypatch, caplog):
    """The default targets reach BERT's `query`/`key`/`value`: the merged text tower's attention changed, its MLP
    did not."""
    user_folder(tmp_path, monkeypatch, family_dirs["chinese_clip"])
    main(run_args("--learning_rate", "1e-2", "--max_steps", "3", "--lora_rank", "4", "--eval_strategy", "no"))
    settings = json.loads(Path("out/adapter/adapter_config.json").read_text())
    assert {"query", "key", "value", "q_proj", "v_proj"} <= set(settings["target_modules"])
    # Compared as loaded (transformers may save some families' weights under their checkpoints' older names).
    before, after = AutoModel.from_pretrained("model").state_dict(), AutoModel.from_pretrained("out").state_dict()
    layer = "text_model.encoder.layer.1."
    assert not torch.equal(before[f"{layer}attention.self.query.weight"], after[f"{layer}attention.self.query.weight"])
    assert torch.equal(before[f"{layer}intermediate.dense.weight"], after[f"{layer}intermediate.dense.weight"])
    assert torch.equal(before["text_projection.weight"], after["text_projection.weight"])

    # Targets that name only CLIP's projections leave BERT without adapters, and the run says so.
    caplog.set_level(logging.WARNING)
    main(run_args("--max_steps", "1", "--lora_rank", "4", "--lora_target_modules", "q_proj", "v_proj",
                  "--eval_strategy", "no", "--output_dir", "out2"))  # fmt: skip
    assert "match no module of the text tower" in caplog.text


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime", "onnxscript")),
    reason='pip install "clip-trainer[onnx]"',
)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_onnx_graphs_serve_the_models_embeddings(family, family_dirs, tmp_path, monkeypatch):
    """Exported by the command; served from the exported folder alone (its processor files, the graphs) on real
    captions and images, the embeddings are the PyTorch model's."""
    import onnxruntime

    from clip_trainer.cli import main as clip_trainer

    user_folder(tmp_path, monkeypatch, family_dirs[family])
    assert clip_trainer(["export-onnx", "model", "--output_dir", "onnx"]) == 0
    processor = AutoProcessor.from_pretrained("onnx")
    images = [draw_shape("red", "circle"), draw_shape("blue", "square", "black"), draw_shape("green", "triangle")]
    captions = ["a red circle", "a blue square on black and more words here", "triangle"]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    text = processor(text=captions, padding=True, truncation=True, max_length=POSITIONS, return_tensors="pt")
    vision = onnxruntime.InferenceSession("onnx/vision_model.onnx", providers=["CPUExecutionProvider"])
    text_graph = onnxruntime.InferenceSession("onnx/text_model.onnx", providers=["CPUExecutionProvider"])
    (image_embeds,) = vision.run(None, {"pixel_values": pixels.numpy()})
    (text_embeds,) = text_graph.run(
        None, {"input_ids": text["input_ids"].numpy(), "attention_mask": text["attention_mask"].numpy()}
    )
    model = AutoModel.from_pretrained("model").eval()
    with torch.no_grad():
        expected_images = model.get_image_features(pixel_values=pixels).pooler_output
        expected_texts = model.get_text_features(**text).pooler_output  # Chinese-CLIP's token_type_ids included
    assert (text["attention_mask"] == 0).any()
    torch.testing.assert_close(torch.from_numpy(image_embeds), expected_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(text_embeds), expected_texts, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_built_from_scratch_by_the_command(family, tmp_path, monkeypatch):
    """`config_name` alone: the family's processor with a caption tokenizer trained on the data, cut to the positions
    the text tower reads (AltCLIP: 2 fewer than its 18 embeddings)."""
    monkeypatch.chdir(tmp_path)
    write_shapes_csv(tmp_path / "data", repeats=1)
    config_class = {"metaclip_2": MetaClip2Config, "chinese_clip": ChineseCLIPConfig, "altclip": AltCLIPConfig}[family]
    text = {**TINY_TEXT, "max_position_embeddings": 18, **({"project_dim": 16} if family == "altclip" else {})}
    Path("tiny.json").write_text(config_class(text_config=text, vision_config=TINY_VISION).to_json_string())
    arguments = run_args("--max_steps", "2", "--eval_strategy", "no")
    index = arguments.index("--model_name_or_path")
    main([*arguments[:index], *arguments[index + 2 :], "--config_name", "tiny.json", "--tokenizer_vocab_size", "300"])
    assert type(AutoModel.from_pretrained("out")) is MODEL_CLASSES[family]
    processor = AutoProcessor.from_pretrained("out")
    assert type(processor) is PROCESSOR_CLASSES[family]
    assert processor.tokenizer.model_max_length == (16 if family == "altclip" else 18)
    if family == "chinese_clip":
        assert type(processor.image_processor) is ChineseCLIPImageProcessorPil


def test_altclip_positions_are_the_tokens_it_reads(family_dirs, tmp_path, monkeypatch):
    """AltCLIP's RoBERTa reads 2 fewer tokens than its table has rows: a `max_seq_length` above those tokens is
    refused with the number it can take (16), not the table's rows (18), which would crash at the first step."""
    user_folder(tmp_path, monkeypatch, family_dirs["altclip"])
    for length in ("17", "18"):
        with pytest.raises(ConfigError, match="above the text model's 16 positions.*set it to 16 or less") as error:
            main(run_args("--max_steps", "1", "--eval_strategy", "no", "--max_seq_length", length))
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_altclip_built_from_scratch_reads_captions_of_max_seq_length(tmp_path, monkeypatch):
    """A new AltCLIP with `--max_seq_length 24` (its config has 18 rows): built with 24 + pad id + 1 rows, it trains
    on captions of 24 tokens (an index error at the first step when it had only 24 rows)."""
    monkeypatch.chdir(tmp_path)
    csv = write_shapes_csv(tmp_path / "data", repeats=1)
    lines = csv.read_text().splitlines()
    long = [",".join([path, caption + " " + " ".join([caption] * 6), label])
            for path, caption, label in (line.split(",") for line in lines[1:])]  # fmt: skip
    csv.write_text("\n".join([lines[0], *long]) + "\n")
    text = {**TINY_TEXT, "max_position_embeddings": 18, "project_dim": 16}
    Path("tiny.json").write_text(AltCLIPConfig(text_config=text, vision_config=TINY_VISION).to_json_string())
    arguments = run_args("--max_steps", "2", "--eval_strategy", "no", "--max_seq_length", "24")
    index = arguments.index("--model_name_or_path")
    main([*arguments[:index], *arguments[index + 2 :], "--config_name", "tiny.json", "--tokenizer_vocab_size", "300"])
    model = AutoModel.from_pretrained("out")
    text_config = model.config.text_config
    assert text_config.max_position_embeddings == 24 + text_config.pad_token_id + 1
    processor = AutoProcessor.from_pretrained("out")
    assert processor.tokenizer.model_max_length == 24
    assert len(processor.tokenizer([long[0].split(",")[1]], truncation=True)["input_ids"][0]) == 24
