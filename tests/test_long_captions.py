"""Long captions: `max_seq_length` above the text positions stretches them (Long-CLIP); the saved files say so."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLORS, SHAPES, TINY_TEXT, TINY_VISION, draw_shape
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    BertConfig,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    ModernBertConfig,
    ModernBertModel,
    RobertaConfig,
    SiglipConfig,
    SiglipModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)

from clip_trainer import run
from clip_trainer.arguments import DataArguments, ModelArguments
from clip_trainer.errors import ConfigError
from clip_trainer.modeling import load_model
from clip_trainer.positions import check_positions_extendable, extend_text_positions, stretch_position_table
from clip_trainer.tokenization import text_config_token_ids, train_caption_tokenizer
from clip_trainer.validation import check_training_arguments

TINY_VISION_TOWER = {**TINY_VISION, "num_hidden_layers": 1}


def long_clip_positions(old: np.ndarray, length: int, keep: int = 20) -> np.ndarray:
    """The stretching written out: rows below `keep` as they are, row p >= keep read at
    keep + (p - keep) * (rows - keep) / (length - keep), by np.interp of each column; past the last row, the line
    through the last two rows continued (np.interp would hold the last value there)."""
    rows = old.shape[0]
    position = np.arange(length, dtype=np.float64)
    at = np.where(position < keep, position, keep + (position - keep) * (rows - keep) / (length - keep))
    new = np.stack([np.interp(at, np.arange(rows), old[:, column]) for column in range(old.shape[1])], axis=1)
    tail = at > rows - 1
    new[tail] = old[-1] + (at[tail] - (rows - 1))[:, None] * (old[-1] - old[-2])
    return new


def test_stretching_keeps_20_rows_and_interpolates_the_rest_in_float64():
    old = np.random.default_rng(0).normal(size=(77, 6))
    new = stretch_position_table(torch.from_numpy(old), 120).numpy()
    assert new.shape == (120, 6) and new.dtype == np.float64
    np.testing.assert_array_equal(new[:20], old[:20])
    np.testing.assert_allclose(new, long_clip_positions(old, 120), rtol=0, atol=1e-12)
    # Row 119 reads old position 20 + 99 * 57 / 100 = 76.43, past the last row: the last line continued, not held.
    np.testing.assert_allclose(new[119], old[76] + 0.43 * (old[76] - old[75]), atol=1e-12)


def test_stretching_to_248_is_long_clip_four_times():
    """Long-CLIP's released model: 77 -> 248 positions, each of rows 20..76 followed by three quarter-steps."""
    old = np.random.default_rng(1).normal(size=(77, 4))
    new = stretch_position_table(torch.from_numpy(old), 248).numpy()
    expected = np.zeros((248, 4))
    expected[:20] = old[:20]
    for i in range(56):
        for j in range(4):
            expected[20 + 4 * i + j] = old[20 + i] + j / 4 * (old[21 + i] - old[20 + i])
    for j in range(4):
        expected[244 + j] = old[76] + j / 4 * (old[76] - old[75])
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-12)


def tiny_clip(positions: int = 77, vocab: int = 100, eos_token_id: int = 99) -> CLIPModel:
    text = {**TINY_TEXT, "num_hidden_layers": 1, "max_position_embeddings": positions, "vocab_size": vocab}
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config={**text, "eos_token_id": eos_token_id}, vision_config=TINY_VISION_TOWER))


# CLIP pools at the first eos token, or (a config's eos id 2: OpenAI's checkpoints) at the highest id of the caption.
@pytest.mark.parametrize("eos_token_id", [99, 2], ids=["eos-pooling", "argmax-pooling"])
def test_extended_clip_reads_the_new_length_and_keeps_short_captions_as_they_were(eos_token_id):
    model = tiny_clip(eos_token_id=eos_token_id).eval()
    short = torch.randint(1, 98, (3, 15))
    short[:, -1] = 99
    before = model.get_text_features(input_ids=short).pooler_output
    old_table = model.text_model.embeddings.position_embedding.weight.detach().clone()
    assert extend_text_positions(model, 120)
    embeddings = model.text_model.embeddings
    assert embeddings.position_embedding.weight.shape == (120, 32)
    torch.testing.assert_close(embeddings.position_embedding.weight[:20], old_table[:20], rtol=0, atol=0)
    assert torch.equal(embeddings.position_ids, torch.arange(120).unsqueeze(0))
    assert model.config.text_config.max_position_embeddings == 120
    # A causal tower reads a 15-token caption with the 20 kept positions only: the same embedding.
    torch.testing.assert_close(model.get_text_features(input_ids=short).pooler_output, before, rtol=0, atol=0)
    # A caption ending at position 110 of a batch padded to 120: pooled at its end, past the old 77 positions.
    long = torch.randint(1, 98, (2, 120))
    long[:, 110] = 99
    long[:, 111:] = 0
    mask = (torch.arange(120) <= 110).long().expand(2, -1)
    with torch.no_grad():
        hidden = model.text_model(input_ids=long, attention_mask=mask)
    torch.testing.assert_close(hidden.pooler_output, hidden.last_hidden_state[:, 110], rtol=0, atol=0)
    assert model.get_text_features(input_ids=long, attention_mask=mask).pooler_output.shape == (2, 512)
    assert not extend_text_positions(model, 100)  # already long enough: nothing changes


def test_siglip_and_a_bert_tower_are_extended_with_their_buffers():
    siglip = SiglipModel(
        SiglipConfig(text_config={**TINY_TEXT, "max_position_embeddings": 64}, vision_config=TINY_VISION_TOWER)
    )
    extend_text_positions(siglip, 100)
    assert siglip.text_model.embeddings.position_embedding.num_embeddings == 100
    assert siglip.get_text_features(input_ids=torch.ones(2, 100, dtype=torch.long)).pooler_output.shape[0] == 2

    bert = BertConfig(**TINY_TEXT, max_position_embeddings=40, vocab_size=50)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(CLIPVisionConfig(**TINY_VISION_TOWER), bert)
    dual = VisionTextDualEncoderModel(config)
    extend_text_positions(dual, 64)
    embeddings = dual.text_model.embeddings
    assert embeddings.position_embeddings.num_embeddings == 64
    assert torch.equal(embeddings.position_ids, torch.arange(64).unsqueeze(0))
    assert embeddings.token_type_ids.shape == (1, 64) and not embeddings.token_type_ids.any()
    assert dual.get_text_features(input_ids=torch.ones(2, 64, dtype=torch.long)).pooler_output.shape[0] == 2


def dual_config(text) -> VisionTextDualEncoderConfig:
    return VisionTextDualEncoderConfig.from_vision_text_configs(CLIPVisionConfig(**TINY_VISION_TOWER), text)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            dual_config(ModernBertConfig(**TINY_TEXT, max_position_embeddings=64)),
            r"'vision-text-dual-encoder' model's text tower \('modernbert'\) has no learned",
        ),
        (
            dual_config(RobertaConfig(**TINY_TEXT, max_position_embeddings=66)),
            "numbers its positions from the padding",
        ),
        (
            CLIPConfig(text_config={**TINY_TEXT, "max_position_embeddings": 16}),
            "'clip' model's text tower has only 16",
        ),
    ],
    ids=["rotary", "roberta-offset", "too-few-positions"],
)
def test_towers_without_a_stretchable_table_are_refused_before_any_weight(config, expected):
    with pytest.raises(ConfigError, match=expected) as error:
        check_positions_extendable(config, 100)
    positions = config.text_config.max_position_embeddings
    # RoBERTa numbers its tokens after the padding id (1): 66 rows read 64 tokens, the length the message offers.
    readable = positions - 2 if config.text_config.model_type == "roberta" else positions
    assert "`max_seq_length` is 100" in str(error.value) and f"set it to {readable} or less" in str(error.value)
    check_positions_extendable(config, readable, readable_positions=readable)  # within them: nothing to extend


def test_a_trainer_given_a_short_model_names_the_extension():
    config = CLIPConfig(text_config={**TINY_TEXT, "max_position_embeddings": 77})
    from clip_trainer.arguments import CLIPTrainingArguments

    args = CLIPTrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match=r"extend_text_positions\(model, 120, processor.tokenizer\)"):
        check_training_arguments(DataArguments(max_seq_length=120), args, config)


def test_a_new_model_is_built_at_the_longer_length(tmp_path):
    tokenizer = train_caption_tokenizer(["a red circle", "a blue square"] * 4, vocab_size=280, model_max_length=16)
    config = CLIPConfig(text_config={**TINY_TEXT, "max_position_embeddings": 16}, vision_config=TINY_VISION_TOWER)
    (tmp_path / "config.json").write_text(config.to_json_string())
    model = load_model(ModelArguments(config_name=str(tmp_path / "config.json")), config, tokenizer, max_seq_length=40)
    assert model.text_model.embeddings.position_embedding.num_embeddings == 40
    assert model.config.text_config.max_position_embeddings == 40 and tokenizer.model_max_length == 40
    assert config.text_config.max_position_embeddings == 16  # the caller's config is left as it was


def test_the_command_refuses_a_rotary_text_tower_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION_TOWER)).save_pretrained("vision")
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2}
    text = ModernBertConfig(**TINY_TEXT, **ids, vocab_size=300, max_position_embeddings=64)
    ModernBertModel(text).save_pretrained("text")
    Path("pairs.csv").write_text("image,caption\nmissing.png,a caption\n")
    capsys.readouterr()  # the saves' progress bars
    status = run.cli(["--vision_model_name_or_path", "vision", "--text_model_name_or_path", "text",
                      "--train_file", "pairs.csv", "--output_dir", "out", "--max_seq_length", "100",
                      "--report_to", "none", "--use_cpu", "true"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "this 'vision-text-dual-encoder' model's text tower ('modernbert') has no learned table" in err
    assert "set it to 64 or less" in err
    assert not Path("out").exists() or not any(Path("out").iterdir())


# --- a run on captions longer than CLIP's 77 tokens ------------------------------------------------------------------

FILLER = " ".join(["with", "some", "more", "words", "about", "the", "picture"] * 11)


def long_caption(color: str, shape: str, background: str) -> str:
    """Past CLIP's 77 tokens: the words that tell the pairs apart come after a long common beginning."""
    return f"a picture {FILLER} of a {color} {shape} on {background}"


def write_long_pairs(folder: Path, backgrounds: tuple[str, ...], name: str) -> Path:
    (folder / "images").mkdir(exist_ok=True)
    path = folder / name
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for color in COLORS:
            for shape in SHAPES:
                for background in backgrounds:
                    file = f"images/{color}_{shape}_{background}.png"
                    draw_shape(color, shape, background, size=32).save(folder / file)
                    writer.writerow([file, long_caption(color, shape, background)])
    return path


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A tiny CLIP with 77 positions, fine-tuned by the command with `--max_seq_length 120` on long captions."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    folder = tmp_path_factory.mktemp("long-captions")
    captions = [long_caption(c, s, b) for c in COLORS for s in SHAPES for b in ("white", "black")]
    tokenizer = train_caption_tokenizer(captions * 4, vocab_size=320, model_max_length=77)
    config = CLIPConfig(
        text_config={**TINY_TEXT, "max_position_embeddings": 77, **text_config_token_ids(tokenizer)},
        vision_config=TINY_VISION,
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder / "clip77")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder / "clip77")
    write_long_pairs(folder, ("white",), "train.csv")
    write_long_pairs(folder, ("black",), "validation.csv")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        run.main(["--model_name_or_path", "clip77", "--train_file", "train.csv", "--validation_file",
                  "validation.csv", "--max_seq_length", "120", "--output_dir", "out", "--num_train_epochs", "1",
                  "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16", "--learning_rate",
                  "1e-3", "--eval_strategy", "no", "--do_train", "true", "--do_eval", "true", "--save_strategy", "no",
                  "--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu", "true", "--seed", "3",
                  "--export_onnx", "true"])  # fmt: skip
    return folder


def encode(model, processor, captions: list[str], images, truncate_to: int | None = None):
    text = processor.tokenizer(captions, padding="longest", truncation=True, return_tensors="pt")
    if truncate_to is not None:  # what a 77-position CLIP reads: the first tokens, closed by the eos token
        ids = text["input_ids"][:, :truncate_to].clone()
        ids[:, -1] = processor.tokenizer.eos_token_id
        text = {"input_ids": ids, "attention_mask": text["attention_mask"][:, :truncate_to]}
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        texts = model.get_text_features(**text).pooler_output
        image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
    return torch.nn.functional.normalize(image_embeds, dim=-1), torch.nn.functional.normalize(texts, dim=-1)


def validation_pairs(folder: Path):
    from PIL import Image

    with (folder / "validation.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return [row["caption"] for row in rows], [Image.open(folder / row["image"]).convert("RGB") for row in rows]


@pytest.mark.slow  # a fine-tuning run and an ONNX export, about 15 s on 2 cores
def test_run_with_long_captions_saves_a_model_that_reads_120_tokens(long_run):
    from transformers import AutoProcessor

    out = long_run / "out"
    saved = json.loads((out / "config.json").read_text())
    assert saved["text_config"]["max_position_embeddings"] == 120
    model = CLIPModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    assert processor.tokenizer.model_max_length == 120
    captions, images = validation_pairs(long_run)
    lengths = [len(ids) for ids in processor.tokenizer(captions, truncation=True)["input_ids"]]
    untruncated = [len(ids) for ids in processor.tokenizer(captions)["input_ids"]]
    assert lengths == untruncated and 77 < min(lengths) and max(lengths) <= 120

    image_embeds, text_embeds = encode(model, processor, captions, images)
    _, truncated = encode(model, processor, captions, images, truncate_to=77)
    assert (text_embeds - truncated).abs().max() > 1e-3  # the tokens past 77 change the embedding

    # The run's own evaluation of the validation pairs, recomputed from the saved folder: CLIP's loss over the one
    # batch, and text-to-image recall@1.
    results = json.loads((out / "eval_results.json").read_text())
    logits = model.logit_scale.exp() * image_embeds @ text_embeds.T
    targets = torch.arange(len(captions))
    loss = (
        torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)
    ) / 2
    assert results["eval_loss"] == pytest.approx(loss.item(), rel=1e-4)
    recall = (logits.T.argmax(dim=1) == targets).float().mean().item()
    assert results["eval_t2i_recall@1"] == pytest.approx(recall, abs=1e-6)

    # The ONNX text graph, exported by the run, reads the 120 tokens as PyTorch does.
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "onnx" / "text_model.onnx"))
    tokens = processor.tokenizer(captions, padding="longest", return_tensors="np")
    (onnx_embeds,) = session.run(None, {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    onnx_embeds = torch.nn.functional.normalize(torch.from_numpy(onnx_embeds), dim=-1)
    torch.testing.assert_close(onnx_embeds, text_embeds, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # two short runs, about 10 s on 2 cores
def test_a_run_with_extended_positions_resumes_from_its_checkpoint(long_run, monkeypatch):
    """The stretch is redone on the pretrained model at the restart, and the checkpoint's 120-row table replaces it."""
    from safetensors.torch import load_file

    monkeypatch.chdir(long_run)
    argv = ["--model_name_or_path", "clip77", "--train_file", "train.csv", "--max_seq_length", "120",
            "--output_dir", "resumed", "--per_device_train_batch_size", "4", "--save_strategy", "steps",
            "--save_steps", "2", "--eval_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
            "--use_cpu", "true", "--seed", "3"]  # fmt: skip
    run.main([*argv, "--max_steps", "2"])
    checkpoint = load_file("resumed/checkpoint-2/model.safetensors")
    table = checkpoint["text_model.embeddings.position_embedding.weight"]
    assert table.shape[0] == 120
    run.main([*argv, "--max_steps", "3", "--resume_from_checkpoint", "true", "--overwrite_output_dir", "false"])
    state = json.loads(Path("resumed/checkpoint-3/trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert json.loads(Path("resumed/config.json").read_text())["text_config"]["max_position_embeddings"] == 120


def test_a_saved_tokenizer_and_processor_truncate_at_the_new_length(tmp_path):
    """A tokenizer that clip-trainer trained (its own truncation at 32 tokens, which transformers 5 saves again as
    `max_length` once reloaded) truncates at the extended length after a save and reload, through `AutoProcessor`
    too, which reads that `max_length`."""
    captions = [f"{color} {shape} on a plain background" for color in COLORS for shape in SHAPES]
    tokenizer = train_caption_tokenizer(captions * 3, vocab_size=300, model_max_length=32)
    tokenizer(captions, truncation=True, max_length=32)  # as a run's collator does: the backend keeps truncating at 32
    tokenizer.save_pretrained(tmp_path / "short")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "short")  # now with `max_length` 32 among its settings
    model = CLIPModel(CLIPConfig(text_config={**TINY_TEXT, "max_position_embeddings": 32,
                                              **text_config_token_ids(reloaded)},
                                 vision_config=TINY_VISION))  # fmt: skip
    extend_text_positions(model, 60, reloaded)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=reloaded)
    processor.save_pretrained(tmp_path / "long")
    long_caption_text = " ".join(captions[:12])
    for loaded in (AutoTokenizer.from_pretrained(tmp_path / "long"), AutoProcessor.from_pretrained(tmp_path / "long")):
        ids = loaded(text=[long_caption_text], truncation=True)["input_ids"][0]
        assert len(ids) == 60
