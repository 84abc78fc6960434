"""Shared fixtures: a tiny CLIP model saved to disk, and small image-caption data made on the fly."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

# The project's CPU thread policy (clip_trainer/threads.py), set on import, before torch is imported below.
# isort: off
import clip_trainer  # noqa: E402, F401

# isort: on
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# In CI a skip is a failure
# --------------------------------------------------------------------------------------------------------------
# CI (`CI=true bash .ci/run`) builds every environment the tests need: the extras, transformers 4, transformers.js,
# open_clip's. A test that skips there is a test that silently did not run, so it fails instead, naming its reason.
# The one exception: the open_clip tests in the main environment, where open_clip cannot be installed (its
# torchvision needs another torch); .ci/run runs them again in their own environment with OPEN_CLIP_STEP set, where
# they may not skip either.
STRICT_SKIPS = os.environ.get("CI") == "true"
OPEN_CLIP_STEP_VARIABLE = "CLIP_TRAINER_OPEN_CLIP_STEP"
OPEN_CLIP_TEST_FILES = ("test_open_clip_import.py", "test_open_clip_export.py")


def _skip_allowed(path: Path) -> bool:
    return path.name in OPEN_CLIP_TEST_FILES and os.environ.get(OPEN_CLIP_STEP_VARIABLE) != "1"


def _fail_skip(report, path: Path) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, which builds what this test needs ({path.name}): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail") and not _skip_allowed(item.path):
        _fail_skip(report, item.path)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    path = getattr(collector, "path", None)
    if STRICT_SKIPS and report.skipped and isinstance(collector, pytest.Module) and not _skip_allowed(path):
        _fail_skip(report, path)


# LoRA tests need the `lora` extra. In CI, which installs it, a skip is a failure (above), so this cannot hide a test.
needs_peft = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None, reason="peft is not installed (pip install 'clip-trainer[lora]')"
)


COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}

TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_VISION = {"image_size": 32, "patch_size": 8, **TINY_TEXT}


def draw_shape(color: str, shape: str, background: str = "white", size: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=COLORS[color])
    return image


def shape_rows() -> list[tuple[str, str, str, str]]:
    """Every (color, shape, background, caption): 24 distinct, learnable pairs."""
    rows = []
    for color, shape, background in itertools.product(COLORS, SHAPES, BACKGROUNDS):
        rows.append((color, shape, background, f"a {color} {shape} on {background}"))
    return rows


def write_shapes_csv(folder: Path, repeats: int = 2, name: str = "pairs.csv") -> Path:
    """Writes PNGs under `folder/images/` and a CSV of relative paths and captions; returns the CSV path."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "shape"])
        for repeat in range(repeats):
            for color, shape, background, caption in shape_rows():
                file = f"images/{color}_{shape}_{background}_{repeat}.png"
                draw_shape(color, shape, background, size=40 + 8 * repeat).save(folder / file)
                writer.writerow([file, caption, shape])
    return path


# `run_clip.py` in its own process with every step from the 5th on slowed down (the numbers are not changed), so that
# a test can kill it once a checkpoint is complete and before the run ends.
SLOWED_CLI = (
    "import sys, time\n"
    "from clip_trainer.trainer import CLIPContrastiveTrainer as T\n"
    "step = T.training_step\n"
    "def slow(self, *args, **kwargs):\n"
    "    if self.state.global_step >= 4:\n"
    "        time.sleep(10)\n"
    "    return step(self, *args, **kwargs)\n"
    "T.training_step = slow\n"
    "from clip_trainer.run import cli\n"
    "sys.exit(cli(sys.argv[1:]))\n"
)


def set_option(argv: list[str], name: str, value: str) -> list[str]:
    """`argv` with `--name value` (replaced where it is, else appended)."""
    argv = list(argv)
    if f"--{name}" in argv:
        argv[argv.index(f"--{name}") + 1] = value
        return argv
    return [*argv, f"--{name}", value]


def drop_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `--name value`."""
    index = argv.index(f"--{name}")
    return argv[:index] + argv[index + 2 :]


@pytest.fixture(scope="session")
def shapes_csv(tmp_path_factory) -> Path:
    return write_shapes_csv(tmp_path_factory.mktemp("shapes"), repeats=3)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP model with a caption tokenizer and a 32 px image processor, saved like a Hub model."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from clip_trainer.tokenization import text_config_token_ids, train_caption_tokenizer

    captions = [caption for *_, caption in shape_rows()]
    tokenizer = train_caption_tokenizer(captions * 4, vocab_size=300, model_max_length=16)
    config = CLIPConfig(
        text_config={**TINY_TEXT, "max_position_embeddings": 16, **text_config_token_ids(tokenizer)},
        vision_config=TINY_VISION,
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    folder = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_siglip_run(tmp_path_factory, shapes_csv) -> Path:
    """A tiny SigLIP trained from scratch by the command (3 steps, its own caption tokenizer), its output folder as a
    user has it: a model to fine-tune or evaluate."""
    from transformers import SiglipConfig

    from clip_trainer import run

    folder = tmp_path_factory.mktemp("siglip-run")
    config = SiglipConfig(text_config={**TINY_TEXT, "max_position_embeddings": 24}, vision_config=TINY_VISION)
    (folder / "siglip.json").write_text(config.to_json_string())
    run.main(["--config_name", str(folder / "siglip.json"), "--tokenizer_vocab_size", "300",
              "--train_file", str(shapes_csv), "--output_dir", str(folder / "out"), "--max_steps", "3",
              "--per_device_train_batch_size", "8", "--report_to", "none", "--dataloader_num_workers", "0",
              "--eval_strategy", "no", "--save_strategy", "no", "--use_cpu", "true"])  # fmt: skip
    return folder / "out"


@pytest.fixture
def base_args(tiny_clip_dir, shapes_csv, tmp_path) -> list[str]:
    """Command-line arguments for a fast CPU run of the tiny model on the shapes data."""
    return [
        "--model_name_or_path", str(tiny_clip_dir),
        "--train_file", str(shapes_csv),
        "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16",
        "--learning_rate", "3e-3",
        "--weight_decay", "0.0",
        "--warmup_steps", "0",
        "--lr_scheduler_type", "constant",
        "--num_train_epochs", "2",
        "--logging_steps", "2",
        "--report_to", "none",
        "--dataloader_num_workers", "0",
        "--dataloader_persistent_workers", "false",
        "--save_strategy", "no",
        "--eval_strategy", "no",
        "--use_cpu", "true",
        "--seed", "1",
    ]  # fmt: skip


# The training arguments of `base_args`, for tests that build the trainer themselves.
FAST_TRAINING = dict(
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    learning_rate=3e-3,
    weight_decay=0.0,
    warmup_steps=0,
    lr_scheduler_type="constant",
    num_train_epochs=2,
    logging_steps=2,
    report_to="none",
    dataloader_num_workers=0,
    dataloader_persistent_workers=False,
    save_strategy="no",
    eval_strategy="no",
    use_cpu=True,
    seed=1,
)


def build_trainer(tmp_path: Path, model_dir: Path, train_csv: Path, trainer_class=None, **training):
    """`CLIPContrastiveTrainer` as a library user builds it, without run_clip.py: arguments, data, model, processor."""
    from transformers import AutoModel, AutoProcessor

    from clip_trainer import CLIPContrastiveTrainer, CLIPTrainingArguments, DataArguments, load_image_text_data

    args = CLIPTrainingArguments(output_dir=str(tmp_path / "out"), **{**FAST_TRAINING, **training})
    data = load_image_text_data(
        DataArguments(train_file=str(train_csv)), seed=args.seed, evaluate=args.eval_strategy != "no"
    )
    torch.manual_seed(args.seed)
    trainer_class = trainer_class or CLIPContrastiveTrainer
    return trainer_class(
        model=AutoModel.from_pretrained(model_dir),
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        processing_class=AutoProcessor.from_pretrained(model_dir, backend="pil"),
    )


from fake_hub import fake_hub  # noqa: E402,F401 - the fixture: a local stand-in for the Hub's HTTP API
