"""Every common consumer of a clip-trainer output folder loads it as it is and embeds as the trainer does.

Each consumer's token ids must equal the trainer's own collator's exactly, and its embeddings (L2-normalised) the
trainer's own (`embed_batch`, what evaluation measures) within 1e-5 for PyTorch consumers and 1e-4 for ONNX ones:
transformers 5 (`AutoModel`, `pipeline`), sentence-transformers, ONNX Runtime, transformers 4.57 (its own virtual
environment) and transformers.js (node). The other environments are made by .ci/run; a test skips, saying how to
make its environment, when it is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT, TINY_VISION, draw_shape, write_shapes_csv
from transformers import AutoModel, AutoProcessor

from clip_trainer.collator import ImageTextCollator
from clip_trainer.evaluation import embed_batch
from clip_trainer.modeling import model_family

TESTS = Path(__file__).parent
REPOSITORY = TESTS.parent
# The Python of an environment with transformers 4.57 (and torch, pillow); .ci/run makes `.venv-transformers4`.
TRANSFORMERS4_PYTHON = os.environ.get(
    "CLIP_TRAINER_TRANSFORMERS4_PYTHON", str(REPOSITORY / ".venv-transformers4" / "bin" / "python")
)
TRANSFORMERS_JS = TESTS / "js" / "node_modules" / "@huggingface" / "transformers"
NODE = shutil.which("node")
# Checked before the runs are trained, so that a missing environment costs nothing.
needs_transformers4 = pytest.mark.skipif(
    not os.access(TRANSFORMERS4_PYTHON, os.X_OK),
    reason=f"no transformers 4 environment at {TRANSFORMERS4_PYTHON}: python3 -m venv .venv-transformers4 && "
    '.venv-transformers4/bin/pip install torch==2.13.0 "transformers>=4.57,<5" pillow (as .ci/run does)',
)
needs_transformers_js = pytest.mark.skipif(
    NODE is None or not TRANSFORMERS_JS.is_dir(),
    reason="transformers.js is not installed: cd tests/js && npm ci (with node; as .ci/run does)",
)
needs_sentence_transformers = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None,
    reason='sentence-transformers is not installed: pip install -e ".[dev]"',
)
needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason='onnxruntime is not installed: pip install -e ".[onnx]"'
)

# The first word is where transformers 4.x's tokenizer would differ (its prefix space); then case, accents, a caption
# longer than every model's caption length (truncation keeps the end token), and one word.
CAPTIONS = [
    "a red circle on white",
    "A Blue SQUARE, on black",
    "café crème: naïve yellow triangle",
    " ".join(["green"] * 80),
]
SHAPES = [
    ("red", "circle", "white"),
    ("blue", "square", "black"),
    ("yellow", "triangle", "white"),
    ("green", "circle", "black"),
]


def run_with_export(folder: Path, csv: Path, config) -> Path:
    """A tiny model trained from scratch by the command in `folder` (3 steps, its own caption tokenizer), with its
    ONNX graphs; returns the output folder, as a user has it."""
    from clip_trainer import run

    (folder / "model.json").write_text(config.to_json_string())
    current = os.getcwd()
    os.chdir(folder)  # the user's working folder: relative paths throughout
    try:
        run.main(["--config_name", "model.json", "--tokenizer_vocab_size", "300", "--train_file", str(csv),
                  "--output_dir", "out", "--max_steps", "3", "--per_device_train_batch_size", "8",
                  "--report_to", "none", "--dataloader_num_workers", "0", "--eval_strategy", "no",
                  "--save_strategy", "no", "--use_cpu", "true", "--export_onnx", "true"])  # fmt: skip
    finally:
        os.chdir(current)
    return folder / "out"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A CLIP run and a SigLIP run (64 positions, as Google's SigLIPs have), each with its `onnx/` folder."""
    from transformers import CLIPConfig, SiglipConfig

    csv = write_shapes_csv(tmp_path_factory.mktemp("shapes"), repeats=1)
    clip = CLIPConfig(
        text_config={**TINY_TEXT, "max_position_embeddings": 24}, vision_config=TINY_VISION, projection_dim=16
    )
    siglip = SiglipConfig(text_config={**TINY_TEXT, "max_position_embeddings": 64}, vision_config=TINY_VISION)
    return {
        "clip": run_with_export(tmp_path_factory.mktemp("clip-run"), csv, clip),
        "siglip": run_with_export(tmp_path_factory.mktemp("siglip-run"), csv, siglip),
    }


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    """PNGs at the tiny models' input size (32 px), so that no consumer's own resizing changes a pixel."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for color, shape, background in SHAPES:
        path = folder / f"{color}_{shape}_{background}.png"
        draw_shape(color, shape, background, size=32).save(path)
        paths.append(str(path))
    return paths


def trainer_embeddings(folder: Path, images: list[str], captions: list[str] = CAPTIONS) -> dict:
    """The trainer's own: its collator's token ids and pixels, `embed_batch`'s normalised embeddings."""
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    family = model_family(model.config)
    max_length = min(model.config.text_config.max_position_embeddings, processor.tokenizer.model_max_length)
    collator = ImageTextCollator.from_processor(processor, padding=family.text_padding, max_seq_length=max_length)
    batch = collator([{"image": image, "caption": caption} for image, caption in zip(images, captions)])
    with torch.no_grad():
        image_embeds, text_embeds = embed_batch(model, batch, collator.image_preprocessor)
        pixel_values = collator.image_preprocessor.normalize(batch["pixel_values"])
    return {
        "family": family,
        "max_length": max_length,
        "input_ids": batch["input_ids"],
        "pixel_values": pixel_values,
        "text_embeds": text_embeds,
        "image_embeds": image_embeds,
    }


def normalised(values) -> torch.Tensor:
    return F.normalize(torch.as_tensor(values, dtype=torch.float32), dim=-1)


def assert_same_embeddings(got: dict, expected: dict, atol: float) -> None:
    assert torch.equal(torch.as_tensor(got["input_ids"]), expected["input_ids"])
    assert (normalised(got["text_embeds"]) - expected["text_embeds"]).abs().max() <= atol
    assert (normalised(got["image_embeds"]) - expected["image_embeds"]).abs().max() <= atol
    # Distinct inputs give distinct embeddings: the comparison is not between constants.
    assert (expected["text_embeds"][0] - expected["text_embeds"][1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# The files, on the default tier's SigLIP run (trained by the command with its own caption tokenizer)
# ---------------------------------------------------------------------------------------------------------------------


def test_a_run_folder_carries_what_each_consumer_reads(tiny_siglip_run):
    from tokenizers import Tokenizer
    from transformers import AutoImageProcessor, AutoTokenizer

    read = lambda name: json.loads((tiny_siglip_run / name).read_text())  # noqa: E731
    # transformers.js: the image processor alone, as transformers 5 nests it in processor_config.json.
    assert read("preprocessor_config.json") == read("processor_config.json")["image_processor"]
    assert read("preprocessor_config.json")["image_processor_type"] == "SiglipImageProcessor"
    # transformers 4.x: a class it has, with the prefix space the trained pre-tokenizer adds.
    tokenizer_config = read("tokenizer_config.json")
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["add_prefix_space"] is read("tokenizer.json")["pre_tokenizer"]["add_prefix_space"] is True
    # sentence-transformers: one module, SigLIP's captions padded to the run's caption length (24 positions).
    assert read("modules.json") == [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"}
    ]
    assert read("sentence_bert_config.json")["processing_kwargs"] == {
        "text": {"padding": "max_length", "max_length": 24}
    }
    assert read("sentence_bert_config.json")["modality_config"]["image"]["method"] == "get_image_features"
    # transformers 5 still reads the rewritten tokenizer as the tokenizers library does (prefix space included).
    tokenizer = AutoTokenizer.from_pretrained(tiny_siglip_run)
    raw = Tokenizer.from_file(str(tiny_siglip_run / "tokenizer.json"))
    raw.no_padding()
    raw.no_truncation()
    for caption in CAPTIONS[:3]:
        assert tokenizer(caption)["input_ids"] == raw.encode(caption).ids
    assert AutoImageProcessor.from_pretrained(tiny_siglip_run, backend="pil").size == {"height": 32, "width": 32}


def test_transformers5_automodel_embeds_as_the_trainer(tiny_siglip_run, image_files):
    """The usage snippet of docs/using-your-model.md: AutoModel + AutoProcessor, the family's padding."""
    from PIL import Image

    expected = trainer_embeddings(tiny_siglip_run, image_files)
    model = AutoModel.from_pretrained(tiny_siglip_run).eval()
    processor = AutoProcessor.from_pretrained(tiny_siglip_run)
    images = [Image.open(path).convert("RGB") for path in image_files]
    inputs = processor(text=CAPTIONS, images=images, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        text_embeds = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
        image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    got = {"input_ids": inputs["input_ids"], "text_embeds": text_embeds, "image_embeds": image_embeds}
    assert_same_embeddings(got, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The consumers, on a CLIP run and a SigLIP run with their ONNX graphs (slow: two training runs and exports)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_transformers_pipeline_scores_labels_as_the_model(runs, image_files, family):
    from PIL import Image
    from transformers import pipeline

    folder = runs[family]
    labels = ["red circle", "blue square", "yellow triangle"]
    classifier = pipeline("zero-shot-image-classification", model=str(folder), device="cpu")
    scores = {row["label"]: row["score"] for row in classifier(Image.open(image_files[0]), candidate_labels=labels)}
    # Independently: the trainer's normalised embeddings of the pipeline's prompts, scaled as the family scores.
    expected = trainer_embeddings(folder, image_files[:1] * 3, [f"This is a photo of {label}." for label in labels])
    model = AutoModel.from_pretrained(folder)
    logits = model.logit_scale.exp() * expected["text_embeds"] @ expected["image_embeds"][0]
    if family == "siglip":
        probabilities = torch.sigmoid(logits + model.logit_bias)
    else:
        probabilities = logits.softmax(-1)
    assert [scores[label] for label in labels] == pytest.approx(probabilities.tolist(), abs=1e-5)


@pytest.mark.slow
@needs_sentence_transformers
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_sentence_transformers_embeds_as_the_trainer_without_arguments(runs, image_files, family):
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    folder = runs[family]
    model = SentenceTransformer(str(folder), device="cpu")
    # Short captions, where SigLIP's padding to its one length matters, then with one longer than that (truncated).
    for captions in (CAPTIONS[:3], CAPTIONS):
        images = image_files[: len(captions)]
        expected = trainer_embeddings(folder, images, captions)
        got = {
            "input_ids": model.preprocess(captions)["input_ids"],
            "text_embeds": model.encode(captions, convert_to_tensor=True),
            "image_embeds": model.encode([Image.open(path).convert("RGB") for path in images], convert_to_tensor=True),
        }
        assert_same_embeddings(got, expected, atol=1e-5)
    assert model.similarity_fn_name == "cosine"


@pytest.mark.slow
@needs_onnxruntime
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_onnxruntime_serves_the_onnx_folder_alone(runs, image_files, family):
    import numpy as np
    import onnxruntime
    from PIL import Image

    folder = runs[family] / "onnx"
    expected = trainer_embeddings(runs[family], image_files)
    processor = AutoProcessor.from_pretrained(folder)
    padding = "max_length" if family == "siglip" else True
    images = [Image.open(path).convert("RGB") for path in image_files]
    inputs = processor(text=CAPTIONS, images=images, padding=padding, truncation=True, return_tensors="np")
    text = onnxruntime.InferenceSession(str(folder / "text_model.onnx"), providers=["CPUExecutionProvider"])
    vision = onnxruntime.InferenceSession(str(folder / "vision_model.onnx"), providers=["CPUExecutionProvider"])
    ids = {name: inputs[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    got = {
        "input_ids": inputs["input_ids"],
        "text_embeds": text.run(None, ids)[0],
        "image_embeds": vision.run(None, {"pixel_values": inputs["pixel_values"].astype(np.float32)})[0],
    }
    assert_same_embeddings(got, expected, atol=1e-4)


def _run_json(command: list[str], request: dict, tmp_path: Path, cwd: Path | None = None) -> dict:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the other environment imports nothing of this one
    done = subprocess.run([*command, str(path)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
@needs_transformers4
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_transformers4_loads_the_same_tokenizer_and_embeddings(runs, image_files, family, tmp_path):
    folder = runs[family]
    expected = trainer_embeddings(folder, image_files)
    request = {
        "model_dir": str(folder),
        "padding": expected["family"].text_padding,
        "max_length": expected["max_length"],
        "texts": CAPTIONS,
        "images": image_files,
    }
    got = _run_json([TRANSFORMERS4_PYTHON, str(TESTS / "transformers4_embed.py")], request, tmp_path)
    assert got["transformers_version"].startswith("4.")
    assert got["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert torch.allclose(torch.tensor(got["pixel_values"]), expected["pixel_values"], atol=1e-5)
    assert_same_embeddings(got, expected, atol=1e-5)


@pytest.mark.slow
@needs_transformers_js
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_transformers_js_loads_the_output_folder(runs, image_files, family, tmp_path):
    folder = runs[family]
    expected = trainer_embeddings(folder, image_files)
    request = {
        "model_dir": str(folder),
        "family": family,
        "max_length": expected["max_length"],
        "texts": CAPTIONS,
        "images": image_files,
    }
    got = _run_json([NODE, str(TESTS / "js" / "embed.mjs")], request, tmp_path, cwd=TESTS / "js")
    assert torch.allclose(torch.tensor(got["pixel_values"]), expected["pixel_values"], atol=1e-5)
    assert_same_embeddings(got, expected, atol=1e-4)


@pytest.mark.slow  # two runs and an ONNX export, about 20 s on 2 cores
@needs_onnxruntime
def test_a_shorter_caption_length_is_the_saved_models_length(tmp_path, monkeypatch):
    """A SigLIP run with `--max_seq_length` shorter than the tokenizer's: the saved folder (and its ONNX folder) says
    the length the model was trained at, so an evaluation of the folder without the flag pads captions as training
    did and reproduces the run's own numbers (it padded to the tokenizer's length and scored lower)."""
    from transformers import AutoTokenizer, SiglipConfig

    from clip_trainer import run

    monkeypatch.chdir(tmp_path)
    csv = write_shapes_csv(tmp_path, repeats=2)
    config = SiglipConfig(text_config={**TINY_TEXT, "max_position_embeddings": 24}, vision_config=TINY_VISION)
    (tmp_path / "siglip.json").write_text(config.to_json_string())
    common = ["--train_file", str(csv), "--validation_split_percentage", "30", "--per_device_eval_batch_size", "5",
              "--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu", "true"]  # fmt: skip
    trained = run.main([*common, "--config_name", "siglip.json", "--tokenizer_vocab_size", "300",
                        "--max_seq_length", "6", "--output_dir", "out", "--max_steps", "4",
                        "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
                        "--do_train", "--do_eval", "--export_onnx", "true"])  # fmt: skip
    for folder in ("out", "out/onnx"):
        assert json.loads((tmp_path / folder / "tokenizer_config.json").read_text())["model_max_length"] == 6
    tokenizer = AutoTokenizer.from_pretrained("out")
    assert len(tokenizer(["a red circle"], padding="max_length")["input_ids"][0]) == 6
    assert len(tokenizer([" ".join(["red"] * 30)], truncation=True)["input_ids"][0]) == 6
    evaluated = run.main([*common, "--model_name_or_path", "out", "--output_dir", "eval", "--do_eval"])
    recalls = [key for key in trained if "recall" in key]
    assert recalls and {key: evaluated[key] for key in recalls} == {key: trained[key] for key in recalls}
