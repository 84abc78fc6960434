"""Training throughput of clip-trainer's real path against the stock recipe and a plain loop, in one run.

Three variants train the same architecture, batch size and device, one after the other:

  (a) clip-trainer: `CLIPContrastiveTrainer` + `ImageTextCollator` reading JPEG bytes from a dataset saved with
      `save_to_disk` (the format `--prepare_only` writes), loaded with `load_image_text_data`; uint8 pixels from the
      workers, normalised on the device.
  (b) the stock recipe (HF's run_clip.py): plain `transformers.Trainer` + `CLIPModel(return_loss=True)`, with a
      collator that decodes the same bytes and runs `CLIPImageProcessorPil` (float32 pixels from the workers).
  (c) the compute ceiling: a plain PyTorch loop on one batch already on the device.

(a) and (b) share precision (bf16 on CUDA, fp32 on the CPU), attention (sdpa), torch.compile (CUDA only unless
`--no-compile`), fused AdamW (CUDA), max_grad_norm 1.0 and the data loader settings (workers, pinned memory,
persistent workers, prefetch, drop_last). Unless clip-trainer's defaults already do, (a) also sets the two
`TrainingArguments` that keep a step free of host synchronisation (`logging_nan_inf_filter=False`,
`accelerator_config.non_blocking=True`); (b) keeps the stock defaults, as run_clip.py does. The JSON names every
setting.

Samples/s is the number of pairs trained in the timed steps divided by their wall time (from the end of the last
warm-up step to the end of the last step, with a device synchronisation at both ends), so it includes every wait
for data; the figure from the median step time is printed beside it. The data-wait share is the time the Trainer
spent in `get_batch_samples` (fetching the next batch from the workers and copying it to the device) over that wall
time. On the CPU the variants run three times, alternating, and each reports its best run: a shared CPU is noisy.
FLOPs per pair are counted with `benchmarks/flops.py` (FlopCounterMode); MFU is against a large matmul measured on
the same device (bf16 8192^3 on CUDA, fp32 1024^3 on the CPU).

Every caption is long enough to fill the text context, so every variant runs the same number of text tokens as
open_clip's fixed 77-token context (and torch.compile sees one shape).

With `--patch-dropout 0,0.5,0.75` only (a) runs, once per value of `--patch_dropout` (alternating, as the variants
do), and the speed-up over the first value is printed; FLOPs per pair are counted with the patches dropped.

Usage:
    python benchmarks/throughput.py --preset tiny                    # CPU: 1-2 minutes on 2 cores
    python benchmarks/throughput.py --preset tiny --patch-dropout 0,0.5,0.75
    python benchmarks/throughput.py --preset demo --caption-words 12  # the demo's model; (c) bounds its step
    python benchmarks/throughput.py --preset vit-b-32                # one GPU: ViT-B/32, batch 256, ~4 minutes
    python benchmarks/throughput.py --preset vit-b-32 --only a,c --steps 100 --source-size 640x480

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from clip_trainer.threads import set_openmp_environment

# The project's CPU thread policy (clip_trainer/threads.py), before torch loads OpenMP: the benchmark measures what a run
# gets.
set_openmp_environment()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import PIL.ImageDraw  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flops import measure_peak_flops, mfu, training_flops_per_sample  # noqa: E402

from clip_trainer.arguments import CLIPTrainingArguments, DataArguments  # noqa: E402
from clip_trainer.collator import ImageTextCollator  # noqa: E402
from clip_trainer.data import load_image_text_data  # noqa: E402
from clip_trainer.loss import clip_loss  # noqa: E402
from clip_trainer.tokenization import train_caption_tokenizer  # noqa: E402
from clip_trainer.trainer import CLIPContrastiveTrainer, no_weight_decay_parameter_names  # noqa: E402

VARIANTS = ("a", "b", "c")
VARIANT_NAMES = {
    "a": "clip-trainer (CLIPContrastiveTrainer + ImageTextCollator, uint8 pixels)",
    "b": "stock recipe (Trainer + CLIPModel return_loss, CLIPImageProcessorPil float pixels)",
    "c": "plain PyTorch loop, batch already on the device",
}
LEARNING_RATE = 5e-4


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model size with the batch, source images and run length it is benchmarked with."""

    vision: dict[str, int]
    text: dict[str, int]
    projection_dim: int
    vocab_size: int | None  # None: the trained tokenizer's size
    batch_size: int
    source_size: tuple[int, int]  # (width, height) of the stored JPEGs
    steps: int
    warmup: int
    tokenizer_vocab_size: int


PRESETS = {
    # A small model that trains in well under a second per step on two CPU cores.
    "tiny": Preset(
        vision={
            "hidden_size": 96,
            "intermediate_size": 384,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
        },
        text={
            "hidden_size": 96,
            "intermediate_size": 384,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
        },
        projection_dim=96,
        vocab_size=None,
        batch_size=64,
        source_size=(96, 72),
        steps=16,
        warmup=3,
        tokenizer_vocab_size=1024,
    ),
    # The bundled demo's model (configs/models/clip-tiny-64px.json) and batch: (c) is the most its step can give.
    "demo": Preset(
        vision={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 16,
        },
        text={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
        },
        projection_dim=128,
        vocab_size=4096,
        batch_size=64,
        source_size=(72, 72),
        steps=40,
        warmup=5,
        tokenizer_vocab_size=2048,
    ),
    # The architecture of openai/clip-vit-base-patch32 (random weights; nothing is downloaded).
    "vit-b-32": Preset(
        vision={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        text={
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
        },
        projection_dim=512,
        vocab_size=49408,
        batch_size=256,
        source_size=(320, 240),
        steps=50,
        warmup=10,
        tokenizer_vocab_size=8192,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data: JPEG bytes with photo-like entropy, and captions that fill the text context
# ----------------------------------------------------------------------------------------------------------------


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A smooth colour field with a few shapes and mild noise, JPEG-encoded (about 20 KB at 320x240)."""
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(field).resize((width, height), PIL.Image.Resampling.BICUBIC)
    draw = PIL.ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(4, width // 2)), y0 + int(rng.integers(4, height // 2))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    noisy = np.asarray(image).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def synthetic_captions(rng: np.random.Generator, count: int, words: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vo", "ne", "pi", "dor", "sa", "lu", "fe", "gri", "to", "ba"]
    vocabulary = ["".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) for _ in range(600)]
    return [" ".join(rng.choice(vocabulary, size=words)) for _ in range(count)]


def write_dataset(folder: Path, rows: int, preset: Preset, caption_words: int, seed: int = 0) -> Path:
    """Writes train/validation splits with images as JPEG bytes (`Image(decode=False)`), as `--prepare_only` does.

    Images come from a pool of at most 512 distinct pictures, repeated: decoding costs the same for a repeat.
    """
    rng = np.random.default_rng(seed)
    width, height = preset.source_size
    pool = [synthetic_jpeg(rng, width, height) for _ in range(min(rows, 512))]
    features = datasets.Features({"image": datasets.Image(decode=False), "caption": datasets.Value("string")})

    def split(count: int, offset: int) -> datasets.Dataset:
        images = [{"bytes": pool[(offset + i) % len(pool)], "path": None} for i in range(count)]
        return datasets.Dataset.from_dict(
            {"image": images, "caption": synthetic_captions(rng, count, caption_words)}, features=features
        )

    datasets.DatasetDict({"train": split(rows, 0), "validation": split(16, 7)}).save_to_disk(str(folder))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The stock recipe's collator (run_clip.py's way: float pixels from the image processor)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StockCollator:
    """Decodes the encoded images and runs the image processor (float32 pixels), tokenizes to the full context."""

    image_processor: Any
    tokenizer: Any
    max_length: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        images = [PIL.Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB") for row in rows]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        text = self.tokenizer(
            [row["caption"] for row in rows],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "pixel_values": pixel_values,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "return_loss": True,
        }


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(TrainerCallback):
    """Records when each optimizer step ends; synchronises the device at the two ends of the timed window."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.step_end: dict[int, float] = {}
        self.step_begin: dict[int, float] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_begin[state.global_step + 1] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.warmup, self.warmup + self.steps):
            synchronize(self.device)
        self.step_end[state.global_step] = time.perf_counter()

    def in_window(self, global_step: int) -> bool:
        """Whether the step that follows `global_step` finished steps is a timed one."""
        return self.warmup <= global_step < self.warmup + self.steps

    def window_seconds(self) -> float:
        return self.step_end[self.warmup + self.steps] - self.step_end[self.warmup]

    def busy_seconds(self) -> list[float]:
        """Host time from `on_step_begin` to `on_step_end` of each timed step (the step without fetching its batch)."""
        return [self.step_end[k] - self.step_begin[k] for k in range(self.warmup + 1, self.warmup + self.steps + 1)]

    def step_seconds(self) -> list[float]:
        """Wall time of each timed step, end to end (data waits included)."""
        first = self.warmup + 1
        return [self.step_end[k] - self.step_end[k - 1] for k in range(first, self.warmup + self.steps + 1)]


class DataWaitMixin:
    """Times `get_batch_samples`, where the Trainer fetches the next micro-batch(es) and places them on the device."""

    step_timer: StepTimer
    data_wait_seconds: float = 0.0

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        started = time.perf_counter()
        result = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.step_timer.in_window(self.state.global_step):
            self.data_wait_seconds += time.perf_counter() - started
        return result


class TimedCLIPContrastiveTrainer(DataWaitMixin, CLIPContrastiveTrainer):
    """clip-trainer's trainer, unchanged but for the data-wait timer."""


class TimedTrainer(DataWaitMixin, Trainer):
    """The stock Trainer, unchanged but for the data-wait timer."""


# ----------------------------------------------------------------------------------------------------------------
# Setup shared by the variants
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    preset_name: str
    preset: Preset
    device: torch.device
    batch_size: int
    steps: int
    warmup: int
    workers: int
    compile: bool
    data_dir: Path
    work_dir: Path
    config: CLIPConfig
    processor: CLIPProcessor
    max_length: int
    jpeg_draft: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def build_model(self) -> CLIPModel:
        torch.manual_seed(0)
        return CLIPModel._from_config(self.config, attn_implementation="sdpa")

    def stock_collator(self) -> StockCollator:
        return StockCollator(self.processor.image_processor, self.processor.tokenizer, self.max_length)

    def common_arguments(self) -> dict[str, Any]:
        """The settings (a) and (b) share."""
        return {
            "per_device_train_batch_size": self.batch_size,
            "max_steps": self.warmup + self.steps,
            "learning_rate": LEARNING_RATE,
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "logging_steps": 10,
            "report_to": "none",
            "save_strategy": "no",
            "eval_strategy": "no",
            "disable_tqdm": True,
            "seed": 0,
            "bf16": self.cuda,
            "torch_compile": self.compile,
            "optim": "adamw_torch_fused" if self.cuda else "adamw_torch",
            "use_cpu": not self.cuda,
            "dataloader_num_workers": self.workers,
            "dataloader_persistent_workers": self.workers > 0,
            "dataloader_prefetch_factor": 4 if self.workers > 0 else None,
            "dataloader_pin_memory": True,
            "dataloader_drop_last": True,
            "remove_unused_columns": False,
        }


def sync_free_arguments() -> dict[str, Any]:
    """What (a) sets beyond the shared settings: the two `TrainingArguments` that keep a step free of host syncs.

    Nothing when clip-trainer's defaults already copy batches without blocking: the same change to the trainer
    filters NaN losses on the device, so its defaults are then sync-free as they stand.
    """
    with tempfile.TemporaryDirectory() as tmp:
        defaults = CLIPTrainingArguments(output_dir=tmp, report_to="none")
    if getattr(defaults.accelerator_config, "non_blocking", False):
        return {}
    return {"logging_nan_inf_filter": False, "accelerator_config": {"non_blocking": True}}


def make_setup(options: argparse.Namespace, work_dir: Path) -> Setup:
    preset = PRESETS[options.preset]
    device = torch.device("cuda" if torch.cuda.is_available() and not options.cpu else "cpu")
    batch_size = options.batch_size or preset.batch_size
    steps = options.steps or preset.steps
    warmup = options.warmup if options.warmup is not None else preset.warmup
    workers = options.workers
    if workers is None:
        # On a GPU the workers' decoding is what limits the real path: give them every core but the main process's
        # and the pinning thread's.
        workers = max(1, (os.cpu_count() or 1) - 2) if device.type == "cuda" else 2
    positions = preset.text["max_position_embeddings"]
    caption_words = options.caption_words or positions + 8

    rng = np.random.default_rng(1)
    tokenizer = train_caption_tokenizer(
        synthetic_captions(rng, 2000, 12), vocab_size=preset.tokenizer_vocab_size, model_max_length=positions
    )
    side = preset.vision["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": preset.vocab_size or len(tokenizer),
    }
    config = CLIPConfig(
        text_config={**preset.text, **token_ids},
        vision_config=preset.vision,
        projection_dim=preset.projection_dim,
    )
    if options.source_size:
        width, height = (int(length) for length in options.source_size.lower().split("x"))
        preset = dataclasses.replace(preset, source_size=(width, height))
    # Every timed batch, one more for accelerate's look-ahead, and one spare: no epoch ends inside the window.
    rows = (warmup + steps + 2) * batch_size
    data_dir = write_dataset(work_dir / "data", rows, preset, caption_words)
    return Setup(
        preset_name=options.preset,
        preset=preset,
        device=device,
        batch_size=batch_size,
        steps=steps,
        warmup=warmup,
        workers=workers,
        compile=device.type == "cuda" and not options.no_compile,
        data_dir=data_dir,
        work_dir=work_dir,
        config=config,
        processor=processor,
        max_length=positions,
        jpeg_draft=options.jpeg_draft,
    )


def stop_workers(trainer: Trainer) -> None:
    """Stops a finished trainer's persistent DataLoader workers: they would compete for CPU with the next variant."""
    for loader in list(getattr(trainer.accelerator, "_dataloaders", [])):
        base = getattr(loader, "base_dataloader", loader)
        iterator = getattr(base, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
    trainer.accelerator.free_memory()


def release() -> None:
    """Frees what the last variant left (call it once its model, optimizer and trainer are out of scope)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def trainer_result(trainer: DataWaitMixin, timer: StepTimer, setup: Setup) -> dict[str, float]:
    window = timer.window_seconds()
    steps = timer.step_seconds()
    return {
        "samples_per_second": setup.steps * setup.batch_size / window,
        "median_step_seconds": statistics.median(steps),
        "samples_per_second_from_median": setup.batch_size / statistics.median(steps),
        "median_busy_seconds": statistics.median(timer.busy_seconds()),
        "data_wait_share": trainer.data_wait_seconds / window,
    }


# ----------------------------------------------------------------------------------------------------------------
# The variants
# ----------------------------------------------------------------------------------------------------------------


def run_clip_trainer(setup: Setup, patch_dropout: float = 0.0) -> dict[str, float]:
    """(a): clip-trainer's own path, from the prepared folder on disk to the optimizer step; with `patch_dropout`,
    each training image keeps that share fewer of its patches (`--patch_dropout`)."""
    data = load_image_text_data(DataArguments(dataset_name=str(setup.data_dir)), seed=0)
    collator = ImageTextCollator.from_processor(
        setup.processor,
        max_seq_length=setup.max_length,
        **({"jpeg_draft": True} if setup.jpeg_draft else {}),
    )
    args = CLIPTrainingArguments(
        output_dir=str(setup.work_dir / "a"),
        **setup.common_arguments(),
        **sync_free_arguments(),
        **({"patch_dropout": patch_dropout} if patch_dropout else {}),
    )
    timer = StepTimer(setup.warmup, setup.steps, setup.device)
    trainer = TimedCLIPContrastiveTrainer(
        model=setup.build_model(),
        args=args,
        train_dataset=data.train,
        data_collator=collator,
        processing_class=setup.processor,
        callbacks=[timer],
    )
    return train_timed(trainer, timer, setup)


def train_timed(trainer: Trainer, timer: StepTimer, setup: Setup) -> dict[str, float]:
    """Trains quietly (no progress bars) under `timer` and returns the timed figures."""
    trainer.step_timer = timer
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.train()
    result = trainer_result(trainer, timer, setup)
    stop_workers(trainer)
    return result


def run_stock_trainer(setup: Setup) -> dict[str, float]:
    """(b): run_clip.py's recipe: the stock Trainer, the model's own loss, float pixels from the image processor."""
    train = datasets.load_from_disk(str(setup.data_dir))["train"]
    args = TrainingArguments(output_dir=str(setup.work_dir / "b"), **setup.common_arguments())
    timer = StepTimer(setup.warmup, setup.steps, setup.device)
    trainer = TimedTrainer(
        model=setup.build_model(),
        args=args,
        train_dataset=train,
        data_collator=setup.stock_collator(),
        callbacks=[timer],
    )
    return train_timed(trainer, timer, setup)


def device_batch(setup: Setup, rows: int) -> dict[str, torch.Tensor]:
    """The first `rows` training rows through the stock collator (float pixels), on the device, with the tokens cut to
    the batch's longest caption as (a) pads them: (c) is then the ceiling of (a) also with captions shorter than the
    context (`--caption-words`). The columns cut are padding, which the causal text tower never reads."""
    train = datasets.load_from_disk(str(setup.data_dir))["train"]
    batch = setup.stock_collator()([train[i] for i in range(rows)])
    longest = int(batch["attention_mask"].sum(dim=1).max())
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, :longest], batch["attention_mask"][:, :longest]
    return {key: value.to(setup.device) for key, value in batch.items() if isinstance(value, torch.Tensor)}


def run_plain_loop(setup: Setup) -> dict[str, float]:
    """(c): the compute ceiling: forward, loss, backward, clipping and fused AdamW on a batch already on the device."""
    model = setup.build_model().to(setup.device).train()
    no_decay = no_weight_decay_parameter_names(model)
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if n not in no_decay], "weight_decay": 0.2},
            {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
        ],
        lr=LEARNING_RATE,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=setup.cuda,
    )
    forward = torch.compile(model) if setup.compile else model
    inputs = device_batch(setup, setup.batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if setup.cuda else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            outputs = forward(**inputs, return_loss=False)
        loss = clip_loss(outputs.image_embeds.float(), outputs.text_embeds.float(), model.logit_scale.exp())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))  # as ClampLogitScaleCallback does

    for _ in range(setup.warmup):
        step()
    synchronize(setup.device)
    ends = [time.perf_counter()]
    for _ in range(setup.steps):
        step()
        ends.append(time.perf_counter())
    synchronize(setup.device)
    ends[-1] = time.perf_counter()
    window = ends[-1] - ends[0]
    return {
        "samples_per_second": setup.steps * setup.batch_size / window,
        "median_step_seconds": statistics.median(b - a for a, b in zip(ends, ends[1:])),
        "samples_per_second_from_median": setup.batch_size / statistics.median(b - a for a, b in zip(ends, ends[1:])),
        "median_busy_seconds": statistics.median(b - a for a, b in zip(ends, ends[1:])),
        "data_wait_share": 0.0,
    }


RUNNERS = {"a": run_clip_trainer, "b": run_stock_trainer, "c": run_plain_loop}


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="tiny (CPU default), demo (the bundled demo's model) or vit-b-32 (GPU default).",
    )
    parser.add_argument("--steps", type=int, default=None, help="Timed optimizer steps per variant.")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (compilation, worker start).")
    parser.add_argument("--batch-size", type=int, default=None, help="Pairs per step (default: the preset's).")
    parser.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default: CPU cores - 2 on GPU, 2 on CPU)."
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="Do not torch.compile (compiles on CUDA by default)."
    )
    parser.add_argument("--only", default="a,b,c", help="Comma-separated variants to run, of a, b, c.")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="Run the variants this many times, alternating, and report each one's best run (default: 3 on CPU, 1 on GPU).",
    )
    parser.add_argument(
        "--source-size", default=None, help="Stored JPEG size as WIDTHxHEIGHT (default: 320x240 for vit-b-32)."
    )
    parser.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="(a) decodes JPEGs at reduced scale (needs ImageTextCollator's `jpeg_draft`; pixels differ slightly).",
    )
    parser.add_argument("--cpu", action="store_true", help="Run on the CPU even when CUDA is available.")
    parser.add_argument(
        "--patch-dropout",
        "--patch_dropout",
        default=None,
        help="Comma-separated `patch_dropout` values, e.g. 0,0.5,0.75: runs (a) alone at each, speed-ups against the "
        "first.",
    )
    parser.add_argument(
        "--caption-words", type=int, default=None, help="Words per caption (default: enough to fill the context)."
    )
    options = parser.parse_args(argv)
    if options.preset is None:
        options.preset = "vit-b-32" if torch.cuda.is_available() and not options.cpu else "tiny"
    if options.repeats is None:
        # Shared CPUs are noisy: the best of three alternating runs. One run on a GPU.
        options.repeats = 1 if torch.cuda.is_available() and not options.cpu else 3
    if options.jpeg_draft and "jpeg_draft" not in {f.name for f in dataclasses.fields(ImageTextCollator)}:
        parser.error("--jpeg-draft needs an ImageTextCollator with a `jpeg_draft` field.")
    options.patch_dropouts = None
    if options.patch_dropout is not None:
        try:
            options.patch_dropouts = [float(value) for value in options.patch_dropout.split(",") if value.strip()]
        except ValueError:
            parser.error(f"--patch-dropout takes comma-separated numbers in [0, 1); got {options.patch_dropout!r}.")
        if not options.patch_dropouts or not all(0 <= value < 1 for value in options.patch_dropouts):
            parser.error(f"--patch-dropout takes comma-separated numbers in [0, 1); got {options.patch_dropout!r}.")
    options.variants = [v.strip() for v in options.only.split(",") if v.strip()]
    unknown = [v for v in options.variants if v not in VARIANTS]
    if unknown or not options.variants:
        parser.error(f"--only takes a comma-separated subset of a,b,c; got {options.only!r}.")
    return options


def run_settings(setup: Setup) -> dict[str, object]:
    """What every summary of this benchmark records about the run: preset, device, versions, date and settings."""
    return {
        "preset": setup.preset_name,
        "device": device_name(setup.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch_size": setup.batch_size,
        "steps": setup.steps,
        "warmup": setup.warmup,
        "workers": setup.workers,
        "precision": "bf16" if setup.cuda else "fp32",
        "compile": setup.compile,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = parse_options(argv)
    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    with tempfile.TemporaryDirectory(prefix="clip-throughput-") as tmp:
        started = time.perf_counter()
        setup = make_setup(options, Path(tmp))
        print(
            f"preset {setup.preset_name} on {device_name(setup.device)}: batch {setup.batch_size}, {setup.steps} timed "
            f"steps after {setup.warmup} warm-up, {setup.workers} workers, compile {setup.compile}, "
            f"{'bf16' if setup.cuda else 'fp32'}; data written in {time.perf_counter() - started:.1f} s",
            flush=True,
        )

        # FLOPs per pair (counted in fp32 on the device, a few rows, extrapolated to the batch) and the device's peak.
        model = setup.build_model().to(setup.device).train()
        flops_per_sample = training_flops_per_sample(
            model, device_batch(setup, min(4, setup.batch_size)), train_batch_size=setup.batch_size
        )
        del model
        release()
        peak = measure_peak_flops(setup.device)
        print(
            f"training step: {flops_per_sample / 1e9:.3f} GFLOP per pair; matmul peak "
            f"{peak / 1e12:.2f} TFLOP/s ({'bf16' if setup.cuda else 'fp32'})",
            flush=True,
        )

        if options.patch_dropouts is not None:
            return patch_dropout_sweep(options, setup, peak)

        results: dict[str, dict[str, float]] = {}
        runs: dict[str, list[float]] = {variant: [] for variant in options.variants}
        # Repeats alternate the variants (a, b, c, a, b, c, ...) so that a burst of other load hits all alike.
        for repeat in range(options.repeats):
            for variant in options.variants:
                variant_started = time.perf_counter()
                result = RUNNERS[variant](setup)
                release()  # the variant's model, optimizer and trainer are out of scope now
                result["mfu"] = mfu(result["samples_per_second"], flops_per_sample, peak)
                runs[variant].append(result["samples_per_second"])
                if variant not in results or result["samples_per_second"] > results[variant]["samples_per_second"]:
                    results[variant] = result
                print(
                    f"({variant}) {VARIANT_NAMES[variant]}: {result['samples_per_second']:.1f} samples/s "
                    f"({result['samples_per_second_from_median']:.1f} from the median step), "
                    f"MFU {result['mfu']:.2%}, data wait {result['data_wait_share']:.1%} "
                    f"[run {repeat + 1}/{options.repeats}, {time.perf_counter() - variant_started:.0f} s]",
                    flush=True,
                )

    # The peak again after the variants, keeping the higher: on a shared machine a burst of other load during the
    # first measurement would otherwise inflate every MFU.
    later_peak = measure_peak_flops(setup.device)
    if later_peak > peak:
        peak = later_peak
        for result in results.values():
            result["mfu"] = mfu(result["samples_per_second"], flops_per_sample, peak)

    print(f"best run of each, against a matmul peak of {peak / 1e12:.3f} TFLOP/s:")
    for variant, result in results.items():
        print(
            f"  ({variant}) {result['samples_per_second']:.1f} samples/s, MFU {result['mfu']:.2%}, "
            f"data wait {result['data_wait_share']:.1%}"
        )

    def ratio(x: str, y: str) -> float | None:
        if x in results and y in results:
            return results[x]["samples_per_second"] / results[y]["samples_per_second"]
        return None

    for name, value in (("a/b", ratio("a", "b")), ("a/c", ratio("a", "c"))):
        if value is not None:
            print(f"{name}: {value:.3f}")

    def per_variant(key: str) -> dict[str, float | None]:
        return {v: results[v][key] if v in results else None for v in VARIANTS}

    summary = {
        **run_settings(setup),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "source_images": f"JPEG {setup.preset.source_size[0]}x{setup.preset.source_size[1]}",
        "jpeg_draft": setup.jpeg_draft,
        "text_tokens": setup.max_length,
        "timing": "pairs / wall time of the timed steps, data waits included; best of the repeats",
        "samples_per_second": per_variant("samples_per_second"),
        "samples_per_second_from_median": per_variant("samples_per_second_from_median"),
        "median_step_seconds": per_variant("median_step_seconds"),
        "median_busy_seconds": per_variant("median_busy_seconds"),
        "repeats": options.repeats,
        "samples_per_second_runs": {v: runs.get(v) for v in VARIANTS},
        "ratio_a_b": ratio("a", "b"),
        "ratio_a_c": ratio("a", "c"),
        "flops_per_sample": flops_per_sample,
        "peak_flops": peak,
        "mfu": per_variant("mfu"),
        # Time in `get_batch_samples` over wall time. (b) keeps accelerate's blocking host-to-device copy, so on a GPU
        # its share also holds the wait for the previous step to finish.
        "data_wait_share": {v: results[v]["data_wait_share"] if v in results else None for v in ("a", "b")},
        "settings": {"shared": setup.common_arguments(), "a_only": sync_free_arguments()},
    }
    print(json.dumps(summary))
    return summary


def patch_dropout_sweep(options: argparse.Namespace, setup: Setup, peak: float) -> dict[str, Any]:
    """(a) at each `--patch-dropout` value, alternating over the repeats; each value's best run, and its speed-up over
    the first value."""
    from clip_trainer.patch_dropout import PatchDropout

    values = options.patch_dropouts
    flops: dict[float, float] = {}
    for value in values:
        # Counted in training mode with the patches dropped: the FLOPs the trainer runs at this value.
        model = setup.build_model().to(setup.device).train()
        if value:
            PatchDropout(value).attach(model)
        batch = device_batch(setup, min(4, setup.batch_size))
        flops[value] = training_flops_per_sample(model, batch, train_batch_size=setup.batch_size)
        del model
        release()
    runs: dict[float, list[float]] = {value: [] for value in values}
    best: dict[float, dict[str, float]] = {}
    for repeat in range(options.repeats):
        for value in values:
            started = time.perf_counter()
            result = run_clip_trainer(setup, patch_dropout=value)
            release()
            result["mfu"] = mfu(result["samples_per_second"], flops[value], peak)
            runs[value].append(result["samples_per_second"])
            if value not in best or result["samples_per_second"] > best[value]["samples_per_second"]:
                best[value] = result
            print(
                f"(a) patch_dropout {value:g}: {result['samples_per_second']:.1f} samples/s "
                f"({result['samples_per_second_from_median']:.1f} from the median step), {flops[value] / 1e9:.3f} "
                f"GFLOP per pair, data wait {result['data_wait_share']:.1%} "
                f"[run {repeat + 1}/{options.repeats}, {time.perf_counter() - started:.0f} s]",
                flush=True,
            )
    base = values[0]
    speedup = {value: best[value]["samples_per_second"] / best[base]["samples_per_second"] for value in values}
    # On a loaded machine the best runs can come from different bursts of load: the medians' ratio is printed too.
    medians = {value: statistics.median(runs[value]) for value in values}
    median_speedup = {value: medians[value] / medians[base] for value in values}
    print(f"speed-up over patch_dropout {base:g}, best run of each / median of the runs:")
    for value in values:
        print(
            f"  {value:g}: {best[value]['samples_per_second']:.1f} samples/s, x{speedup[value]:.2f} / "
            f"{medians[value]:.1f} samples/s, x{median_speedup[value]:.2f}"
        )
    summary = {
        **run_settings(setup),
        "repeats": options.repeats,
        "timing": "pairs / wall time of the timed steps, data waits included; best of the repeats",
        "patch_dropout": values,
        "samples_per_second": {str(value): best[value]["samples_per_second"] for value in values},
        "samples_per_second_runs": {str(value): runs[value] for value in values},
        "speedup": {str(value): speedup[value] for value in values},
        "samples_per_second_median": {str(value): medians[value] for value in values},
        "speedup_median": {str(value): median_speedup[value] for value in values},
        "flops_per_sample": {str(value): flops[value] for value in values},
        "mfu": {str(value): best[value]["mfu"] for value in values},
        "data_wait_share": {str(value): best[value]["data_wait_share"] for value in values},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
